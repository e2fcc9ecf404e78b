//! The failure policy, asserted on what callers get *and* how often the IdP is asked.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

#[tokio::test]
async fn transient_500s_are_retried_and_the_caller_gets_a_token() {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .mount(&app.idp)
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    let answer = app.billing("acme/production").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(app.idp_requests().await.len(), 3);
}

#[tokio::test]
async fn garbage_is_retried_a_bounded_number_of_times_then_503() {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>maintenance</html>"))
        .mount(&app.idp)
        .await;
    let answer = app.billing("acme/production").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.body["error"], "upstream_unavailable");
    assert!(answer.header("retry-after").is_some());
    assert_eq!(app.idp_requests().await.len(), 4);
}

#[tokio::test]
async fn a_429_pauses_every_key_of_that_client_until_retry_after() {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "30"))
        .mount(&app.idp)
        .await;

    let first = app.billing("acme/production").await;
    assert_eq!(first.status, 503);
    assert_eq!(first.header("retry-after"), Some("30"));
    // Another key of the same client: refused at once, the IdP is not asked.
    let other = app.billing("acme/production?scope=read").await;
    assert_eq!(other.status, 503);
    let wait: u64 = other.header("retry-after").unwrap().parse().unwrap();
    assert!((28..=30).contains(&wait), "{wait}");
    assert_eq!(app.idp_requests().await.len(), 1);
    // Another client is not affected.
    issue_tokens(&app.idp, "globex", TokenIssuer::new(3600)).await;
    app.billing("globex/production?audience=urn:g").await;
}

#[tokio::test]
async fn a_429_with_x_ratelimit_reset_is_honoured() {
    let app = TestApp::init().start().await;
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 20;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429).insert_header("x-ratelimit-reset", reset.to_string()),
        )
        .mount(&app.idp)
        .await;
    let answer = app.billing("acme/production").await;
    let wait: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!((18..=20).contains(&wait), "{wait}");
    assert_eq!(app.billing("acme/production").await.status, 503);
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn a_hung_idp_costs_one_request_per_timeout() {
    let app = TestApp::init()
        .with_config(
            r#"
        [tenants.acme.environments.production]
        timeout = "500ms"
        "#,
        )
        .start()
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "late", "expires_in": 3600}))
                .set_delay(Duration::from_secs(10)),
        )
        .mount(&app.idp)
        .await;
    let answer = app.billing("acme/production").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn connection_resets_are_retried_then_503() {
    let (url, accepted) = resetting_server().await;
    let idp = MockServer::start().await;
    let app = TestApp::init()
        .with_idp(idp)
        .with_toml(base_config(&url))
        .start()
        .await;
    let answer = app.billing("acme/production").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(answer.header("retry-after").is_some());
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_rejection_is_remembered_for_negative_ttl() {
    let app = TestApp::init()
        .with_config("[cache]\nnegative_ttl = \"1s\"")
        .start()
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(403).set_body_json(json!({"error": "unauthorized_client"})),
        )
        .mount(&app.idp)
        .await;

    for _ in 0..5 {
        let answer = app.billing("acme/production").await;
        assert_eq!(answer.status, 502);
        assert!(
            answer.body["error_description"]
                .as_str()
                .unwrap()
                .contains("unauthorized_client")
        );
    }
    assert_eq!(
        app.idp_requests().await.len(),
        1,
        "one request per negative_ttl window"
    );
    app.clock.advance(Duration::from_millis(1100));
    assert_eq!(app.billing("acme/production").await.status, 502);
    assert_eq!(app.idp_requests().await.len(), 2);
}

#[tokio::test]
async fn while_the_idp_fails_callers_keep_the_cached_token_if_it_is_valid_long_enough() {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "cached", "expires_in": 600
        })))
        .up_to_n_times(1)
        .mount(&app.idp)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&app.idp)
        .await;
    assert_eq!(app.billing("acme/production").await.token(), "cached");

    // This caller needs more validity than the cached token has: 503, the IdP being down.
    let needs_more = app.billing("acme/production?min_ttl=600").await;
    assert_eq!(needs_more.status, 503);
    assert!(needs_more.header("retry-after").is_some());
    // Everybody else still gets the cached token, which was not thrown away.
    let still = app.billing("acme/production?min_ttl=300").await;
    assert_eq!((still.status, still.token()), (200, "cached"));
    assert_eq!(still.header("x-cache"), Some("hit"));
}

#[tokio::test]
async fn the_quota_guard_stops_asking_the_idp() {
    let app = TestApp::init()
        .with_config(
            r#"
        [tenants.acme.environments.production]
        max_fetches_per_hour = 2
        "#,
        )
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    for expected in ["token-1", "token-2"] {
        assert_eq!(app.billing("acme/production").await.token(), expected);
        app.forget("acme/production", None).await;
    }
    let refused = app.billing("acme/production").await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.body["error_description"]
            .as_str()
            .unwrap()
            .contains("quota")
    );
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(wait > 3500, "{wait}");
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
    // Another environment has its own quota.
    issue_tokens(&app.idp, "acme-staging", TokenIssuer::new(3600)).await;
    assert_eq!(app.billing("acme/staging").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_idp_for_one_tenant_delays_neither_hits_nor_other_tenants() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    issue_tokens(&app.idp, "globex", TokenIssuer::new(3600)).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_delay(Duration::from_secs(60)))
        .mount(&app.idp)
        .await;
    // Warm acme/production, then hang the staging environment's IdP path.
    assert_eq!(app.billing("acme/production").await.status, 200);
    let hung = {
        let http = app.http.clone();
        let url = format!("{}/v1/tokens/acme/staging", app.url);
        tokio::spawn(async move { http.get(url).bearer_auth(BILLING_KEY).send().await })
    };
    eventually("the staging request reaches the hung IdP", async || {
        !app.idp_requests().await.to("acme-staging").is_empty()
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            app.billing("acme/production").await.header("x-cache"),
            Some("hit")
        );
    }
    assert_eq!(
        app.billing("globex/production?audience=urn:g").await.status,
        200
    );
    assert!(
        !hung.is_finished(),
        "the hung request is still waiting on its IdP"
    );
    hung.abort();
}
