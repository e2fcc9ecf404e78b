//! No client secret, caller key, admin or metrics key, access or refresh token, user handle or
//! state reaches a log line (even at DEBUG, as JSON), the metrics, or an admin answer, whatever
//! traffic went before, user sessions in the shared cache included.

use std::process::Command;

use serde_json::json;
use token_broker::auth::KeyHash;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::process::{BIN, spawn};
use crate::workload::{POD, Signer, TestIssuer, workload_config};

const METRICS_KEY: &str = "tbk_test-metrics-key";
const ACCESS_TOKEN: &str = "eyJhbGciOiJub25lIn0.very-secret-access-token.sig";
/// The broker's own token for fetching workload keys (`bearer_token_file`).
const KEYS_BEARER_TOKEN: &str = "very-secret-service-account-token";
/// The refresh token of user sessions.
const REFRESH_TOKEN: &str = "very-secret-refresh-token";
/// The client secret a rotation of globex/production receives.
const ROTATED_SECRET: &str = "very-secret-rotated-client-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_keys_and_tokens_stay_out_of_logs_metrics_and_admin_answers() {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-ratelimit-remaining", "99")
                .set_body_json(json!({
                    "access_token": ACCESS_TOKEN,
                    "expires_in": 3600,
                    "refresh_token": REFRESH_TOKEN,
                })),
        )
        .mount(&idp)
        .await;
    Mock::given(method("POST"))
        .and(path("/acme-staging/oauth/token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({
            "error": "access_denied",
            "error_description": format!("bad secret {ACME_STAGING_SECRET}"),
        })))
        .mount(&idp)
        .await;
    let signer = Signer::rsa("k1", jsonwebtoken::Algorithm::RS256);
    let issuer = TestIssuer::start(&[&signer]).await;
    let workload_token = signer.sign(&issuer.claims(POD));
    let mut forged = issuer.claims(POD);
    forged["sub"] = json!("system:serviceaccount:other:app");
    let refused_token = signer.sign(&forged);
    let dir = tempfile::tempdir().unwrap();
    let bearer_file = dir.path().join("token");
    std::fs::write(&bearer_file, KEYS_BEARER_TOKEN).unwrap();
    // Only the `pods` caller: `billing` is in the base configuration already (one file).
    let workload = workload_config(&issuer.uri(), "30s");
    let workload = workload
        .replace(
            &format!("issuer = \"{}\"\n\n", issuer.uri()),
            &format!(
                "issuer = \"{}\"\nbearer_token_file = \"{}\"\n\n",
                issuer.uri(),
                bearer_file.display()
            ),
        )
        .split("[callers.billing]")
        .next()
        .unwrap()
        .to_owned()
        + "[callers.pods]"
        + workload.split("[callers.pods]").nth(1).unwrap();
    assert!(workload.contains("bearer_token_file"));
    let config = dir.path().join("broker.toml");
    let toml = base_config(&idp.uri())
        .replace(
            "[auth]\n",
            &format!(
                "[auth]\nmetrics_key_sha256 = \"{}\"\n",
                KeyHash::of(METRICS_KEY).to_hex()
            ),
        )
        .replace("[callers.reports]\n", "[callers.reports]\nrate_limit = 1\n")
        + &workload;
    // User tokens in acme/production, their sessions in Redis.
    let redis = RedisServer::start().await;
    let production_secret = format!("client_secret = \"{ACME_PRODUCTION_SECRET}\"\n");
    let toml = toml.replace(
        &production_secret,
        &format!(
            "{production_secret}authorize_url = \"{AUTHORIZE_URL}\"\nredirect_uri = \"{REDIRECT_URI}\"\n"
        ),
    ) + &shared_cache_config(&redis);
    // The broker rotates globex/production's secret, authorised by acme/management.
    let toml = toml
        + &format!(
            r#"
            [tenants.acme.environments.management]
            token_url = "{idp}/acme/oauth/token"
            client_id = "acme-mgmt-id"
            client_secret = "management-secret"
            audience = "https://acme.example/api/v2/"
            [tenants.globex.environments.production.rotation]
            endpoint = "{idp}/api/v2/clients/{{client_id}}/rotate-secret"
            authorized_by = "acme/management"
            "#,
            idp = idp.uri()
        );
    Mock::given(method("POST"))
        .and(path("/api/v2/clients/globex-id/rotate-secret"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"client_id": "globex-id", "client_secret": ROTATED_SECRET})),
        )
        .mount(&idp)
        .await;
    std::fs::write(&config, toml).unwrap();
    let server = spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env(CACHE_KEY_ENV, cache_key())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "debug"),
        false,
    );
    let url = listening_url(&server.wait_for(r#""message":"listening""#));
    let http = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, key: &str| {
        http.request(method, format!("{url}{path}"))
            .bearer_auth(key)
            .send()
    };
    let tokens = "/v1/tokens/acme/production";
    let mut answers = Vec::new();
    for (method, path, key, status) in [
        (reqwest::Method::GET, tokens, BILLING_KEY, 200),
        (reqwest::Method::GET, tokens, REPORTS_KEY, 200),
        (reqwest::Method::GET, tokens, REPORTS_KEY, 429),
        (reqwest::Method::GET, tokens, "tbk_a-wrong-key", 401),
        (
            reqwest::Method::GET,
            "/v1/tokens/acme/staging",
            BILLING_KEY,
            502,
        ),
        (reqwest::Method::GET, "/v1/admin/tenants", ADMIN_KEY, 200),
        (reqwest::Method::GET, "/v1/admin/cache", ADMIN_KEY, 200),
        (reqwest::Method::GET, "/v1/admin/cache", BILLING_KEY, 401),
        (reqwest::Method::GET, "/metrics", METRICS_KEY, 200),
        (reqwest::Method::GET, "/metrics", ADMIN_KEY, 401),
        (reqwest::Method::GET, tokens, &workload_token, 200),
        (reqwest::Method::GET, tokens, &refused_token, 401),
    ] {
        let response = send(method, path, key).await.unwrap();
        assert_eq!(response.status(), status, "{path} with a key");
        answers.push(response.text().await.unwrap());
    }
    assert!(
        answers[0].contains(ACCESS_TOKEN),
        "the caller gets its token"
    );
    assert!(
        answers[1].contains(ACCESS_TOKEN),
        "so does the other caller"
    );
    let compare_and_delete = http
        .delete(format!("{url}{tokens}"))
        .bearer_auth(BILLING_KEY)
        .header("content-type", "application/json")
        .body(json!({"access_token": ACCESS_TOKEN}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(compare_and_delete.status(), 204);

    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{url}{path}"))
            .bearer_auth(BILLING_KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let started = answer(
        post(
            "/v1/users/acme/production/authorize",
            json!({"scope": "offline_access"}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(started.status, 200, "{}", started.body);
    let state = started.body["state"].as_str().unwrap().to_owned();
    let created = answer(
        post(
            "/v1/users/acme/production/sessions",
            json!({"code": "a-code", "state": state}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let handle = created.body["handle"].as_str().unwrap().to_owned();
    let on_handle = |method: reqwest::Method, query: &str| {
        send(
            method,
            &format!("/v1/users/handles/{handle}{query}"),
            BILLING_KEY,
        )
    };
    for query in ["", "?min_ttl=3600"] {
        let token = answer(on_handle(reqwest::Method::GET, query).await.unwrap()).await;
        assert_eq!(
            (token.status, token.token()),
            (200, ACCESS_TOKEN),
            "{query}"
        );
    }
    let forgotten = on_handle(reqwest::Method::DELETE, "").await.unwrap();
    assert_eq!(forgotten.status(), 204);
    let gone = on_handle(reqwest::Method::GET, "").await.unwrap();
    assert_eq!(gone.status(), 404);

    assert_eq!(
        issuer.authorizations().await,
        vec![format!("Bearer {KEYS_BEARER_TOKEN}"); 2],
        "discovery and JWKS carry the broker's own token"
    );

    // A rotation: its answer, the metrics after it and the shared level never show the secret.
    let rotated = send(
        reqwest::Method::POST,
        "/v1/admin/tenants/globex/environments/production/rotate-secret",
        ADMIN_KEY,
    )
    .await
    .unwrap();
    assert_eq!(rotated.status(), 200);
    answers.push(rotated.text().await.unwrap());
    let metrics = send(reqwest::Method::GET, "/metrics", METRICS_KEY)
        .await
        .unwrap();
    answers.push(metrics.text().await.unwrap());
    assert!(
        answers
            .last()
            .unwrap()
            .contains("token_broker_client_secret_rotations_total"),
        "the rotation is counted"
    );
    let mut connection = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*secret:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "the rotated secret is in the shared level");
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&stored).contains(ROTATED_SECRET),
        "sealed"
    );

    let (status, lines) = server.terminate();
    assert!(status.success());
    let log = lines.join("\n");
    assert!(
        log.contains(r#""level":"DEBUG""#),
        "logs were at debug level"
    );
    assert!(log.contains("user session created"), "{log}");
    // The audit trail follows the session by a digest of its handle, never the handle.
    let session = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(handle.as_bytes()))[..16].to_owned()
    };
    for message in [
        "user session created",
        "token handed out",
        "user session forget requested",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(r#""target":"audit""#)
                && line.contains(message)
                && line.contains(&format!(r#""session":"{session}""#))),
            "no audit line {message:?} naming session {session}:\n{log}"
        );
    }
    assert!(log.contains("refreshed a user token"), "{log}");
    let leaks = [
        ACME_PRODUCTION_SECRET,
        ACME_STAGING_SECRET,
        GLOBEX_SECRET,
        BILLING_KEY,
        REPORTS_KEY,
        ADMIN_KEY,
        METRICS_KEY,
        "tbk_a-wrong-key",
        ACCESS_TOKEN,
        "very-secret-access-token",
        KEYS_BEARER_TOKEN,
        REFRESH_TOKEN,
        ROTATED_SECRET,
        "management-secret",
        &handle,
        &state,
        // The signatures: what makes a workload token a credential.
        workload_token.rsplit('.').next().unwrap(),
        refused_token.rsplit('.').next().unwrap(),
    ];
    for secret in leaks {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
    }
    // Token answers to callers are the one place a token belongs.
    for (index, answer) in answers.iter().enumerate().skip(2).filter(|(i, _)| *i != 10) {
        for secret in leaks {
            assert!(
                !answer.contains(secret),
                "{secret:?} in answer {index}:\n{answer}"
            );
        }
    }
    assert!(answers[5].contains("acme-production-id"), "{}", answers[5]);
    assert!(answers[6].contains("acme"), "{}", answers[6]);
    assert!(
        answers[8].contains("token_broker_idp_rate_limit_remaining"),
        "{}",
        answers[8]
    );
}
