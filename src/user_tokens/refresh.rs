//! Access tokens from sessions: [`UserTokens::token`] serves the current one while it has the
//! validity asked for and otherwise refreshes it with the IdP, once per handle however many ask,
//! never for a `min_ttl` a fresh token cannot meet, at most once per
//! `cache.min_refetch_interval`, and charged to the asking caller's IdP budget.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::store::{Grant, Session};
use super::{Asking, UserError, UserTokens};
use crate::broker::BrokerError;
use crate::idp::{EnvironmentSettings, IdpError};
use crate::limits::IdpBudget;
use crate::token::{CacheStatus, Lease};

impl UserTokens {
    /// An access token of `session` with at least `max(min_ttl, cache.min_remaining)` left,
    /// refreshed when the current one has less. The refresh runs in a task of its own, so a
    /// caller that goes away does not lose a rotated refresh token.
    pub async fn token(
        &self,
        session: &Arc<Session>,
        environment: &Arc<EnvironmentSettings>,
        min_ttl: Option<Duration>,
        budget: &Arc<IdpBudget>,
    ) -> Result<Lease, UserError> {
        let min_remaining = self.inner.min_remaining;
        let required = min_ttl.map_or(min_remaining, |ttl| ttl.max(min_remaining));
        let started = self.clock().now();
        {
            let grant = session.grant().await;
            if let Some(lease) = servable(&grant, required, started, self.clock().now()) {
                return Ok(lease);
            }
            // A refresh gives tokens of the lifetime the last refresh gave: when that leaves no
            // room over what is required (a token is never handed out with all of its lifetime
            // left), another would spend an IdP request for nothing, until that token expires
            // (the IdP may issue longer ones by then).
            let lifetime = grant.access.lifetime();
            let last_live = grant.access.remaining(started) > Duration::ZERO;
            if grant.generation > 1 && last_live && lifetime <= required {
                return Err(self.too_short(lifetime, required));
            }
        }
        let this = self.clone();
        let session = Arc::clone(session);
        let environment = Arc::clone(environment);
        let budget = Arc::clone(budget);
        let task = tokio::spawn(async move {
            this.renew(&session, &environment, required, started, &budget)
                .await
        });
        task.await
            .unwrap_or(Err(UserError::Token(BrokerError::Internal)))
    }

    /// Refreshes the access token of `grant` (which `session` holds) with the IdP, keeping a
    /// rotated refresh token; the generation goes up when the IdP answered with tokens.
    pub(super) async fn refresh_with_idp(
        &self,
        session: &Session,
        grant: &mut Grant,
        environment: &EnvironmentSettings,
        required: Duration,
        asking: Asking<'_>,
    ) -> Result<Lease, UserError> {
        let Some(refresh_token) = &grant.refresh_token else {
            return Err(self.reauthorize(session, environment).await);
        };
        if let Some((retry_after, rejected)) = session.refresh_paused(self.clock().instant()) {
            return Err(match rejected {
                // The same refusal, as the IdP gave it: the caller has something to fix.
                Some((status, code)) => {
                    UserError::Token(IdpError::Rejected { status, code }.into())
                }
                None => UserError::RefreshPaused { retry_after },
            });
        }
        // The refetch floor of machine tokens: a session is refreshed at most once per
        // `cache.min_refetch_interval`, so no `min_ttl` turns requests into refreshes.
        let since = self
            .clock()
            .now()
            .duration_since(grant.access.fetched_at)
            .unwrap_or_default();
        if since < self.inner.min_refetch_interval {
            return Err(UserError::Token(BrokerError::RefetchTooSoon {
                required,
                retry_after: self.inner.min_refetch_interval.saturating_sub(since),
            }));
        }
        let (credential, _) = self.inner.broker.client_credential(environment).await;
        let refresh = self
            .inner
            .idp
            .refresh(environment, &credential, refresh_token);
        let answer = self.ask_idp(environment, asking, refresh).await?;
        self.count_idp_request(environment, "refresh_token", &answer);
        let fresh = match answer {
            Ok(fresh) => {
                session.refresh_succeeded();
                fresh
            }
            Err(IdpError::Rejected { status, code })
                if code == "invalid_grant" || (status == 401 && code != "invalid_client") =>
            {
                tracing::info!(
                    caller = %session.owner(),
                    tenant = %session.key().tenant,
                    environment = %session.key().environment,
                    status,
                    code,
                    "the IdP refused a refresh token; the user must authorize again"
                );
                grant.refresh_token = None;
                return Err(self.reauthorize(session, environment).await);
            }
            Err(error) => {
                let rejected = match &error {
                    IdpError::Rejected { status, code } => Some((*status, code.clone())),
                    _ => None,
                };
                let error = BrokerError::from(error);
                let wait =
                    session.refresh_failed(self.clock().instant(), error.retry_after(), rejected);
                tracing::debug!(
                    wait_ms = wait.as_millis(),
                    "user token refreshes paused after a failure"
                );
                return Err(UserError::Token(error));
            }
        };
        let rotated = fresh.refresh_token.is_some();
        let refresh_token = fresh.refresh_token.or_else(|| grant.refresh_token.take());
        *grant = Grant::issued(
            fresh.token,
            refresh_token,
            grant.generation.saturating_add(1),
            self.clock().now(),
        );
        session.mark_produced(grant.generation);
        let access = Arc::clone(&grant.access);
        tracing::info!(
            tenant = %session.key().tenant,
            environment = %session.key().environment,
            lifetime_s = access.lifetime().as_secs(),
            rotated,
            "refreshed a user token"
        );
        let lifetime = access.lifetime();
        if lifetime < required {
            return Err(self.too_short(lifetime, required));
        }
        access.record_hit();
        Ok(Lease {
            token: access,
            status: CacheStatus::Miss,
            at: self.clock().now(),
        })
    }

    /// Why tokens of `lifetime` cannot serve a request for `required`.
    fn too_short(&self, lifetime: Duration, required: Duration) -> UserError {
        let min_remaining = self.inner.min_remaining;
        UserError::Token(if lifetime < min_remaining {
            BrokerError::LifetimeBelowMinimum {
                lifetime,
                min_remaining,
            }
        } else {
            BrokerError::MinTtlTooLong { required, lifetime }
        })
    }
}

/// A lease on the access token of `grant` when it serves a request for `required` validity
/// that started at `started` ([`CachedToken::serves`](crate::token::CachedToken::serves)); a hit, since this request did not ask
/// the IdP (a refresh it waited for counts as another's).
pub(super) fn servable(
    grant: &Grant,
    required: Duration,
    started: SystemTime,
    now: SystemTime,
) -> Option<Lease> {
    let access = &grant.access;
    access.serves(now, required, started).then(|| {
        access.record_hit();
        Lease {
            token: Arc::clone(access),
            status: CacheStatus::Hit,
            at: now,
        }
    })
}
