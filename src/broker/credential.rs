//! Which client credential a fetch tries when the IdP refuses the one it used (`invalid_client`,
//! or a 401 such as Auth0's `access_denied` "Unauthorized"): the configured one when it started
//! with a secret the broker rotated, the configured file read again, the fallback credential,
//! and a secret rotated while it was under way; each once, within the one fetch, so the caller
//! is charged once.

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret as _;

use super::Broker;
use crate::idp::{ClientCredential, EnvironmentSettings};
use crate::token::{RotatedSecret, SharedKey, SharedSecret};

/// How often a fetch refused during another replica's rotation looks for the new secret.
const ROTATION_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The next step of a refused fetch.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// The configured credential (the fetch began with a rotated secret).
    Configured,
    /// The configured credential's file, read again.
    Reread,
    /// The second credential.
    Fallback,
    /// A secret rotated since the fetch began (a rotation under way when it was refused).
    Rotated,
    /// None left.
    Done,
}

/// Where the credential a fetch uses came from.
#[derive(Clone)]
pub(super) enum Source {
    /// A secret the broker rotated.
    Rotated(Arc<RotatedSecret>),
    /// The configuration (its value at load, or its file read again).
    Configured,
    /// The fallback credential.
    Fallback,
}

/// Whether an IdP refusal is about the client's credential, which another may cure.
pub(super) fn refuses_client(status: u16, code: &str) -> bool {
    status == 401 || code == "invalid_client"
}

impl Broker {
    /// The credential a fetch of `environment` starts with, where it came from, and the step
    /// after a refusal.
    pub(super) async fn first_credential(
        &self,
        environment: &EnvironmentSettings,
    ) -> (ClientCredential, Source, Next) {
        match self.client_credential(environment).await {
            (credential, Some(rotated)) => (credential, Source::Rotated(rotated), Next::Configured),
            (credential, None) => (credential, Source::Configured, Next::Reread),
        }
    }

    /// The next credential to try after `current` was refused, or `None` when none is left.
    pub(super) async fn next_credential(
        &self,
        environment: &EnvironmentSettings,
        next: &mut Next,
        current: &ClientCredential,
        began_with: Option<&str>,
    ) -> Option<(ClientCredential, Source)> {
        loop {
            match *next {
                Next::Configured => {
                    *next = Next::Reread;
                    return Some((environment.credential.clone(), Source::Configured));
                }
                Next::Reread => {
                    *next = Next::Fallback;
                    let Some(file) = &environment.fallbacks.primary_file else {
                        continue;
                    };
                    let Some((read, digest)) = file.read(&environment.credential).await else {
                        continue;
                    };
                    // The file still holds what was refused: not worth a request.
                    let unchanged = environment.fallbacks.primary_digest == Some(digest)
                        || same_secret(&read, current);
                    if !unchanged {
                        return Some((read, Source::Configured));
                    }
                }
                Next::Fallback => {
                    *next = Next::Rotated;
                    let fallbacks = &environment.fallbacks;
                    let read = match &fallbacks.fallback_file {
                        Some(file) => file
                            .read(&environment.credential)
                            .await
                            .map(|(credential, _)| credential),
                        None => None,
                    };
                    if let Some(fallback) = read.or_else(|| fallbacks.fallback.clone()) {
                        return Some((fallback, Source::Fallback));
                    }
                }
                Next::Rotated => {
                    *next = Next::Done;
                    if let Some(newer) = self.newer_secret(environment, began_with).await {
                        let credential = ClientCredential::Secret(newer.secret.clone());
                        return Some((credential, Source::Rotated(newer)));
                    }
                }
                Next::Done => return None,
            }
        }
    }

    /// A secret rotated since the one of fingerprint `began_with` was in force (`None`: the
    /// configured one), waiting for a rotation under way here or on another replica to finish
    /// (within the environment's `timeout`); `None` when no rotation changed it.
    async fn newer_secret(
        &self,
        environment: &EnvironmentSettings,
        began_with: Option<&str>,
    ) -> Option<Arc<RotatedSecret>> {
        environment.rotation.as_ref()?;
        let key = SharedKey::for_secret(environment);
        let newer = |secret: &Option<Arc<RotatedSecret>>| {
            secret
                .as_ref()
                .filter(|secret| Some(secret.fingerprint().as_str()) != began_with)
                .cloned()
        };
        // Real time: a rotation's network exchange, whatever a test does to the clock.
        let deadline = tokio::time::Instant::now() + environment.timeout;
        self.await_rotation(&key, deadline).await;
        let Some(shared) = &self.inner.shared else {
            return newer(&self.rotated_secret(environment).await);
        };
        loop {
            let stored = match shared.load_secret(&key).await.ok()? {
                SharedSecret::Stored(stored) => Some(Arc::new(stored)),
                SharedSecret::Dropped { .. } | SharedSecret::Absent | SharedSecret::Unreadable => {
                    None
                }
            };
            if let Some(stored) = newer(&stored) {
                self.adopt_secret(environment, key, &stored);
                return Some(stored);
            }
            // Nobody holds the rotation lock: no rotation is under way.
            if let Some(held) = shared.try_lock(&key).await.ok()? {
                let _ = shared.unlock(&key, held).await;
                return None;
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(ROTATION_POLL_INTERVAL).await;
        }
    }
}

/// Whether two credentials are the same secret.
fn same_secret(one: &ClientCredential, other: &ClientCredential) -> bool {
    match (one, other) {
        (ClientCredential::Secret(one), ClientCredential::Secret(other)) => {
            one.expose_secret() == other.expose_secret()
        }
        _ => false,
    }
}
