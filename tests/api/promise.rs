//! The broker's promise under stress: one IdP request per key per token lifetime, whatever
//! careless callers and hostile IdPs do. Every test counts IdP requests.

use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

/// DELETE within this of a key's last fetch marks the entry instead of forgetting it.
const REFETCH_INTERVAL: &str = r#"
    [cache]
    min_refetch_interval = "1s"
"#;

/// GETs `path` as billing with a client that gives up after `patience`.
async fn impatient_get(app: &TestApp, path: &str, patience: Duration) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(patience)
        .build()
        .unwrap();
    client
        .get(format!("{}/v1/tokens/{path}", app.url))
        .bearer_auth(BILLING_KEY)
        .send()
        .await
        .ok()
        .map(|response| response.status().as_u16())
}

/// GETs as billing until the answer is a 200 (at most 10 s), for after a slow IdP answered.
async fn until_ok(app: &TestApp, path: &str) -> Answer {
    for _ in 0..500 {
        let answer = app.billing(path).await;
        if answer.status == 200 {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{path} never answered 200");
}

#[tokio::test]
async fn callers_that_give_up_and_retry_cancel_nothing_and_make_one_idp_request() {
    let app = TestApp::init().start().await;
    let slow = TokenIssuer::new(3600).with_delay(Duration::from_millis(1500));
    issue_tokens(&app.idp, "acme", slow).await;

    // Callers that wait 200 ms, give up and ask again, for most of the time the IdP takes.
    let patience = Duration::from_millis(200);
    assert_eq!(impatient_get(&app, "acme/production", patience).await, None);
    for _ in 0..4 {
        impatient_get(&app, "acme/production", patience).await;
    }
    let answer = until_ok(&app, "acme/production").await;
    assert_eq!(answer.token(), "token-1");
    assert_eq!(
        app.idp_requests().await.to("acme").len(),
        1,
        "the abandoned fetch was not repeated"
    );
    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("hit")
    );
}

#[tokio::test]
async fn impatient_callers_on_every_replica_make_one_idp_request() {
    let redis = RedisServer::start().await;
    let fleet = TestApp::init().with_redis(&redis).start_fleet(3).await;
    let slow = TokenIssuer::new(3600).with_delay(Duration::from_millis(1500));
    issue_tokens(&fleet[0].idp, "acme", slow).await;

    for round in 0..6 {
        let app = &fleet[round % fleet.len()];
        impatient_get(app, "acme/production", Duration::from_millis(200)).await;
    }
    for app in &fleet {
        assert_eq!(until_ok(app, "acme/production").await.token(), "token-1");
    }
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 1);
    // The fetch lock went with the fetch: nothing waits out shared_cache.lock_ttl.
    let mut connection = redis.connection().await;
    let locks: Vec<String> = redis::cmd("KEYS")
        .arg("*lock:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(locks.is_empty(), "{locks:?}");
}

#[tokio::test]
async fn a_min_ttl_longer_than_a_fresh_token_lives_is_refused_without_asking_again() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(600)).await;

    for _ in 0..10 {
        let refused = app.billing("acme/production?min_ttl=900").await;
        assert_eq!(refused.status, 400, "{}", refused.body);
        assert_eq!(refused.body["error"], "invalid_request");
    }
    assert_eq!(
        app.idp_requests().await.to("acme").len(),
        1,
        "the first fetch taught the lifetime"
    );
    // Within the lifetime, the token is served as before.
    assert_eq!(app.billing("acme/production?min_ttl=300").await.status, 200);
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}

#[tokio::test]
async fn tokens_shorter_than_min_remaining_are_remembered_like_a_rejection() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(30)).await;

    for _ in 0..10 {
        let refused = app.billing("acme/production").await;
        assert_eq!(refused.status, 502, "{}", refused.body);
        assert_eq!(refused.body["error"], "upstream_rejected");
        let description = refused.body["error_description"].as_str().unwrap();
        assert!(description.contains("cache.min_remaining"), "{description}");
    }
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}

#[tokio::test]
async fn a_caller_looping_delete_and_get_makes_one_idp_request_per_interval() {
    let app = TestApp::init().with_config(REFETCH_INTERVAL).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    for _ in 0..30 {
        let token = app.billing("acme/production").await.token().to_owned();
        assert_eq!(token, "token-1");
        assert_eq!(app.forget("acme/production", None).await.status, 204);
        let compare = json!({ "access_token": token });
        assert_eq!(
            app.forget("acme/production", Some(compare)).await.status,
            204
        );
    }
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);

    // After the interval, the first request fetches the new token the DELETEs asked for.
    app.clock.advance(Duration::from_millis(1100));
    let fresh = app.billing("acme/production").await;
    assert_eq!(
        (fresh.token(), fresh.header("x-cache")),
        ("token-2", Some("miss"))
    );
    assert_eq!(app.billing("acme/production").await.token(), "token-2");
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);

    // Outside the interval of the last fetch, a DELETE forgets at once, as it always did.
    app.clock.advance(Duration::from_millis(1100));
    app.forget("acme/production", None).await;
    assert_eq!(app.billing("acme/production").await.token(), "token-3");
    assert_eq!(app.idp_requests().await.to("acme").len(), 3);
}

#[tokio::test]
async fn a_caller_over_its_idp_budget_gets_429_and_spends_nobody_elses() {
    let app = TestApp::init()
        .with_config(
            r#"
        [callers.billing]
        idp_requests_per_minute = 5
        [tenants.acme.environments.production]
        max_fetches_per_hour = 8
        "#,
        )
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    // A wildcard rule lets billing name any audience: each new one is a new key.
    for n in 0..5 {
        let answer = app
            .billing(&format!("acme/production?audience=https://api{n}.example"))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let refused = app
        .billing("acme/production?audience=https://api5.example")
        .await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["error"], "rate_limited");
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(app.idp_requests().await.to("acme").len(), 5);

    // What a cached token answers is never refused for budget.
    let cached = app
        .billing("acme/production?audience=https://api0.example")
        .await;
    assert_eq!(
        (cached.status, cached.header("x-cache")),
        (200, Some("hit"))
    );
    // Another caller, and the environment's quota, are untouched.
    let other = app.get_token("acme/production", Some(REPORTS_KEY)).await;
    assert_eq!(other.status, 200, "{}", other.body);
    assert_eq!(app.idp_requests().await.to("acme").len(), 6);

    let metrics = app.scrape().await;
    assert!(
        metrics.contains(r#"token_broker_caller_idp_requests_total{caller="billing"} 5"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"token_broker_caller_idp_requests_total{caller="reports"} 1"#));
    assert!(
        metrics.contains(
            r#"token_broker_caller_refusals_total{caller="billing",reason="idp_budget"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn joining_a_fetch_under_way_costs_no_budget() {
    let app = TestApp::init()
        .with_config("[callers.billing]\nidp_requests_per_minute = 1")
        .start()
        .await;
    let slow = TokenIssuer::new(3600).with_delay(Duration::from_millis(300));
    issue_tokens(&app.idp, "acme", slow).await;

    let gets = (0..20).map(|_| app.billing("acme/production"));
    let answers = futures::future::join_all(gets).await;
    assert!(
        answers.iter().all(|a| a.status == 200),
        "one paid, the others joined"
    );
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}

#[tokio::test]
async fn a_caller_cannot_create_more_than_max_keys_keys() {
    let app = TestApp::init()
        .with_config("[callers.billing]\nmax_keys = 3")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    for scope in ["a", "b", "c"] {
        let answer = app.billing(&format!("acme/production?scope={scope}")).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let refused = app.billing("acme/production?scope=d").await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.body["error_description"]
            .as_str()
            .unwrap()
            .contains("max_keys")
    );
    assert_eq!(app.billing("acme/production?scope=a").await.status, 200);
    assert_eq!(app.idp_requests().await.to("acme").len(), 3);
    let metrics = app.scrape().await;
    assert!(
        metrics.contains(
            r#"token_broker_caller_refusals_total{caller="billing",reason="max_keys"} 1"#
        ),
        "{metrics}"
    );

    // A key that leaves the cache frees its slot.
    app.forget("acme/production?scope=a", None).await;
    assert_eq!(app.billing("acme/production?scope=d").await.status, 200);
    assert_eq!(app.idp_requests().await.to("acme").len(), 4);
}

#[tokio::test]
async fn an_endless_idp_body_is_not_read_past_max_response_bytes_nor_retried() {
    let app = TestApp::init().start().await;
    let huge = format!(
        r#"{{"access_token":"t","expires_in":3600,"padding":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_string(huge))
        .mount(&app.idp)
        .await;

    let refused = app.billing("acme/production").await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.body["error"], "upstream_unavailable");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(app.idp_requests().await.len(), 1, "not retried");
}

#[tokio::test]
async fn outlandish_lifetimes_and_pauses_are_capped_not_crashes() {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({"access_token": "forever", "expires_in": 1_000_000_000_000u64}),
            ),
        )
        .mount(&app.idp)
        .await;
    Mock::given(method("POST"))
        .and(path("/globex/oauth/token"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "99999999999999999999")
                .insert_header("x-ratelimit-reset", "18446744073709551615"),
        )
        .mount(&app.idp)
        .await;

    let answer = app.billing("acme/production").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let expires_in = answer.body["expires_in"].as_u64().unwrap();
    assert!(expires_in <= 365 * 24 * 3600, "{expires_in}");
    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("hit")
    );

    let paused = app
        .billing("globex/production?audience=https://api.globex.example")
        .await;
    assert_eq!(paused.status, 503, "{}", paused.body);
    let wait: u64 = paused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&wait), "{wait}");
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
    assert_eq!(app.idp_requests().await.to("globex").len(), 1);
}

#[tokio::test]
async fn a_remembered_rejection_is_answered_without_charging_the_budget() {
    let app = TestApp::init()
        .with_config("[callers.billing]\nidp_requests_per_minute = 1")
        .start()
        .await;
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": "access_denied"})))
        .mount(&app.idp)
        .await;
    for _ in 0..5 {
        let refused = app.billing("acme/production").await;
        assert_eq!(refused.status, 502, "{}", refused.body);
        assert_eq!(refused.body["upstream_error"], "access_denied");
    }
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn a_min_ttl_just_under_the_lifetime_cannot_refetch_before_the_interval() {
    let app = TestApp::init()
        .with_config("[cache]\nmin_refetch_interval = \"1h\"")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    assert_eq!(app.billing("acme/production").await.status, 200);
    app.clock.advance(Duration::from_millis(1100));
    for _ in 0..5 {
        let refused = app.billing("acme/production?min_ttl=3599").await;
        assert_eq!(refused.status, 429, "{}", refused.body);
        assert!(refused.header("retry-after").is_some());
    }
    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("hit")
    );
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}

#[tokio::test]
async fn a_delete_on_another_replica_marks_a_token_fetched_moments_ago() {
    let redis = RedisServer::start().await;
    let fleet = TestApp::init()
        .with_redis(&redis)
        .with_config("[cache]\nmin_refetch_interval = \"1h\"")
        .start_fleet(2)
        .await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;
    fleet[0].wait_for_shared_cache(true).await;
    fleet[1].wait_for_shared_cache(true).await;
    for _ in 0..10 {
        assert_eq!(fleet[0].billing("acme/production").await.token(), "token-1");
        assert_eq!(fleet[1].forget("acme/production", None).await.status, 204);
    }
    // Wait until replica 0 has received the announcements, then look again.
    for _ in 0..250 {
        let scrape = fleet[0].scrape().await;
        if scrape.contains("token_broker_shared_cache_invalidations_total 10") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = fleet[0].billing("acme/production").await;
    assert_eq!(
        (after.token(), after.header("x-cache")),
        ("token-1", Some("hit"))
    );
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 1);
}
