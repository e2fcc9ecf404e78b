//! token-broker: one service that fetches OAuth2 machine-to-machine tokens for many tenants,
//! caches them until shortly before they expire, and hands them to internal callers, so that the
//! IdP sees one request per token lifetime instead of one per pod and client secrets live in one
//! place.
//!
//! # Layout
//!
//! - [`clock`]: the one clock, which tests move instead of waiting.
//! - [`telemetry`]: logging setup and formats, the request's log context, the audit trail's
//!   counters, the cause-chain formatter and the Prometheus metrics.
//! - [`limits`]: rate limiters and each caller's IdP budget.
//! - [`idp`]: the IdP token endpoint client and the environment settings it consumes.
//! - [`token`]: the token core that machine tokens, user tokens and the shared level build on:
//!   keys, cached tokens and leases, the one SHA-256 id type, the shared level's vocabulary, the
//!   refresh backoff.
//! - [`broker`]: cache, single flight, refresh ahead, failure policy, replicas; no HTTP.
//! - [`user_tokens`]: user tokens through the authorization-code flow: state, PKCE, handles.
//! - [`shared_cache`]: Redis as the level shared by replicas (tokens, user sessions), encrypted at
//!   rest.
//! - [`auth`]: caller keys and workload tokens (with their issuers' JWKS), allow rules, the
//!   authenticating extractors.
//! - [`config`]: loads, layers and validates the configuration into each component's settings.
//! - [`app`]: the state every handler shares, the configuration snapshot and reload.
//! - [`api`]: the route list, the handlers and the one mapping of errors to HTTP.
//! - [`startup`]: middleware stack, listener (HTTP or HTTPS), graceful shutdown.
//! - [`dev_idp`] and [`dev`]: the built-in development IdP and the `dev` command.
//!
//! Dependencies point one way, down this table: a module names `crate::<module>` only for the
//! modules in its row (the `layering` integration test reads this table and fails on any other).
//! Components receive their own settings types and never import `config`.
//!
//! | module | may use |
//! | --- | --- |
//! | `dev` | `startup`, `app`, `config`, `auth`, `dev_idp`, `telemetry`, `clock` |
//! | `startup` | `api`, `app`, `config`, `telemetry`, `clock` |
//! | `api` | `app`, `config`, `auth`, `user_tokens`, `broker`, `token`, `limits`, `idp`, `telemetry`, `clock` |
//! | `app` | `config`, `auth`, `user_tokens`, `shared_cache`, `broker`, `token`, `limits`, `idp`, `telemetry`, `clock` |
//! | `config` | `auth`, `user_tokens`, `shared_cache`, `broker`, `token`, `idp`, `telemetry`, `clock` |
//! | `auth` | `token`, `limits`, `idp`, `telemetry`, `clock` |
//! | `shared_cache` | `user_tokens`, `broker`, `token`, `idp`, `telemetry`, `clock` |
//! | `user_tokens` | `broker`, `token`, `limits`, `idp`, `telemetry`, `clock` |
//! | `broker` | `token`, `limits`, `idp`, `telemetry`, `clock` |
//! | `token` | `limits`, `idp`, `telemetry`, `clock` |
//! | `dev_idp` | `idp`, `clock` |
//! | `idp` | `telemetry`, `clock` |
//! | `limits` | `clock` |
//! | `telemetry` | `clock` |
//! | `clock` | |
//!
//! The shared level is reached through traits of the modules that use it (`broker::SharedCache`,
//! `user_tokens::SharedSessions`), which `shared_cache` implements with the token core's types,
//! so neither knows Redis and none reaches into another's insides.
//!
//! Files inside a module import each other in no circle, and a file longer than 600 lines
//! before its `#[cfg(test)]` module is a smell: split by subject, or say in its `//!` why its
//! subject is long (the same test checks all three).

pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod clock;
pub mod config;
pub mod dev;
pub mod dev_idp;
pub mod idp;
pub mod limits;
pub mod shared_cache;
pub mod startup;
pub mod telemetry;
pub mod token;
pub mod user_tokens;
