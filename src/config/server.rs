//! `[server]`: the listener and its limits, read by `startup`, and their checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The least `server.max_header_bytes` that hyper accepts as its read buffer.
pub const MIN_HEADER_BYTES: usize = 8192;

/// `[server]`: the listener and its limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the listener binds, `host:port`.
    pub listen: String,
    /// How long the listener keeps accepting after a shutdown signal while `/readyz` answers
    /// 503, so load balancers notice before connections are refused.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// How long in-flight requests may take to finish after the listener closes.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Bound on the time one request may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often the files the configuration names are checked for a change, which reloads
    /// as `SIGHUP` does; zero turns the check off.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Largest accepted request head (request line and headers) in bytes; larger ones get 431.
    pub max_header_bytes: usize,
    /// Most connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A second listener for `/metrics` and `/v1/admin/*` (then not served on `listen`).
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
}

/// `[server.tls]`: the listener's certificate chain and private key, PEM files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The certificate chain, leaf first.
    pub certificate_file: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// The `server.*` settings that differ between `new` and `running` and are read only at start.
pub(super) fn needing_restart(new: &ServerSettings, running: &ServerSettings) -> Vec<String> {
    let fields = [
        ("server.listen", new.listen != running.listen),
        (
            "server.admin_listen",
            new.admin_listen != running.admin_listen,
        ),
        (
            "server.max_connections",
            new.max_connections != running.max_connections,
        ),
        // New certificate files are applied; turning TLS on or off needs a restart.
        ("server.tls", new.tls.is_some() != running.tls.is_some()),
        (
            "server.shutdown_grace",
            new.shutdown_grace != running.shutdown_grace,
        ),
        (
            "server.request_timeout",
            new.request_timeout != running.request_timeout,
        ),
        (
            "server.max_body_bytes",
            new.max_body_bytes != running.max_body_bytes,
        ),
        (
            "server.max_header_bytes",
            new.max_header_bytes != running.max_header_bytes,
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// Every problem of `[server]`, added to `problems`.
pub(super) fn check(server: &ServerSettings, problems: &mut Vec<String>) {
    if server.listen.parse::<SocketAddr>().is_err() {
        problems.push("server.listen: not an address like 0.0.0.0:8080".to_owned());
    }
    if server.max_connections == 0 {
        problems.push("server.max_connections: must be at least 1".to_owned());
    }
    if !server.watch_interval.is_zero() && server.watch_interval < Duration::from_secs(1) {
        problems.push(
            "server.watch_interval: at least 1s (every file is read at each check), or \"0s\" for none"
                .to_owned(),
        );
    }
    if let Some(admin) = &server.admin_listen {
        match admin.parse::<SocketAddr>() {
            Err(_) => {
                problems.push("server.admin_listen: not an address like 127.0.0.1:9090".to_owned())
            }
            Ok(admin)
                if server
                    .listen
                    .parse::<SocketAddr>()
                    .is_ok_and(|main| main == admin && admin.port() != 0) =>
            {
                problems.push("server.admin_listen: must differ from server.listen".to_owned());
            }
            Ok(_) => {}
        }
    }
    if server.max_body_bytes == 0 {
        problems.push("server.max_body_bytes: must be above 0".to_owned());
    }
    if server.request_timeout.is_zero() {
        problems.push("server.request_timeout: must be above 0".to_owned());
    }
    if server.max_header_bytes < MIN_HEADER_BYTES {
        problems.push(format!(
            "server.max_header_bytes: must be at least {MIN_HEADER_BYTES}, the least the HTTP server accepts"
        ));
    }
    if let Some(tls) = &server.tls {
        for (name, path) in [
            ("certificate_file", &tls.certificate_file),
            ("key_file", &tls.key_file),
        ] {
            if let Err(e) = std::fs::File::open(path) {
                problems.push(format!(
                    "server.tls.{name}: cannot read {}: {e}",
                    path.display()
                ));
            }
        }
    }
}
