//! The facade accepts the request shapes real clients send: Auth0-style JSON, RFC 6749 forms,
//! credentials in the body or with HTTP Basic, `audience` or `resource`; it answers RFC 6749 §5.1.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use wiremock::matchers::{body_json, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";

/// Mounts an IdP that answers only the Auth0-style request for acme/production with `scope`
/// (the tests check that exactly one was sent).
async fn answer_one_idp_request(app: &TestApp, scope: Option<&str>, answer: Value) {
    let mut request = json!({
        "grant_type": "client_credentials",
        "client_id": "acme-production-id",
        "client_secret": ACME_PRODUCTION_SECRET,
        "audience": ACME_AUDIENCE,
    });
    if let Some(scope) = scope {
        request["scope"] = json!(scope);
    }
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .and(body_json(request))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .mount(&app.idp)
        .await;
}

async fn post(
    app: &TestApp,
    content_type: &str,
    basic: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Answer {
    let mut request = app
        .http
        .post(format!("{}/t/acme/production/oauth/token", app.url))
        .header("content-type", content_type)
        .body(body);
    if let Some(credentials) = basic {
        request = request.header(
            "authorization",
            format!("Basic {}", STANDARD.encode(credentials)),
        );
    }
    answer(request.send().await.expect("request")).await
}

fn assert_rfc6749_success(answer: &Answer) {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    assert_eq!(answer.header("pragma"), Some("no-cache"));
    let expires_in = answer.body["expires_in"].as_u64().expect("a number");
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    assert_eq!(answer.body["token_type"], "Bearer");
}

#[tokio::test]
async fn auth0_style_json_with_credentials_in_the_body() {
    let app = TestApp::init().start().await;
    let issued = json!({ "access_token": "issued", "token_type": "Bearer", "expires_in": 3600 });
    answer_one_idp_request(&app, None, issued).await;
    let body = json!({
        "grant_type": "client_credentials",
        "client_id": "billing",
        "client_secret": BILLING_KEY,
        "audience": ACME_AUDIENCE,
        "unknown_extra": 42,
    });
    let answer = post(&app, JSON, None, body.to_string()).await;
    assert_rfc6749_success(&answer);
    let fields: Vec<&String> = answer.body.as_object().unwrap().keys().collect();
    assert_eq!(fields, ["access_token", "expires_in", "token_type"]);
    assert_eq!(answer.token(), "issued");
    assert_eq!(answer.header("x-cache"), Some("miss"));
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn rfc6749_form_with_resource_and_scope_in_any_order() {
    let app = TestApp::init().start().await;
    let issued = json!({
        "access_token": "issued", "token_type": "Bearer", "expires_in": 3600, "scope": "a b",
    });
    answer_one_idp_request(&app, Some("a b"), issued).await;
    let key: String = form_urlencoded::byte_serialize(BILLING_KEY.as_bytes()).collect();
    let resource: String = form_urlencoded::byte_serialize(ACME_AUDIENCE.as_bytes()).collect();
    for scope in ["b+a", "a+b+a"] {
        let body = format!(
            "grant_type=client_credentials&client_id=billing&client_secret={key}&resource={resource}&scope={scope}"
        );
        let answer = post(&app, &format!("{FORM}; charset=utf-8"), None, body).await;
        assert_rfc6749_success(&answer);
        assert_eq!(answer.body["scope"], "a b");
    }
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn http_basic_url_encoded_or_raw_with_the_default_audience() {
    let app = TestApp::init().start().await;
    let issued = json!({ "access_token": "issued", "token_type": "Bearer", "expires_in": 3600 });
    answer_one_idp_request(&app, None, issued).await;
    // RFC 6749 §2.3.1 form-encodes id and secret before Base64; many clients do not.
    let encoded: String = form_urlencoded::byte_serialize(BILLING_KEY.as_bytes()).collect();
    let basic_bodies = [
        (
            format!("billing:{encoded}"),
            "grant_type=client_credentials",
        ),
        (
            format!("billing:{BILLING_KEY}"),
            "grant_type=client_credentials&client_id=billing",
        ),
    ];
    for (credentials, body) in basic_bodies {
        let answer = post(&app, FORM, Some(&credentials), body).await;
        assert_rfc6749_success(&answer);
    }
    let json_body = json!({ "grant_type": "client_credentials" }).to_string();
    let answer = post(
        &app,
        JSON,
        Some(&format!("billing:{BILLING_KEY}")),
        json_body,
    )
    .await;
    assert_rfc6749_success(&answer);
    assert_eq!(answer.header("x-cache"), Some("hit"));
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn basic_credentials_with_reserved_characters_are_form_decoded() {
    let idp = wiremock::MockServer::start().await;
    let key = "tbk_with+plus&amp=colon:";
    let toml = format!(
        r#"{}
        [callers.odd]
        key_sha256 = "{}"
        allow = ["acme/production"]
        "#,
        base_config(&idp.uri()),
        token_broker::auth::KeyHash::of(key).to_hex()
    );
    let app = TestApp::init().with_idp(idp).with_toml(toml).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let encoded: String = form_urlencoded::byte_serialize(key.as_bytes()).collect();
    let answer = post(
        &app,
        FORM,
        Some(&format!("odd:{encoded}")),
        "grant_type=client_credentials",
    )
    .await;
    assert_rfc6749_success(&answer);
}
