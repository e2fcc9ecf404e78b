//! Client secrets the broker rotates itself (docs/guides/rotating-secrets.md): one rotation at
//! a time per client, across replicas, in a task the broker owns (the IdP invalidates the old
//! secret as soon as it answers, so a caller that goes away must not lose the new one); the new
//! secret kept in memory, sealed in the shared level and announced, and written to
//! `rotation.secret_file`. The secret in force and its lookups are in `rotated`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::watch;

use super::{Broker, BrokerError, lock};
use crate::idp::{EnvironmentSettings, IdpError, RotationSettings};
use crate::limits::{BudgetCounters, IdpBudget};
use crate::token::{Lease, LockToken, RotatedSecret, SharedKey, SharedSecret, TokenKey};

/// How often a replica that waits for another's rotation looks for its result.
const PEER_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// IdP requests a minute the broker may spend on its own authorising tokens.
const OWN_REQUESTS_PER_MINUTE: NonZeroU32 = NonZeroU32::new(30).expect("not zero");
/// Keys the broker may hold for its own authorising tokens.
const OWN_MAX_KEYS: usize = 64;

/// What a rotation hands those who asked for it.
type RotationOutcome = Result<Arc<RotatedSecret>, Arc<RotationError>>;

/// The rotations under way, one per secret ([`SharedKey::for_secret`]); others asking join it.
#[derive(Default)]
pub(super) struct Rotations(Mutex<HashMap<SharedKey, watch::Receiver<Option<RotationOutcome>>>>);

/// The budget the broker's own authorising tokens are charged to: no caller pays for them.
pub(super) fn own_budget() -> Arc<IdpBudget> {
    Arc::new(IdpBudget::new(
        Arc::from("token-broker"),
        OWN_REQUESTS_PER_MINUTE,
        OWN_MAX_KEYS,
        BudgetCounters::noop(),
    ))
}

/// Why a secret was not rotated; in every case the old secret stays in use.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The environment has no `rotation` table.
    #[error(
        "{tenant}/{environment} has no [rotation] table, so the broker does not rotate its secret; configure one, or rotate by hand"
    )]
    NotConfigured {
        /// The tenant.
        tenant: String,
        /// The environment.
        environment: String,
    },
    /// The token that authorises the rotation could not be had.
    #[error(
        "cannot get the token that authorises the rotation from {authority} ({source}); the old secret stays in use"
    )]
    Authorization {
        /// `tenant/environment` of `authorized_by`.
        authority: String,
        /// Why.
        #[source]
        source: Arc<BrokerError>,
    },
    /// The rotation endpoint failed or answered no usable secret.
    #[error(
        "the rotation endpoint failed: {}; the old secret stays in use",
        endpoint_failure(.0)
    )]
    Endpoint(#[source] IdpError),
    /// The shared level is down: a new secret would reach no other replica.
    #[error(
        "the shared cache is down, and a rotated secret must reach every replica through it; the old secret stays in use: retry when it is back"
    )]
    SharedCacheDown,
    /// Another replica holds the rotation lock and its result did not arrive in time.
    #[error(
        "another replica is rotating this secret and its result did not arrive in time; the old secret stays in use: retry"
    )]
    PeerBusy,
    /// The rotation task failed unexpectedly.
    #[error("the rotation failed unexpectedly; the old secret stays in use")]
    Internal,
}

impl Broker {
    /// Rotates `environment`'s client secret now, with a token of `authority` (its
    /// `rotation.authorized_by`). Concurrent calls, on this replica or on others sharing the
    /// level, make one rotation and all receive its secret. The work belongs to the broker: a
    /// caller that goes away cancels nothing.
    pub async fn rotate_secret(
        &self,
        environment: &Arc<EnvironmentSettings>,
        authority: &Arc<EnvironmentSettings>,
    ) -> RotationOutcome {
        if environment.rotation.is_none() {
            return Err(Arc::new(RotationError::NotConfigured {
                tenant: environment.tenant.to_string(),
                environment: environment.environment.to_string(),
            }));
        }
        let key = SharedKey::for_secret(environment);
        let mut receiver = {
            let mut under_way = lock(&self.inner.rotations.0);
            match under_way.get(&key) {
                Some(receiver) => receiver.clone(),
                None => {
                    let (done, receiver) = watch::channel(None);
                    under_way.insert(key, receiver.clone());
                    let (broker, environment, authority) =
                        (self.clone(), Arc::clone(environment), Arc::clone(authority));
                    tokio::spawn(async move {
                        // In a task of its own, so that a panic is an outcome too.
                        let rotated = tokio::spawn({
                            let broker = broker.clone();
                            async move { broker.rotate_now(&environment, &authority).await }
                        })
                        .await
                        .unwrap_or_else(|_| Err(Arc::new(RotationError::Internal)));
                        lock(&broker.inner.rotations.0).remove(&key);
                        let _ = done.send(Some(rotated));
                    });
                    receiver
                }
            }
        };
        match receiver.wait_for(Option::is_some).await {
            Ok(outcome) => outcome
                .clone()
                .unwrap_or_else(|| Err(Arc::new(RotationError::Internal))),
            Err(_) => Err(Arc::new(RotationError::Internal)),
        }
    }

    /// One rotation, counted in the metrics whatever its outcome.
    async fn rotate_now(
        &self,
        environment: &EnvironmentSettings,
        authority: &Arc<EnvironmentSettings>,
    ) -> RotationOutcome {
        let outcome = self.rotate_locked(environment, authority).await;
        let (tenant, name) = (&environment.tenant, &environment.environment);
        match &outcome {
            Ok((secret, By::ThisReplica)) => {
                self.inner.metrics.secret_rotation(tenant, name, "rotated");
                tracing::info!(
                    tenant = %tenant,
                    environment = %name,
                    fingerprint = %secret.fingerprint(),
                    "rotated the client secret; new tokens are fetched with the new one"
                );
            }
            Ok((secret, By::AnotherReplica)) => {
                tracing::info!(
                    tenant = %tenant,
                    environment = %name,
                    fingerprint = %secret.fingerprint(),
                    "another replica rotated the client secret meanwhile; using its new one"
                );
            }
            Err(error) => {
                self.inner.metrics.secret_rotation(tenant, name, "failed");
                tracing::warn!(
                    tenant = %tenant,
                    environment = %name,
                    error = %error,
                    cause = %crate::telemetry::error_chain(error.as_ref()),
                    "client secret rotation failed; the old secret stays in use"
                );
            }
        }
        outcome.map(|(secret, _)| secret)
    }

    /// The authorising token, then (under the shared lock, with a shared level) the call and
    /// the new secret's installation; or another replica's result, when one rotated meanwhile.
    async fn rotate_locked(
        &self,
        environment: &EnvironmentSettings,
        authority: &Arc<EnvironmentSettings>,
    ) -> Result<(Arc<RotatedSecret>, By), Arc<RotationError>> {
        let rotation = environment
            .rotation
            .as_ref()
            .ok_or(RotationError::Internal)?;
        let key = SharedKey::for_secret(environment);
        // What was in force when asked: a different secret found once the lock is held was
        // rotated meanwhile, and is this rotation's result too.
        let before = self.rotated_secret(environment).await;
        let before = before.as_ref().map(|secret| secret.fingerprint());
        let token_key = TokenKey::new(
            &authority.tenant,
            &authority.environment,
            authority.audience.as_deref().unwrap_or_default(),
            &rotation.scope,
        );
        let budget = &self.inner.own_budget;
        let authorization = |source| RotationError::Authorization {
            authority: format!("{}/{}", authority.tenant, authority.environment),
            source,
        };
        // The token before the lock, so that the lock is held for the rotation call alone.
        let lease = self
            .get(authority, &token_key, None, budget, None)
            .await
            .map_err(authorization)?;
        let held = match self
            .rotation_lock(environment, &key, before.as_deref())
            .await?
        {
            Locked::Held(held) => held,
            Locked::RotatedMeanwhile(secret) => return Ok((secret, By::AnotherReplica)),
        };
        let answer = async {
            let first = self.call_endpoint(environment, rotation, &lease).await;
            let Err(IdpError::Rejected { status: 401, .. }) = first else {
                return Ok(first);
            };
            // The authorising token was revoked or lost its scope: forgotten, and one more try
            // with a fresh one.
            let stale = lease.token.access_token();
            let _ = self
                .forget(authority, &token_key, Some(stale.expose()), budget)
                .await;
            let fresh = self
                .get(authority, &token_key, None, budget, None)
                .await
                .map_err(authorization)?;
            Ok(self.call_endpoint(environment, rotation, &fresh).await)
        }
        .await;
        let installed = match answer {
            Ok(Ok(secret)) => Ok((
                self.install_rotated(environment, &key, secret).await,
                By::ThisReplica,
            )),
            Ok(Err(error)) => Err(Arc::new(RotationError::Endpoint(error))),
            Err(error) => Err(Arc::new(error)),
        };
        if let (Some(shared), Some(held)) = (&self.inner.shared, held) {
            let _ = shared.unlock(&key, held).await;
        }
        installed
    }

    /// One call of `environment`'s rotation endpoint (`rotation`, its table) with the
    /// authorising token of `lease`.
    async fn call_endpoint(
        &self,
        environment: &EnvironmentSettings,
        rotation: &RotationSettings,
        lease: &Lease,
    ) -> Result<SecretString, IdpError> {
        self.inner
            .idp
            .rotate_secret(
                &rotation.endpoint,
                lease.token.access_token().expose(),
                environment.timeout,
                environment.max_response_bytes,
            )
            .await
    }

    /// The cross-replica rotation lock of `key` (`None` without a shared level), or the secret
    /// another replica rotated since `before` was in force.
    async fn rotation_lock(
        &self,
        environment: &EnvironmentSettings,
        key: &SharedKey,
        before: Option<&str>,
    ) -> Result<Locked, Arc<RotationError>> {
        let Some(shared) = &self.inner.shared else {
            return Ok(Locked::Held(None));
        };
        // Real time: another replica's network exchange, whatever a test does to the clock.
        let deadline = tokio::time::Instant::now() + environment.timeout + self.inner.wait_for_peer;
        loop {
            let held = shared
                .try_lock(key)
                .await
                .map_err(|_| RotationError::SharedCacheDown)?;
            let stored = shared
                .load_secret(key)
                .await
                .map_err(|_| RotationError::SharedCacheDown)?;
            if let SharedSecret::Stored(stored) = stored
                && before != Some(stored.fingerprint().as_str())
            {
                if let Some(held) = held {
                    let _ = shared.unlock(key, held).await;
                }
                let stored = Arc::new(stored);
                self.adopt_secret(environment, *key, &stored);
                return Ok(Locked::RotatedMeanwhile(stored));
            }
            if let Some(held) = held {
                return Ok(Locked::Held(Some(held)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Arc::new(RotationError::PeerBusy));
            }
            tokio::time::sleep(PEER_POLL_INTERVAL).await;
        }
    }

    /// Puts a newly rotated secret in force: in the shared level (announced) and
    /// `secret_file`, then in memory. The IdP no longer takes the old one, so the new one is
    /// used even when it could not be kept (logged at ERROR: a restart would lose it).
    async fn install_rotated(
        &self,
        environment: &EnvironmentSettings,
        key: &SharedKey,
        secret: SecretString,
    ) -> Arc<RotatedSecret> {
        let rotated = Arc::new(RotatedSecret {
            secret,
            rotated_at: self.inner.clock.now(),
        });
        let (tenant, name) = (&environment.tenant, &environment.environment);
        if let Some(shared) = &self.inner.shared
            && let Err(error) = shared.store_secret(key, &rotated).await
        {
            tracing::error!(
                tenant = %tenant,
                environment = %name,
                %error,
                "the rotated client secret could not be stored in the shared cache: other replicas keep the old one, which the IdP refuses; rotate again once the shared cache is back"
            );
        }
        if let Some(path) = environment
            .rotation
            .as_ref()
            .and_then(|r| r.secret_file.as_ref())
            && let Err(error) =
                super::rotated::write_secret_file(path, rotated.secret.expose_secret()).await
        {
            tracing::error!(
                tenant = %tenant,
                environment = %name,
                file = %path.display(),
                %error,
                "the rotated client secret could not be written to rotation.secret_file: a restart would lose it"
            );
        }
        self.adopt_secret(environment, *key, &rotated);
        rotated
    }

    /// Waits, until `deadline`, for the rotation of `key` under way on this replica, if any.
    pub(super) async fn await_rotation(&self, key: &SharedKey, deadline: tokio::time::Instant) {
        let under_way = lock(&self.inner.rotations.0).get(key).cloned();
        if let Some(mut rotation) = under_way {
            let _ = tokio::time::timeout_at(deadline, rotation.wait_for(Option::is_some)).await;
        }
    }
}

/// What the rotation endpoint did, in words about the endpoint (an [`IdpError`] speaks of token
/// requests).
fn endpoint_failure(error: &IdpError) -> String {
    match error {
        IdpError::Rejected { status, code } => {
            format!("it answered HTTP {status} with error code '{code}'")
        }
        IdpError::RateLimited { .. } => "it is rate limiting the broker (HTTP 429)".to_owned(),
        IdpError::ServerError(status) => format!("it answered HTTP {status}"),
        other => other.to_string(),
    }
}

/// Which replica made a rotation.
enum By {
    /// This one: it called the endpoint.
    ThisReplica,
    /// Another, while this one waited for the lock.
    AnotherReplica,
}

/// The rotation lock, or another replica's result.
enum Locked {
    /// This replica rotates (`None`: there is no shared level to lock).
    Held(Option<LockToken>),
    /// Another replica rotated since the rotation was asked for.
    RotatedMeanwhile(Arc<RotatedSecret>),
}
