//! User sessions in the shared level: replicas that share a `redis-server` share handles and
//! pending authorizations, refresh one session once between them, survive a restart, and keep
//! serving the handles they hold while Redis is down. The IdP is the built-in development IdP,
//! which rotates refresh tokens and revokes the whole grant when a rotated one is presented again.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::json;
use token_broker::clock::Clock;
use token_broker::dev_idp::{DevClient, DevIdp, DevIdpHandle, DevIdpSettings};
use tokio::net::TcpListener;

use crate::helpers::*;

/// The development IdP with acme/production's client, issuing hour-long tokens.
pub(crate) async fn dev_idp() -> DevIdpHandle {
    let idp = DevIdp::new(DevIdpSettings {
        issuer: String::new(),
        token_lifetime: Duration::from_secs(3600),
        clients: vec![DevClient {
            client_id: "acme-production-id".into(),
            client_secret: SecretString::from(ACME_PRODUCTION_SECRET),
        }],
    })
    .expect("dev IdP settings");
    idp.serve(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
        .await
        .expect("dev IdP")
}

/// One replica: the standard configuration with acme/production on the dev IdP, user tokens on,
/// sharing `redis`, plus `extra`.
pub(crate) async fn replica(
    idp: &DevIdpHandle,
    redis: &impl SharedLevel,
    extra: &str,
    clock: &Clock,
) -> TestApp {
    let users = format!(
        r#"
        [tenants.acme.environments.production]
        token_url = "{}"
        authorize_url = "{}"
        redirect_uri = "{}"
        "#,
        idp.token_url(),
        idp.authorize_url(),
        idp.callback_url()
    );
    TestApp::init()
        .with_config(users)
        .with_redis(redis)
        .with_config(extra)
        .with_clock(clock.clone())
        .start()
        .await
}

/// Starts an authorization on `starts`, lets the dev IdP answer it, and redeems the code on
/// `redeems`: the new handle, and the state.
pub(crate) async fn log_in(starts: &TestApp, redeems: &TestApp) -> (String, String) {
    let body = json!({ "scope": "offline_access" });
    let started = starts.authorize("acme/production", BILLING_KEY, body).await;
    assert_eq!(started.status, 200, "{}", started.body);
    let url = started.body["authorization_url"].as_str().unwrap();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = browser.get(url).send().await.expect("authorize");
    assert_eq!(answer.status(), 302);
    let location = answer.headers()["location"].to_str().unwrap().to_owned();
    let query = query_fields(&location);
    let value = |name: &str| {
        query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let (code, state) = (value("code"), value("state"));
    let created = redeems
        .create_session("acme/production", BILLING_KEY, &code, &state)
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    (created.body["handle"].as_str().unwrap().to_owned(), state)
}

/// `GET` on the handle asking for more validity than a two-second-old token has left, so
/// that it is refreshed, while a token refreshed since is enough.
pub(crate) fn aged(handle: &str) -> String {
    format!("{handle}?min_ttl=3598")
}

/// Lets the tokens of a login or refresh age past [`aged`]'s threshold, on the replicas' clock.
pub(crate) fn age_tokens(clock: &Clock) {
    clock.advance(Duration::from_millis(2100));
}

#[tokio::test]
async fn two_replicas_refreshing_one_session_at_once_make_one_refresh_and_the_grant_survives() {
    let clock = Clock::manual();
    let redis = RedisServer::start().await;
    let idp = dev_idp().await;
    let a = replica(&idp, &redis, "", &clock).await;
    let b = replica(&idp, &redis, "", &clock).await;
    let (handle, _) = log_in(&a, &b).await;
    assert_eq!(idp.token_requests(), 1, "the code exchange");

    for round in 1..=2 {
        age_tokens(&clock);
        let before = idp.token_requests();
        let path = aged(&handle);
        let (a1, b1, a2, b2) = tokio::join!(
            a.user_token(&path, BILLING_KEY),
            b.user_token(&path, BILLING_KEY),
            a.user_token(&path, BILLING_KEY),
            b.user_token(&path, BILLING_KEY),
        );
        for answer in [&a1, &b1, &a2, &b2] {
            assert_eq!(answer.status, 200, "round {round}: {}", answer.body);
        }
        assert_eq!(
            idp.token_requests() - before,
            1,
            "round {round}: one refresh for four requests on two replicas"
        );
        let tokens: Vec<&str> = [&a1, &b1, &a2, &b2].iter().map(|a| a.token()).collect();
        assert!(
            tokens.iter().all(|t| *t == tokens[0]),
            "round {round}: one token"
        );
        let misses = [&a1, &b1, &a2, &b2]
            .iter()
            .filter(|a| a.header("x-cache") == Some("miss"))
            .count();
        assert_eq!(
            misses, 1,
            "round {round}: the refresh is one request's miss"
        );
    }
    // A rotated refresh token presented twice would have revoked the grant: it still works.
    age_tokens(&clock);
    let again = b.user_token(&aged(&handle), BILLING_KEY).await;
    assert_eq!(again.status, 200, "the grant survives: {}", again.body);
    assert_eq!(idp.token_requests(), 4, "1 exchange and 3 refreshes");
    // The replicas' metrics count the same requests.
    let mut counted = [0.0, 0.0];
    for app in [&a, &b] {
        let text = app.scrape().await;
        for (grant, total) in ["authorization_code", "refresh_token"]
            .iter()
            .zip(&mut counted)
        {
            let name = format!(
                r#"token_broker_user_idp_requests_total{{tenant="acme",environment="production",grant="{grant}",outcome="ok"}}"#
            );
            *total += metric(&text, &name).unwrap_or(0.0);
        }
    }
    assert_eq!(counted, [1.0, 3.0]);
}

#[tokio::test]
async fn a_replica_restarted_between_login_and_token_request_serves_the_handle() {
    let clock = Clock::manual();
    let redis = RedisServer::start().await;
    let idp = dev_idp().await;
    let first = replica(&idp, &redis, "", &clock).await;
    let (handle, _) = log_in(&first, &first).await;
    let before = first.user_token(&handle, BILLING_KEY).await;
    assert_eq!(before.status, 200, "{}", before.body);
    drop(first);

    let restarted = replica(&idp, &redis, "", &clock).await;
    let after = restarted.user_token(&handle, BILLING_KEY).await;
    assert_eq!(after.status, 200, "{}", after.body);
    assert_eq!(after.token(), before.token());
    assert_eq!(after.header("x-cache"), Some("hit"));
    assert_eq!(idp.token_requests(), 1, "no new login, no refresh");
    // And its refresh token came along.
    age_tokens(&clock);
    let refreshed = restarted.user_token(&aged(&handle), BILLING_KEY).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert_ne!(refreshed.token(), before.token());
    assert_eq!(idp.token_requests(), 2);
}

#[tokio::test]
async fn replicas_share_authorizations_handles_and_deletions_and_redis_holds_no_secret() {
    let clock = Clock::manual();
    let redis = RedisServer::start().await;
    let idp = dev_idp().await;
    let extra = "[users]\nmax_pending_per_caller = 2\n";
    let a = replica(&idp, &redis, extra, &clock).await;
    let b = replica(&idp, &redis, extra, &clock).await;

    // Started on one replica, redeemed on the other; the state is good once, anywhere.
    let (handle, state) = log_in(&a, &b).await;
    let reused = a
        .create_session("acme/production", BILLING_KEY, "any-code", &state)
        .await;
    assert_eq!(reused.status, 400, "{}", reused.body);
    let from_a = a.user_token(&handle, BILLING_KEY).await;
    let from_b = b.user_token(&handle, BILLING_KEY).await;
    assert_eq!((from_a.status, from_b.status), (200, 200));
    assert_eq!(from_a.token(), from_b.token());
    let other_caller = a.user_token(&handle, REPORTS_KEY).await;
    assert_eq!(other_caller.status, 404, "a handle is its owner's only");

    // users.max_pending_per_caller counts the fleet's pending authorizations.
    let body = json!({ "scope": "offline_access" });
    let mut states = vec![state.clone()];
    for app in [&a, &b] {
        let started = app
            .authorize("acme/production", BILLING_KEY, body.clone())
            .await;
        assert_eq!(started.status, 200, "{}", started.body);
        states.push(started.body["state"].as_str().unwrap().to_owned());
    }
    let third = a.authorize("acme/production", BILLING_KEY, body).await;
    assert_eq!(third.status, 429, "{}", third.body);

    // Nothing in Redis names the handle, a state or a token.
    let mut redis_connection = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis_connection)
        .await
        .unwrap();
    assert!(keys.iter().any(|k| k.contains("session:")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("pending:")), "{keys:?}");
    for key in &keys {
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut redis_connection)
            .await
            .unwrap();
        let value = if kind == "string" {
            let value: Vec<u8> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut redis_connection)
                .await
                .unwrap();
            String::from_utf8_lossy(&value).into_owned()
        } else {
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut redis_connection)
                .await
                .unwrap();
            members.join(" ")
        };
        let secrets = [handle.as_str(), from_a.token(), "billing", "acme"];
        for secret in secrets
            .iter()
            .copied()
            .chain(states.iter().map(String::as_str))
        {
            assert!(
                !key.contains(secret) && !value.contains(secret),
                "{key} shows a secret, the caller or the tenant"
            );
        }
    }

    // Deleted on one replica, gone on both.
    let deleted = b.forget_user(&handle, BILLING_KEY).await;
    assert_eq!(deleted.status, 204);
    for app in [&a, &b] {
        let gone = app.user_token(&handle, BILLING_KEY).await;
        assert_eq!(gone.status, 404, "{}", gone.body);
    }
}

#[tokio::test]
async fn while_redis_is_down_held_handles_are_served_and_refreshed_and_others_are_503() {
    let clock = Clock::manual();
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    let idp = dev_idp().await;
    let a = replica(&idp, &redis, "", &clock).await;
    let b = replica(&idp, &redis, "", &clock).await;
    let (handle, _) = log_in(&a, &a).await;
    assert_eq!(a.user_token(&handle, BILLING_KEY).await.status, 200);
    // A second session that nobody asks for during the outage.
    let (quiet, _) = log_in(&a, &a).await;

    redis.kill();
    a.wait_for_shared_cache(false).await;
    let held = a.user_token(&handle, BILLING_KEY).await;
    assert_eq!(held.status, 200, "held in memory: {}", held.body);
    age_tokens(&clock);
    let refreshed = a.user_token(&aged(&handle), BILLING_KEY).await;
    assert_eq!(
        refreshed.status, 200,
        "refreshed from memory: {}",
        refreshed.body
    );
    assert_eq!(idp.token_requests(), 3);
    let unwritten = |text: String| metric(&text, "token_broker_user_sessions_unwritten");
    assert_eq!(unwritten(a.scrape().await), Some(1.0), "the refreshed one");
    let elsewhere = b.user_token(&handle, BILLING_KEY).await;
    assert_eq!(elsewhere.status, 503, "never a 404: {}", elsewhere.body);
    assert_eq!(elsewhere.body["error"], "upstream_unavailable");
    assert!(elsewhere.header("retry-after").is_some());
    let not_forgotten = b.forget_user(&handle, BILLING_KEY).await;
    assert_eq!(
        not_forgotten.status, 503,
        "a DELETE that cannot reach Redis says so"
    );

    // Redis comes back empty: the replica that holds the sessions writes them back (the
    // rotated refresh token included) without being asked, and the other one then serves
    // both handles and refreshes with that token.
    let redis = RedisServer::start_on(port).await;
    a.wait_for_shared_cache(true).await;
    let mut connection = redis.connection().await;
    eventually("both sessions are written back to Redis", async || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*session:*")
            .query_async(&mut connection)
            .await
            .unwrap();
        keys.len() == 2
    })
    .await;
    eventually("nothing left to write", async || {
        unwritten(a.scrape().await) == Some(0.0)
    })
    .await;
    b.wait_for_shared_cache(true).await;
    let served = b.user_token(&handle, BILLING_KEY).await;
    assert_eq!(served.status, 200, "{}", served.body);
    assert_eq!(served.token(), refreshed.token());
    age_tokens(&clock);
    let again = b.user_token(&aged(&handle), BILLING_KEY).await;
    assert_eq!(
        again.status, 200,
        "the rotated refresh token was kept: {}",
        again.body
    );
    assert_eq!(
        idp.token_requests(),
        4,
        "2 exchanges, a refresh on each side"
    );
    let quiet_on_b = b.user_token(&quiet, BILLING_KEY).await;
    assert_eq!(quiet_on_b.status, 200, "{}", quiet_on_b.body);
}

/// Replicas whose acme environments answer within 4.5 s (two 2 s fetches, one waiting for the
/// other's permit), one IdP request at a time, with locks that outlive such a fetch by little
/// (5.2 s against 4.5 s plus two 200 ms Redis calls), and shorter than a refresh that waited for
/// the permit under its lock would need (2 s + 2 s + 2 s).
const ONE_AT_A_TIME: &str = r#"
    [shared_cache]
    lock_ttl = "5200ms"
    wait_for_peer = "5s"

    [tenants.acme.environments.production]
    timeout = "4500ms"
    max_concurrent_fetches = 1

    [tenants.acme.environments.staging]
    timeout = "4500ms"

    [tenants.globex.environments.production]
    timeout = "4500ms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_waits_for_the_idp_clients_permit_never_outlives_its_lock() {
    let redis = RedisServer::start().await;
    let fleet = TestApp::init()
        .with_users()
        .with_redis(&redis)
        .with_config(ONE_AT_A_TIME)
        .start_fleet(2)
        .await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let idp = &a.idp;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::body_string_contains(
            "grant_type=authorization_code",
        ))
        .respond_with(user_token_body("user-1", 100, Some("rt-1")))
        .mount(idp)
        .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::body_string_contains(
            "grant_type=refresh_token",
        ))
        .respond_with(
            user_token_body("user-2", 3600, Some("rt-2")).set_delay(Duration::from_secs(2)),
        )
        .mount(idp)
        .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::body_string_contains(
            "client_credentials",
        ))
        .respond_with(TokenIssuer::new(3600).with_delay(Duration::from_secs(2)))
        .mount(idp)
        .await;
    let started = a.authorize("acme/production", BILLING_KEY, json!({})).await;
    let state = started.body["state"].as_str().unwrap();
    let created = a
        .create_session("acme/production", BILLING_KEY, "code", state)
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let handle = created.body["handle"].as_str().unwrap().to_owned();
    // user-1 now has 40 s left, under cache.min_remaining: the next request refreshes.
    a.clock.advance(Duration::from_secs(60));

    // Two machine-token misses on A hold its one permit for about 4 s, one after the other:
    // the first is at the IdP before the second is sent, and the second is queued for the
    // permit before A's refresh (100 ms: a queue position shows nowhere to poll for).
    let miss = |scope: &'static str| {
        let (url, http) = (a.url.clone(), a.http.clone());
        tokio::spawn(async move {
            http.get(format!("{url}/v1/tokens/acme/production?{scope}"))
                .bearer_auth(BILLING_KEY)
                .send()
                .await
                .map(|answer| answer.status().as_u16())
        })
    };
    let first = miss("scope=one");
    eventually("a machine-token fetch reaches the IdP", async || {
        !idp.received_requests().await.unwrap_or_default().is_empty()
    })
    .await;
    let second = miss("scope=two");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let misses = [first, second];
    // A's refresh waits for the permit until about 4 s; B asks 3 s in: a lock A took at once
    // would lapse at 5.3 s, before A's refresh (sent at 4 s, answered at 6 s) is written.
    let on_a = {
        let (url, http, handle) = (a.url.clone(), a.http.clone(), handle.clone());
        tokio::spawn(async move {
            let response = http
                .get(format!("{url}/v1/users/handles/{handle}"))
                .bearer_auth(BILLING_KEY)
                .send()
                .await
                .expect("request");
            answer(response).await
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on_b = b.user_token(&handle, BILLING_KEY).await;
    let on_a = on_a.await.expect("A's request");
    for (replica, answer) in [("A", &on_a), ("B", &on_b)] {
        assert_eq!(
            (answer.status, answer.token()),
            (200, "user-2"),
            "{replica}: {}",
            answer.body
        );
    }
    for miss in misses {
        assert_eq!(miss.await.expect("task").expect("request"), 200);
    }
    assert_eq!(
        idp_requests(idp).await.grant("refresh_token").len(),
        1,
        "rt-1 was sent once: an IdP that rotates refresh tokens keeps the grant"
    );
}

#[tokio::test]
async fn a_newer_session_value_that_cannot_be_read_does_not_pass_for_a_write() {
    let redis = RedisServer::start().await;
    let app = TestApp::init()
        .with_users()
        .with_redis(&redis)
        .start()
        .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::body_string_contains(
            "grant_type=authorization_code",
        ))
        .respond_with(user_token_body("user-1", 100, Some("rt-1")))
        .mount(&app.idp)
        .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::body_string_contains(
            "grant_type=refresh_token",
        ))
        .respond_with(user_token_body("user-2", 3600, Some("rt-2")))
        .mount(&app.idp)
        .await;
    let started = app
        .authorize("acme/production", BILLING_KEY, json!({}))
        .await;
    let state = started.body["state"].as_str().unwrap();
    let created = app
        .create_session("acme/production", BILLING_KEY, "code", state)
        .await;
    let handle = created.body["handle"].as_str().unwrap().to_owned();

    // Someone who can write to Redis puts a value there that claims a far higher generation
    // but opens with no key of the broker's.
    let mut connection = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*session:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: () = redis::cmd("SET")
        .arg(&keys[0])
        .arg("s1:9999999999999999:forged:not-a-sealed-session")
        .query_async(&mut connection)
        .await
        .unwrap();

    // user-1 now has 40 s left, under cache.min_remaining: the next request refreshes, and the
    // write of the rotated refresh token meets the forged value.
    app.clock.advance(Duration::from_secs(60));
    let refreshed = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!(
        (refreshed.status, refreshed.token()),
        (200, "user-2"),
        "{}",
        refreshed.body
    );
    // Not taken for another replica's newer write: the replica keeps rt-2 to write again.
    assert_eq!(
        app.state.user_tokens.session_counts().1,
        1,
        "held unwritten"
    );
    assert_eq!(app.user_token(&handle, BILLING_KEY).await.token(), "user-2");
}
