//! Refresh ahead: callers keep being served from cache while a new token is fetched.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::helpers::*;

const SHORT_TOKENS: &str = r#"
    [cache]
    min_remaining = "1s"
    refresh_ahead = 0.5
"#;

#[tokio::test]
async fn the_first_request_in_the_refresh_window_is_served_at_once_and_starts_one_refresh() {
    let app = TestApp::init().with_config(SHORT_TOKENS).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(6)).await;

    assert_eq!(app.billing("acme/production").await.token(), "token-1");
    // 6 s tokens refresh from 3-3.3 s on and leave the cache at 5 s.
    app.clock.advance(Duration::from_millis(3500));
    let during = app.billing("acme/production").await;
    assert_eq!(
        (during.token(), during.header("x-cache")),
        ("token-1", Some("hit"))
    );
    // The IdP counts its answer before the broker has read it: wait for the broker, not the IdP.
    let mut after = app.billing("acme/production").await;
    for _ in 0..50 {
        if after.token() == "token-2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = app.billing("acme/production").await;
    }
    assert_eq!(
        (after.token(), after.header("x-cache")),
        ("token-2", Some("hit"))
    );
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollover_under_load_has_no_errors_and_no_waiting_after_the_first_fetch() {
    let app = Arc::new(TestApp::init().with_config(SHORT_TOKENS).start().await);
    issue_tokens(
        &app.idp,
        "acme",
        TokenIssuer::new(6).with_delay(Duration::from_millis(500)),
    )
    .await;
    // The first fetch; everything after it must be a hit.
    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("miss")
    );

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (app, stop) = (Arc::clone(&app), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let answer = app.billing("acme/production").await;
                    seen.push((
                        answer.status,
                        answer.header("x-cache").map(str::to_owned),
                        answer.body["access_token"].as_str().map(str::to_owned),
                    ));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            })
        })
        .collect();
    // 14 s of token time at twice real speed: each refresh (500 ms at the IdP) still lands well
    // inside the 2 s between the start of its window and its token leaving the cache.
    for _ in 0..70 {
        app.clock.advance(Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut answers = Vec::new();
    for worker in workers {
        answers.extend(worker.await.unwrap());
    }
    let errors = answers.iter().filter(|(status, ..)| *status != 200).count();
    let misses = answers
        .iter()
        .filter(|(_, cache, _)| cache.as_deref() != Some("hit"))
        .count();
    let tokens: BTreeSet<_> = answers
        .iter()
        .filter_map(|(.., token)| token.clone())
        .collect();
    assert!(answers.len() > 500, "{} requests", answers.len());
    assert_eq!(errors, 0);
    assert_eq!(
        misses, 0,
        "no request waited on the IdP after the first fetch"
    );
    // 14 s of 6 s tokens refreshed at half-life: 4 or 5 fetches in all, each one served.
    let fetches = app.idp_requests().await.to("acme").len();
    assert!((4..=6).contains(&fetches), "{fetches} fetches");
    assert!(tokens.len() >= fetches - 1, "{tokens:?}");
}

#[tokio::test]
async fn tokens_barely_longer_than_min_remaining_still_refresh_ahead() {
    // 4 s tokens with min_remaining 2 s are servable for 2 s; with refresh_ahead 0.5 the refresh
    // starts after 1 s, inside that window, so no request ever waits on the IdP again.
    let app = TestApp::init()
        .with_config(
            r#"
        [cache]
        min_remaining = "2s"
        refresh_ahead = 0.5
        "#,
        )
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(4)).await;
    assert_eq!(app.billing("acme/production").await.token(), "token-1");

    let mut seen = Vec::new();
    // Token time runs at five times real speed: the refresh (a few milliseconds at the IdP)
    // still lands long before the 2 s window closes.
    for _ in 0..60 {
        app.clock.advance(Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let answer = app.billing("acme/production").await;
        seen.push((answer.status, answer.header("x-cache").map(str::to_owned)));
        if answer.body["access_token"] == "token-2" {
            break;
        }
    }
    assert!(
        seen.iter()
            .all(|(status, cache)| *status == 200 && cache.as_deref() == Some("hit")),
        "{seen:?}"
    );
    assert_eq!(app.billing("acme/production").await.token(), "token-2");
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
}

#[tokio::test]
async fn a_failing_refresh_backs_off_instead_of_asking_on_every_request() {
    let app = TestApp::init().with_config(SHORT_TOKENS).start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/acme/oauth/token"))
        .respond_with(TokenIssuer::new(10))
        .up_to_n_times(1)
        .mount(&app.idp)
        .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/acme/oauth/token"))
        .respond_with(wiremock::ResponseTemplate::new(500))
        .mount(&app.idp)
        .await;
    assert_eq!(app.billing("acme/production").await.token(), "token-1");
    // 10 s tokens, servable for 9 s, refresh from 4.5 s on: a second of requests in the window.
    app.clock.advance(Duration::from_millis(4600));
    for _ in 0..50 {
        let answer = app.billing("acme/production").await;
        assert_eq!((answer.status, answer.token()), (200, "token-1"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let requests = app.idp_requests().await.len();
    // The first fetch, one refresh with its retries (4 attempts), and at most one more after
    // the backoff: never one per request.
    assert!((2..=9).contains(&requests), "{requests} IdP requests");
    let scrape = app.scrape().await;
    assert!(
        !scrape.contains(
            r#"token_broker_cache_refresh_failures_total{tenant="acme",environment="production"} 0"#
        ) && scrape.contains(
            r#"token_broker_cache_refresh_failures_total{tenant="acme",environment="production"}"#
        ),
        "{scrape}"
    );
    assert!(scrape.contains("token_broker_ready 1"), "{scrape}");
}
