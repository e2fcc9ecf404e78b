//! `rate_limit` on a caller: 429 `rate_limited` with `Retry-After`, for that caller alone.

use std::time::Duration;

use crate::helpers::*;

const BILLING_ONE_PER_SECOND: &str = r#"
    [callers.billing]
    rate_limit = 1
"#;

#[tokio::test]
async fn a_caller_over_its_rate_gets_429_with_retry_after_and_others_are_unaffected() {
    let app = TestApp::init()
        .with_config(BILLING_ONE_PER_SECOND)
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    assert_eq!(app.billing("acme/production").await.status, 200);

    let limited = app.billing("acme/production").await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.body["error"], "rate_limited");
    assert_eq!(
        limited.body["request_id"].as_str(),
        limited.header("x-request-id")
    );
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(app.forget("acme/production", None).await.status, 429);

    for _ in 0..5 {
        let other = app.get_token("acme/production", Some(REPORTS_KEY)).await;
        assert_eq!(other.status, 200, "reports has no rate limit");
    }
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);

    app.clock.advance(Duration::from_millis(1100));
    assert_eq!(app.billing("acme/production").await.status, 200);
}

#[tokio::test]
async fn the_rate_limit_applies_after_authentication_so_strangers_cannot_spend_it() {
    let app = TestApp::init()
        .with_config(BILLING_ONE_PER_SECOND)
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    for _ in 0..3 {
        let stranger = app
            .get_token("acme/production", Some("tbk_not-billing"))
            .await;
        assert_eq!(stranger.status, 401);
    }
    assert_eq!(app.billing("acme/production").await.status, 200);
}
