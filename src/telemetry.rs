//! Logging setup (human-readable on a terminal, JSON lines with `LOG_FORMAT=json`) and, in
//! [`metrics`], the Prometheus metrics.
//!
//! The level comes from `RUST_LOG` (for example `RUST_LOG=token_broker=debug`), else `info`.
//! Logs go to stderr so that `token-broker dev` can print its caller key and `curl` line alone
//! on stdout. Two targets besides the module paths can be filtered on their own: [`AUDIT`], one
//! line per token handed to a caller, and [`ACCESS`], one line per request served (probes and
//! scrapes at DEBUG, everything else at INFO).

pub mod metrics;

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// The log target of the audit trail: who was handed which token.
pub const AUDIT: &str = "audit";

/// The log target of the access log: one line per request.
pub const ACCESS: &str = "access";

/// Installs the global subscriber; call once, at start.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}
