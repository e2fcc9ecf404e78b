//! A real OAuth2 client library (the `oauth2` crate) gets tokens from the facade unchanged, by
//! pointing its token URL at the broker, and shares them with `GET /v1/tokens`.

use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicTokenType};
use oauth2::{
    AuthType, ClientId, ClientSecret, HttpRequest, HttpResponse, RequestTokenError, Scope,
    TokenResponse, TokenUrl,
};
use serde_json::json;
use wiremock::matchers::{body_json, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

/// The `oauth2` crate's HTTP client interface over our reqwest (its own `reqwest` feature would
/// bring a second reqwest version).
async fn send(request: HttpRequest) -> Result<HttpResponse, reqwest::Error> {
    let (parts, body) = request.into_parts();
    let response = reqwest::Client::new()
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await?;
    let mut answer = oauth2::http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        answer = answer.header(name, value);
    }
    let body = response.bytes().await?.to_vec();
    Ok(answer
        .body(body)
        .expect("status and headers came from a valid response"))
}

fn client(app: &TestApp, name: &str, key: &str, environment: &str) -> OAuthClient {
    let token_url = format!("{}/t/acme/{environment}/oauth/token", app.url);
    BasicClient::new(ClientId::new(name.to_owned()))
        .set_client_secret(ClientSecret::new(key.to_owned()))
        .set_token_uri(TokenUrl::new(token_url).expect("a valid URL"))
}

type OAuthClient = BasicClient<
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

#[tokio::test]
async fn client_credentials_with_basic_and_body_authentication_share_one_cached_token() {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .and(body_json(json!({
            "grant_type": "client_credentials",
            "client_id": "acme-production-id",
            "client_secret": ACME_PRODUCTION_SECRET,
            "audience": ACME_AUDIENCE,
            "scope": "read:a write:b",
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "issued", "token_type": "Bearer", "expires_in": 3600,
            "scope": "read:a write:b",
        })))
        .mount(&app.idp)
        .await;

    let basic = client(&app, "billing", BILLING_KEY, "production");
    let in_body =
        client(&app, "billing", BILLING_KEY, "production").set_auth_type(AuthType::RequestBody);
    for client in [basic, in_body] {
        let token = client
            .exchange_client_credentials()
            .add_scope(Scope::new("write:b".into()))
            .add_scope(Scope::new("read:a".into()))
            .add_extra_param("audience", ACME_AUDIENCE)
            .request_async(&send)
            .await
            .expect("a token");
        assert_eq!(token.access_token().secret(), "issued");
        assert_eq!(token.token_type(), &BasicTokenType::Bearer);
        let expires_in = token.expires_in().expect("expires_in").as_secs();
        assert!((3590..=3600).contains(&expires_in), "{expires_in}");
        let scopes: Vec<&str> = token.scopes().unwrap().iter().map(|s| s.as_str()).collect();
        assert_eq!(scopes, ["read:a", "write:b"]);
    }

    let answer = app.billing("acme/production?scope=read:a+write:b").await;
    assert_eq!(answer.token(), "issued");
    assert_eq!(answer.header("x-cache"), Some("hit"));
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn the_library_sees_rfc6749_errors() {
    let app = TestApp::init().start().await;
    let outcomes = [
        (
            client(&app, "billing", "tbk_wrong", "production"),
            BasicErrorResponseType::InvalidClient,
        ),
        (
            client(&app, "reports", BILLING_KEY, "production"),
            BasicErrorResponseType::InvalidClient,
        ),
        (
            client(&app, "reports", REPORTS_KEY, "staging"),
            BasicErrorResponseType::UnauthorizedClient,
        ),
    ];
    for (client, expected) in outcomes {
        let error = client
            .exchange_client_credentials()
            .request_async(&send)
            .await
            .expect_err("refused");
        let RequestTokenError::ServerResponse(response) = error else {
            panic!("expected an OAuth2 error response, got {error:?}");
        };
        assert_eq!(response.error(), &expected);
        assert!(response.error_description().is_some());
    }
    assert!(app.idp_requests().await.is_empty());
}
