//! token-broker: one service that fetches OAuth2 machine-to-machine tokens for many tenants,
//! caches them until shortly before they expire, and hands them to internal callers, so that the
//! IdP sees one request per token lifetime instead of one per pod and client secrets live in one
//! place.
//!
//! # Layout
//!
//! - [`config`]: typed, validated settings (file, environment, secrets).
//! - [`idp`]: the IdP token endpoint client; one request, one classified answer.
//! - [`broker`]: cache, single flight, refresh ahead; knows nothing about HTTP.
//! - [`user_tokens`]: user tokens through the authorization-code flow: state, PKCE, handles, refresh.
//! - [`shared_cache`]: Redis as the cache level shared by replicas, tokens encrypted at rest.
//! - [`auth`]: caller keys, allow rules, the authenticating extractor.
//! - [`api`]: handlers and the one mapping of errors to HTTP.
//! - [`startup`]: state, the route list, middleware, listener (HTTP or HTTPS), graceful shutdown.
//! - [`telemetry`]: logging setup and the Prometheus metrics.
//! - [`dev_idp`] and [`dev`]: the built-in development IdP and the `dev` command.
//!
//! Dependencies point one way: `api → auth, broker, users → idp`; `shared_cache` implements the
//! broker's `SharedCache` trait and `startup` hands it to the broker; `telemetry` is a leaf that
//! `broker` and `startup` record into.

pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod config;
pub mod dev;
pub mod dev_idp;
pub mod idp;
pub mod shared_cache;
pub mod startup;
pub mod telemetry;
pub mod user_tokens;
