//! Logs: JSON lines with `LOG_FORMAT=json`, one `audit` line per token handed out, one `access`
//! line per request at DEBUG, spans with route, request id and caller.

use std::process::Command;

use serde_json::Value;
use wiremock::MockServer;

use crate::helpers::*;
use crate::process::{BIN, spawn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_an_audit_line_per_token_and_access_lines_at_debug() {
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, base_config(&idp.uri())).unwrap();
    let server = spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info,access=debug"),
        false,
    );
    let url = listening_url(&server.wait_for(r#""message":"listening""#));
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
    for (path, key, status) in [
        ("/v1/tokens/acme/production", Some(BILLING_KEY), 200),
        (
            "/v1/tokens/acme/production?scope=read",
            Some(BILLING_KEY),
            200,
        ),
        ("/v1/tokens/acme/production", Some(REPORTS_KEY), 200),
        ("/v1/tokens/acme/production", Some("tbk_wrong"), 401),
        ("/livez", None, 200),
        ("/readyz", None, 200),
        ("/metrics", None, 200),
    ] {
        assert_eq!(get(path, key).await.unwrap().status(), status, "{path}");
    }
    let (status, lines) = server.terminate();
    assert!(status.success());

    let lines: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let audit: Vec<&Value> = lines.iter().filter(|l| l["target"] == "audit").collect();
    let summary: Vec<(&str, &str, &str)> = audit
        .iter()
        .map(|l| {
            (
                l["caller"].as_str().unwrap(),
                l["scope"].as_str().unwrap(),
                l["cache"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("billing", "", "miss"),
            ("billing", "read", "miss"),
            ("reports", "", "hit")
        ]
    );
    for line in &audit {
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["tenant"], "acme");
        assert_eq!(line["environment"], "production");
        assert_eq!(line["audience"], ACME_AUDIENCE);
        assert!(line.get("access_token").is_none());
        assert_eq!(line["span"]["route"], "/v1/tokens/{tenant}/{environment}");
        assert_eq!(line["span"]["caller"], line["caller"]);
        assert!(
            line["span"]["request_id"]
                .as_str()
                .unwrap()
                .starts_with("/v1/tokens/acme/production")
        );
    }

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
