//! The shared level on a Redis Cluster (`shared_cache.cluster_nodes`) keeps every promise it keeps
//! on one server: one IdP request per key for the fleet, keys spread over every master, `DELETE`
//! reaching every replica, user sessions refreshed once, the rotated secret shared, and no
//! failed request while a master fails over or the whole cluster is down. The clusters are real:
//! six `redis-server --cluster-enabled yes` on loopback.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use token_broker::clock::Clock;
use wiremock::MockServer;

use crate::helpers::*;
use crate::rotation::{RotatingIdp, rotate, rotation_config};
use crate::shared_sessions::{age_tokens, aged, dev_idp, log_in, replica};

/// A key prefix of a test's own, so that tests sharing a cluster do not meet.
fn prefix(test: &str) -> String {
    format!("[shared_cache]\nkey_prefix = \"{test}:\"\n")
}

/// Two replicas on `cluster` with `prefix`, sharing an IdP that issues hour-long tokens.
async fn fleet_on(cluster: &RedisCluster, test: &str) -> Vec<TestApp> {
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    TestApp::init()
        .with_idp(idp)
        .with_redis(cluster)
        .with_config(prefix(test))
        .start_fleet(2)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_on_two_replicas_make_one_idp_request() {
    let fleet = fleet_on(shared_cluster(), "concurrent").await;
    let requests = (0..50).map(|n| fleet[n % 2].billing("acme/production?scope=cold"));
    let answers = futures::future::join_all(requests).await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    assert!(
        answers.iter().all(|a| a.token() == answers[0].token()),
        "one token"
    );
    assert_eq!(fleet[0].idp_requests().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_keys_spread_over_every_master_and_each_is_fetched_once() {
    let cluster = shared_cluster();
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    // A hundred new keys in a minute, within the caller's budget.
    let budget = "[callers.billing]\nidp_requests_per_minute = 200\n";
    let fleet = TestApp::init()
        .with_idp(idp)
        .with_redis(cluster)
        .with_config(prefix("spread"))
        .with_config(budget)
        .start_fleet(2)
        .await;
    for n in 0..100 {
        let answer = fleet[0]
            .billing(&format!("acme/production?scope=key-{n}"))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    for n in 0..100 {
        let answer = fleet[1]
            .billing(&format!("acme/production?scope=key-{n}"))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    assert_eq!(fleet[0].idp_requests().await.len(), 100, "each key once");
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let per_master: Vec<usize> = masters
        .iter()
        .map(|port| cluster.keys(*port, "spread:token:").len())
        .collect();
    assert_eq!(per_master.iter().sum::<usize>(), 100, "{per_master:?}");
    assert!(per_master.iter().all(|keys| *keys > 0), "{per_master:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_compare_and_delete_through_one_replica_reach_the_other() {
    let fleet = fleet_on(shared_cluster(), "delete").await;
    let first = fleet[0].billing("acme/production").await;
    assert_eq!(
        fleet[1].billing("acme/production").await.token(),
        first.token()
    );
    assert_eq!(fleet[0].forget("acme/production", None).await.status, 204);
    eventually("the other replica forgot the token", async || {
        let answer = fleet[1].billing("acme/production").await;
        answer.status == 200 && answer.token() != first.token()
    })
    .await;
    assert_eq!(
        fleet[0].idp_requests().await.len(),
        2,
        "one refetch for both"
    );
    // Compare-and-delete: a stale token changes nothing, the current one is forgotten on both.
    let current = fleet[1].billing("acme/production").await.token().to_owned();
    let stale = json!({ "access_token": first.token() });
    assert_eq!(
        fleet[1].forget("acme/production", Some(stale)).await.status,
        204
    );
    assert_eq!(fleet[0].billing("acme/production").await.token(), current);
    let matching = json!({ "access_token": current });
    assert_eq!(
        fleet[1]
            .forget("acme/production", Some(matching))
            .await
            .status,
        204
    );
    eventually("the other replica forgot the rejected token", async || {
        fleet[0].billing("acme/production").await.token() != current
    })
    .await;
    assert_eq!(fleet[0].idp_requests().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_session_made_through_one_replica_is_refreshed_once_through_the_other() {
    let cluster = shared_cluster();
    let clock = Clock::manual();
    let idp = dev_idp().await;
    let extra = prefix("sessions");
    let a = replica(&idp, cluster, &extra, &clock).await;
    let b = replica(&idp, cluster, &extra, &clock).await;
    let (handle, _) = log_in(&a, &b).await;
    assert_eq!(idp.token_requests(), 1, "the code exchange");
    age_tokens(&clock);
    let path = aged(&handle);
    let (on_a, on_b) = tokio::join!(
        a.user_token(&path, BILLING_KEY),
        b.user_token(&path, BILLING_KEY)
    );
    assert_eq!(on_a.status, 200, "{}", on_a.body);
    assert_eq!(on_b.status, 200, "{}", on_b.body);
    assert_eq!(on_a.token(), on_b.token());
    assert_eq!(idp.token_requests(), 2, "one refresh for both replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_is_shared_through_the_cluster() {
    let idp = Arc::new(MockServer::start().await);
    let rotating = RotatingIdp::mount(&idp).await;
    let builder = TestApp::init()
        .with_config(rotation_config(&idp.uri(), ""))
        .with_idp(Arc::clone(&idp))
        .with_redis(shared_cluster())
        .with_config(prefix("rotation"));
    let fleet = builder.clone().start_fleet(2).await;
    let (first, second) = tokio::join!(rotate(&fleet[0]), rotate(&fleet[1]));
    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(rotating.rotations(), 1);
    for (n, replica) in fleet.iter().enumerate() {
        let answer = replica
            .billing(&format!("acme/production?scope=after-{n}"))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let later = builder.start().await;
    assert_eq!(
        later.billing("acme/production?scope=later").await.status,
        200
    );
    assert_eq!(
        rotating.refused(),
        0,
        "the rotated secret everywhere, first time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failing_over_and_the_whole_cluster_down_fail_no_request() {
    let mut cluster = RedisCluster::start();
    let fleet = fleet_on(&cluster, "failover").await;
    assert_eq!(fleet[0].billing("acme/production").await.status, 200);
    assert_eq!(fleet[1].billing("acme/production").await.status, 200);
    assert_eq!(fleet[0].idp_requests().await.len(), 1);

    // Requests on both replicas throughout: the cached key, and a new key now and then.
    let load = Load::start(&fleet, 10, Duration::from_millis(20));

    // The master holding the token is killed; its replica takes over.
    let holder = cluster
        .masters()
        .into_iter()
        .find(|port| !cluster.keys(*port, "failover:token:").is_empty())
        .expect("a master holds the token");
    cluster.kill(holder);
    let started = std::time::Instant::now();
    while cluster.masters().contains(&holder) || cluster.masters().len() < 3 {
        assert!(started.elapsed() < Duration::from_secs(30), "no failover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.wait_until_ok();
    for replica in &fleet {
        replica.wait_for_shared_cache(true).await;
    }
    load.finish("during the failover").await;
    // The level works again: a new key is one IdP request for both replicas.
    let before = fleet[0].idp_requests().await.len();
    let answer = fleet[0]
        .billing("acme/production?scope=after-failover")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    eventually("the other replica gets it from the cluster", async || {
        fleet[1]
            .billing("acme/production?scope=after-failover")
            .await
            .status
            == 200
    })
    .await;
    assert_eq!(fleet[0].idp_requests().await.len(), before + 1);

    // The whole cluster down: both replicas serve from memory and the IdP.
    cluster.kill_all();
    for replica in &fleet {
        assert_eq!(replica.billing("acme/production").await.status, 200);
        let fresh = replica.billing("acme/production?scope=cluster-down").await;
        assert_eq!(fresh.status, 200, "{}", fresh.body);
    }
}
