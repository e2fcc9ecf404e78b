//! The failure policy (docs/design.md, "Failure policy"): transient IdP failures retried with backoff and jitter within
//! the environment's `timeout`, a 429 honoured for the whole IdP client, rejections remembered
//! per key for `negative_ttl`, and the quota guard.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng as _;

use super::credential::{Source, refuses_client};
use super::upstream::Upstream;
use super::{Broker, BrokerError, CachedToken, TokenKey, lock};
use crate::idp::{EnvironmentSettings, IdpError, RateLimitHeaders};
use crate::telemetry::error_chain;
use crate::telemetry::metrics::IdpOutcome;
use crate::token::RotatedSecret;

/// Most attempts of one fetch (the first and its retries).
const MAX_ATTEMPTS: u32 = 4;
/// Backoff before the first retry; doubled for each later one, before jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest backoff between two attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Exponential backoff with full jitter: uniform in `[0, min(cap, base * 2^(attempt-1))]`.
fn full_jitter(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(rand::rng().random::<f64>())
}

/// What the broker remembers about a key for `cache.negative_ttl`, so that it does not ask again.
#[derive(Debug, Clone)]
pub(super) enum Remembered {
    /// The IdP rejected the request: HTTP status and error code.
    Rejected {
        /// HTTP status of the answer.
        status: u16,
        /// The IdP's error code.
        code: String,
    },
    /// The IdP issued a token that lives less than `cache.min_remaining`.
    TooShort {
        /// Its lifetime.
        lifetime: Duration,
    },
}

/// A place among the requests an IdP client may have under way at once
/// (`max_concurrent_fetches`); given back when dropped.
pub struct IdpPermit {
    _held: tokio::sync::OwnedSemaphorePermit,
}

/// The `outcome` label of one IdP answer.
pub fn idp_outcome<T>(answer: &Result<T, IdpError>) -> IdpOutcome {
    match answer {
        Ok(_) => IdpOutcome::Ok,
        Err(IdpError::Rejected { .. }) => IdpOutcome::Rejected,
        Err(IdpError::RateLimited { .. }) => IdpOutcome::RateLimited,
        Err(IdpError::Timeout(_)) => IdpOutcome::Timeout,
        Err(IdpError::Connect(_)) => IdpOutcome::Connect,
        Err(IdpError::ServerError(_)) => IdpOutcome::ServerError,
        Err(IdpError::InvalidResponse(_)) => IdpOutcome::InvalidResponse,
        Err(IdpError::ResponseTooLarge { .. }) => IdpOutcome::ResponseTooLarge,
        Err(IdpError::Signing(_)) => IdpOutcome::SigningFailed,
    }
}

impl Broker {
    /// The shared state of the IdP client `environment` talks to.
    pub(super) fn upstream(&self, environment: &EnvironmentSettings) -> Arc<Upstream> {
        let id = (
            environment.token_url.as_str().to_owned(),
            environment.client_id.clone(),
        );
        let mut upstreams = lock(&self.inner.upstreams);
        Arc::clone(
            upstreams
                .entry(id)
                .or_insert_with(|| Arc::new(Upstream::new(environment.max_concurrent_fetches))),
        )
    }

    /// Lifts the pause after a 429 of `environment`'s IdP client (its settings changed); the
    /// quota guard's count of the last hour stays.
    pub(super) fn forget_upstream(&self, environment: &EnvironmentSettings) {
        self.upstream(environment).unblock();
    }

    /// One of the `max_concurrent_fetches` requests `environment`'s IdP client may have under
    /// way, for a user-token refresh to hold before it takes its cross-replica lock: the wait
    /// for a permit then never eats into the lock's time to live.
    pub async fn idp_permit(&self, environment: &EnvironmentSettings) -> IdpPermit {
        let permits = Arc::clone(&self.upstream(environment).permits);
        IdpPermit {
            _held: permits.acquire_owned().await.expect("never closed"),
        }
    }

    /// Sends `request`, one request of a user token (a code exchange or a refresh), through the
    /// guards of `environment`'s IdP client: not while a 429 pauses the client (the outer
    /// `Err`), at most `max_concurrent_fetches` at once (`permit`, when one is held already),
    /// and a 429 answer pauses the client for every key, machine tokens included.
    /// `max_fetches_per_hour` is not charged: it guards machine-token quotas, which user grants
    /// do not draw on.
    pub async fn guard_user_request<T>(
        &self,
        environment: &EnvironmentSettings,
        permit: Option<IdpPermit>,
        request: impl Future<Output = Result<T, IdpError>>,
    ) -> Result<Result<T, IdpError>, BrokerError> {
        let upstream = self.upstream(environment);
        if let Some(retry_after) = upstream.blocked_for(self.inner.clock.instant()) {
            return Err(BrokerError::RateLimited { retry_after });
        }
        let answer = {
            let _permit = match permit {
                Some(permit) => permit,
                None => self.idp_permit(environment).await,
            };
            request.await
        };
        if let Err(IdpError::RateLimited { retry_after }) = &answer {
            tracing::warn!(
                tenant = %environment.tenant,
                environment = %environment.environment,
                "the IdP is rate limiting this client (on a user token request); pausing requests to it"
            );
            upstream.block(
                self.inner.clock.instant(),
                super::error::rate_limit_pause(*retry_after),
            );
        }
        Ok(answer)
    }

    /// The rate-limit headers last seen from `environment`'s IdP client.
    pub fn rate_limit(&self, environment: &EnvironmentSettings) -> RateLimitHeaders {
        self.upstream(environment).rate_limit()
    }

    /// What the broker remembers about `key`, until `cache.negative_ttl` after it learnt it
    /// (by the broker's clock; moka drops the entry on its own timer).
    pub(super) async fn recalled(&self, key: &TokenKey) -> Option<Remembered> {
        let (remembered, until) = self.inner.rejections.get(key).await?;
        (self.inner.clock.instant() < until).then_some(remembered)
    }

    /// Remembers `remembered` about `key` for `cache.negative_ttl`.
    pub(super) async fn remember(&self, key: &TokenKey, remembered: Remembered) {
        let now = self.inner.clock.instant();
        let until = now
            .checked_add(self.inner.settings.negative_ttl)
            .unwrap_or(now);
        self.inner
            .rejections
            .insert(key.clone(), (remembered, until))
            .await;
    }

    /// The error a remembered answer stands for.
    pub(super) fn remembered_error(&self, remembered: Remembered) -> BrokerError {
        match remembered {
            Remembered::Rejected { status, code } => IdpError::Rejected { status, code }.into(),
            Remembered::TooShort { lifetime } => BrokerError::LifetimeBelowMinimum {
                lifetime,
                min_remaining: self.inner.settings.min_remaining,
            },
        }
    }

    /// One token from the IdP, with the failure policy applied (see the module docs); `asked`
    /// is set once a request is sent, so the caller who started the fetch is charged for it.
    pub(super) async fn fetch_from_idp(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
        asked: &AtomicBool,
    ) -> Result<CachedToken, BrokerError> {
        if let Some(remembered) = self.recalled(key).await {
            return Err(self.remembered_error(remembered));
        }
        let reloads = self.inner.reloads.load(Ordering::Acquire);
        let upstream = self.upstream(environment);
        // Real time: the bound of a network exchange, whatever a test does to the clock.
        let deadline = tokio::time::Instant::now() + environment.timeout;
        let mut attempt = 1;
        // When the IdP refuses the client: another credential (see `credential`), each once,
        // within this fetch (so charged once to the caller).
        let (mut credential, mut source, mut next) = self.first_credential(environment).await;
        let began_with = match &source {
            Source::Rotated(rotated) => Some(rotated.fingerprint()),
            _ => None,
        };
        // The rotated secret the IdP refused, dropped if another credential is accepted.
        let mut refused_rotated: Option<Arc<RotatedSecret>> = None;
        loop {
            let now = self.inner.clock.instant();
            if let Some(retry_after) = upstream.blocked_for(now) {
                return Err(BrokerError::RateLimited { retry_after });
            }
            let result = tokio::time::timeout_at(deadline, async {
                let _permit = upstream.permits.acquire().await.expect("never closed");
                if let Err(retry_after) = upstream
                    .take_quota(self.inner.clock.instant(), environment.max_fetches_per_hour)
                {
                    self.record_idp(environment, IdpOutcome::QuotaExhausted, None);
                    return Err(BrokerError::QuotaExhausted {
                        limit: environment.max_fetches_per_hour.unwrap_or_default(),
                        retry_after,
                    });
                }
                asked.store(true, Ordering::Relaxed);
                let sent = self.inner.clock.instant();
                let answer = self
                    .inner
                    .idp
                    .fetch(
                        environment,
                        &credential,
                        &key.audience,
                        key.scope.as_str(),
                        key.organization.as_deref(),
                    )
                    .await;
                self.record_idp(
                    environment,
                    idp_outcome(&answer),
                    Some(self.inner.clock.instant().saturating_duration_since(sent)),
                );
                answer.map_err(BrokerError::from)
            })
            .await
            .unwrap_or_else(|_| {
                self.record_idp(environment, IdpOutcome::Timeout, None);
                Err(BrokerError::from(IdpError::Timeout(environment.timeout)))
            });

            let error = match result {
                Ok(fetched) => {
                    upstream.record_rate_limit(fetched.rate_limit);
                    if let Some(refused) = &refused_rotated
                        && !matches!(source, Source::Rotated(_))
                    {
                        let accepted = match source {
                            Source::Fallback => "fallback",
                            _ => "configured",
                        };
                        self.drop_rotated(environment, refused, accepted).await;
                    }
                    if matches!(source, Source::Fallback) {
                        tracing::warn!(
                            tenant = %key.tenant,
                            environment = %key.environment,
                            "the IdP refused the configured client credential and accepted the fallback one: finish the rotation (make the new credential the configured one)"
                        );
                        self.inner
                            .metrics
                            .credential_fallback(&key.tenant, &key.environment);
                    }
                    tracing::info!(
                        tenant = %key.tenant,
                        environment = %key.environment,
                        attempt,
                        lifetime_s = fetched.token.lifetime.as_secs(),
                        "fetched a token from the IdP"
                    );
                    return Ok(CachedToken::new(
                        fetched.token,
                        self.inner.clock.now(),
                        self.inner.settings.refresh_ahead,
                        self.inner.settings.min_remaining,
                        rand::rng().random(),
                    ));
                }
                Err(error) => error,
            };
            let log = |message: &str| {
                tracing::warn!(
                    tenant = %key.tenant,
                    environment = %key.environment,
                    attempt,
                    error = %error,
                    cause = %error_chain(&error),
                    "{message}"
                );
            };
            match &error {
                BrokerError::QuotaExhausted { limit, .. } => {
                    tracing::error!(
                        tenant = %key.tenant,
                        environment = %key.environment,
                        limit,
                        "quota guard: max_fetches_per_hour reached, not asking the IdP"
                    );
                    return Err(error);
                }
                BrokerError::Rejected {
                    source: IdpError::Rejected { status, code },
                    ..
                } if refuses_client(*status, code)
                    && let Some((other, from)) = self
                        .next_credential(environment, &mut next, &credential, began_with.as_deref())
                        .await =>
                {
                    log(match from {
                        Source::Rotated(_) => {
                            "the IdP refused the client's credential; trying the secret rotated meanwhile"
                        }
                        Source::Configured => {
                            "the IdP refused the client's credential; trying the configured one"
                        }
                        Source::Fallback => {
                            "the IdP refused the client's credential; trying the fallback credential"
                        }
                    });
                    if let Source::Rotated(refused) = &source {
                        refused_rotated = Some(Arc::clone(refused));
                    }
                    credential = other;
                    source = from;
                }
                BrokerError::Rejected {
                    source: IdpError::Rejected { status, code },
                    ..
                } => {
                    log(
                        "the IdP rejected the token request; remembering it for cache.negative_ttl",
                    );
                    let reloaded = self.inner.reloads.load(Ordering::Acquire) != reloads;
                    if !self.inner.settings.negative_ttl.is_zero() && !reloaded {
                        let remembered = Remembered::Rejected {
                            status: *status,
                            code: code.clone(),
                        };
                        self.remember(key, remembered).await;
                    }
                    return Err(error);
                }
                BrokerError::Unavailable {
                    source: IdpError::RateLimited { .. },
                    retry_after,
                } => {
                    log("the IdP is rate limiting this client; pausing requests to it");
                    upstream.block(self.inner.clock.instant(), *retry_after);
                    return Err(error);
                }
                BrokerError::Unavailable { source, .. } if source.is_transient() => {
                    let backoff = full_jitter(attempt);
                    if attempt >= MAX_ATTEMPTS || tokio::time::Instant::now() + backoff >= deadline
                    {
                        log("token request failed; giving up");
                        return Err(error);
                    }
                    log("token request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    attempt += 1;
                }
                _ => {
                    log("token request failed");
                    return Err(error);
                }
            }
        }
    }

    /// Counts one IdP request (or one the quota guard stopped) of `environment`.
    pub(super) fn record_idp(
        &self,
        environment: &EnvironmentSettings,
        outcome: IdpOutcome,
        took: Option<Duration>,
    ) {
        let (tenant, name) = (&environment.tenant, &environment.environment);
        self.inner.metrics.idp_request(tenant, name, outcome, took);
    }
}
