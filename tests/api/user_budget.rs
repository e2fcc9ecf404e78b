//! User tokens spend only their caller's IdP budget, and no request pattern turns into one IdP
//! request per request: code exchanges and refreshes are charged to the caller's
//! `idp_requests_per_minute`, a `min_ttl` a fresh token cannot meet is refused, and a session is
//! refreshed at most once per `cache.min_refetch_interval`.

use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

/// Three IdP requests a minute for billing, and the refetch floor machine tokens have.
const TIGHT: &str = r#"
    [cache]
    min_refetch_interval = "5s"

    [callers.billing]
    idp_requests_per_minute = 3
"#;

#[tokio::test]
async fn a_loop_of_made_up_codes_spends_only_the_callers_budget() {
    let app = TestApp::init()
        .with_users()
        .with_config(TIGHT)
        .start()
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=authorization_code"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_grant", "error_description": "Invalid authorization code",
        })))
        .mount(&app.idp)
        .await;
    let mut statuses = Vec::new();
    let mut refused_state = None;
    for _ in 0..6 {
        let started = app
            .authorize("acme/production", BILLING_KEY, json!({}))
            .await;
        assert_eq!(started.status, 200, "{}", started.body);
        let state = started.body["state"].as_str().unwrap();
        let answer = app
            .create_session("acme/production", BILLING_KEY, "made-up", state)
            .await;
        if answer.status == 429 {
            assert_eq!(answer.body["error"], "rate_limited");
            assert!(answer.header("retry-after").is_some());
            refused_state = Some(state.to_owned());
        }
        statuses.push(answer.status);
    }
    assert_eq!(statuses, [400, 400, 400, 429, 429, 429]);
    assert_eq!(
        app.idp_requests().await.grant("authorization_code").len(),
        3,
        "one IdP request per unit of billing's budget, none beyond"
    );
    // A refusal for budget keeps the state: once the budget refills, the same state is
    // redeemed (and its made-up code refused by the IdP).
    app.clock.advance(Duration::from_secs(60));
    let retried = app
        .create_session(
            "acme/production",
            BILLING_KEY,
            "made-up",
            &refused_state.expect("a state refused for budget"),
        )
        .await;
    assert_eq!(retried.status, 400, "{}", retried.body);
    assert_eq!(retried.body["error"], "invalid_grant");
    assert_eq!(
        app.idp_requests().await.grant("authorization_code").len(),
        4
    );
    // Another caller's budget is untouched: reports may still start and redeem.
    let reports = app
        .authorize("acme/production", REPORTS_KEY, json!({}))
        .await;
    assert_eq!(reports.status, 200, "{}", reports.body);
}

/// A broker with [`TIGHT`] limits, a user session of `user-1` and an IdP that refreshes it to
/// `user-2`: the app and the handle.
async fn session_refreshed_to_user_2() -> (TestApp, String) {
    let app = TestApp::init()
        .with_users()
        .with_config(TIGHT)
        .start()
        .await;
    let handle = app
        .user_session(user_token_body("user-1", 3600, Some("rt-1")))
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(user_token_body("user-2", 3600, Some("rt-2")))
        .mount(&app.idp)
        .await;
    (app, handle)
}

#[tokio::test]
async fn a_min_ttl_of_the_whole_lifetime_costs_one_refresh_not_one_per_request() {
    let (app, handle) = session_refreshed_to_user_2().await;
    // The floor after the code exchange: a refresh may start 5 s after it.
    app.clock.advance(Duration::from_secs(6));
    let asked = format!("{handle}?min_ttl=3600");
    let first = app.user_token(&asked, BILLING_KEY).await;
    assert_eq!((first.status, first.token()), (200, "user-2"));
    for _ in 0..5 {
        app.clock.advance(Duration::from_secs(6));
        let again = app.user_token(&asked, BILLING_KEY).await;
        assert_eq!(again.status, 400, "{}", again.body);
        assert_eq!(again.body["error"], "invalid_request");
    }
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 1);
}

#[tokio::test]
async fn a_refresh_asked_again_within_the_refetch_interval_is_a_429_not_a_refresh() {
    let (app, handle) = session_refreshed_to_user_2().await;
    let asked = format!("{handle}?min_ttl=3599");
    app.clock.advance(Duration::from_secs(6));
    assert_eq!(app.user_token(&asked, BILLING_KEY).await.token(), "user-2");
    // Each second the token falls short of 3599 s again; within 5 s of its refresh that is a
    // 429 with the wait, and the IdP sees nothing.
    for _ in 0..4 {
        app.clock.advance(Duration::from_secs(1));
        let refused = app.user_token(&asked, BILLING_KEY).await;
        assert_eq!(refused.status, 429, "{}", refused.body);
        assert_eq!(refused.body["error"], "rate_limited");
        assert!(refused.header("retry-after").is_some());
        // A caller that needs less is still served the current token.
        let served = app.user_token(&handle, BILLING_KEY).await;
        assert_eq!((served.status, served.token()), (200, "user-2"));
    }
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 1);
    app.clock.advance(Duration::from_secs(2));
    assert_eq!(app.user_token(&asked, BILLING_KEY).await.status, 200);
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 2);
}
