//! The HTTP API: the route list, handlers, extractors and the one mapping of errors to responses.
//!
//! One file per resource: [`tokens`] for callers, [`oauth`] for the OAuth2-compatible facade,
//! [`user_tokens`] for user tokens, [`admin`] for operators, [`health`] for probes, [`metrics`] for the
//! Prometheus scrape and [`openapi`] for the OpenAPI document; [`token_request`] holds the authorisation
//! they share. [`error`] maps every failure to the JSON error body of docs/api.md, "Errors" (the facade maps
//! its own to RFC 6749 §5.2). [`routes()`] is the one list of routes: the router and the OpenAPI
//! document are both built from it; the middleware stack and the listener are `startup`'s.

pub mod admin;
pub mod audit;
pub mod error;
pub mod health;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod response;
pub mod token_request;
pub mod tokens;
pub mod user_tokens;

use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;

pub use error::ApiError;

/// Whether `route` (a matched route template) is the OAuth2 facade, whose errors have the RFC
/// 6749 shape.
pub fn is_oauth_facade(route: &str) -> bool {
    route.starts_with("/t/")
}

/// The answer to a request that took longer than `server.request_timeout`: 503 with the error
/// body of its API and `Retry-After`.
pub fn timed_out(facade: bool, after: std::time::Duration) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if facade {
        oauth::OAuthError::TimedOut(after).into_response()
    } else {
        ApiError::TimedOut(after).into_response()
    }
}

/// Fallback for unknown paths: a JSON 404.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// Fallback for known paths with another method: a JSON 405.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Which routes a listener serves: everything on one port, or callers' and operators' routes
/// apart when `server.admin_listen` is set (probes and `/openapi.json` on both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Every route, on `server.listen` alone.
    All,
    /// Callers' routes and probes, on `server.listen` beside an admin listener.
    Main,
    /// `/metrics`, `/v1/admin/*` and probes, on `server.admin_listen`.
    Admin,
}

/// Every route with its OpenAPI description. The router and `/openapi.json` are both built from
/// this one list, so neither can miss a route.
pub fn routes() -> OpenApiRouter<AppState> {
    routes_for(Surface::All)
}

/// The routes of one listener, with their OpenAPI description.
pub fn routes_for(surface: Surface) -> OpenApiRouter<AppState> {
    let document = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(probe_routes())
        .merge(openapi_route(surface));
    match surface {
        Surface::All => document.merge(caller_routes()).merge(operator_routes()),
        Surface::Main => document.merge(caller_routes()),
        Surface::Admin => document.merge(operator_routes()),
    }
}

/// Every route a caller uses: tokens, the OAuth2 facade, user tokens.
fn caller_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(token_routes())
        .merge(oauth_facade_routes())
        .merge(user_routes())
}

/// The metrics scrape and the admin API behind the admin key (docs/api.md, "Operations" and "Admin API").
fn operator_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metrics::metrics))
        .merge(admin_routes())
}

/// The caller API of docs/api.md, "Tokens for callers".
fn token_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(tokens::get_token, tokens::delete_token))
}

/// The OAuth2-compatible facade of docs/api.md, `POST /t/{tenant}/{environment}/oauth/token`, kept
/// apart from the `/v1` API because it speaks RFC 6749 and authenticates callers its own way. Its
/// handler is registered here, with `.routes(routes!(...))` like the others.
fn oauth_facade_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(oauth::token))
}

/// User tokens through the authorization-code flow.
fn user_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(user_tokens::authorize))
        .routes(routes!(user_tokens::create_session))
        .routes(routes!(
            user_tokens::get_user_token,
            user_tokens::delete_user_token
        ))
}

/// Probes (docs/api.md, "Operations"), on every listener.
fn probe_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health::livez))
        .routes(routes!(health::readyz))
}

/// The OpenAPI document of `surface`, on every listener. Only this route needs to know which
/// listener it answers on, so only it carries the `Surface` extension (an extension on every
/// route costs every request an insert).
fn openapi_route(surface: Surface) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(openapi::openapi_json))
        .layer(axum::Extension(surface))
}

/// The admin API behind the admin key (docs/api.md, "Admin API").
fn admin_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(admin::tenants))
        .routes(routes!(admin::cache))
        .routes(routes!(admin::reload))
        .routes(routes!(admin::rotate_secret))
}
