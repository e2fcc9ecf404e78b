//! Client secrets the broker rotates itself (docs/guides/rotating-secrets.md): one rotation at
//! a time per client, across replicas, in a task the broker owns (the IdP invalidates the old
//! secret as soon as it answers, so a caller that goes away must not lose the new one); the new
//! secret kept in memory, sealed in the shared level and announced, and written to
//! `rotation.secret_file`; and the secret each fetch starts with.
//!
//! A replica looks the rotated secret up (shared level, then `secret_file`) the first time it
//! needs the environment's credential, again when another replica announces a change, and after
//! every resubscription, so a replica that starts later or missed an announcement never uses a
//! secret the IdP no longer accepts for long.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::watch;

use super::{Broker, BrokerError, lock};
use crate::idp::{ClientCredential, EnvironmentSettings, IdpError};
use crate::limits::{BudgetCounters, IdpBudget};
use crate::token::{LockToken, RotatedSecret, SharedKey, TokenKey};

/// How often a replica that waits for another's rotation looks for its result.
const PEER_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// IdP requests a minute the broker may spend on its own authorising tokens.
const OWN_REQUESTS_PER_MINUTE: NonZeroU32 = NonZeroU32::new(30).expect("not zero");
/// Keys the broker may hold for its own authorising tokens.
const OWN_MAX_KEYS: usize = 64;

/// What a rotation hands those who asked for it.
type RotationOutcome = Result<Arc<RotatedSecret>, Arc<RotationError>>;

/// The rotated secrets known to this replica and the rotations under way, by
/// [`SharedKey::for_secret`].
#[derive(Default)]
pub(super) struct Rotations {
    /// Looked up or rotated: `None` when none is stored (the configured secret is in force).
    secrets: Mutex<HashMap<SharedKey, Option<Arc<RotatedSecret>>>>,
    /// One rotation per secret at a time; others asking join it.
    under_way: Mutex<HashMap<SharedKey, watch::Receiver<Option<RotationOutcome>>>>,
}

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
    #[error("the rotation endpoint failed: {0}; the old secret stays in use")]
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
    /// The secret `environment`'s requests start with: the one the broker rotated when there
    /// is one, else the configured credential. The rotated one, when used, is returned too.
    pub async fn client_credential(
        &self,
        environment: &EnvironmentSettings,
    ) -> (ClientCredential, Option<Arc<RotatedSecret>>) {
        match self.rotated_secret(environment).await {
            Some(rotated) => (
                ClientCredential::Secret(rotated.secret.clone()),
                Some(rotated),
            ),
            None => (environment.credential.clone(), None),
        }
    }

    /// The secret the broker rotated for `environment`, looked up the first time (shared
    /// level, then `rotation.secret_file`); `None` without a rotation or when none is stored.
    pub async fn rotated_secret(
        &self,
        environment: &EnvironmentSettings,
    ) -> Option<Arc<RotatedSecret>> {
        let rotation = environment.rotation.as_ref()?;
        let key = SharedKey::for_secret(environment);
        if let Some(known) = lock(&self.inner.rotations.secrets).get(&key) {
            return known.clone();
        }
        let mut remember = true;
        let mut found = None;
        if let Some(shared) = &self.inner.shared {
            match shared.load_secret(&key).await {
                Ok(stored) => found = stored.map(Arc::new),
                // Looked up again next time, and after the level's next subscription.
                Err(_) => remember = false,
            }
        }
        if found.is_none()
            && let Some(path) = &rotation.secret_file
        {
            found = read_secret_file(path).await.map(Arc::new);
        }
        if let Some(secret) = &found {
            self.record_rotated_at(environment, secret.rotated_at);
        }
        if remember {
            lock(&self.inner.rotations.secrets)
                .entry(key)
                .or_insert_with(|| found.clone());
        }
        found
    }

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
            let mut under_way = lock(&self.inner.rotations.under_way);
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
                        lock(&broker.inner.rotations.under_way).remove(&key);
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
            Ok(secret) => {
                self.inner.metrics.secret_rotation(tenant, name, "rotated");
                tracing::info!(
                    tenant = %tenant,
                    environment = %name,
                    fingerprint = %secret.fingerprint(),
                    "rotated the client secret; new tokens are fetched with the new one"
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
        outcome
    }

    /// The authorising token, then (under the shared lock, with a shared level) the call and
    /// the new secret's installation; or another replica's result, when one rotated meanwhile.
    async fn rotate_locked(
        &self,
        environment: &EnvironmentSettings,
        authority: &Arc<EnvironmentSettings>,
    ) -> RotationOutcome {
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
        let mut lease = self
            .get(authority, &token_key, None, budget)
            .await
            .map_err(authorization)?;
        let held = match self
            .rotation_lock(environment, &key, before.as_deref())
            .await?
        {
            Locked::Held(held) => held,
            Locked::RotatedMeanwhile(secret) => return Ok(secret),
        };
        let idp = &self.inner.idp;
        let limit = environment.max_response_bytes;
        let mut answer = idp
            .rotate_secret(
                &rotation.endpoint,
                lease.token.access_token().expose(),
                environment.timeout,
                limit,
            )
            .await;
        if let Err(IdpError::Rejected { status: 401, .. }) = answer {
            // The authorising token was revoked or lost its scope: forgotten, and one more try
            // with a fresh one.
            let stale = lease.token.access_token().expose().to_owned();
            let _ = self
                .forget(authority, &token_key, Some(&stale), budget)
                .await;
            lease = self
                .get(authority, &token_key, None, budget)
                .await
                .map_err(authorization)?;
            answer = idp
                .rotate_secret(
                    &rotation.endpoint,
                    lease.token.access_token().expose(),
                    environment.timeout,
                    limit,
                )
                .await;
        }
        let installed = match answer {
            Ok(secret) => Ok(self.install_rotated(environment, &key, secret).await),
            Err(error) => Err(Arc::new(RotationError::Endpoint(error))),
        };
        if let (Some(shared), Some(held)) = (&self.inner.shared, held) {
            let _ = shared.unlock(&key, held).await;
        }
        installed
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
            if let Some(stored) = stored
                && before != Some(stored.fingerprint().as_str())
            {
                if let Some(held) = held {
                    let _ = shared.unlock(key, held).await;
                }
                let stored = Arc::new(stored);
                self.record_rotated_at(environment, stored.rotated_at);
                lock(&self.inner.rotations.secrets).insert(*key, Some(Arc::clone(&stored)));
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
            && let Err(error) = write_secret_file(path, rotated.secret.expose_secret()).await
        {
            tracing::error!(
                tenant = %tenant,
                environment = %name,
                file = %path.display(),
                %error,
                "the rotated client secret could not be written to rotation.secret_file: a restart would lose it"
            );
        }
        self.record_rotated_at(environment, rotated.rotated_at);
        lock(&self.inner.rotations.secrets).insert(*key, Some(Arc::clone(&rotated)));
        rotated
    }

    /// Drops `rotated` for the whole fleet: the IdP refused it and accepted another credential,
    /// so someone rotated by hand and the configuration holds the secret in force.
    pub(super) async fn drop_rotated(
        &self,
        environment: &EnvironmentSettings,
        rotated: &RotatedSecret,
    ) {
        let key = SharedKey::for_secret(environment);
        let fingerprint = rotated.fingerprint();
        tracing::warn!(
            tenant = %environment.tenant,
            environment = %environment.environment,
            fingerprint = %fingerprint,
            "the IdP refused the secret the broker rotated and accepted the configured one: it was rotated by hand, so the broker's is dropped"
        );
        {
            let mut secrets = lock(&self.inner.rotations.secrets);
            if let Some(Some(known)) = secrets.get(&key)
                && known.fingerprint() == fingerprint
            {
                secrets.insert(key, None);
            }
        }
        if let Some(shared) = &self.inner.shared {
            let _ = shared.drop_secret(&key, &fingerprint).await;
        }
        if let Some(path) = environment
            .rotation
            .as_ref()
            .and_then(|r| r.secret_file.as_ref())
            && read_secret_file(path)
                .await
                .is_some_and(|stored| stored.fingerprint() == fingerprint)
            && let Err(error) = tokio::fs::remove_file(path).await
        {
            tracing::warn!(file = %path.display(), %error, "cannot remove rotation.secret_file");
        }
    }

    /// Reads the secret under `key` again from the shared level, after another replica
    /// announced a change or after a resubscription; a secret this replica never looked up is
    /// left for its first use.
    pub(super) async fn reread_secret(&self, key: &SharedKey) {
        let Some(shared) = &self.inner.shared else {
            return;
        };
        if !lock(&self.inner.rotations.secrets).contains_key(key) {
            return;
        }
        if let Ok(stored) = shared.load_secret(key).await {
            lock(&self.inner.rotations.secrets).insert(*key, stored.map(Arc::new));
        }
    }

    /// Waits, until `deadline`, for the rotation of `key` under way on this replica, if any.
    pub(super) async fn await_rotation(&self, key: &SharedKey, deadline: tokio::time::Instant) {
        let under_way = lock(&self.inner.rotations.under_way).get(key).cloned();
        if let Some(mut rotation) = under_way {
            let _ = tokio::time::timeout_at(deadline, rotation.wait_for(Option::is_some)).await;
        }
    }

    /// Puts `secret`, read from the shared level, in force for `key` on this replica.
    pub(super) fn adopt_secret(&self, key: SharedKey, secret: &Arc<RotatedSecret>) {
        lock(&self.inner.rotations.secrets).insert(key, Some(Arc::clone(secret)));
    }

    /// Every secret key this replica looked up, for a check after a resubscription.
    pub(super) fn known_secrets(&self) -> Vec<SharedKey> {
        lock(&self.inner.rotations.secrets)
            .keys()
            .copied()
            .collect()
    }

    /// Sets `token_broker_client_secret_rotated_timestamp_seconds` of `environment`.
    fn record_rotated_at(&self, environment: &EnvironmentSettings, at: SystemTime) {
        self.inner
            .metrics
            .secret_rotated_at(&environment.tenant, &environment.environment, at);
    }
}

/// The rotation lock, or another replica's result.
enum Locked {
    /// This replica rotates (`None`: there is no shared level to lock).
    Held(Option<LockToken>),
    /// Another replica rotated since the rotation was asked for.
    RotatedMeanwhile(Arc<RotatedSecret>),
}

/// The secret in `rotation.secret_file`, rotated when the file was last written; `None` when
/// it is missing, unreadable or empty.
async fn read_secret_file(path: &Path) -> Option<RotatedSecret> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let secret = text.trim();
    if secret.is_empty() || secret.len() > crate::idp::MAX_SECRET_LEN {
        return None;
    }
    let rotated_at = tokio::fs::metadata(path)
        .await
        .and_then(|metadata| metadata.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Some(RotatedSecret {
        secret: SecretString::from(secret.to_owned()),
        rotated_at,
    })
}

/// Writes `secret` to `path` atomically (a new file beside it, mode 0600, synced, renamed).
async fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
    let path = path.to_path_buf();
    let contents = format!("{secret}\n");
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut temporary = path.clone().into_os_string();
        temporary.push(format!(".{}.tmp", std::process::id()));
        let temporary = std::path::PathBuf::from(temporary);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options.open(&temporary).and_then(|mut file| {
            file.write_all(contents.as_bytes())?;
            file.sync_all()
        });
        match written.and_then(|()| std::fs::rename(&temporary, &path)) {
            Ok(()) => Ok(()),
            Err(error) => {
                let _ = std::fs::remove_file(&temporary);
                Err(error)
            }
        }
    })
    .await
    .unwrap_or_else(|error| Err(std::io::Error::other(error)))
}
