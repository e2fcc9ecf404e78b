//! A handle refreshes its access token once however many ask, asks for reauthorization when the
//! IdP refuses or there is nothing to refresh with, and belongs to the caller that created it.

use std::time::Duration;

use futures::future::join_all;
use serde_json::json;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

#[tokio::test]
async fn concurrent_requests_on_a_handle_make_one_refresh() {
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 30, Some("rt-1")))
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(
            user_token_body("user-2", 3600, Some("rt-2")).set_delay(Duration::from_millis(200)),
        )
        .mount(&app.idp)
        .await;
    let answers = join_all((0..20).map(|_| app.user_token(&handle, BILLING_KEY))).await;
    for answer in &answers {
        assert_eq!(
            (answer.status, answer.token()),
            (200, "user-2"),
            "{}",
            answer.body
        );
    }
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 1);
}

#[tokio::test]
async fn a_caller_that_goes_away_during_a_refresh_loses_nothing() {
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 30, Some("rt-1")))
        .await;
    Mock::given(method("POST"))
        .and(ExactForm::of(&[
            ("grant_type", "refresh_token"),
            ("client_id", "acme-production-id"),
            ("client_secret", ACME_PRODUCTION_SECRET),
            ("refresh_token", "rt-1"),
        ]))
        .respond_with(
            user_token_body("user-2", 3600, Some("rt-2")).set_delay(Duration::from_millis(300)),
        )
        .mount(&app.idp)
        .await;
    // The caller gives up while the IdP is still answering the refresh.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let gone = impatient
        .get(format!("{}/v1/users/handles/{handle}", app.url))
        .bearer_auth(BILLING_KEY)
        .send()
        .await;
    assert!(gone.is_err(), "the request should time out");
    // The refresh went on without it: the rotated token is kept and rt-1 is never sent again.
    eventually("the refreshed token is served", async || {
        let answer = app.user_token(&handle, BILLING_KEY).await;
        answer.status == 200 && answer.token() == "user-2"
    })
    .await;
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 1);
}

#[tokio::test]
async fn a_min_ttl_longer_than_refreshed_tokens_live_spends_one_refresh_at_most() {
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 600, Some("rt-1")))
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(user_token_body("user-2", 600, Some("rt-2")))
        .mount(&app.idp)
        .await;
    for _ in 0..5 {
        let answer = app
            .user_token(&format!("{handle}?min_ttl=3600"), BILLING_KEY)
            .await;
        assert_eq!(
            (answer.status, answer.body["error"].as_str()),
            (400, Some("invalid_request")),
            "{}",
            answer.body
        );
    }
    let usable = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!((usable.status, usable.token()), (200, "user-2"));
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 1);
}

#[tokio::test]
async fn a_too_short_refreshed_token_is_refused_until_it_expires_then_refreshed_again() {
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 30, Some("rt-1")))
        .await;
    // The first refresh gives a token shorter than cache.min_remaining (60 s), later ones an
    // hour: the IdP changed its settings.
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(user_token_body("user-2", 2, Some("rt-2")))
        .up_to_n_times(1)
        .mount(&app.idp)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("refresh_token=rt-2"))
        .respond_with(user_token_body("user-3", 3600, Some("rt-3")))
        .mount(&app.idp)
        .await;
    for _ in 0..3 {
        let answer = app.user_token(&handle, BILLING_KEY).await;
        assert_eq!(answer.status, 502, "{}", answer.body);
    }
    app.clock.advance(Duration::from_millis(2100));
    let answer = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!(
        (answer.status, answer.token()),
        (200, "user-3"),
        "{}",
        answer.body
    );
    // One with rt-1, refused as too short, and one with rt-2.
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 2);
}

#[tokio::test]
async fn a_refused_refresh_is_answered_the_same_without_asking_again() {
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 30, Some("rt-1")))
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_scope"})))
        .mount(&app.idp)
        .await;
    for _ in 0..3 {
        let answer = app.user_token(&handle, BILLING_KEY).await;
        assert_eq!(
            (answer.status, answer.body["upstream_error"].as_str()),
            (502, Some("invalid_scope")),
            "{}",
            answer.body
        );
    }
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 1);
}

#[tokio::test]
async fn a_429_pauses_the_client_for_user_and_machine_tokens_alike() {
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 30, Some("rt-1")))
        .await;
    let rate_limited = ResponseTemplate::new(429).insert_header("retry-after", "30");
    Mock::given(method("POST"))
        .and(body_string_contains("refresh_token"))
        .respond_with(rate_limited.clone())
        .mount(&app.idp)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("client_credentials"))
        .respond_with(rate_limited)
        .mount(&app.idp)
        .await;
    // A user token's refresh gets the 429: the client is paused for machine tokens too.
    let user = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!(user.status, 503, "{}", user.body);
    assert_eq!(user.header("retry-after"), Some("30"));
    let machine = app.billing("acme/production").await;
    assert_eq!(machine.status, 503, "{}", machine.body);
    assert!(machine.header("retry-after").is_some());
    assert_eq!(
        app.idp_requests().await.grant("client_credentials").len(),
        0
    );
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 1);

    // And the other way round, on a client whose machine token got the 429 first.
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 30, Some("rt-1")))
        .await;
    let rate_limited = ResponseTemplate::new(429).insert_header("retry-after", "30");
    Mock::given(method("POST"))
        .respond_with(rate_limited)
        .mount(&app.idp)
        .await;
    assert_eq!(app.billing("acme/production").await.status, 503);
    let user = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!(user.status, 503, "{}", user.body);
    assert!(user.header("retry-after").is_some());
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 0);
}

#[tokio::test]
async fn a_401_on_refresh_asks_for_reauthorization() {
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 30, Some("rt-1")))
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({ "error": "access_denied" })))
        .mount(&app.idp)
        .await;
    let answer = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert_eq!(answer.body["error"], "reauthorization_required");
    assert!(
        answer.body["authorization_url"]
            .as_str()
            .unwrap()
            .starts_with("https://login.acme.example/authorize?")
    );
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 1);
}

#[tokio::test]
async fn without_a_refresh_token_an_old_access_token_needs_reauthorization() {
    let app = TestApp::init().with_users().start().await;
    let handle = app.user_session(user_token_body("user-1", 120, None)).await;
    let fresh = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!((fresh.status, fresh.token()), (200, "user-1"));
    let answer = app
        .user_token(&format!("{handle}?min_ttl=3600"), BILLING_KEY)
        .await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert_eq!(answer.body["error"], "reauthorization_required");
    // Only the code exchange reached the IdP.
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn idp_outages_on_refresh_are_503s_and_keep_the_handle() {
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 30, Some("rt-1")))
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&app.idp)
        .await;
    let answer = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(answer.header("retry-after").is_some());
    Mock::given(method("POST"))
        .and(body_string_contains("refresh_token=rt-1"))
        .respond_with(user_token_body("user-2", 3600, None))
        .mount(&app.idp)
        .await;
    // Asking again at once does not make another IdP request: refreshes pause after a failure.
    for _ in 0..5 {
        let again = app.user_token(&handle, BILLING_KEY).await;
        assert_eq!(again.status, 503, "{}", again.body);
        assert_eq!(again.body["error"], "upstream_unavailable");
        assert_eq!(again.header("retry-after"), Some("1"));
    }
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 1);
    app.clock.advance(Duration::from_millis(1100));
    let answer = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!((answer.status, answer.token()), (200, "user-2"));
    assert_eq!(app.idp_requests().await.grant("refresh_token").len(), 2);
}

#[tokio::test]
async fn handles_belong_to_their_caller_and_delete_forgets_them() {
    let app = TestApp::init().with_users().start().await;
    let handle = app
        .user_session(user_token_body("user-1", 3600, Some("rt-1")))
        .await;
    let other = app.user_token(&handle, REPORTS_KEY).await;
    assert_eq!(
        (other.status, other.body["error"].as_str()),
        (404, Some("not_found"))
    );
    assert_eq!(app.forget_user(&handle, REPORTS_KEY).await.status, 204);
    assert_eq!(app.user_token(&handle, BILLING_KEY).await.token(), "user-1");

    for unknown in ["uth_nosuch", "not a handle", &"x".repeat(100)] {
        let answer = app.user_token(unknown, BILLING_KEY).await;
        assert_eq!(answer.status, 404, "{unknown}");
    }
    let answer = app
        .user_token(&format!("{handle}?audience=x"), BILLING_KEY)
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);

    assert_eq!(app.forget_user(&handle, BILLING_KEY).await.status, 204);
    assert_eq!(app.user_token(&handle, BILLING_KEY).await.status, 404);
    assert_eq!(app.forget_user(&handle, BILLING_KEY).await.status, 204);
    assert_eq!(app.user_token(&handle, "tbk_wrong").await.status, 401);
}
