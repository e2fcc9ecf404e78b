//! Logging setup (human-readable on a terminal, JSON lines with `LOG_FORMAT=json`) and, in
//! [`metrics`], the Prometheus metrics.
//!
//! The level comes from `RUST_LOG` (for example `RUST_LOG=token_broker=debug`), else `info`.
//! Logs go to stderr so that `token-broker dev` can print its caller key and `curl` line alone
//! on stdout. Two targets besides the module paths can be filtered on their own: [`AUDIT`], one
//! line per token handed to a caller (INFO), and [`ACCESS`], one line per request served (DEBUG:
//! `RUST_LOG=info,access=debug` turns the access log on). Lines are written by a background
//! thread, so a slow or blocked stderr never stalls a request; keep the guard [`init`] returns
//! until exit so the last lines are flushed.

pub mod audit;
pub mod format;
pub mod metrics;
pub mod request;

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// The log target of the audit trail: who was handed which token.
pub const AUDIT: &str = "audit";

/// The log target of the access log: one line per request.
pub const ACCESS: &str = "access";

/// The cause chain of an error (its sources, not the error itself) as one line, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut chain = String::new();
    let mut source = error.source();
    while let Some(cause) = source {
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

/// Flushes buffered log lines when dropped.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: tracing_appender::non_blocking::WorkerGuard,
}

/// Installs the global subscriber; call once, at start, and keep the guard until exit.
pub fn init() -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Lossless: when the buffer is full, requests wait rather than audit lines being dropped.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.event_format(format::Json).init();
    } else {
        builder.event_format(format::Text).init();
    }
    LogGuard { _writer: guard }
}
