//! `/v1/users/...`: user tokens through the authorization-code flow.
//!
//! - `POST /v1/users/{tenant}/{environment}/authorize` → an authorization URL and its `state`;
//! - `POST /v1/users/{tenant}/{environment}/sessions` with the returned `code` and `state` → a handle;
//! - `GET /v1/users/handles/{handle}` → a fresh access token; `DELETE` forgets the handle.
//!
//! Every route authenticates the caller and applies its allow rules to the tenant, environment
//! and audience ([`token_request`]), on each request (so a rule removed later applies to old handles
//! too). A handle is bound to the caller that created it: to anyone else it does not exist.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::error::ErrorBody;
use crate::api::response::{self, no_store};
use crate::api::token_request::{self, TokenRequest, check_value, printable};
use crate::api::tokens::parse_min_ttl;
use crate::api::{ApiError, audit};
use crate::app::AppState;
use crate::auth::Authenticated;
use crate::token::HandleId;
use crate::user_tokens::UserError;

/// Longest handle looked up; anything longer is not one of ours.
const MAX_HANDLE_LEN: usize = 64;

/// The optional body of `POST .../authorize`.
#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeBody {
    /// The API the user token is for; defaults to the environment's `audience`.
    #[schema(max_length = 1024, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    audience: Option<String>,
    /// Space-separated scopes.
    #[schema(max_length = 1024, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    scope: Option<String>,
}

#[derive(Serialize)]
struct AuthorizationBody<'a> {
    authorization_url: &'a str,
    state: &'a str,
    expires_in: u64,
}

/// `POST /v1/users/{tenant}/{environment}/authorize`: an authorization URL for a user to open.
#[utoipa::path(
    post,
    path = "/v1/users/{tenant}/{environment}/authorize",
    tag = "users",
    summary = "An authorization URL (with state and PKCE) for a user to open",
    params(
        ("tenant" = String, Path, description = "Configured tenant name", pattern = "^[a-z0-9_-]{1,64}$"),
        ("environment" = String, Path, description = "Configured environment name", pattern = "^[a-z0-9_-]{1,64}$"),
    ),
    request_body(content = Option<AuthorizeBody>, content_type = "application/json", description = "Optional; an empty body or `null` asks for the default audience and no scope"),
    responses(
        (status = 200, description = "{authorization_url, state, expires_in}"),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such environment, or no user tokens configured", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the caller's rate, or users.max_pending_per_caller; with Retry-After", body = ErrorBody),
    ),
    security(("caller_key" = [])),
)]
pub async fn authorize(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path((tenant, environment)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: AuthorizeBody = json_body(body, r#"{"audience": "...", "scope": "..."}"#)?;
    let audience = body.audience.filter(|audience| !audience.trim().is_empty());
    let scope = body.scope.unwrap_or_default();
    if let Some(audience) = &audience {
        check_value("audience", audience)?;
    }
    check_value("scope", &scope)?;
    let request = TokenRequest {
        audience,
        scope,
        min_ttl: None,
        organization: None,
    };
    let authorised = token_request::authorise(&state, &caller, &tenant, &environment, request)?;
    let authorization = state
        .user_tokens
        .start(
            Arc::clone(&caller.name),
            authorised.key,
            &authorised.environment,
        )
        .await?;
    let body = AuthorizationBody {
        authorization_url: authorization.url.as_str(),
        state: &authorization.state,
        expires_in: authorization.expires_in.as_secs(),
    };
    Ok((StatusCode::OK, no_store(), Json(body)).into_response())
}

/// The body of `POST .../sessions`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionBody {
    /// The authorization code the IdP sent to the redirect URI.
    #[schema(
        min_length = 1,
        max_length = 1024,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    code: String,
    /// The `state` of the authorization URL.
    #[schema(
        min_length = 1,
        max_length = 1024,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    state: String,
}

#[derive(Serialize)]
struct HandleBody<'a> {
    handle: &'a str,
}

/// `POST /v1/users/{tenant}/{environment}/sessions`: exchanges the code for a handle.
#[utoipa::path(
    post,
    path = "/v1/users/{tenant}/{environment}/sessions",
    tag = "users",
    summary = "Exchange the returned code and state for a handle",
    params(
        ("tenant" = String, Path, description = "Configured tenant name", pattern = "^[a-z0-9_-]{1,64}$"),
        ("environment" = String, Path, description = "Configured environment name", pattern = "^[a-z0-9_-]{1,64}$"),
    ),
    request_body(content = SessionBody, content_type = "application/json"),
    responses(
        (status = 201, description = "{handle}"),
        (status = 400, description = "`invalid_request` or `invalid_grant`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such environment, or no user tokens configured", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 500, description = "`internal_error`", body = ErrorBody),
        (status = 502, description = "`upstream_rejected`", body = ErrorBody),
        (status = 503, description = "`upstream_unavailable`", body = ErrorBody),
    ),
    security(("caller_key" = [])),
)]
pub async fn create_session(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path((tenant, environment)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: Option<SessionBody> = json_body(body, r#"{"code": "...", "state": "..."}"#)?;
    let Some(SessionBody {
        code,
        state: oauth_state,
    }) = body
    else {
        return Err(ApiError::InvalidRequest(
            r#"the body must be {"code": "...", "state": "..."}"#.into(),
        ));
    };
    for (name, value) in [("code", &code), ("state", &oauth_state)] {
        check_value(name, value)?;
        if value.is_empty() {
            return Err(ApiError::InvalidRequest(format!("'{name}' is empty")));
        }
    }
    // Refusals in the usual order before the state is looked at: 403, then 404 for an
    // environment that is not configured or not set up for user tokens.
    let configured = token_request::authorise_environment(&state, &caller, &tenant, &environment)?;
    if configured.user_login.is_none() {
        return Err(UserError::NotEnabled {
            tenant: configured.tenant.to_string(),
            environment: configured.environment.to_string(),
        }
        .into());
    }
    // The exchange is charged before the one-time state is spent, and given back when it
    // never starts, so a caller over its budget can retry with the same state.
    state.user_tokens.charge_exchange(&caller.idp_budget)?;
    let redeemed = state
        .user_tokens
        .redeem(&caller.name, &tenant, &environment, &oauth_state)
        .await
        .map_err(ApiError::from)
        .and_then(|pending| {
            let settings = token_request::authorise_key(&state, &caller, &pending.key)?;
            Ok((pending, settings))
        });
    let (pending, settings) = redeemed.inspect_err(|_| caller.idp_budget.refund())?;
    let key = pending.key.clone();
    let handle = state
        .user_tokens
        .exchange(pending, settings, code, &caller.idp_budget)
        .await?;
    audit::session_created(&caller, &key, &HandleId::of(&handle));
    let body = HandleBody { handle: &handle };
    Ok((StatusCode::CREATED, no_store(), Json(body)).into_response())
}

/// `GET /v1/users/handles/{handle}?min_ttl=`: a user access token with enough validity left.
#[utoipa::path(
    get,
    path = "/v1/users/handles/{handle}",
    tag = "users",
    summary = "A fresh user access token, refreshed when needed",
    params(
        ("handle" = String, Path, description = "The handle returned by sessions", pattern = "^[A-Za-z0-9_-]{1,64}$"),
        ("min_ttl" = Option<u64>, Query, description = "Seconds of validity the caller needs left (at most a year)", minimum = 0, maximum = 31536000),
    ),
    responses(
        (status = 200, description = "The token body of GET /v1/tokens", body = crate::api::tokens::TokenResponse),
        (status = 400, description = "`invalid_request`: a malformed min_ttl", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such handle", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 500, description = "`internal_error`", body = ErrorBody),
        (status = 502, description = "`upstream_rejected`", body = ErrorBody),
        (status = 503, description = "`upstream_unavailable`", body = ErrorBody),
    ),
    security(("caller_key" = [])),
)]
pub async fn get_user_token(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(handle): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let min_ttl = parse_handle_query(query.as_deref())?;
    let session = state
        .user_tokens
        .session(&caller.name, known_form(&handle)?)
        .await?;
    let settings = token_request::authorise_key(&state, &caller, session.key())?;
    let lease = state
        .user_tokens
        .token(&session, &settings, min_ttl, &caller.idp_budget)
        .await?;
    let id = session.id();
    audit::handed_out(&state.audit, &caller, session.key(), &lease, Some(&id));
    Ok(response::token(&lease))
}

#[utoipa::path(
    delete,
    path = "/v1/users/handles/{handle}",
    tag = "users",
    summary = "Forget a handle and its refresh token",
    params(
        ("handle" = String, Path, description = "The handle returned by sessions", pattern = "^[A-Za-z0-9_-]{1,64}$"),
    ),
    responses(
        (status = 204, description = "Forgotten, or nothing to forget"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 503, description = "`upstream_unavailable`: the shared cache that holds sessions cannot be reached, so the handle is not forgotten everywhere yet; retry after Retry-After", body = ErrorBody),
    ),
    security(("caller_key" = [])),
)]
/// `DELETE /v1/users/handles/{handle}`: forgets the session and its refresh token on every
/// replica. 204 whether there was one or not, so a caller cannot probe for other callers'
/// handles; 503 when the shared level that holds it cannot be reached.
pub async fn delete_user_token(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(handle): Path<String>,
) -> Result<StatusCode, ApiError> {
    if let Ok(handle) = known_form(&handle) {
        let forgotten = state.user_tokens.forget(&caller.name, handle).await?;
        audit::session_forgotten(&caller, &HandleId::of(handle), forgotten.is_some());
        if let Some(session) = forgotten {
            let key = session.key();
            let environment = state
                .current()
                .settings
                .environment(&key.tenant, &key.environment)
                .cloned();
            if let Some(environment) = environment {
                state.user_tokens.revoke_later(session, environment);
            }
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The handle when it could be one of ours; a 404 otherwise, without a lookup.
fn known_form(handle: &str) -> Result<&str, ApiError> {
    let plausible = handle.len() <= MAX_HANDLE_LEN
        && handle
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plausible {
        Ok(handle)
    } else {
        Err(UserError::UnknownHandle.into())
    }
}

fn parse_handle_query(raw: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let mut min_ttl = None;
    for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if name != "min_ttl" {
            return Err(ApiError::InvalidRequest(format!(
                "unknown query parameter '{}'; expected min_ttl",
                printable(&name)
            )));
        }
        if min_ttl.is_some() {
            return Err(ApiError::InvalidRequest(
                "query parameter 'min_ttl' is given more than once".into(),
            ));
        }
        min_ttl = Some(parse_min_ttl(&value)?);
    }
    Ok(min_ttl)
}

/// A JSON body; an empty body is `T::default()`. Serde's message is not passed on, since it
/// could quote a value.
fn json_body<T: DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
    expected: &str,
) -> Result<T, ApiError> {
    let body = body?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    // JSON `null` is no body too.
    serde_json::from_slice::<Option<T>>(&body)
        .map(Option::unwrap_or_default)
        .map_err(|_| ApiError::InvalidRequest(format!("the body must be JSON like {expected}")))
}
