//! A Redis Cluster of the test's own: six `redis-server --cluster-enabled yes` on loopback (three
//! masters, three replicas), each in a directory of its own, joined with `redis-cli --cluster
//! create --cluster-replicas 1`, ready once every node says `cluster_state:ok`. Tests that
//! leave a cluster as they found it share one ([`shared_cluster`]); one that kills nodes starts
//! its own.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{CACHE_KEY_ENV, ChildGuard, SharedLevel, free_port};

/// How long a master may be silent before its replica takes over: short, so a failover in a
/// test takes a few seconds.
const NODE_TIMEOUT_MS: &str = "1000";

/// One node: its port and process.
struct Node {
    port: u16,
    child: Option<ChildGuard>,
    /// Not killed by the test.
    alive: bool,
}

/// Six nodes joined into a cluster; killed when dropped.
pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// A loopback port for a cluster node, whose bus port (10,000 above) is free too.
fn node_port() -> u16 {
    loop {
        let port = free_port();
        if std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// What `redis-cli ARGS` printed; panics naming the package when it cannot run.
fn redis_cli(args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run redis-cli ({error}): the cluster tests need it; install redis-tools \
                 (`apt-get install redis-tools`; .ci/run does)"
            )
        });
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl RedisCluster {
    /// Starts six nodes and joins them (three masters with one replica each); waits, polling,
    /// until every node reports `cluster_state:ok`.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("a directory for the cluster");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = node_port();
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
                // Replicas in sync at once, so that one can take over as soon as a test starts.
                .args(["--repl-diskless-sync-delay", "0"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|error| {
                    panic!(
                        "cannot run redis-server ({error}): the cluster tests need a real Redis; \
                         install it (`apt-get install redis-server`; .ci/run does)"
                    )
                });
            nodes.push(Node {
                port,
                child: Some(ChildGuard::new(child)),
                alive: true,
            });
        }
        let cluster = Self { nodes, _dir: dir };
        for node in &cluster.nodes {
            cluster.wait_for(node.port, "PONG", &["ping"]);
        }
        let addresses: Vec<String> = cluster.seeds();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        redis_cli(&create);
        for node in &cluster.nodes {
            cluster.wait_for(node.port, "cluster_state:ok", &["cluster", "info"]);
        }
        // A replica that never synced cannot take over: wait until each has.
        for node in &cluster.nodes {
            let port = node.port.to_string();
            if redis_cli(&["-p", &port, "info", "replication"]).contains("role:slave") {
                cluster.wait_for(node.port, "master_link_status:up", &["info", "replication"]);
            }
        }
        cluster
    }

    /// Polls `redis-cli -p PORT ARGS` until it prints `expected`, for at most 30 seconds.
    fn wait_for(&self, port: u16, expected: &str, args: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = port.to_string();
        let mut all = vec!["-p", &port];
        all.extend(args);
        while !redis_cli(&all).contains(expected) {
            assert!(
                Instant::now() < deadline,
                "redis-cli -p {port} {args:?} never printed {expected}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every live node reports `cluster_state:ok` (after a failover).
    pub fn wait_until_ok(&self) {
        for node in self.nodes.iter().filter(|node| node.alive) {
            self.wait_for(node.port, "cluster_state:ok", &["cluster", "info"]);
        }
    }

    /// `127.0.0.1:PORT` of every node.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect()
    }

    /// The ports of the masters, as a live node sees them now.
    pub fn masters(&self) -> Vec<u16> {
        let alive = self
            .nodes
            .iter()
            .find(|node| node.alive)
            .expect("a live node");
        redis_cli(&["-p", &alive.port.to_string(), "cluster", "nodes"])
            .lines()
            .filter(|line| {
                let flags = line.split(' ').nth(2).unwrap_or_default();
                flags.contains("master") && !flags.contains("fail")
            })
            .filter_map(|line| {
                let address = line.split(' ').nth(1)?;
                address.split(['@', ':']).nth(1)?.parse().ok()
            })
            .collect()
    }

    /// The keys on node `port` that start with `prefix`.
    pub fn keys(&self, port: u16, prefix: &str) -> Vec<String> {
        redis_cli(&["-p", &port.to_string(), "keys", &format!("{prefix}*")])
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Kills node `port` at once (`SIGKILL`), as a crash would.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|node| node.port == port) {
            node.child = None;
            node.alive = false;
        }
    }

    /// Kills every node.
    pub fn kill_all(&mut self) {
        for node in &mut self.nodes {
            node.child = None;
            node.alive = false;
        }
    }

    /// Hands the nodes to a watchdog that kills them (and removes their directory) when this
    /// test process ends: for a cluster kept in a `static`, which is never dropped.
    #[expect(
        clippy::zombie_processes,
        reason = "the watchdog outlives the tests on purpose; it exits with the test process"
    )]
    fn outlive_no_test(mut self) -> Self {
        let pids: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|node| node.child.as_ref().map(|child| child.id().to_string()))
            .collect();
        let script = format!(
            "while kill -0 {} 2>/dev/null; do sleep 1; done; kill -9 {} 2>/dev/null; rm -rf '{}'",
            std::process::id(),
            pids.join(" "),
            self._dir.path().display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("a watchdog shell");
        for node in &mut self.nodes {
            if let Some(child) = node.child.take() {
                std::mem::forget(child);
            }
        }
        self
    }
}

impl SharedLevel for RedisCluster {
    fn shared_cache_layer(&self) -> String {
        let nodes: Vec<String> = self
            .seeds()
            .iter()
            .map(|seed| format!("\"{seed}\""))
            .collect();
        format!(
            "[shared_cache]\ncluster_nodes = [{}]\nencryption_key_env = \"{CACHE_KEY_ENV}\"\n",
            nodes.join(", ")
        )
    }
}

/// The cluster the tests that leave it as they found it share (each with a `key_prefix` of its
/// own), started by the first that asks.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| RedisCluster::start().outlive_no_test())
}
