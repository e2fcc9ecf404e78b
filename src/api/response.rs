//! The pieces every token answer shares: `Cache-Control: no-store` (tokens and their errors must
//! never be cached), the `x-cache` header, and the two token bodies (docs/api.md for `/v1`, RFC
//! 6749 §5.1 at the facade).
//!
//! The `/v1` body is pre-serialised in the cache entry and shared by the hits of one second (see
//! [`crate::token::CachedToken::body`]); the facade's body is smaller and serialised per request.

use axum::body::Body;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::token::{CacheStatus, Lease};

/// `x-cache`: `hit`, or `miss` when the request waited on the IdP.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
static JSON: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");
static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
static NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
static HIT: HeaderValue = HeaderValue::from_static("hit");
static MISS: HeaderValue = HeaderValue::from_static("miss");

/// `Cache-Control: no-store`, for every answer that carries a token, a handle or an error.
pub fn no_store() -> [(HeaderName, HeaderValue); 1] {
    [(CACHE_CONTROL, NO_STORE.clone())]
}

/// `Cache-Control: no-store` and `Pragma: no-cache`, as RFC 6749 §5.1 asks of token answers.
pub fn no_store_oauth() -> [(HeaderName, HeaderValue); 2] {
    [
        (CACHE_CONTROL, NO_STORE.clone()),
        (PRAGMA, NO_CACHE.clone()),
    ]
}

/// The `x-cache` header of a lease.
fn x_cache(status: CacheStatus) -> (HeaderName, HeaderValue) {
    let value = match status {
        CacheStatus::Hit => HIT.clone(),
        CacheStatus::Miss => MISS.clone(),
    };
    (X_CACHE.clone(), value)
}

/// The headers of a token answer, built once per cache status, so that a hit clones the map
/// instead of hashing three header names.
static TOKEN_HEADERS: std::sync::LazyLock<[HeaderMap; 2]> = std::sync::LazyLock::new(|| {
    [CacheStatus::Hit, CacheStatus::Miss].map(|status| {
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(CONTENT_TYPE, JSON.clone());
        headers.insert(CACHE_CONTROL, NO_STORE.clone());
        let (name, value) = x_cache(status);
        headers.insert(name, value);
        headers
    })
});

/// A 200 with the token body of docs/api.md (`GET /v1/tokens/…`), `Cache-Control: no-store` and `x-cache`.
pub fn token(lease: &Lease) -> Response {
    let mut response = Response::new(Body::from(lease.token.body(lease.at)));
    let [hit, miss] = &*TOKEN_HEADERS;
    *response.headers_mut() = match lease.status {
        CacheStatus::Hit => hit.clone(),
        CacheStatus::Miss => miss.clone(),
    };
    response
}

/// The RFC 6749 §5.1 success body.
#[derive(Serialize)]
struct OAuthTokenBody<'a> {
    access_token: &'a str,
    token_type: &'a str,
    expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

/// A 200 with the RFC 6749 §5.1 body, `no-store`, `Pragma: no-cache` and `x-cache`.
pub fn oauth_token(lease: &Lease) -> Response {
    let token = &lease.token;
    let access_token = token.access_token();
    let body = OAuthTokenBody {
        access_token: access_token.expose(),
        token_type: token.token_type(),
        expires_in: token.remaining(lease.at).as_secs(),
        scope: token.scope(),
    };
    let [cache_control, pragma] = no_store_oauth();
    (
        StatusCode::OK,
        [cache_control, pragma, x_cache(lease.status)],
        axum::Json(body),
    )
        .into_response()
}
