//! DELETE forgets a token; with a body, only if it is still the token the caller saw rejected.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn delete_then_get_fetches_a_new_token() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    assert_eq!(app.billing("acme/production").await.token(), "token-1");
    let deleted = app.forget("acme/production", None).await;
    assert_eq!(deleted.status, 204);
    assert_eq!(app.billing("acme/production").await.token(), "token-2");
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);

    // Nothing cached: still 204.
    assert_eq!(
        app.forget("acme/production?scope=never", None).await.status,
        204
    );
}

#[tokio::test]
async fn compare_and_delete_with_a_stale_token_leaves_the_new_one() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    let rejected = app.billing("acme/production").await.token().to_owned();
    // A hundred callers saw token-1 rejected at once.
    let deletes =
        (0..100).map(|_| app.forget("acme/production", Some(json!({ "access_token": rejected }))));
    let first = futures::future::join_all(deletes).await;
    assert!(first.iter().all(|a| a.status == 204));
    assert_eq!(app.billing("acme/production").await.token(), "token-2");

    // Late DELETEs for token-1 leave token-2 alone.
    for _ in 0..5 {
        let late = app
            .forget("acme/production", Some(json!({ "access_token": rejected })))
            .await;
        assert_eq!(late.status, 204);
    }
    assert_eq!(app.billing("acme/production").await.token(), "token-2");
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
}

#[tokio::test]
async fn a_malformed_body_is_a_400_and_forgets_nothing() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    app.billing("acme/production").await;

    let answer = app
        .forget("acme/production", Some(json!({ "token": "x" })))
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["error"], "invalid_request");
    assert_eq!(app.billing("acme/production").await.token(), "token-1");
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}
