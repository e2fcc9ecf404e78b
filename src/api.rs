//! The HTTP API: handlers, extractors and the mapping of errors to responses, and nothing else.
//!
//! One file per resource: [`tokens`] for callers, [`oauth`] for the OAuth2-compatible facade,
//! [`users`] for user tokens, [`admin`] for operators, [`health`] for probes, [`metrics`] for the
//! Prometheus scrape and [`openapi`] for the OpenAPI document; [`access`] holds the authorisation
//! they share. [`error`] maps every failure to the JSON error body of API.md §2 (the facade maps
//! its own to RFC 6749 §5.2). Routes and middleware are assembled in [`crate::startup`].

pub mod access;
pub mod admin;
pub mod error;
pub mod health;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod tokens;
pub mod users;

pub use error::ApiError;

/// Fallback for unknown paths: a JSON 404.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// Fallback for known paths with another method: a JSON 405.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
