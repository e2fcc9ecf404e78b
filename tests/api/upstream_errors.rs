//! IdP failures become 502 (rejected) or 503 (unavailable, with Retry-After).

use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

async fn answer_with(template: ResponseTemplate) -> Answer {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .respond_with(template)
        .mount(&app.idp)
        .await;
    app.billing("acme/production").await
}

#[tokio::test]
async fn an_idp_401_is_a_502_carrying_the_idp_error_code() {
    let answer = answer_with(ResponseTemplate::new(401).set_body_json(json!({
        "error": "access_denied",
        "error_description": "Unauthorized client acme-production-id secret=leak",
    })))
    .await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.body["error"], "upstream_rejected");
    let description = answer.body["error_description"].as_str().unwrap();
    assert!(description.contains("access_denied"), "{description}");
    assert!(!description.contains("leak"));
    assert_eq!(answer.body["upstream_error"], "access_denied");
}

#[tokio::test]
async fn an_idp_500_is_a_503_with_retry_after() {
    let answer = answer_with(ResponseTemplate::new(500)).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.body["error"], "upstream_unavailable");
    assert!(
        answer
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
}

#[tokio::test]
async fn a_garbage_body_is_a_503() {
    let answer = answer_with(ResponseTemplate::new(200).set_body_string("<html>oops</html>")).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(answer.header("retry-after").is_some());
}

#[tokio::test]
async fn a_429_is_a_503_with_the_idp_retry_after() {
    let answer = answer_with(ResponseTemplate::new(429).insert_header("retry-after", "42")).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.header("retry-after"), Some("42"));
}

#[tokio::test]
async fn an_unreachable_idp_is_a_503() {
    let idp = MockServer::start().await;
    let toml = base_config(&CLOSED_PORT_URL);
    let app = TestApp::init().with_idp(idp).with_toml(toml).start().await;
    let answer = app.billing("acme/production").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.body["error"], "upstream_unavailable");
    assert!(answer.header("retry-after").is_some());
}

#[tokio::test]
async fn errors_are_not_cached() {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(4)
        .mount(&app.idp)
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    assert_eq!(app.billing("acme/production").await.status, 503);
    let retry = app.billing("acme/production").await;
    assert_eq!(retry.status, 200, "{}", retry.body);
}
