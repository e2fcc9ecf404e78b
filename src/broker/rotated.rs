//! The client secret in force for an environment with a `rotation` table: the one the broker
//! rotated last (`None`: the configured one), and since when it is in force, for the schedule.
//!
//! A replica looks it up the first time it needs it (the shared level, then
//! `rotation.secret_file`), again when another replica announces a change, and after every
//! resubscription. A secret dropped because someone rotated by hand leaves a tombstone in the
//! shared level, so no replica goes back to it (not even from its own `secret_file`) and the
//! schedule counts from the manual rotation. A level that lost its data gets the secret back
//! from the replicas that hold it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use secrecy::SecretString;

use super::{Broker, EnvironmentName, lock};
use crate::idp::{ClientCredential, EnvironmentSettings};
use crate::token::{RotatedSecret, SharedKey, SharedSecret};

/// How long a newly rotated secret is kept even if the IdP refuses it and takes another
/// credential: an IdP may accept the old secret at some of its nodes for a few seconds after a
/// rotation, and dropping the new one then would lose the only secret that works once it has
/// settled.
const SETTLE: Duration = Duration::from_secs(300);

/// What a replica knows of one client's secret.
#[derive(Clone, Default)]
pub(super) struct Known {
    /// The secret the broker rotated, in force; `None`: the configured one.
    pub(super) rotated: Option<Arc<RotatedSecret>>,
    /// Since when the secret in force is: its rotation, or the manual rotation that dropped the
    /// broker's; `None` when unknown (never rotated by the broker).
    pub(super) since: Option<SystemTime>,
    /// Whose secret it is, for its metrics.
    names: EnvironmentName,
}

impl Known {
    fn of(names: EnvironmentName, rotated: Arc<RotatedSecret>) -> Self {
        Self {
            since: Some(rotated.rotated_at),
            rotated: Some(rotated),
            names,
        }
    }

    fn without(names: EnvironmentName, since: Option<SystemTime>) -> Self {
        Self {
            rotated: None,
            since,
            names,
        }
    }
}

/// The (tenant, environment) of `environment`.
fn names(environment: &EnvironmentSettings) -> EnvironmentName {
    (
        Arc::clone(&environment.tenant),
        Arc::clone(&environment.environment),
    )
}

/// The secrets known to this replica, by [`SharedKey::for_secret`].
#[derive(Default)]
pub(super) struct KnownSecrets(Mutex<HashMap<SharedKey, Known>>);

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

    /// The secret the broker rotated for `environment`, in force; `None` without a rotation
    /// or when the configured one is in force.
    pub async fn rotated_secret(
        &self,
        environment: &EnvironmentSettings,
    ) -> Option<Arc<RotatedSecret>> {
        self.known_secret(environment).await.rotated
    }

    /// Since when `environment`'s secret in force is (its rotation, or a manual rotation
    /// the broker noticed); `None` when unknown.
    pub async fn secret_since(&self, environment: &EnvironmentSettings) -> Option<SystemTime> {
        self.known_secret(environment).await.since
    }

    /// What this replica knows of `environment`'s secret, looked up the first time.
    async fn known_secret(&self, environment: &EnvironmentSettings) -> Known {
        let Some(rotation) = &environment.rotation else {
            return Known::default();
        };
        let key = SharedKey::for_secret(environment);
        if let Some(known) = lock(&self.inner.known_secrets.0).get(&key) {
            return known.clone();
        }
        let mut remember = true;
        let mut known = None;
        if let Some(shared) = &self.inner.shared {
            match shared.load_secret(&key).await {
                Ok(SharedSecret::Stored(stored)) => {
                    known = Some(Known::of(names(environment), Arc::new(stored)));
                }
                Ok(SharedSecret::Dropped { at, .. }) => {
                    known = Some(Known::without(names(environment), Some(at)));
                }
                Ok(SharedSecret::Absent | SharedSecret::Unreadable) => {}
                // Looked up again next time, and after the level's next subscription.
                Err(_) => remember = false,
            }
        }
        if known.is_none()
            && let Some(path) = &rotation.secret_file
        {
            known = read_secret_file(path)
                .await
                .map(|found| Known::of(names(environment), Arc::new(found)));
        }
        let known = known.unwrap_or_else(|| Known::without(names(environment), None));
        if !remember {
            return known;
        }
        let mut secrets = lock(&self.inner.known_secrets.0);
        if let Some(raced) = secrets.get(&key) {
            return raced.clone();
        }
        self.record_since(&known);
        secrets.insert(key, known.clone());
        known
    }

    /// Puts `known` in force for `key` on this replica, and its time in the gauge.
    fn put_known(&self, key: SharedKey, known: Known) {
        self.record_since(&known);
        lock(&self.inner.known_secrets.0).insert(key, known);
    }

    /// Sets `token_broker_client_secret_rotated_timestamp_seconds` to when `known`'s secret
    /// was put in force, when known.
    fn record_since(&self, known: &Known) {
        if let Some(since) = known.since {
            let (tenant, environment) = &known.names;
            self.inner
                .metrics
                .secret_rotated_at(tenant, environment, since);
        }
    }

    /// Puts `secret` in force for `environment` (whose secret lives at `key`) on this replica.
    pub(super) fn adopt_secret(
        &self,
        environment: &EnvironmentSettings,
        key: SharedKey,
        secret: &Arc<RotatedSecret>,
    ) {
        self.put_known(key, Known::of(names(environment), Arc::clone(secret)));
    }

    /// Drops `rotated` for the whole fleet: the IdP refused it and accepted `accepted` (the
    /// configured or the fallback credential), so someone rotated by hand. A secret rotated
    /// less than [`SETTLE`] ago is kept.
    pub(super) async fn drop_rotated(
        &self,
        environment: &EnvironmentSettings,
        rotated: &RotatedSecret,
        accepted: &'static str,
    ) {
        let now = self.inner.clock.now();
        let age = now.duration_since(rotated.rotated_at).unwrap_or_default();
        let fingerprint = rotated.fingerprint();
        let (tenant, name) = (&environment.tenant, &environment.environment);
        if age < SETTLE {
            tracing::warn!(
                tenant = %tenant,
                environment = %name,
                fingerprint = %fingerprint,
                accepted,
                "the IdP refused the secret the broker rotated moments ago and took another credential; keeping it while the rotation settles at the IdP"
            );
            return;
        }
        tracing::warn!(
            tenant = %tenant,
            environment = %name,
            fingerprint = %fingerprint,
            accepted,
            "the IdP refused the secret the broker rotated and took another credential: it was rotated by hand, so the broker's is dropped"
        );
        let key = SharedKey::for_secret(environment);
        let still_ours = lock(&self.inner.known_secrets.0)
            .get(&key)
            .and_then(|known| known.rotated.as_ref())
            .is_none_or(|known| known.fingerprint() == fingerprint);
        if still_ours {
            self.put_known(key, Known::without(names(environment), Some(now)));
        }
        if let Some(shared) = &self.inner.shared {
            let _ = shared.drop_secret(&key, &fingerprint, now).await;
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
    /// announced a change or after a resubscription: a stored secret is put in force, a
    /// tombstone drops the secret it names, and a level that holds nothing (it lost its data)
    /// gets this replica's secret back. A secret this replica never looked up is left for its
    /// first use.
    pub(super) async fn reread_secret(&self, key: &SharedKey) {
        let Some(shared) = &self.inner.shared else {
            return;
        };
        let Some(mine) = lock(&self.inner.known_secrets.0).get(key).cloned() else {
            return;
        };
        match shared.load_secret(key).await {
            Ok(SharedSecret::Stored(stored)) => {
                self.put_known(*key, Known::of(mine.names, Arc::new(stored)));
            }
            Ok(SharedSecret::Dropped { fingerprint, at }) => {
                if mine
                    .rotated
                    .as_ref()
                    .is_none_or(|rotated| rotated.fingerprint() == fingerprint)
                {
                    self.put_known(*key, Known::without(mine.names, Some(at)));
                }
            }
            Ok(SharedSecret::Absent) => {
                if let Some(rotated) = &mine.rotated {
                    tracing::warn!(
                        fingerprint = %rotated.fingerprint(),
                        "the shared cache lost the rotated client secret; storing it again"
                    );
                    let _ = shared.restore_secret(key, rotated).await;
                }
            }
            // Sealed with a key this replica lacks (a key change under way): left alone.
            Ok(SharedSecret::Unreadable) | Err(_) => {}
        }
    }

    /// Every secret key this replica looked up, for a check after a resubscription.
    pub(super) fn known_secrets(&self) -> Vec<SharedKey> {
        lock(&self.inner.known_secrets.0).keys().copied().collect()
    }
}

/// The secret in `rotation.secret_file`, rotated when the file was last written; `None` when
/// it is missing, unreadable or empty.
pub(super) async fn read_secret_file(path: &Path) -> Option<RotatedSecret> {
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
pub(super) async fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
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
