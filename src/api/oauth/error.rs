//! The facade's errors: every failure of `POST /t/{tenant}/{environment}/oauth/token` as an
//! RFC 6749 §5.2 body, mapped from the API's shared errors in one place.

use std::sync::Arc;

use axum::http::header::WWW_AUTHENTICATE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::api::error::{
    BodyError, TIMED_OUT_RETRY_AFTER, broker_retry_after, broker_status_and_code, log_failure,
    retry_after_value, upstream_error,
};
use crate::api::response;
use crate::api::token_request::AccessError;
use crate::auth::WorkloadRejection;
use crate::broker::BrokerError;
use crate::telemetry::request::current_id;

/// A failed facade request, as an RFC 6749 §5.2 error.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// A malformed request: body, parameters, or more than one client authentication method.
    #[error("{0}")]
    InvalidRequest(String),
    /// No client credentials, or wrong ones.
    #[error("{0}")]
    InvalidClient(&'static str),
    /// A client assertion (workload token) that failed a check.
    #[error(transparent)]
    InvalidAssertion(WorkloadRejection),
    /// The keys of the client assertion's issuer cannot be fetched now.
    #[error(
        "the keys of the client assertion's issuer cannot be fetched now; retry after the seconds in Retry-After"
    )]
    IssuerUnavailable(std::time::Duration),
    /// The caller may not use this tenant / environment / audience.
    #[error("caller '{caller}' may not use {tenant}/{environment}")]
    UnauthorizedClient {
        /// The authenticated caller.
        caller: Arc<str>,
        /// The tenant asked for.
        tenant: String,
        /// The environment asked for.
        environment: String,
    },
    /// The client may not name this organization (the facade's mapping of a 403).
    #[error("{0}")]
    UnauthorizedOrganization(String),
    /// No token of this environment is handed out (it authorises secret rotations).
    #[error("{0}")]
    AccessDenied(String),
    /// A grant type other than `client_credentials`.
    #[error("grant_type '{0}' is not supported here; use client_credentials")]
    UnsupportedGrantType(String),
    /// A malformed scope, or one the IdP refused.
    #[error("{0}")]
    InvalidScope(String),
    /// An audience no token is handed out for (RFC 8707's `invalid_target`).
    #[error("{0}")]
    InvalidTarget(String),
    /// Allowed, but no such tenant / environment is configured.
    #[error("{0}")]
    NotFound(String),
    /// The body is over `server.max_body_bytes`.
    #[error("the request body is over the size limit")]
    PayloadTooLarge,
    /// The caller is over its `rate_limit`.
    #[error("this caller is over its rate limit; retry after the seconds in Retry-After")]
    RateLimited(std::time::Duration),
    /// The broker could not hand out a token.
    #[error(transparent)]
    Broker(Arc<BrokerError>),
    /// The request took longer than `server.request_timeout`.
    #[error(
        "the request took longer than server.request_timeout ({}s); a token fetch it waited on goes on and is cached: retry",
        .0.as_secs_f64()
    )]
    TimedOut(std::time::Duration),
}

impl From<AccessError> for OAuthError {
    fn from(error: AccessError) -> Self {
        match error {
            AccessError::InvalidRequest(message) => Self::InvalidRequest(message),
            AccessError::Forbidden {
                caller,
                tenant,
                environment,
            } => Self::UnauthorizedClient {
                caller,
                tenant,
                environment,
            },
            AccessError::OrganizationForbidden { .. } => {
                Self::UnauthorizedOrganization(error.to_string())
            }
            AccessError::OwnAudience(_) => Self::InvalidTarget(error.to_string()),
            AccessError::BrokerOwn { .. } => Self::AccessDenied(error.to_string()),
            AccessError::NotConfigured { .. } => Self::NotFound(error.to_string()),
        }
    }
}

impl From<BodyError> for OAuthError {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::TooLarge => Self::PayloadTooLarge,
            BodyError::Unreadable => Self::InvalidRequest(error.to_string()),
        }
    }
}

impl From<Arc<BrokerError>> for OAuthError {
    fn from(error: Arc<BrokerError>) -> Self {
        match error.as_ref() {
            BrokerError::Rejected { code, .. } if code == "invalid_scope" => {
                Self::InvalidScope("the IdP refused the requested scope (invalid_scope)".into())
            }
            _ => Self::Broker(error),
        }
    }
}

impl OAuthError {
    /// Status and RFC 6749 §5.2 `error` code (docs/api.md "Errors" codes for upstream failures).
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::InvalidClient(_) | Self::InvalidAssertion(_) => {
                (StatusCode::UNAUTHORIZED, "invalid_client")
            }
            Self::UnauthorizedClient { .. } | Self::UnauthorizedOrganization(_) => {
                (StatusCode::BAD_REQUEST, "unauthorized_client")
            }
            Self::AccessDenied(_) => (StatusCode::FORBIDDEN, "access_denied"),
            Self::UnsupportedGrantType(_) => (StatusCode::BAD_REQUEST, "unsupported_grant_type"),
            Self::InvalidScope(_) => (StatusCode::BAD_REQUEST, "invalid_scope"),
            Self::InvalidTarget(_) => (StatusCode::BAD_REQUEST, "invalid_target"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request"),
            Self::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Broker(error) => broker_status_and_code(error),
            Self::TimedOut(_) | Self::IssuerUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable")
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'static str,
    error_description: String,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_error: Option<&'a str>,
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        log_failure(&self, status);
        let request_id = current_id();
        let body = ErrorBody {
            error: code,
            error_description: self.to_string(),
            request_id: &request_id,
            upstream_error: match &self {
                Self::Broker(error) => upstream_error(error),
                _ => None,
            },
        };
        let mut response = (status, response::no_store_oauth(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            let challenge = HeaderValue::from_static(r#"Basic realm="token-broker""#);
            headers.insert(WWW_AUTHENTICATE, challenge);
        }
        let wait = match &self {
            Self::Broker(error) => broker_retry_after(error),
            Self::RateLimited(wait) | Self::IssuerUnavailable(wait) => Some(*wait),
            Self::TimedOut(_) => Some(TIMED_OUT_RETRY_AFTER),
            _ => None,
        };
        if let Some(wait) = wait {
            headers.insert(axum::http::header::RETRY_AFTER, retry_after_value(wait));
        }
        response
    }
}
