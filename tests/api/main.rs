//! Integration tests: the real server on port 0, over real HTTP, against a fake IdP (wiremock) or
//! the built-in development IdP. Set `TEST_LOG=1` to see the server's logs.

mod helpers;

mod auth;
mod cache_keys;
mod client_assertion;
mod delete;
mod deployment;
mod expiry;
mod health;
mod lifetimes;
mod oauth_client;
mod oauth_errors;
mod oauth_requests;
mod process;
mod refresh;
mod reload;
mod request_styles;
mod resilience;
mod single_flight;
mod upstream_errors;
mod user_login;
mod user_refresh;
mod user_round_trip;
