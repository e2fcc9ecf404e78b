//! Token lifetimes: `expires_in` as a number or a string, else the JWT `exp`, else the default.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

async fn expires_in_for(idp_body: Value, extra: &str) -> u64 {
    let app = TestApp::init().with_config(extra).start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(idp_body))
        .mount(&app.idp)
        .await;
    let answer = app.billing("acme/production").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(app.idp_requests().await.len(), 1);
    let expires_at = answer.body["expires_at"].as_str().expect("expires_at");
    let expires_at = humantime::parse_rfc3339(expires_at).expect("RFC 3339");
    let expires_in = answer.body["expires_in"]
        .as_u64()
        .expect("integer expires_in");
    let left = expires_at
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs();
    assert!(left.abs_diff(expires_in) <= 1, "{expires_in} vs {left}");
    expires_in
}

fn in_range(value: u64, expected: u64) -> bool {
    (expected - 2..=expected).contains(&value)
}

#[tokio::test]
async fn expires_in_as_a_number() {
    let n = expires_in_for(json!({"access_token": "t", "expires_in": 7200}), "").await;
    assert!(in_range(n, 7200), "{n}");
}

#[tokio::test]
async fn expires_in_as_a_numeric_string() {
    let n = expires_in_for(json!({"access_token": "t", "expires_in": "3599"}), "").await;
    assert!(in_range(n, 3599), "{n}");
}

#[tokio::test]
async fn without_expires_in_the_jwt_exp_decides() {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1800;
    let jwt = format!(
        "{}.{}.signature",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(json!({"exp": exp, "sub": "x"}).to_string())
    );
    let n = expires_in_for(json!({"access_token": jwt, "token_type": "Bearer"}), "").await;
    assert!(in_range(n, 1800), "{n}");
}

#[tokio::test]
async fn without_expires_in_or_jwt_the_configured_default_decides() {
    let extra = r#"
        [tenants.acme.environments.production]
        default_lifetime = "2h"
    "#;
    let n = expires_in_for(json!({"access_token": "opaque-token"}), extra).await;
    assert!(in_range(n, 7200), "{n}");
}
