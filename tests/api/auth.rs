//! Authentication (401), then authorisation (403), then configuration (404) and the query (400).

use crate::helpers::*;

#[tokio::test]
async fn no_key_or_a_wrong_key_is_a_401_with_www_authenticate() {
    let app = TestApp::init().start().await;
    for key in [None, Some("tbk_wrong"), Some("")] {
        let answer = app.get_token("acme/production", key).await;
        assert_eq!(answer.status, 401, "{key:?}");
        assert_eq!(answer.body["error"], "unauthorized");
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
        assert!(
            answer.body["request_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
    }
    assert!(app.idp_requests().await.is_empty());
}

#[tokio::test]
async fn a_tenant_the_caller_may_not_use_is_a_403_whether_or_not_it_exists() {
    let app = TestApp::init().start().await;
    // reports may use only acme/production with one audience.
    for path in [
        "acme/staging",
        "globex/production",
        "nosuch/production",
        "acme/production?audience=urn:other",
    ] {
        let answer = app.get_token(path, Some(REPORTS_KEY)).await;
        assert_eq!(answer.status, 403, "{path}: {}", answer.body);
        assert_eq!(answer.body["error"], "forbidden");
        assert!(
            answer.body["error_description"]
                .as_str()
                .unwrap()
                .starts_with("caller 'reports' may not use")
        );
    }
    assert!(app.idp_requests().await.is_empty());
}

#[tokio::test]
async fn an_allowed_but_unconfigured_environment_is_a_404() {
    let app = TestApp::init().start().await;
    let answer = app.billing("acme/qa").await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(answer.body["error"], "not_found");
}

#[tokio::test]
async fn no_audience_and_no_default_is_a_400() {
    let app = TestApp::init().start().await;
    let answer = app.billing("globex/production").await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.body["error"], "invalid_request");
    assert!(
        answer.body["error_description"]
            .as_str()
            .unwrap()
            .contains("audience")
    );
}

#[tokio::test]
async fn malformed_queries_are_400s() {
    let app = TestApp::init().start().await;
    let long = "x".repeat(2000);
    for query in [
        "min_ttl=1.5".to_owned(),
        "scope=%00".to_owned(),
        format!("audience={long}"),
        "unknown=1".to_owned(),
    ] {
        let answer = app.billing(&format!("acme/production?{query}")).await;
        assert_eq!(answer.status, 400, "{query}");
        assert_eq!(answer.body["error"], "invalid_request");
    }
}

#[tokio::test]
async fn a_restricted_caller_gets_its_allowed_audience() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let answer = app.get_token("acme/production", Some(REPORTS_KEY)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}
