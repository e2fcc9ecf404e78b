//! Entries expire at `expires_at - min_remaining`; `min_ttl` asks for more validity.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn a_token_is_fetched_again_after_its_window() {
    // 62 s tokens with min_remaining 60 s: each is served for about 2 s.
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(62)).await;

    let first = app.billing("acme/production").await;
    assert_eq!(first.token(), "token-1");
    assert!(first.body["expires_in"].as_u64().unwrap() >= 60);
    assert_eq!(app.billing("acme/production").await.token(), "token-1");

    app.clock.advance(Duration::from_millis(2500));
    let after = app.billing("acme/production").await;
    assert_eq!(after.token(), "token-2");
    assert_eq!(after.header("x-cache"), Some("miss"));
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
}

#[tokio::test]
async fn min_ttl_above_the_remaining_life_forces_a_fetch() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(600)).await;

    assert_eq!(app.billing("acme/production").await.token(), "token-1");
    app.clock.advance(Duration::from_millis(1100));
    // token-1 now has 598-599 s left: min_ttl 300 is a hit, min_ttl 600 is not.
    let ok = app.billing("acme/production?min_ttl=300").await;
    assert_eq!((ok.token(), ok.header("x-cache")), ("token-1", Some("hit")));
    let fresh = app.billing("acme/production?min_ttl=600").await;
    assert_eq!(fresh.token(), "token-2");
    assert!(fresh.body["expires_in"].as_u64().unwrap() >= 599);
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
    // The fresh token replaced the old one for everybody.
    assert_eq!(app.billing("acme/production").await.token(), "token-2");
}

#[tokio::test]
async fn min_ttl_longer_than_a_fresh_token_is_a_400() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(600)).await;

    let answer = app.billing("acme/production?min_ttl=601").await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.body["error"], "invalid_request");
    assert!(
        answer.body["error_description"]
            .as_str()
            .unwrap()
            .contains("min_ttl")
    );
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);

    let bad = app.billing("acme/production?min_ttl=ten").await;
    assert_eq!(bad.status, 400);
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}
