//! `GET` and `DELETE /v1/tokens/{tenant}/{environment}`: tokens for callers.
//!
//! Both authenticate the caller (401), parse and bound the query (400), authorise the caller for
//! the tenant, environment and audience (403, [`token_request`]), and only then look at configuration
//! (404) and the cache. A caller never learns whether a tenant it may not use exists. Every token
//! handed out is logged once on the `audit` target: caller, tenant, environment, audience, scope,
//! hit or miss, and never the token.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::error::ErrorBody;
use crate::api::token_request::{
    self, Grant, TokenRequest, check_organization, check_value, printable,
};
use crate::api::{ApiError, audit, response};
use crate::app::AppState;
use crate::auth::{Authenticated, Caller};
use crate::idp::MAX_LIFETIME;

/// Parses and bounds the query of a token request: `audience`, `scope`, `min_ttl` and
/// `organization`, each at most once.
pub(super) fn parse_query(raw: Option<&str>) -> Result<TokenRequest, ApiError> {
    let mut query = TokenRequest::default();
    let mut seen = [false; 4];
    for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        let index = match name.as_ref() {
            "audience" => 0,
            "scope" => 1,
            "min_ttl" => 2,
            "organization" => 3,
            other => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown query parameter '{}'; expected audience, scope, min_ttl or organization",
                    printable(other)
                )));
            }
        };
        if std::mem::replace(&mut seen[index], true) {
            return Err(ApiError::InvalidRequest(format!(
                "query parameter '{name}' is given more than once"
            )));
        }
        check_value(&name, &value)?;
        match index {
            0 if value.trim().is_empty() => {
                return Err(ApiError::InvalidRequest(
                    "audience is empty; leave it out to use the environment's default".into(),
                ));
            }
            0 => query.audience = Some(value.into_owned()),
            1 => query.scope = value.into_owned(),
            2 => query.min_ttl = Some(parse_min_ttl(&value)?),
            _ => {
                check_organization(&value)?;
                query.organization = Some(value.into_owned());
            }
        }
    }
    Ok(query)
}

/// `min_ttl` as a whole number of seconds, at most a year (no token lives longer).
pub(super) fn parse_min_ttl(value: &str) -> Result<Duration, ApiError> {
    let invalid = || {
        ApiError::InvalidRequest(format!(
            "min_ttl must be a whole number of seconds, at most {}",
            MAX_LIFETIME.as_secs()
        ))
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let min_ttl = value
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| invalid())?;
    if min_ttl > MAX_LIFETIME {
        return Err(invalid());
    }
    Ok(min_ttl)
}

/// Authorises the request: the caller's grant for `target` (the path and query of a request
/// recognised before the router) when it has one, else decided from the query and kept.
fn authorise(
    state: &AppState,
    caller: &Caller,
    tenant: &str,
    environment: &str,
    raw_query: Option<&str>,
    target: Option<&str>,
) -> Result<Arc<Grant>, ApiError> {
    if let Some(grant) = target.and_then(|target| caller.grants.get(target)) {
        return Ok(grant);
    }
    let request = parse_query(raw_query)?;
    let current = state.current();
    let grant = Arc::new(token_request::authorise_in(
        &current,
        caller,
        tenant,
        environment,
        request,
    )?);
    if let Some(target) = target {
        token_request::keep_grant(&current, caller, target, &grant);
    }
    Ok(grant)
}

/// The body of a token answer (docs/api.md, `GET /v1/tokens/{tenant}/{environment}`). The handler writes it pre-serialised from the cache
/// entry; this type describes it for the OpenAPI document.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: String,
    /// Usually `Bearer`.
    pub token_type: String,
    /// Whole seconds of validity left now.
    pub expires_in: u64,
    /// When the token expires, RFC 3339 UTC.
    pub expires_at: String,
    /// The scopes granted, when the IdP said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The query of `GET` and `DELETE /v1/tokens/{tenant}/{environment}`, for the OpenAPI document
/// (the handlers parse the raw query themselves, to reject unknown and repeated names).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenParams {
    /// The API the token is for; defaults to the environment's `audience`.
    #[param(
        min_length = 1,
        max_length = 1024,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub audience: Option<String>,
    /// Space-separated scopes; order and duplicates do not matter.
    #[param(max_length = 1024, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub scope: Option<String>,
    /// Seconds of validity the caller needs left on the token (at most a year).
    #[param(minimum = 0, maximum = 31536000)]
    pub min_ttl: Option<u64>,
    /// An Auth0 Organization id (`org_…`): the token is for that organization (sent to the IdP
    /// as `organization`, its own cache entry); the caller's `organizations` must list it.
    #[param(max_length = 64, pattern = "^org_[A-Za-z0-9]{1,60}$")]
    pub organization: Option<String>,
}

/// The optional body of `DELETE /v1/tokens/{tenant}/{environment}`: forget the cached token only
/// if it is still this one.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgetBody {
    /// The token the caller saw rejected.
    pub access_token: String,
}

/// The body of a `DELETE`: none (empty, whitespace or JSON `null`), or a [`ForgetBody`].
fn forget_body(body: &[u8]) -> Result<Option<ForgetBody>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body).map_err(|_| {
        ApiError::InvalidRequest(
            r#"the body must be empty or {"access_token": "<the rejected token>"}"#.into(),
        )
    })
}

/// `GET /v1/tokens/{tenant}/{environment}`: a valid token, from cache when possible.
#[utoipa::path(
    get,
    path = "/v1/tokens/{tenant}/{environment}",
    tag = "tokens",
    summary = "A valid access token for the tenant's credentials in that environment",
    params(
        ("tenant" = String, Path, description = "Configured tenant name", pattern = "^[a-z0-9_-]{1,64}$"),
        ("environment" = String, Path, description = "Configured environment name", pattern = "^[a-z0-9_-]{1,64}$"),
        TokenParams,
    ),
    responses(
        (status = 200, description = "A token with at least max(min_ttl, cache.min_remaining) of validity", body = TokenResponse,
            headers(("x-cache" = String, description = "`hit`, or `miss` when the request waited on the IdP"))),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no caller key or a wrong one", body = ErrorBody),
        (status = 403, description = "`forbidden`: the caller may not use this tenant, environment or audience", body = ErrorBody),
        (status = 404, description = "`not_found`: no such environment configured", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the caller is over its rate, its idp_requests_per_minute or its max_keys; with Retry-After", body = ErrorBody),
        (status = 500, description = "`internal_error`: an unforeseen failure of the fetch (logged); retry", body = ErrorBody),
        (status = 502, description = "`upstream_rejected`: the IdP refused the request, or issues tokens shorter than cache.min_remaining", body = ErrorBody),
        (status = 503, description = "`upstream_unavailable`: no token now; with Retry-After", body = ErrorBody),
    ),
    security(("caller_key" = [])),
)]
pub async fn get_token(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path((tenant, environment)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    hand_out(
        &state,
        &caller,
        &tenant,
        &environment,
        query.as_deref(),
        None,
    )
    .await
}

/// The route template of `GET` and `DELETE /v1/tokens/{tenant}/{environment}`.
pub const TOKENS_ROUTE: &str = "/v1/tokens/{tenant}/{environment}";

/// The tenant and environment of a path of [`TOKENS_ROUTE`], when the router would take both
/// as they are: each segment non-empty and without `%`, which the router would decode.
pub fn plain_token_path(path: &str) -> Option<(&str, &str)> {
    let (tenant, environment) = path.strip_prefix("/v1/tokens/")?.split_once('/')?;
    let plain =
        |segment: &str| !segment.is_empty() && !segment.bytes().any(|b| b == b'/' || b == b'%');
    (plain(tenant) && plain(environment)).then_some((tenant, environment))
}

/// [`get_token`] for a request recognised before the router (`startup::routes`), whose path
/// [`plain_token_path`] accepts: the same extractors in the same order, and the same answers.
pub async fn get_token_unrouted(state: AppState, request: Request) -> Response {
    // The handler reads no body; the router's extractors drop it before the handler runs too.
    let (parts, _) = request.into_parts();
    let caller = match Authenticated::from_headers(&parts.headers, &state).await {
        Ok(Authenticated(caller)) => caller,
        Err(rejection) => return rejection.into_response(),
    };
    let Some((tenant, environment)) = plain_token_path(parts.uri.path()) else {
        // Not a path of this route after all: what the router answers for no route.
        return crate::api::not_found().await.into_response();
    };
    let target = parts.uri.path_and_query().map(|target| target.as_str());
    hand_out(
        &state,
        &caller,
        tenant,
        environment,
        parts.uri.query(),
        target,
    )
    .await
    .into_response()
}

/// Authorises the request, gets the token from the broker, audits and answers it. `target` is
/// the path and query of a request recognised before the router, by which the caller keeps its
/// grant.
async fn hand_out(
    state: &AppState,
    caller: &Arc<Caller>,
    tenant: &str,
    environment: &str,
    query: Option<&str>,
    target: Option<&str>,
) -> Result<Response, ApiError> {
    let request = authorise(state, caller, tenant, environment, query, target)?;
    let lease = state
        .broker
        .get(
            &request.environment,
            &request.key,
            request.min_ttl,
            &caller.idp_budget,
            // Only a kept grant is asked again.
            target.map(|_| &request.memo),
        )
        .await?;
    audit::handed_out(&state.audit, caller, &request.key, &lease, None);
    Ok(response::token(&lease))
}

/// `DELETE /v1/tokens/{tenant}/{environment}`: forget the cached token (optionally only if it is
/// still the one the caller saw rejected). Always 204 once authorised.
#[utoipa::path(
    delete,
    path = "/v1/tokens/{tenant}/{environment}",
    tag = "tokens",
    summary = "Forget the cached token of this key, optionally only if it is still the given one",
    params(
        ("tenant" = String, Path, description = "Configured tenant name", pattern = "^[a-z0-9_-]{1,64}$"),
        ("environment" = String, Path, description = "Configured environment name", pattern = "^[a-z0-9_-]{1,64}$"),
        TokenParams,
    ),
    request_body(content = Option<ForgetBody>, description = "Compare-and-delete: forget the entry only if it still holds this token"),
    responses(
        (status = 204, description = "Forgotten, or nothing (else) to forget"),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 429, description = "`rate_limited`; with Retry-After", body = ErrorBody),
    ),
    security(("caller_key" = [])),
)]
pub async fn delete_token(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path((tenant, environment)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let request = authorise(
        &state,
        &caller,
        &tenant,
        &environment,
        query.as_deref(),
        None,
    )?;
    let body = body?;
    let only = forget_body(&body)?.map(|ForgetBody { access_token }| access_token);
    let forgot = state
        .broker
        .forget(
            &request.environment,
            &request.key,
            only.as_deref(),
            &caller.idp_budget,
        )
        .await
        .map_err(|error| ApiError::Broker(Arc::new(error)))?;
    audit::forgotten(&caller, &request.key, only.is_some(), forgot);
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = parse_query(Some("audience=https%3A%2F%2Fapi&scope=b+a+a&min_ttl=30")).unwrap();
        assert_eq!(q.audience.as_deref(), Some("https://api"));
        assert_eq!(q.scope, "b a a");
        assert_eq!(q.min_ttl, Some(Duration::from_secs(30)));
        assert_eq!(parse_query(None).unwrap(), TokenRequest::default());
        for bad in [
            "min_ttl=1.5",
            "min_ttl=-1",
            "min_ttl=+5",
            "min_ttl=31536001",
            "audience=",
            "audiance=x",
            "scope=a&scope=b",
            "audience=%07",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
        let long = format!("audience={}", "a".repeat(token_request::MAX_VALUE_LEN + 1));
        assert!(parse_query(Some(&long)).is_err());
    }
}
