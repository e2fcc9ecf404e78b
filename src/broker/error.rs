//! Why the broker could not hand out a token, and what a caller should do about it.

use std::time::Duration;

use crate::idp::IdpError;

/// How long callers are asked to wait after a transient IdP failure.
const RETRY_AFTER_TRANSIENT: Duration = Duration::from_secs(1);
/// How long a caller with `max_keys` keys is asked to wait (until some of them expire).
const RETRY_AFTER_TOO_MANY_KEYS: Duration = Duration::from_secs(60);
/// How long an IdP client is left alone after a 429 that did not say.
const RETRY_AFTER_RATE_LIMITED: Duration = Duration::from_secs(10);

/// Why no token could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The caller asked for more validity than a fresh token has.
    #[error(
        "min_ttl asks for {}s of validity but a freshly issued token lives only {}s; ask for less",
        required.as_secs(), lifetime.as_secs()
    )]
    MinTtlTooLong {
        /// What the caller required.
        required: Duration,
        /// The lifetime of a fresh token.
        lifetime: Duration,
    },
    /// The IdP issues tokens that live less than `cache.min_remaining`, so none can be served.
    #[error(
        "the IdP issues tokens that live {}s, less than cache.min_remaining ({}s); lower cache.min_remaining",
        lifetime.as_secs(), min_remaining.as_secs()
    )]
    LifetimeBelowMinimum {
        /// The lifetime of a fresh token.
        lifetime: Duration,
        /// The configured minimum.
        min_remaining: Duration,
    },
    /// The IdP refused the request; retrying will not help until configuration changes.
    #[error(
        "the IdP refused the token request (error '{code}'); check the client credentials and audience"
    )]
    Rejected {
        /// The IdP's OAuth2 error code.
        code: String,
        /// Why, for the log.
        #[source]
        source: IdpError,
    },
    /// The IdP answered 429 recently; no request goes to it before `retry_after`.
    #[error(
        "the IdP is rate limiting this client and no cached token is valid long enough; retry later"
    )]
    RateLimited {
        /// When the IdP allows requests again.
        retry_after: Duration,
    },
    /// The quota guard (`max_fetches_per_hour`) stopped the request.
    #[error(
        "the IdP request quota of this environment ({limit} per hour) is spent and no cached token is valid long enough; retry later"
    )]
    QuotaExhausted {
        /// The configured limit.
        limit: u32,
        /// When a request is allowed again.
        retry_after: Duration,
    },
    /// The caller's requests started `idp_requests_per_minute` IdP requests this minute; a
    /// cached token would have been served, but this request needs a new one.
    #[error(
        "this caller's requests have started as many IdP requests as its idp_requests_per_minute allows; retry later, or raise it"
    )]
    CallerOverBudget {
        /// When the caller's budget allows the next IdP request.
        retry_after: Duration,
    },
    /// The caller's requests created `max_keys` cache keys (audiences and scope sets) already.
    #[error(
        "this caller has {max_keys} keys (audience and scope combinations) cached, its max_keys; ask for fewer distinct ones, or raise it"
    )]
    TooManyKeys {
        /// The caller's `max_keys`.
        max_keys: usize,
    },
    /// The cached token was fetched less than `cache.min_refetch_interval` ago and has less
    /// validity left than this request needs.
    #[error(
        "the cached token was fetched less than cache.min_refetch_interval ago and has less than the {}s min_ttl asks for; retry after the seconds in Retry-After, or ask for less",
        required.as_secs()
    )]
    RefetchTooSoon {
        /// What the caller required.
        required: Duration,
        /// When a new token may be fetched.
        retry_after: Duration,
    },
    /// A reload changed this environment's IdP settings while its token was being fetched.
    #[error("the environment's IdP settings changed while its token was fetched; retry")]
    SettingsChanged,
    /// The fetch failed in a way the broker did not foresee (it was logged).
    #[error("internal error while fetching the token; retry")]
    Internal,
    /// The IdP could not give a token now and no cached token has enough validity left.
    #[error("the IdP is unavailable and no cached token is valid long enough; retry later")]
    Unavailable {
        /// When callers may try again.
        retry_after: Duration,
        /// Why, for the log.
        #[source]
        source: IdpError,
    },
}

impl BrokerError {
    /// When a caller should try again, for failures that pass.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after }
            | Self::QuotaExhausted { retry_after, .. }
            | Self::Unavailable { retry_after, .. }
            | Self::CallerOverBudget { retry_after }
            | Self::RefetchTooSoon { retry_after, .. } => Some(*retry_after),
            Self::TooManyKeys { .. } => Some(RETRY_AFTER_TOO_MANY_KEYS),
            Self::SettingsChanged | Self::Internal => Some(RETRY_AFTER_TRANSIENT),
            _ => None,
        }
    }
}

/// How long a 429 pauses the IdP client: what the IdP said, else 10 s.
pub(super) fn rate_limit_pause(asked: Option<Duration>) -> Duration {
    asked.unwrap_or(RETRY_AFTER_RATE_LIMITED)
}

impl From<IdpError> for BrokerError {
    fn from(error: IdpError) -> Self {
        match error {
            IdpError::Rejected { ref code, .. } => Self::Rejected {
                code: code.clone(),
                source: error,
            },
            IdpError::RateLimited { retry_after } => Self::Unavailable {
                retry_after: rate_limit_pause(retry_after),
                source: error,
            },
            _ => Self::Unavailable {
                retry_after: RETRY_AFTER_TRANSIENT,
                source: error,
            },
        }
    }
}
