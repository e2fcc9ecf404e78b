//! Replicas sharing one token through a real Redis: one IdP request per key for the whole fleet,
//! nothing readable at rest, DELETE and refresh reaching every replica, and no failed request
//! when Redis dies.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

/// Asks `app` until it serves `expected` for `path`, for at most two seconds.
async fn until_serves(app: &TestApp, path: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let answer = app.billing(path).await;
        if answer.token() == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still served {} instead of {expected}",
            answer.token()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_and_three_hundred_cold_gets_make_one_idp_request() {
    let redis = RedisServer::start().await;
    let fleet = TestApp::init().with_redis(&redis).start_fleet(3).await;
    issue_tokens(
        &fleet[0].idp,
        "acme",
        TokenIssuer::new(3600).with_delay(Duration::from_millis(300)),
    )
    .await;

    let requests = (0..300).map(|i| fleet[i % 3].billing("acme/production?scope=read"));
    let answers = futures::future::join_all(requests).await;

    assert!(answers.iter().all(|a| a.status == 200));
    let tokens: HashSet<&str> = answers.iter().map(Answer::token).collect();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 1);
    // Callers that waited on that IdP request, whichever replica made it, see a miss.
    let misses = answers
        .iter()
        .filter(|a| a.header("x-cache") == Some("miss"))
        .count();
    assert!(misses > 0);

    // A replica started later finds the token in Redis.
    let late = TestApp::init()
        .with_idp(Arc::clone(&fleet[0].idp))
        .with_redis(&redis)
        .start()
        .await;
    let answer = late.billing("acme/production?scope=read").await;
    assert_eq!(answer.token(), answers[0].token());
    assert_eq!(answer.header("x-cache"), Some("hit"));
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 1);
}

#[tokio::test]
async fn nothing_in_redis_shows_a_token_or_an_audience_in_clear() {
    let redis = RedisServer::start().await;
    let fleet = TestApp::init().with_redis(&redis).start_fleet(2).await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;
    issue_tokens(&fleet[0].idp, "acme-staging", TokenIssuer::new(3600)).await;
    assert_eq!(
        fleet[0].billing("acme/production?scope=read").await.status,
        200
    );
    assert_eq!(fleet[1].billing("acme/staging").await.status, 200);

    let mut connection = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in keys {
        assert!(key.starts_with("token-broker:token:"), "{key}");
        assert!(!key.contains("acme") && !key.contains("api."), "{key}");
        let value: String = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(value.starts_with("v1:"), "{value}");
        // Base64 has no '-' or ':', so these cannot appear in the ciphertext by chance.
        for clear in ["token-1", "token-2", ACME_AUDIENCE, "Bearer"] {
            assert!(!value.contains(clear), "{clear} in {value}");
        }
        let ttl_ms: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        // 3600 s tokens are handed out until 60 s (cache.min_remaining) before they expire.
        assert!((3_530_000..=3_540_000).contains(&ttl_ms), "{ttl_ms}");
    }
}

#[tokio::test]
async fn a_delete_on_one_replica_reaches_the_others() {
    let redis = RedisServer::start().await;
    let fleet = TestApp::init().with_redis(&redis).start_fleet(3).await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;
    for app in &fleet {
        assert_eq!(app.billing("acme/production").await.token(), "token-1");
    }

    assert_eq!(fleet[0].forget("acme/production", None).await.status, 204);
    assert_eq!(fleet[0].billing("acme/production").await.token(), "token-2");
    until_serves(&fleet[1], "acme/production", "token-2").await;
    until_serves(&fleet[2], "acme/production", "token-2").await;
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 2);

    // A late compare-and-delete of token-1, on any replica, leaves token-2 everywhere.
    let late = fleet[2]
        .forget(
            "acme/production",
            Some(json!({ "access_token": "token-1" })),
        )
        .await;
    assert_eq!(late.status, 204);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for app in &fleet {
        assert_eq!(app.billing("acme/production").await.token(), "token-2");
    }
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 2);

    // A compare-and-delete of the current token forgets it fleet-wide: one new fetch.
    fleet[1]
        .forget(
            "acme/production",
            Some(json!({ "access_token": "token-2" })),
        )
        .await;
    assert_eq!(fleet[1].billing("acme/production").await.token(), "token-3");
    until_serves(&fleet[0], "acme/production", "token-3").await;
    until_serves(&fleet[2], "acme/production", "token-3").await;
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_on_one_replica_replaces_the_token_everywhere() {
    let redis = RedisServer::start().await;
    let short_tokens = r#"
        [cache]
        min_remaining = "1s"
        refresh_ahead = 0.5
    "#;
    let fleet = TestApp::init()
        .with_redis(&redis)
        .with_config(short_tokens)
        .start_fleet(3)
        .await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(6)).await;
    for app in &fleet {
        assert_eq!(app.billing("acme/production").await.token(), "token-1");
    }

    // 6 s tokens refresh from 3-3.3 s on; the first request in the window starts it.
    fleet[0].clock.advance(Duration::from_millis(3400));
    assert_eq!(fleet[0].billing("acme/production").await.token(), "token-1");
    until_serves(&fleet[0], "acme/production", "token-2").await;
    until_serves(&fleet[1], "acme/production", "token-2").await;
    until_serves(&fleet[2], "acme/production", "token-2").await;
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_under_load_fails_no_request_and_is_used_again_when_back() {
    let mut redis = RedisServer::start().await;
    // Hundreds of DELETEs a second, each writing a tombstone: a budget to match, as this test
    // is about Redis going away, not about the caller's limits.
    let fleet = Arc::new(
        TestApp::init()
            .with_redis(&redis)
            .with_config("[callers.billing]\nidp_requests_per_minute = 1000000\n")
            .start_fleet(3)
            .await,
    );
    issue_tokens(
        &fleet[0].idp,
        "acme",
        TokenIssuer::new(3600).with_delay(Duration::from_millis(20)),
    )
    .await;

    // Hits on eight keys, with a DELETE now and then so that misses keep reaching Redis.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|worker| {
            let (fleet, stop) = (Arc::clone(&fleet), Arc::clone(&stop));
            tokio::spawn(async move {
                let app = &fleet[worker % 3];
                let (mut served, mut failures, mut not_ready) = (0, Vec::new(), 0);
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let path = format!("acme/production?scope=s{}", round % 8);
                    if round % 10 == 0 {
                        let deleted = app.forget(&path, None).await;
                        if deleted.status != 204 {
                            failures.push((deleted.status, deleted.body.to_string()));
                        }
                    }
                    let answer = app.billing(&path).await;
                    if answer.status == 200 {
                        served += 1;
                    } else {
                        failures.push((answer.status, answer.body.to_string()));
                    }
                    let ready = app.http.get(format!("{}/readyz", app.url)).send().await;
                    if ready.map(|r| r.status().as_u16()).ok() != Some(200) {
                        not_ready += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (served, failures, not_ready)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.kill();
    for app in fleet.iter() {
        app.wait_for_shared_cache(false).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let redis = RedisServer::start_on(redis.port()).await;
    for app in fleet.iter() {
        app.wait_for_shared_cache(true).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut served, mut failures, mut not_ready) = (0, Vec::new(), 0);
    for worker in workers {
        let (s, f, n) = worker.await.unwrap();
        served += s;
        failures.extend(f);
        not_ready += n;
    }
    assert!(served > 100, "only {served} requests served");
    assert_eq!(failures, Vec::<(u16, String)>::new());
    assert_eq!(not_ready, 0, "readiness left 200");

    // The restarted Redis is used again: a new key costs one IdP request for the whole fleet.
    let before = fleet[0].idp_requests().await.to("acme").len();
    let first = fleet[0].billing("acme/production?scope=after").await;
    assert_eq!(first.status, 200);
    for app in &fleet[1..] {
        assert_eq!(
            app.billing("acme/production?scope=after").await.token(),
            first.token()
        );
    }
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), before + 1);
    let mut connection = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("token-broker:token:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(!keys.is_empty());
}

/// The value of an unlabelled metric in a scrape.
fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn the_shared_level_health_errors_and_invalidations_are_exported() {
    let single = TestApp::init().start().await;
    assert_eq!(
        metric(&single.scrape().await, "token_broker_shared_cache_up"),
        None
    );

    let mut redis = RedisServer::start().await;
    let fleet = TestApp::init().with_redis(&redis).start_fleet(2).await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;
    fleet[0].wait_for_shared_cache(true).await;
    fleet[1].wait_for_shared_cache(true).await;
    assert_eq!(fleet[0].billing("acme/production").await.status, 200);
    // The other replica's DELETE reaches this one as an announcement.
    fleet[1].forget("acme/production", None).await;
    let mut scrape = fleet[0].scrape().await;
    for _ in 0..250 {
        if metric(&scrape, "token_broker_shared_cache_invalidations_total") >= Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        scrape = fleet[0].scrape().await;
    }
    assert_eq!(
        metric(&scrape, "token_broker_shared_cache_up"),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        metric(&scrape, "token_broker_shared_cache_subscribed"),
        Some(1.0)
    );
    assert!(metric(&scrape, "token_broker_shared_cache_invalidations_total") >= Some(1.0));
    let errors = metric(&scrape, "token_broker_shared_cache_errors_total").unwrap();

    redis.kill();
    // The subscriber may notice first; calls are marked down at the next probe (every second).
    let mut scrape = fleet[0].scrape().await;
    for _ in 0..500 {
        if metric(&scrape, "token_broker_shared_cache_up") == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        scrape = fleet[0].scrape().await;
    }
    assert_eq!(
        metric(&scrape, "token_broker_shared_cache_up"),
        Some(0.0),
        "{scrape}"
    );
    assert!(metric(&scrape, "token_broker_shared_cache_errors_total") > Some(errors));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_announced_while_a_replica_was_not_subscribed_reaches_it_when_it_resubscribes() {
    let redis = RedisServer::start().await;
    let fleet = TestApp::init().with_redis(&redis).start_fleet(2).await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;
    for app in &fleet {
        assert_eq!(app.billing("acme/production").await.token(), "token-1");
    }
    delete_while_replica_1_is_not_listening(&fleet, &redis).await;

    // Replica 1 checks its entries when it subscribes again and forgets token-1.
    eventually("replica 1 stops serving the deleted token", async || {
        fleet[1].billing("acme/production").await.token() != "token-1"
    })
    .await;
    assert_eq!(
        fleet[0].billing("acme/production").await.token(),
        fleet[1].billing("acme/production").await.token(),
        "the replicas share the new token"
    );
    assert_eq!(
        fleet[0].idp_requests().await.to("acme").len(),
        2,
        "one new token for the fleet"
    );
}

/// Cuts every subscription and DELETEs on replica 0 while replica 1 is not subscribed, so that
/// the announcement never reaches replica 1 (tried until it is so).
async fn delete_while_replica_1_is_not_listening(fleet: &[TestApp], redis: &RedisServer) {
    let mut connection = redis.connection().await;
    let subscribed = async |app: &TestApp| {
        metric(&app.scrape().await, "token_broker_shared_cache_subscribed") == Some(1.0)
    };
    for _ in 0..50 {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut connection)
            .await
            .unwrap();
        if subscribed(&fleet[1]).await {
            continue;
        }
        assert_eq!(fleet[0].forget("acme/production", None).await.status, 204);
        if !subscribed(&fleet[1]).await {
            return;
        }
    }
    panic!("never managed to announce a DELETE while replica 1 was not listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_empty_replicas_keep_their_tokens_and_a_missed_delete_still_arrives() {
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    let fleet = TestApp::init().with_redis(&redis).start_fleet(2).await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;
    for app in &fleet {
        assert_eq!(app.billing("acme/production").await.token(), "token-1");
    }

    // Redis comes back empty (no persistence): the check on resubscription finds nothing, and
    // that alone is no reason to forget a token.
    redis.kill();
    for app in &fleet {
        app.wait_for_shared_cache(false).await;
    }
    let redis = RedisServer::start_on(port).await;
    for app in &fleet {
        app.wait_for_shared_cache(true).await;
        eventually("the replica subscribes again", async || {
            metric(&app.scrape().await, "token_broker_shared_cache_subscribed") == Some(1.0)
        })
        .await;
        assert_eq!(app.billing("acme/production").await.token(), "token-1");
    }
    assert_eq!(
        fleet[0].idp_requests().await.to("acme").len(),
        1,
        "no replica fetched again"
    );

    // A DELETE now finds nothing in Redis; its tombstone still tells replica 1, which missed
    // the announcement, to forget its copy.
    delete_while_replica_1_is_not_listening(&fleet, &redis).await;
    eventually("replica 1 stops serving the deleted token", async || {
        fleet[1].billing("acme/production").await.token() != "token-1"
    })
    .await;
    assert_eq!(
        fleet[0].billing("acme/production").await.token(),
        fleet[1].billing("acme/production").await.token()
    );
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 2);
}

#[tokio::test]
async fn deletes_of_keys_and_handles_nobody_holds_write_nothing_to_redis_and_announce_nothing() {
    let redis = RedisServer::start().await;
    let fleet = TestApp::init()
        .with_users()
        .with_redis(&redis)
        .start_fleet(2)
        .await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;
    assert_eq!(fleet[0].billing("acme/production").await.status, 200);
    let mut connection = redis.connection().await;
    let keys_before: u64 = redis::cmd("DBSIZE")
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut connection)
        .await
        .unwrap();

    for round in 0..1000 {
        let app = &fleet[round % 2];
        let deleted = app
            .forget(&format!("acme/production?scope=made-up-{round}"), None)
            .await;
        assert_eq!(deleted.status, 204, "{}", deleted.body);
        if round % 10 == 0 {
            let forgotten = app
                .forget_user(&format!("uth_made-up-{round}"), BILLING_KEY)
                .await;
            assert_eq!(forgotten.status, 204, "{}", forgotten.body);
        }
    }

    let keys_after: u64 = redis::cmd("DBSIZE")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(keys_after, keys_before, "no tombstone for what nobody held");
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        !stats.contains("cmdstat_publish:"),
        "no announcement woke the replicas:\n{stats}"
    );
    // A real key's DELETE still reaches Redis and every replica.
    assert_eq!(fleet[1].forget("acme/production", None).await.status, 204);
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(stats.contains("cmdstat_publish:calls=1,"), "{stats}");
    assert!(fleet[0].idp_requests().await.to("acme").len() <= 1);
}
