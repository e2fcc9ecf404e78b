//! Concurrent misses on one key make one IdP request.

use std::collections::HashSet;
use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_cold_gets_make_one_idp_request() {
    let app = TestApp::init().start().await;
    issue_tokens(
        &app.idp,
        "acme",
        TokenIssuer::new(3600).with_delay(Duration::from_millis(300)),
    )
    .await;

    let requests = (0..200).map(|_| app.billing("acme/production?scope=read"));
    let answers = futures::future::join_all(requests).await;

    assert!(answers.iter().all(|a| a.status == 200));
    let tokens: HashSet<&str> = answers.iter().map(Answer::token).collect();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
    assert!(answers.iter().all(|a| a.header("x-cache") == Some("miss")));

    let later = app.billing("acme/production?scope=read").await;
    assert_eq!(later.header("x-cache"), Some("hit"));
    assert_eq!(later.token(), answers[0].token());
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_waiters_share_one_failure() {
    let app = TestApp::init().start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(500).set_delay(Duration::from_millis(300)))
        .mount(&app.idp)
        .await;

    let answers = futures::future::join_all((0..50).map(|_| app.billing("acme/production"))).await;
    assert!(answers.iter().all(|a| a.status == 503));
    // One fetch for all fifty callers: its first attempt and three retries.
    assert_eq!(app.idp_requests().await.len(), 4);
}
