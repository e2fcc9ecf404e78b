//! The broker rotates a client secret itself (`[...rotation]`, `POST .../rotate-secret`): one
//! call to the IdP's rotation endpoint however many ask and on however many replicas, the new
//! secret used by every replica (and by one started later) for every new key, no token request
//! failing meanwhile, the old secret kept when the rotation fails, the secret file without a
//! shared level, a manual rotation never fought, and the authorising environment's tokens
//! never handed to a caller.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::*;

/// The management client's secret and the prefix of its tokens.
const MANAGEMENT_SECRET: &str = "management-secret";
const MANAGEMENT_TOKEN: &str = "management-token-";
/// The Management API's audience, the authorising environment's.
const MANAGEMENT_AUDIENCE: &str = "https://acme.example/api/v2/";

/// An IdP whose acme/production client accepts only its current secret, which the Management
/// API (`POST /api/v2/clients/acme-production-id/rotate-secret`, with a management token)
/// replaces with `rotated-secret-N`, the old one refused at once.
#[derive(Clone)]
pub(crate) struct RotatingIdp {
    secret: Arc<Mutex<String>>,
    rotations: Arc<AtomicU64>,
    issued: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    /// What the rotation endpoint answers instead of rotating, for the failure tests.
    failing: Arc<Mutex<Option<ResponseTemplate>>>,
}

impl RotatingIdp {
    pub(crate) async fn mount(idp: &MockServer) -> Self {
        let this = Self {
            secret: Arc::new(Mutex::new(ACME_PRODUCTION_SECRET.to_owned())),
            rotations: Arc::new(AtomicU64::new(0)),
            issued: Arc::new(AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
            failing: Arc::new(Mutex::new(None)),
        };
        Mock::given(method("POST"))
            .and(path("/acme/oauth/token"))
            .respond_with(TokenEndpoint(this.clone()))
            .mount(idp)
            .await;
        Mock::given(method("POST"))
            .and(path("/api/v2/clients/acme-production-id/rotate-secret"))
            .respond_with(RotateEndpoint(this.clone()))
            .mount(idp)
            .await;
        this
    }

    fn secret(&self) -> String {
        self.secret.lock().unwrap().clone()
    }

    fn set_secret(&self, secret: &str) {
        *self.secret.lock().unwrap() = secret.to_owned();
    }

    pub(crate) fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::SeqCst)
    }

    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    fn fail_with(&self, answer: Option<ResponseTemplate>) {
        *self.failing.lock().unwrap() = answer;
    }
}

struct TokenEndpoint(RotatingIdp);

impl Respond for TokenEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let field = |name: &str| body[name].as_str().unwrap_or_default().to_owned();
        let n = self.0.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let token = match (field("client_id").as_str(), field("client_secret")) {
            ("acme-mgmt-id", secret) if secret == MANAGEMENT_SECRET => {
                format!("{MANAGEMENT_TOKEN}{n}")
            }
            ("acme-production-id", secret) if secret == self.0.secret() => format!("token-{n}"),
            _ => {
                self.0.refused.fetch_add(1, Ordering::SeqCst);
                return ResponseTemplate::new(401).set_body_json(json!({
                    "error": "access_denied", "error_description": "Unauthorized",
                }));
            }
        };
        ResponseTemplate::new(200).set_body_json(json!({
            "access_token": token, "token_type": "Bearer", "expires_in": 3600,
        }))
    }
}

struct RotateEndpoint(RotatingIdp);

impl Respond for RotateEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if let Some(answer) = self.0.failing.lock().unwrap().clone() {
            return answer;
        }
        let bearer = request
            .headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !bearer.starts_with(&format!("Bearer {MANAGEMENT_TOKEN}")) {
            return ResponseTemplate::new(401).set_body_json(json!({
                "statusCode": 401, "error": "Unauthorized", "message": "Invalid token",
            }));
        }
        let n = self.0.rotations.fetch_add(1, Ordering::SeqCst) + 1;
        let secret = format!("rotated-secret-{n}");
        self.0.set_secret(&secret);
        // Long enough for a second request to arrive while the first is under way.
        ResponseTemplate::new(200)
            .set_body_json(json!({ "client_id": "acme-production-id", "client_secret": secret }))
            .set_delay(Duration::from_millis(300))
    }
}

/// The management environment, and the rotation of acme/production it authorises.
pub(crate) fn rotation_config(idp: &str, extra: &str) -> String {
    format!(
        r#"
        [tenants.acme.environments.management]
        token_url = "{idp}/acme/oauth/token"
        client_id = "acme-mgmt-id"
        client_secret = "{MANAGEMENT_SECRET}"
        audience = "{MANAGEMENT_AUDIENCE}"

        [tenants.acme.environments.production.rotation]
        endpoint = "{idp}/api/v2/clients/{{client_id}}/rotate-secret"
        authorized_by = "acme/management"
        {extra}
        "#
    )
}

pub(crate) async fn rotate(app: &TestApp) -> Answer {
    rotate_environment(app, "production").await
}

/// `POST …/rotate-secret` of acme/`environment` with the admin key.
async fn rotate_environment(app: &TestApp, environment: &str) -> Answer {
    let url = format!(
        "{}/v1/admin/tenants/acme/environments/{environment}/rotate-secret",
        app.url
    );
    let response = app
        .http
        .post(url)
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    answer(response).await
}

/// The secret of every token request the IdP received for acme/production, in order.
async fn production_secrets(app: &TestApp) -> Vec<String> {
    app.idp_requests()
        .await
        .to("acme")
        .requests()
        .iter()
        .filter_map(|request| {
            let body: Value = serde_json::from_slice(&request.body).ok()?;
            (body["client_id"] == "acme-production-id").then(|| {
                body["client_secret"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_make_one_rotation_and_every_replica_uses_the_new_secret() {
    let redis = RedisServer::start().await;
    let idp = Arc::new(MockServer::start().await);
    let rotating = RotatingIdp::mount(&idp).await;
    let layer = rotation_config(&idp.uri(), "");
    let builder = TestApp::init()
        .with_config(layer)
        .with_idp(Arc::clone(&idp))
        .with_redis(&redis);
    let fleet = builder.clone().start_fleet(2).await;
    assert_eq!(fleet[0].billing("acme/production").await.status, 200);

    // Load on both replicas throughout: cached keys and new ones.
    let load = Load::start(&fleet, 5, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (first, second) = tokio::join!(rotate(&fleet[0]), rotate(&fleet[1]));
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(
        rotating.rotations(),
        1,
        "two requests at once make one rotation"
    );
    assert_eq!(first.body["fingerprint"], second.body["fingerprint"]);
    assert!(
        !first.body.to_string().contains("rotated-secret"),
        "never the secret"
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    load.finish("during and after the rotation").await;

    // Both replicas fetch new keys with the new secret, the first time.
    let refused = rotating.refused();
    for (n, replica) in fleet.iter().enumerate() {
        let answer = replica
            .billing(&format!("acme/production?scope=after-{n}"))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    assert_eq!(
        rotating.refused(),
        refused,
        "no request with the old secret"
    );
    let secrets = production_secrets(&fleet[0]).await;
    assert_eq!(secrets.last().map(String::as_str), Some("rotated-secret-1"));
    let scraped = fleet[1].scrape().await;
    assert!(
        metric(
            &scraped,
            "token_broker_client_secret_rotated_timestamp_seconds{tenant=\"acme\",environment=\"production\"}"
        )
        .is_some_and(|at| at > 0.0),
        "{scraped}"
    );

    // A replica started afterwards reads the rotated secret before it uses the configured one.
    let third = builder.start().await;
    let answer = third.billing("acme/production?scope=third").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        rotating.refused(),
        refused,
        "the third replica never used the old secret"
    );
    assert_eq!(rotating.rotations(), 1);
}

#[tokio::test]
async fn without_a_shared_cache_the_rotated_secret_is_kept_in_its_file_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rotated.secret");
    let idp = Arc::new(MockServer::start().await);
    let rotating = RotatingIdp::mount(&idp).await;
    let layer = rotation_config(&idp.uri(), &format!("secret_file = \"{}\"", file.display()));
    let builder = TestApp::init()
        .with_config(layer)
        .with_idp(Arc::clone(&idp));
    let app = builder.clone().start().await;
    assert_eq!(app.billing("acme/production").await.status, 200);
    let rotated = rotate(&app).await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        rotating.secret()
    );
    // Cached tokens keep serving: a rotation revokes nothing.
    let cached = app.billing("acme/production").await;
    assert_eq!(cached.header("x-cache"), Some("hit"));
    // The operators' view: which secret is in force, by fingerprint, and whose tokens are the
    // broker's own.
    let tenants = app.get("/v1/admin/tenants", Some(ADMIN_KEY)).await;
    let acme = &tenants.body["tenants"][0];
    let environment = |name: &str| {
        acme["environments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()
            .clone()
    };
    let production = environment("production");
    assert_eq!(
        production["rotation"]["fingerprint"],
        rotated.body["fingerprint"]
    );
    assert_eq!(production["rotation"]["authorized_by"], "acme/management");
    assert_eq!(environment("management")["broker_own"], true);
    assert!(!tenants.body.to_string().contains("rotated-secret"));
    drop(app);

    let restarted = builder.start().await;
    let refused = rotating.refused();
    let answer = restarted
        .billing("acme/production?scope=after-restart")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        rotating.refused(),
        refused,
        "the rotated secret, first time"
    );
}

#[tokio::test]
async fn a_failed_rotation_keeps_the_old_secret_and_says_why() {
    let idp = Arc::new(MockServer::start().await);
    let rotating = RotatingIdp::mount(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("secret_file = \"{}\"", dir.path().join("s").display());
    let layer = rotation_config(&idp.uri(), &extra)
        + "\n[tenants.acme.environments.production]\ntimeout = \"1s\"\n";
    let app = TestApp::init()
        .with_config(layer)
        .with_idp(Arc::clone(&idp))
        .start()
        .await;
    let cases = [
        (
            ResponseTemplate::new(500),
            503,
            "upstream_unavailable",
            "HTTP 500",
        ),
        (
            ResponseTemplate::new(200).set_delay(Duration::from_secs(3)),
            503,
            "upstream_unavailable",
            "did not answer",
        ),
        (
            ResponseTemplate::new(200).set_body_json(json!({ "client_id": "acme-production-id" })),
            502,
            "upstream_rejected",
            "no client_secret",
        ),
        (
            ResponseTemplate::new(200).set_body_string("x".repeat(200_000)),
            502,
            "upstream_rejected",
            "max_response_bytes",
        ),
        (
            ResponseTemplate::new(403).set_body_json(json!({ "error": "insufficient_scope" })),
            502,
            "upstream_rejected",
            "insufficient_scope",
        ),
    ];
    for (n, (failure, status, code, why)) in cases.into_iter().enumerate() {
        rotating.fail_with(Some(failure));
        let answer = rotate(&app).await;
        assert_eq!(answer.status, status, "{}", answer.body);
        assert_eq!(answer.body["error"], code);
        let description = answer.body["error_description"].to_string();
        assert!(description.contains(why), "{description}");
        assert!(
            description.contains("old secret stays in use"),
            "{description}"
        );
        let next = app
            .billing(&format!("acme/production?scope=after-{n}"))
            .await;
        assert_eq!(
            next.status, 200,
            "the old secret still works: {}",
            next.body
        );
    }
    assert_eq!(rotating.secret(), ACME_PRODUCTION_SECRET);
    assert_eq!(rotating.refused(), 0);
    let scraped = app.scrape().await;
    assert_eq!(
        metric(
            &scraped,
            "token_broker_client_secret_rotations_total{tenant=\"acme\",environment=\"production\",outcome=\"failed\"}"
        ),
        Some(5.0),
        "{scraped}"
    );

    // An environment without a rotation table: 409.
    let answer = rotate_environment(&app, "staging").await;
    assert_eq!(answer.status, 409, "{}", answer.body);
    assert_eq!(answer.body["error"], "rotation_not_configured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rotated_by_hand_is_not_fought_by_the_fleet_nor_by_the_schedule() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rotated.secret");
    let idp = Arc::new(MockServer::start().await);
    let rotating = RotatingIdp::mount(&idp).await;
    let config_file = dir.path().join("broker.toml");
    let write_config = |secret: &str| {
        let extra = format!("secret_file = \"{}\"\nevery = \"1h\"", file.display());
        let config = base_config(&idp.uri()).replace(ACME_PRODUCTION_SECRET, secret)
            + &rotation_config(&idp.uri(), &extra)
            + &shared_cache_config(&redis);
        std::fs::write(&config_file, config).unwrap();
    };
    write_config(ACME_PRODUCTION_SECRET);
    let fleet = TestApp::init()
        .with_file(&config_file)
        .with_idp(Arc::clone(&idp))
        .start_fleet(2)
        .await;
    for replica in &fleet {
        replica.wait_for_shared_cache(true).await;
    }
    assert_eq!(rotate(&fleet[0]).await.status, 200);
    assert_eq!(rotating.rotations(), 1);
    // Some time later (past the settling of a rotation at the IdP), someone rotates at the IdP
    // by hand and puts the new secret in the configuration of every replica.
    fleet[0].clock.advance(Duration::from_secs(600));
    rotating.set_secret("manual-secret");
    write_config("manual-secret");
    for replica in &fleet {
        let reload = replica
            .http
            .post(format!("{}/v1/admin/reload", replica.url))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(reload.status(), 200);
    }
    let answer = fleet[0].billing("acme/production?scope=after-manual").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        rotating.refused(),
        1,
        "the rotated secret once, then the configured one"
    );
    assert!(!file.exists(), "the broker's rotated secret is dropped");

    // The other replica drops it too, on the announcement: the configured secret first.
    eventually("the other replica dropped the rotated secret", async || {
        let tenants = fleet[1].get("/v1/admin/tenants", Some(ADMIN_KEY)).await;
        let acme = &tenants.body["tenants"][0]["environments"];
        acme.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "production" && e["rotation"]["fingerprint"].is_null())
    })
    .await;
    let answer = fleet[1].billing("acme/production?scope=next").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        rotating.refused(),
        1,
        "no replica goes back to the dropped secret"
    );

    // The schedule counts from the manual rotation: nothing within the hour after it.
    for _ in 0..5 {
        fleet[0].clock.advance(Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rotating.rotations(),
        1,
        "a manual rotation is not rotated over at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_the_rotated_secret_gets_it_back_from_the_replicas() {
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    let idp = Arc::new(MockServer::start().await);
    let rotating = RotatingIdp::mount(&idp).await;
    let app = TestApp::init()
        .with_config(rotation_config(&idp.uri(), ""))
        .with_idp(Arc::clone(&idp))
        .with_redis(&redis)
        .start()
        .await;
    assert_eq!(rotate(&app).await.status, 200);
    // Redis restarts empty (no persistence); the replica resubscribes and stores its secret
    // again, so that a replica starting now does not fall back to the configured secret.
    redis.kill();
    app.wait_for_shared_cache(false).await;
    let redis = RedisServer::start_on(port).await;
    app.wait_for_shared_cache(true).await;
    let mut connection = redis.connection().await;
    eventually("the secret stored again", async || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*secret:*")
            .query_async(&mut connection)
            .await
            .unwrap();
        keys.len() == 1
    })
    .await;
    let later = TestApp::init()
        .with_config(rotation_config(&idp.uri(), ""))
        .with_idp(Arc::clone(&idp))
        .with_redis(&redis)
        .start()
        .await;
    let answer = later.billing("acme/production?scope=later").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(rotating.refused(), 0, "the rotated secret, first time");
}

#[tokio::test]
async fn the_authorising_environment_s_tokens_are_the_broker_s_own() {
    let idp = Arc::new(MockServer::start().await);
    RotatingIdp::mount(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("secret_file = \"{}\"", dir.path().join("s").display());
    let app = TestApp::init()
        .with_config(rotation_config(&idp.uri(), &extra))
        .with_idp(Arc::clone(&idp))
        .start()
        .await;
    // billing may use acme/*, which names the management environment too.
    let refused = app.billing("acme/management").await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.body.to_string().contains("broker's own"),
        "{}",
        refused.body
    );
    let facade = app
        .http
        .post(format!("{}/t/acme/management/oauth/token", app.url))
        .basic_auth("billing", Some(BILLING_KEY))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    let facade = answer(facade).await;
    assert_eq!(facade.status, 403, "{}", facade.body);
    assert_eq!(facade.body["error"], "access_denied");
    assert!(
        !app.idp_requests()
            .await
            .requests()
            .iter()
            .any(|request| String::from_utf8_lossy(&request.body).contains("acme-mgmt-id")),
        "no management token was fetched for a caller"
    );
}

#[tokio::test]
async fn a_scheduled_rotation_happens_every_period_by_the_broker_s_clock() {
    let idp = Arc::new(MockServer::start().await);
    let rotating = RotatingIdp::mount(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "secret_file = \"{}\"\nevery = \"1h\"",
        dir.path().join("s").display()
    );
    let app = TestApp::init()
        .with_config(rotation_config(&idp.uri(), &extra))
        .with_idp(Arc::clone(&idp))
        .start()
        .await;
    // The schedule is checked every minute of the broker's clock; a minute at a time.
    let minutes = async |until: u64| {
        eventually("a scheduled rotation", async || {
            app.clock.advance(Duration::from_secs(60));
            rotating.rotations() == until
        })
        .await;
    };
    // Never rotated by the broker (its age unknown): rotated at the first check.
    minutes(1).await;
    app.clock.advance(Duration::from_secs(30 * 60));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rotating.rotations(), 1, "not before the period");
    app.clock.advance(Duration::from_secs(29 * 60));
    minutes(2).await;
    let answer = app.billing("acme/production?scope=after").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let scraped = app.scrape().await;
    assert!(
        metric(
            &scraped,
            "token_broker_client_secret_rotation_due_timestamp_seconds{tenant=\"acme\",environment=\"production\"}"
        )
        .is_some(),
        "{scraped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_is_resealed_with_a_new_encryption_key_so_the_old_one_can_go() {
    let redis = RedisServer::start().await;
    let idp = Arc::new(MockServer::start().await);
    let rotating = RotatingIdp::mount(&idp).await;
    let first = TestApp::init()
        .with_config(rotation_config(&idp.uri(), ""))
        .with_idp(Arc::clone(&idp))
        .with_redis(&redis)
        .start()
        .await;
    assert_eq!(rotate(&first).await.status, 200);
    drop(first);
    // The encryption key changes: a replica with the new key reads the secret with the
    // previous one and seals it again with the new.
    let new_key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let keys = |previous: bool| {
        let previous = if previous {
            format!("previous_encryption_key_env = \"{CACHE_KEY_ENV}\"")
        } else {
            String::new()
        };
        format!("[shared_cache]\nencryption_key_env = \"NEW_CACHE_KEY\"\n{previous}\n")
    };
    let during = TestApp::init()
        .with_config(rotation_config(&idp.uri(), ""))
        .with_idp(Arc::clone(&idp))
        .with_redis(&redis)
        .with_config(keys(true))
        .with_env("NEW_CACHE_KEY", new_key.clone())
        .start()
        .await;
    let answer = during.billing("acme/production?scope=during").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    drop(during);
    // The previous key retired: the secret still reads.
    let after = TestApp::init()
        .with_config(rotation_config(&idp.uri(), ""))
        .with_idp(Arc::clone(&idp))
        .with_redis(&redis)
        .with_config(keys(false))
        .with_env("NEW_CACHE_KEY", new_key)
        .start()
        .await;
    let answer = after.billing("acme/production?scope=after").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(rotating.refused(), 0, "the rotated secret at every step");
    assert_eq!(rotating.rotations(), 1);
}
