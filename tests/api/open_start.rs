//! Refusal to start open: no callers is an error unless `auth.allow_anonymous = true`, which is
//! then served as caller `anonymous` with a warning at start.

use std::process::Command;

use token_broker::config::{ConfigError, Settings};
use wiremock::MockServer;

use crate::helpers::*;
use crate::process::{BIN, spawn};

fn without_callers(idp: &str, extra: &str) -> String {
    format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        {extra}
        [tenants.acme.environments.production]
        token_url = "{idp}/acme/oauth/token"
        client_id = "acme-production-id"
        client_secret = "{ACME_PRODUCTION_SECRET}"
        audience = "{ACME_AUDIENCE}"
        "#
    )
}

#[test]
fn no_callers_is_refused_with_the_way_out_named() {
    let Err(ConfigError::Invalid(problems)) =
        Settings::from_toml(&without_callers("http://127.0.0.1:9", ""), &|_| None)
    else {
        panic!("a configuration without callers was accepted");
    };
    assert!(
        problems
            .iter()
            .any(|p| p.contains("auth.allow_anonymous = true")),
        "{problems:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("open.toml");
    std::fs::write(&file, without_callers("http://127.0.0.1:9", "")).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started without callers");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("allow_anonymous"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_anonymous_serves_without_a_key_and_warns_at_start() {
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecar.toml");
    let config = without_callers(&idp.uri(), "[auth]\nallow_anonymous = true\n");
    std::fs::write(&file, config).unwrap();
    let server = spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&file)
            .env("RUST_LOG", "info"),
        false,
    );
    server.wait_for("allow_anonymous is on");
    let url = listening_url(&server.wait_for("listening address="));
    let response = reqwest::get(format!("{url}/v1/tokens/acme/production"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, _) = server.terminate();
    assert!(status.success(), "{status:?}");
}
