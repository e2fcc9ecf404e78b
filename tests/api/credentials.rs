//! A client secret that changes under the broker: the IdP refusing the client makes the broker
//! read the secret's file again, then try the environment's fallback secret, once each, within
//! the same fetch, so callers see no failure while a rotation is under way.

use serde_json::json;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

/// An IdP for acme/production that accepts only `secret` (any other: 401 invalid_client).
async fn accepting_only(idp: &MockServer, secret: &str) {
    idp.reset().await;
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .and(body_string_contains(secret))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "accepted-token", "token_type": "Bearer", "expires_in": 3600,
        })))
        .mount(idp)
        .await;
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({
            "error": "invalid_client", "error_description": "Unauthorized",
        })))
        .mount(idp)
        .await;
}

#[tokio::test]
async fn a_secret_file_rewritten_by_a_symlink_swap_is_read_again_when_the_idp_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, link) = (
        dir.path().join("old"),
        dir.path().join("new"),
        dir.path().join("secret"),
    );
    std::fs::write(&old, "the-old-secret\n").unwrap();
    std::fs::write(&new, "the-new-secret\n").unwrap();
    std::os::unix::fs::symlink(&old, &link).unwrap();
    let idp = MockServer::start().await;
    let config = base_config(&idp.uri()).replace(
        &format!("client_secret = \"{ACME_PRODUCTION_SECRET}\""),
        &format!("client_secret_file = \"{}\"", link.display()),
    );
    let app = TestApp::init()
        .with_toml(config)
        .with_idp(idp)
        .start()
        .await;
    accepting_only(&app.idp, "the-old-secret").await;
    assert_eq!(app.billing("acme/production").await.status, 200);

    // Kubernetes swaps a mounted Secret through a symlink; the IdP accepts only the new one.
    let swapped = dir.path().join("swapped");
    std::os::unix::fs::symlink(&new, &swapped).unwrap();
    std::fs::rename(&swapped, &link).unwrap();
    accepting_only(&app.idp, "the-new-secret").await;
    let next = app.billing("acme/production?scope=new-key").await;
    assert_eq!(next.status, 200, "{}", next.body);
    let requests = app.idp_requests().await.to("acme");
    assert_eq!(
        requests.len(),
        2,
        "one refused with the old secret, one accepted"
    );
    assert!(
        metric(
            &app.scrape().await,
            "token_broker_client_credential_fallbacks_total"
        )
        .is_none(),
        "the configured source served: no fallback"
    );
}

#[tokio::test]
async fn the_fallback_secret_is_tried_once_when_the_idp_refuses_the_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let fallback = dir.path().join("fallback");
    std::fs::write(&fallback, "the-fallback-secret").unwrap();
    let app = TestApp::init()
        .with_config(format!(
            "[tenants.acme.environments.production]\nfallback_client_secret_file = \"{}\"\n",
            fallback.display()
        ))
        .start()
        .await;
    accepting_only(&app.idp, "the-fallback-secret").await;
    let answer = app.billing("acme/production").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
    assert_eq!(
        metric(
            &app.scrape().await,
            r#"token_broker_client_credential_fallbacks_total{tenant="acme",environment="production"}"#
        ),
        Some(1.0)
    );

    // An IdP that refuses both: one request each, and the refusal as ever.
    accepting_only(&app.idp, "a-secret-nobody-has").await;
    let refused = app.billing("acme/production?scope=other").await;
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
}
