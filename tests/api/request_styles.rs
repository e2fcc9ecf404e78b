//! Each configured request style sends exactly the request the IdP expects.

use base64::Engine as _;
use serde_json::json;
use wiremock::matchers::{body_json, body_string, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

fn token_body() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "access_token": "issued", "token_type": "Bearer", "expires_in": 3600
    }))
}

#[tokio::test]
async fn auth0_style_json_body_with_credentials_in_the_body() {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .and(header("content-type", "application/json"))
        .and(body_json(json!({
            "grant_type": "client_credentials",
            "client_id": "acme-production-id",
            "client_secret": ACME_PRODUCTION_SECRET,
            "audience": ACME_AUDIENCE,
            "scope": "read:a write:b",
        })))
        .respond_with(token_body())
        .mount(&app.idp)
        .await;

    let answer = app.billing("acme/production?scope=write:b%20read:a").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.token(), "issued");
    let requests = app.idp_requests().await;
    assert!(
        requests.requests()[0]
            .headers
            .get("authorization")
            .is_none()
    );
    assert_eq!(requests.len(), 1);
}

#[tokio::test]
async fn rfc6749_form_body_with_http_basic_and_nothing_secret_in_the_body() {
    let app = TestApp::init().start().await;
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("acme-staging-id:{ACME_STAGING_SECRET}"));
    Mock::given(method("POST"))
        .and(path("/acme-staging/oauth/token"))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(header("authorization", format!("Basic {basic}").as_str()))
        .and(body_string(
            "grant_type=client_credentials&audience=https%3A%2F%2Fapi.acme.example",
        ))
        .respond_with(token_body())
        .mount(&app.idp)
        .await;

    let answer = app.billing("acme/staging").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn form_body_in_post_style_with_resource_and_extra_params() {
    let idp = wiremock::MockServer::start().await;
    let toml = format!(
        r#"{}
        [tenants.initech.environments.production]
        token_url = "{}/initech/oauth/token"
        client_id = "client id"
        client_secret = "s&cret"
        audience = "urn:initech"
        request_format = "form"
        audience_param = "resource"
        extra_params = {{ tenant = "example.com" }}
        "#,
        base_config(&idp.uri()),
        idp.uri()
    );
    Mock::given(method("POST"))
        .and(path("/initech/oauth/token"))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string(
            "grant_type=client_credentials&client_id=client+id&client_secret=s%26cret&resource=urn%3Ainitech&tenant=example.com",
        ))
        .respond_with(token_body())
        .mount(&idp)
        .await;
    let app = TestApp::init().with_idp(idp).with_toml(toml).start().await;

    let answer = app.billing("initech/production").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(app.idp_requests().await.len(), 1);
}
