//! Integration tests: the real server on port 0, over real HTTP, against a fake IdP (wiremock) or
//! the built-in development IdP, and with a `redis-server` of their own for the shared cache
//! (tests fail when it is not installed). Set `TEST_LOG=1` to see the server's logs.
//!
//! Tests read the real clock to time real servers and processes; the broker under test reads its
//! own [`token_broker::clock::Clock`], which a test may move instead of waiting.

#![allow(
    clippy::disallowed_methods,
    reason = "tests time real servers; the broker's time is its Clock"
)]

mod helpers;

mod admin;
mod auth;
mod cache_keys;
mod client_assertion;
mod credentials;
mod delete;
mod deployment;
mod docs;
mod expiry;
mod hardening;
mod health;
mod hit_path;
mod layering;
mod lifetimes;
mod limits;
mod logs;
mod metrics;
mod no_leaks;
mod oauth_client;
mod oauth_errors;
mod oauth_requests;
mod open_start;
mod openapi;
mod organizations;
mod process;
mod prometheus;
mod promise;
mod rate_limit;
mod redis_cluster;
mod redis_sentinel;
mod redis_tls;
mod refresh;
mod reload;
mod request_styles;
mod resilience;
mod rotation;
mod shared_cache;
mod shared_sessions;
mod single_flight;
mod tls;
mod upstream_errors;
mod user_budget;
mod user_login;
mod user_refresh;
mod user_round_trip;
mod workload;
