//! Integration tests: the real server on port 0, over real HTTP, against a fake IdP (wiremock) or
//! the built-in development IdP. Set `TEST_LOG=1` to see the server's logs.

mod helpers;

mod admin;
mod auth;
mod cache_keys;
mod delete;
mod expiry;
mod health;
mod lifetimes;
mod limits;
mod logs;
mod metrics;
mod no_leaks;
mod open_start;
mod openapi;
mod process;
mod rate_limit;
mod refresh;
mod reload;
mod request_styles;
mod resilience;
mod single_flight;
mod tls;
mod upstream_errors;
