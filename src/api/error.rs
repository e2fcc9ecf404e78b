//! Every error the HTTP API returns, and its one mapping to a response.
//!
//! Handlers and extractors return [`ApiError`]; [`IntoResponse`] turns it into the JSON body of
//! docs/api.md, "Errors" (`error`, `error_description`, `request_id`) with the right status and headers, and
//! logs it once with its cause chain. Descriptions say what to do next and never carry a secret,
//! a caller key, a token or an upstream body. The OAuth2 facade maps its own RFC 6749 §5.2 errors
//! in [`super::oauth`] and shares the request id, `Retry-After` and logging helpers here.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::token_request::AccessError;
use crate::app::ReloadError;
use crate::auth::AuthError;
use crate::broker::{BrokerError, RotationError};
use crate::config::ConfigError;
use crate::idp::IdpError;
use crate::telemetry::error_chain;
use crate::telemetry::request::current_id;
use crate::user_tokens::UserError;

/// How long a caller whose request timed out is asked to wait.
pub(super) const TIMED_OUT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long an operator is asked to wait after a rotation the IdP, the shared cache or another
/// replica could not complete.
const ROTATION_RETRY_AFTER: Duration = Duration::from_secs(5);

/// How long a caller with too many pending authorizations is asked to wait.
const PENDING_RETRY_AFTER: Duration = Duration::from_secs(60);

/// An error answer of the `/v1` API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A malformed request; the message says which part.
    #[error("{0}")]
    InvalidRequest(String),
    /// No caller key, or a wrong one, or a workload token that failed a check.
    #[error(transparent)]
    Unauthorized(AuthError),
    /// The keys of a workload token's issuer cannot be fetched now; retry after the duration.
    #[error("{}", AuthError::WorkloadKeysUnavailable { retry_after: *.0 })]
    IssuerUnavailable(Duration),
    /// The caller may not use this tenant / environment / audience.
    #[error("caller '{caller}' may not use {tenant}/{environment}")]
    Forbidden {
        /// The authenticated caller.
        caller: Arc<str>,
        /// The tenant asked for.
        tenant: String,
        /// The environment asked for.
        environment: String,
    },
    /// The caller may not name this organization.
    #[error("{0}")]
    ForbiddenOrganization(String),
    /// No token is handed out for this audience (the broker's own).
    #[error("{0}")]
    ForbiddenAudience(String),
    /// No token of this environment is handed out (it authorises secret rotations).
    #[error("{0}")]
    ForbiddenEnvironment(String),
    /// An unknown path, or an allowed tenant / environment that is not configured.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method.
    #[error("this route does not accept that method")]
    MethodNotAllowed,
    /// The body is over `server.max_body_bytes`.
    #[error("the request body is over the size limit")]
    PayloadTooLarge,
    /// The caller is over its `rate_limit`.
    #[error("this caller is over its rate limit; retry after the seconds in Retry-After")]
    RateLimited {
        /// How long until the caller's next request is allowed.
        retry_after: Duration,
    },
    /// The broker could not hand out a token.
    #[error(transparent)]
    Broker(Arc<BrokerError>),
    /// A user-token request failed.
    #[error(transparent)]
    Users(#[from] UserError),
    /// A client secret rotation failed or is not configured; the old secret stays in use.
    #[error(transparent)]
    Rotation(Arc<RotationError>),
    /// A reload was refused; the old configuration keeps serving.
    #[error("{0}")]
    Reload(#[from] ReloadError),
    /// Something the broker did not foresee; the detail is in the log.
    #[error("internal error")]
    Internal,
    /// The request took longer than `server.request_timeout`.
    #[error(
        "the request took longer than server.request_timeout ({}s); a token fetch it waited on goes on and is cached: retry",
        .0.as_secs_f64()
    )]
    TimedOut(Duration),
}

impl From<AccessError> for ApiError {
    fn from(error: AccessError) -> Self {
        match error {
            AccessError::InvalidRequest(message) => Self::InvalidRequest(message),
            AccessError::Forbidden {
                caller,
                tenant,
                environment,
            } => Self::Forbidden {
                caller,
                tenant,
                environment,
            },
            AccessError::OrganizationForbidden { .. } => {
                Self::ForbiddenOrganization(error.to_string())
            }
            AccessError::OwnAudience(_) => Self::ForbiddenAudience(error.to_string()),
            AccessError::BrokerOwn { .. } => Self::ForbiddenEnvironment(error.to_string()),
            AccessError::NotConfigured { .. } => Self::NotFound(error.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::RateLimited { retry_after } => Self::RateLimited { retry_after },
            AuthError::WorkloadKeysUnavailable { retry_after } => {
                Self::IssuerUnavailable(retry_after)
            }
            other => Self::Unauthorized(other),
        }
    }
}

/// Why a request body could not be read: the one mapping of axum's body rejection, which the
/// `/v1` API and the facade each turn into their own error shape.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum BodyError {
    /// Over `server.max_body_bytes`.
    #[error("the request body is over the size limit")]
    TooLarge,
    /// The connection broke or the body is malformed at the HTTP level.
    #[error("the request body could not be read")]
    Unreadable,
}

impl From<BytesRejection> for BodyError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::TooLarge
        } else {
            Self::Unreadable
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::TooLarge => Self::PayloadTooLarge,
            BodyError::Unreadable => Self::InvalidRequest(error.to_string()),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        BodyError::from(rejection).into()
    }
}

impl From<Arc<BrokerError>> for ApiError {
    fn from(error: Arc<BrokerError>) -> Self {
        Self::Broker(error)
    }
}

/// The JSON body of every `/v1` error (docs/api.md, "Errors").
#[derive(Serialize, ToSchema)]
pub struct ErrorBody<'a> {
    /// The stable error code: `invalid_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `payload_too_large`, `rate_limited`, `upstream_rejected`, `upstream_unavailable`, ...
    pub error: &'static str,
    /// What went wrong and what to do next; never a secret, key or token.
    pub error_description: String,
    /// The request's `x-request-id`.
    pub request_id: &'a str,
    /// Every problem of a refused configuration (reload only).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub problems: &'a [String],
    /// The IdP's OAuth2 error code, with `upstream_rejected` when the IdP gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_error: Option<&'a str>,
    /// Where to send the user, with `reauthorization_required`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_url: Option<&'a str>,
    /// The state of that URL, with `reauthorization_required`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'a str>,
}

impl ApiError {
    /// Status and the stable `error` code of docs/api.md, "Errors".
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden { .. }
            | Self::ForbiddenOrganization(_)
            | Self::ForbiddenAudience(_)
            | Self::ForbiddenEnvironment(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            Self::TimedOut(_) | Self::IssuerUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable")
            }
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Reload(ReloadError::NotReloadable) => (StatusCode::CONFLICT, "not_reloadable"),
            Self::Reload(ReloadError::Config(_) | ReloadError::Apply(_)) => {
                (StatusCode::BAD_REQUEST, "invalid_configuration")
            }
            Self::Broker(error) => broker_status_and_code(error),
            Self::Rotation(error) => rotation_status_and_code(error),
            Self::Users(error) => match error {
                UserError::NotEnabled { .. } | UserError::UnknownHandle => {
                    (StatusCode::NOT_FOUND, "not_found")
                }
                UserError::UnknownState => (StatusCode::BAD_REQUEST, "invalid_request"),
                UserError::TooManyPending { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
                UserError::CodeRejected { .. } => (StatusCode::BAD_REQUEST, "invalid_grant"),
                UserError::ReauthorizationRequired(_) => {
                    (StatusCode::UNAUTHORIZED, "reauthorization_required")
                }
                UserError::SharedUnavailable { .. }
                | UserError::PeerRefreshing { .. }
                | UserError::RefreshPaused { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable")
                }
                UserError::Token(error) => broker_status_and_code(error),
            },
        }
    }

    /// How long the caller should wait before retrying, for 429s and 503s.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => Some(*retry_after),
            Self::TimedOut(_) => Some(TIMED_OUT_RETRY_AFTER),
            Self::IssuerUnavailable(wait) => Some(*wait),
            Self::Broker(error) => broker_retry_after(error),
            Self::Rotation(error) => match error.as_ref() {
                RotationError::Authorization { source, .. } => broker_retry_after(source),
                RotationError::Endpoint(IdpError::RateLimited {
                    retry_after: Some(wait),
                }) => Some(*wait),
                // Every other 503: worth another try soon.
                _ if self.status_and_code().0 == StatusCode::SERVICE_UNAVAILABLE => {
                    Some(ROTATION_RETRY_AFTER)
                }
                _ => None,
            },
            Self::Users(UserError::TooManyPending { .. }) => Some(PENDING_RETRY_AFTER),
            Self::Users(error) => error.retry_after(),
            _ => None,
        }
    }
}

/// Status and docs/api.md "Errors" code of a broker failure.
pub(super) fn broker_status_and_code(error: &BrokerError) -> (StatusCode, &'static str) {
    match error {
        BrokerError::MinTtlTooLong { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
        BrokerError::Rejected { .. } | BrokerError::LifetimeBelowMinimum { .. } => {
            (StatusCode::BAD_GATEWAY, "upstream_rejected")
        }
        BrokerError::Unavailable { .. }
        | BrokerError::RateLimited { .. }
        | BrokerError::QuotaExhausted { .. }
        | BrokerError::SettingsChanged => (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable"),
        BrokerError::CallerOverBudget { .. }
        | BrokerError::TooManyKeys { .. }
        | BrokerError::RefetchTooSoon { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        BrokerError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    }
}

/// Status and docs/api.md "Errors" code of a failed rotation: 409 when none is configured,
/// 502 when the IdP answered but not with a secret, 503 when it (or the shared level, or the
/// replica rotating) could not be reached.
fn rotation_status_and_code(error: &RotationError) -> (StatusCode, &'static str) {
    match error {
        RotationError::NotConfigured { .. } => (StatusCode::CONFLICT, "rotation_not_configured"),
        RotationError::Authorization { source, .. } => broker_status_and_code(source),
        RotationError::Endpoint(
            IdpError::Rejected { .. }
            | IdpError::InvalidResponse(_)
            | IdpError::ResponseTooLarge { .. }
            | IdpError::Signing(_),
        ) => (StatusCode::BAD_GATEWAY, "upstream_rejected"),
        RotationError::Endpoint(
            IdpError::Timeout(_)
            | IdpError::Connect(_)
            | IdpError::ServerError(_)
            | IdpError::RateLimited { .. },
        )
        | RotationError::SharedCacheDown
        | RotationError::PeerBusy => (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable"),
        RotationError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    }
}

/// The IdP's error code of a rejection, for the `upstream_error` field.
pub(super) fn upstream_error(error: &BrokerError) -> Option<&str> {
    match error {
        BrokerError::Rejected { code, .. } => Some(code),
        _ => None,
    }
}

/// How long a caller should wait after a broker failure, for 503s.
pub(super) fn broker_retry_after(error: &BrokerError) -> Option<Duration> {
    error.retry_after()
}

/// Logs a failed request once, where it becomes a response: server errors with their cause
/// chain at WARN, refusals of the caller (401, 403, 429) on the audit trail, other client errors
/// at DEBUG.
pub(super) fn log_failure(error: &dyn std::error::Error, status: StatusCode) {
    if status.is_server_error() {
        let cause = error_chain(error);
        tracing::warn!(status = status.as_u16(), error = %error, %cause, "request failed");
    } else if super::audit::is_refusal(status) {
        super::audit::refused(status, error);
    } else {
        tracing::debug!(status = status.as_u16(), error = %error, "request refused");
    }
}

/// A `Retry-After` value in whole seconds, rounded up so a caller never retries before the
/// broker would try again, and at least 1.
pub(super) fn retry_after_value(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        log_failure(&self, status);
        let request_id = current_id();
        let authorization = match &self {
            Self::Users(UserError::ReauthorizationRequired(authorization)) => Some(authorization),
            _ => None,
        };
        let problems = match &self {
            Self::Reload(ReloadError::Config(ConfigError::Invalid(problems))) => {
                problems.as_slice()
            }
            _ => &[],
        };
        let upstream_error = match &self {
            Self::Broker(error) => upstream_error(error),
            Self::Users(UserError::Token(error)) => upstream_error(error),
            Self::Rotation(error) => match error.as_ref() {
                RotationError::Endpoint(IdpError::Rejected { code, .. }) => Some(code.as_str()),
                RotationError::Authorization { source, .. } => upstream_error(source),
                _ => None,
            },
            _ => None,
        };
        let body = ErrorBody {
            error: code,
            error_description: self.to_string(),
            request_id: &request_id,
            upstream_error,
            problems,
            authorization_url: authorization.map(|a| a.url.as_str()),
            state: authorization.map(|a| a.state.as_str()),
        };
        let mut response = (status, super::response::no_store(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(wait) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, retry_after_value(wait));
        }
        response
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

/// The `x-request-id` header name.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
