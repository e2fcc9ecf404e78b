//! Logs: JSON lines with `LOG_FORMAT=json`, one `audit` line per token handed out, one `access`
//! line per request at DEBUG, spans with route, request id and caller.

use std::process::Command;

use serde_json::Value;
use wiremock::MockServer;

use crate::helpers::*;
use crate::process::{BIN, spawn};

/// The first 16 hex digits of the SHA-256 of `token`: how the audit trail names it.
fn token_sha256(token: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))[..16].to_owned()
}

/// Starts the broker with JSON logs at `rust_log` and `extra` appended to the base config.
fn json_broker(
    idp: &str,
    rust_log: &str,
    extra: &str,
) -> (crate::process::Running, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, format!("{}\n{extra}", base_config(idp))).unwrap();
    let server = spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", rust_log),
        false,
    );
    let url = listening_url(&server.wait_for(r#""message":"listening""#));
    (server, url, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_writes_misses_first_hand_outs_and_refusals_and_counts_the_rest() {
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let (server, url, _dir) = json_broker(&idp.uri(), "info,access=debug", "");
    let http = reqwest::Client::new();
    let get = |path: &str, key: Option<&str>| {
        let mut request = http
            .get(format!("{url}{path}"))
            .header("x-request-id", path);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let mut requests = vec![
        ("/v1/tokens/acme/production", Some(BILLING_KEY), 200),
        (
            "/v1/tokens/acme/production?scope=read",
            Some(BILLING_KEY),
            200,
        ),
    ];
    // Three more hits for billing and two for reports: counted, not written one by one.
    requests.extend([("/v1/tokens/acme/production", Some(BILLING_KEY), 200); 3]);
    requests.extend([("/v1/tokens/acme/production", Some(REPORTS_KEY), 200); 2]);
    requests.extend([
        ("/v1/tokens/acme/production", Some("tbk_wrong"), 401),
        ("/v1/tokens/other/production", Some(BILLING_KEY), 403),
        ("/livez", None, 200),
        ("/readyz", None, 200),
        ("/metrics", None, 200),
    ]);
    for (path, key, status) in requests {
        assert_eq!(get(path, key).await.unwrap().status(), status, "{path}");
    }
    // Shutdown writes the counts gathered since the last summary.
    let (status, lines) = server.terminate();
    assert!(status.success());
    for line in &lines {
        assert!(
            !line.contains("token-1") && !line.contains("token-2"),
            "{line}"
        );
    }

    let lines: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let audit = |message: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["target"] == "audit" && l["message"] == message)
            .collect()
    };
    let handed: Vec<(&str, &str, &str, String)> = audit("token handed out")
        .iter()
        .map(|l| {
            (
                l["caller"].as_str().unwrap(),
                l["scope"].as_str().unwrap(),
                l["cache"].as_str().unwrap(),
                l["token_sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        handed,
        [
            ("billing", "", "miss", token_sha256("token-1")),
            ("billing", "read", "miss", token_sha256("token-2")),
            ("reports", "", "hit", token_sha256("token-1")),
        ]
    );
    let counted: Vec<(&str, u64, String)> = audit("tokens handed out from the cache")
        .iter()
        .map(|l| {
            (
                l["caller"].as_str().unwrap(),
                l["count"].as_u64().unwrap(),
                l["token_sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut counted = counted;
    counted.sort();
    assert_eq!(
        counted,
        [
            ("billing", 3, token_sha256("token-1")),
            ("reports", 1, token_sha256("token-1")),
        ]
    );
    for line in audit("token handed out") {
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["tenant"], "acme");
        assert_eq!(line["environment"], "production");
        assert_eq!(line["audience"], ACME_AUDIENCE);
        assert!(line.get("access_token").is_none());
        assert!(line.get("jti").is_none(), "opaque tokens have no jti");
        assert_eq!(line["span"]["route"], "/v1/tokens/{tenant}/{environment}");
        assert_eq!(line["span"]["caller"], line["caller"]);
        assert!(
            line["span"]["request_id"]
                .as_str()
                .unwrap()
                .starts_with("/v1/tokens/acme/production")
        );
    }
    let refused: Vec<(Option<&str>, u64)> = audit("request refused")
        .iter()
        .map(|l| (l["caller"].as_str(), l["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(refused, [(None, 401), (Some("billing"), 403)]);

    let access = |request_id: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["target"] == "access" && l["span"]["request_id"] == request_id)
            .unwrap_or_else(|| panic!("no access line for {request_id}"))
    };
    for probe in ["/livez", "/readyz", "/metrics"] {
        assert_eq!(access(probe)["level"], "DEBUG", "{probe}");
        assert_eq!(access(probe)["status"], 200);
    }
    let served = access("/v1/tokens/acme/production?scope=read");
    assert_eq!(served["level"], "DEBUG");
    assert_eq!(served["status"], 200);
    assert_eq!(served["span"]["method"], "GET");
    assert!(served["took_ms"].as_f64().is_some());
    let refused = lines
        .iter()
        .find(|l| l["target"] == "access" && l["status"] == 401)
        .expect("an access line for the 401");
    assert_eq!(refused["level"], "DEBUG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counted_hand_outs_are_summarised_every_audit_interval_and_name_the_jti() {
    use base64::Engine as _;
    let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    let jwt = format!(
        "{}.{}.c2lnbmF0dXJl",
        encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        encode(r#"{"jti":"jti-7f3a","sub":"billing@clients"}"#)
    );
    let idp = MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(
            wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "access_token": jwt, "token_type": "Bearer", "expires_in": 3600,
            })),
        )
        .mount(&idp)
        .await;
    let (server, url, _dir) =
        json_broker(&idp.uri(), "info", "[telemetry]\naudit_interval = \"1s\"\n");
    let http = reqwest::Client::new();
    for _ in 0..4 {
        let got = http
            .get(format!("{url}/v1/tokens/acme/production"))
            .bearer_auth(BILLING_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), 200);
    }
    // Written by the interval, not by shutdown: the broker is still running.
    let summary: Value =
        serde_json::from_str(&server.wait_for("tokens handed out from the cache")).unwrap();
    assert_eq!(summary["count"], 3);
    assert_eq!(summary["caller"], "billing");
    assert_eq!(summary["jti"], "jti-7f3a");
    assert_eq!(summary["token_sha256"], token_sha256(&jwt));
    assert!(summary["since"].as_str().unwrap().ends_with('Z'));
    let (_, lines) = server.terminate();
    // Nothing new since that summary: shutdown adds no line for the token.
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("tokens handed out from the cache")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains(&jwt)));
    assert_eq!(idp_requests(&idp).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_line_of_a_delete_says_what_it_did() {
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    // A refetch interval, so that a DELETE right after a fetch marks the token.
    let toml = base_config(&idp.uri()).replace(
        "min_refetch_interval = \"0s\"",
        "min_refetch_interval = \"1h\"",
    );
    std::fs::write(&config, toml).unwrap();
    let server = spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info"),
        false,
    );
    let url = listening_url(&server.wait_for(r#""message":"listening""#));
    let http = reqwest::Client::new();
    let tokens = format!("{url}/v1/tokens/acme/production");
    let delete = |body: Option<&str>| {
        let request = http.delete(&tokens).bearer_auth(BILLING_KEY);
        match body {
            Some(body) => request
                .header("content-type", "application/json")
                .body(body.to_owned()),
            None => request,
        }
        .send()
    };
    assert_eq!(delete(None).await.unwrap().status(), 204);
    let got = http
        .get(&tokens)
        .bearer_auth(BILLING_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(
        delete(Some(r#"{"access_token":"not-the-one"}"#))
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        delete(Some(r#"{"access_token":"token-1"}"#))
            .await
            .unwrap()
            .status(),
        204
    );
    let (_, lines) = server.terminate();

    let outcomes: Vec<String> = lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "audit" && line["message"] == "forget requested")
        .map(|line| line["outcome"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(outcomes, ["nothing_cached", "not_matched", "marked"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_counting_a_callers_hand_outs_where_it_was() {
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let (server, url, _dir) = json_broker(&idp.uri(), "info", "");
    let http = reqwest::Client::new();
    let get = || {
        http.get(format!("{url}/v1/tokens/acme/production"))
            .bearer_auth(BILLING_KEY)
            .send()
    };
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(get().await.unwrap().status(), 200);
    let reloaded = http
        .post(format!("{url}/v1/admin/reload"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    assert_eq!(get().await.unwrap().status(), 200);
    let (_, lines) = server.terminate();
    let audit: Vec<Value> = lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "audit")
        .collect();
    let first: Vec<&Value> = audit
        .iter()
        .filter(|l| l["message"] == "token handed out")
        .collect();
    assert_eq!(first.len(), 1, "{audit:?}");
    let counted: u64 = audit
        .iter()
        .filter(|l| l["message"] == "tokens handed out from the cache")
        .map(|l| l["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 2, "{audit:?}");
}
