//! High-availability Redis behind Sentinel: a master, a replica and a sentinel of the test's own
//! (`redis-server --sentinel` needs no other package). The brokers find the master through the
//! sentinel, share one token, follow the master through a failover forced with
//! `SENTINEL FAILOVER` (after `WAIT` confirmed replication), and still share one token after it.

use crate::helpers::*;

const MASTER_NAME: &str = "tokens";

/// A master, its replica and a sentinel watching them.
struct Ha {
    master: RedisServer,
    _replica: RedisServer,
    sentinel: RedisServer,
    replica_port: u16,
    _dir: tempfile::TempDir,
}

impl Ha {
    async fn start() -> Self {
        let master = RedisServer::start().await;
        let replica_port = free_port();
        let replica_client =
            redis::Client::open(format!("redis://127.0.0.1:{replica_port}")).unwrap();
        let master_address = master.port().to_string();
        let replica = RedisServer::start_with(
            replica_port,
            &[
                "--port",
                &replica_port.to_string(),
                "--replicaof",
                "127.0.0.1",
                &master_address,
            ],
            replica_client,
        )
        .await;
        // The sentinel rewrites its configuration file, so it gets one of its own.
        let dir = tempfile::tempdir().unwrap();
        let sentinel_port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor {MASTER_NAME} 127.0.0.1 {} 1\nsentinel down-after-milliseconds {MASTER_NAME} 2000\nsentinel failover-timeout {MASTER_NAME} 10000\n",
                master.port()
            ),
        )
        .unwrap();
        let sentinel_client =
            redis::Client::open(format!("redis://127.0.0.1:{sentinel_port}")).unwrap();
        let conf = conf.display().to_string();
        let sentinel =
            RedisServer::start_with(sentinel_port, &[&conf, "--sentinel"], sentinel_client).await;
        let ha = Self {
            master,
            _replica: replica,
            sentinel,
            replica_port,
            _dir: dir,
        };
        // The sentinel knows the replica once it has read the master's INFO.
        let mut sentinel = ha.sentinel.connection().await;
        eventually("the sentinel knows the replica", async || {
            let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                .arg("replicas")
                .arg(MASTER_NAME)
                .query_async(&mut sentinel)
                .await
                .unwrap_or_default();
            !replicas.is_empty()
        })
        .await;
        ha
    }

    /// The master's port, as the sentinel says now.
    async fn master_port(&self) -> u16 {
        let mut sentinel = self.sentinel.connection().await;
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER_NAME)
            .query_async(&mut sentinel)
            .await
            .unwrap();
        port
    }

    /// The `[shared_cache]` layer of a broker that finds the master through the sentinel.
    fn config(&self) -> String {
        format!(
            r#"
            [shared_cache]
            sentinels = ["127.0.0.1:{}"]
            master_name = "{MASTER_NAME}"
            encryption_key_env = "{CACHE_KEY_ENV}"
            "#,
            self.sentinel.port()
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_follow_the_master_through_a_failover_and_still_share_one_token() {
    let ha = Ha::start().await;
    let fleet = sentinel_fleet(&ha.config()).await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;

    assert_eq!(fleet[0].billing("acme/production").await.token(), "token-1");
    assert_eq!(fleet[1].billing("acme/production").await.token(), "token-1");
    assert_eq!(fleet[0].idp_requests().await.to("acme").len(), 1);

    // Replication has the token, then the sentinel fails over to the replica.
    let mut master = ha.master.connection().await;
    eventually("the replica confirms the writes (WAIT)", async || {
        let replicas: redis::RedisResult<i64> = redis::cmd("WAIT")
            .arg(1)
            .arg(100)
            .query_async(&mut master)
            .await;
        replicas == Ok(1)
    })
    .await;
    let mut sentinel = ha.sentinel.connection().await;
    let _: () = redis::cmd("SENTINEL")
        .arg("failover")
        .arg(MASTER_NAME)
        .query_async(&mut sentinel)
        .await
        .unwrap();
    eventually("the sentinel names the replica as master", async || {
        ha.master_port().await == ha.replica_port
    })
    .await;
    // The old master becomes a read-only replica of the new one (as the sentinel makes it at its
    // next look, done here at once), so a broker that stayed on it would have its writes fail.
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(ha.replica_port)
        .query_async(&mut master)
        .await
        .unwrap();
    eventually("the old master is a replica", async || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut master)
            .await
            .unwrap_or_default();
        info.contains("role:slave")
    })
    .await;
    for app in &fleet {
        eventually(
            "the broker moved to the new master and subscribed there",
            async || {
                let scrape = app.scrape().await;
                metric(&scrape, "token_broker_shared_cache_master_changes_total") == Some(2.0)
                    && metric(&scrape, "token_broker_shared_cache_subscribed") == Some(1.0)
                    && app.state.broker.shared_cache_healthy() == Some(true)
            },
        )
        .await;
    }

    // Writes go to the new master: a DELETE and a new token reach the other broker, and a key
    // new to both is fetched once.
    assert_eq!(fleet[0].forget("acme/production", None).await.status, 204);
    let renewed = fleet[0].billing("acme/production").await;
    assert_eq!(renewed.status, 200, "{}", renewed.body);
    let token = renewed.token().to_owned();
    eventually("the other broker is served the new token", async || {
        fleet[1].billing("acme/production").await.token() == token
    })
    .await;
    let scoped = "acme/production?scope=read";
    let first = fleet[1].billing(scoped).await.token().to_owned();
    assert_eq!(fleet[0].billing(scoped).await.token(), first);
    assert_eq!(
        fleet[0].idp_requests().await.to("acme").len(),
        3,
        "token-1 before the failover, one renewed token and one new key after it"
    );
}

#[tokio::test]
async fn an_unknown_master_name_leaves_the_broker_serving() {
    let ha = Ha::start().await;
    let idp = wiremock::MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let config = ha
        .config()
        .replace(&format!("\"{MASTER_NAME}\""), "\"no-such-master\"");
    let app = TestApp::init()
        .with_idp(idp)
        .with_config(config)
        .start()
        .await;
    eventually("the probe asks the sentinel and fails", async || {
        metric(
            &app.scrape().await,
            "token_broker_shared_cache_errors_total",
        ) >= Some(1.0)
    })
    .await;
    assert_eq!(app.state.broker.shared_cache_healthy(), Some(false));
    for _ in 0..5 {
        assert_eq!(app.billing("acme/production").await.status, 200);
    }
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}

/// Two brokers sharing one fake IdP and the sentinel's master, with the `[shared_cache]` layer
/// `config`.
async fn sentinel_fleet(config: &str) -> Vec<TestApp> {
    let fleet = TestApp::init().with_config(config).start_fleet(2).await;
    for app in &fleet {
        app.wait_for_shared_cache(true).await;
    }
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_going_away_leave_the_known_master_in_use() {
    let mut ha = Ha::start().await;
    let fleet = sentinel_fleet(&ha.config()).await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;

    // A rolling restart of the sentinels: the master is healthy and stays in use, through
    // three probes or more.
    ha.sentinel.kill();
    for _ in 0..30 {
        for app in &fleet {
            assert_eq!(app.state.broker.shared_cache_healthy(), Some(true));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let token = fleet[0].billing("acme/production").await;
    assert_eq!(token.status, 200, "{}", token.body);
    assert_eq!(
        fleet[1].billing("acme/production").await.token(),
        token.token()
    );
    assert_eq!(
        fleet[0].idp_requests().await.to("acme").len(),
        1,
        "the brokers still share through the master"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_that_does_not_answer_is_passed_over_for_the_next() {
    let ha = Ha::start().await;
    // Nothing listens on the first sentinel's port.
    let config = ha.config().replace(
        "sentinels = [",
        &format!("sentinels = [\"127.0.0.1:{}\", ", free_port()),
    );
    assert!(config.contains("\", \"127.0.0.1:"), "{config}");
    let fleet = sentinel_fleet(&config).await;
    issue_tokens(&fleet[0].idp, "acme", TokenIssuer::new(3600)).await;
    let token = fleet[0].billing("acme/production").await;
    assert_eq!(token.status, 200, "{}", token.body);
    assert_eq!(
        fleet[1].billing("acme/production").await.token(),
        token.token()
    );
    assert_eq!(
        fleet[0].idp_requests().await.to("acme").len(),
        1,
        "both found the master through the second sentinel"
    );
}
