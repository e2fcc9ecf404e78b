//! Sessions kept in step with the shared level: look-ups, writes and their retries, deletions,
//! and the refresh that is single flight across replicas.
//!
//! The shared level is the truth while it answers: each request reads the session there (which
//! also starts its idle timeout again) and this replica's copy follows it. A refresh takes the
//! session's lock in the shared level, reads the session again (another replica may have just
//! refreshed it), asks the IdP only when the token is still too old, and writes the rotated
//! refresh token before the new access token is handed out. A replica that finds the lock taken
//! waits for the holder's write (at most `shared_cache.wait_for_peer`) instead of presenting the
//! same refresh token a second time, which the IdP would take for reuse.
//!
//! While the level does not answer, a session this replica holds is served and refreshed from
//! memory, and its writes are retried in the background until they land; a session it does not
//! hold is a 503, never a 404, since the caller would log its user out.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::shared::{SessionLookup, SessionWrite, SharedSessions};
use super::store::{Grant, HandleId, Session, grant_of};
use super::{SHARED_RETRY_AFTER, UserError, UserTokens, servable};
use crate::broker::{CacheStatus, Lease, LockToken};
use crate::idp::EnvironmentSettings;

/// How often a replica waiting for another one's refresh looks again.
const PEER_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// First and longest wait between two attempts to write a session that could not be written.
const SAVE_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

impl UserTokens {
    fn shared(&self) -> Option<&Arc<dyn SharedSessions>> {
        self.inner.shared.as_ref()
    }

    /// The session of `id` as the shared level has it, reconciled with this replica's copy
    /// `local`; `None` when there is none (or it is not `owner`'s).
    pub(super) async fn look_up(
        &self,
        shared: &dyn SharedSessions,
        id: HandleId,
        owner: &str,
        local: Option<Arc<Session>>,
    ) -> Result<Option<Arc<Session>>, UserError> {
        match shared.load_session(&id, self.inner.idle_timeout).await {
            Ok(SessionLookup::Found(record)) => {
                if *record.owner != *owner {
                    return Ok(None);
                }
                let Some(session) = local else {
                    let session = Arc::new(Session::from_record(id, *record));
                    self.inner.sessions.insert(Arc::clone(&session)).await;
                    return Ok(Some(session));
                };
                let mut grant = session.grant().await;
                if record.generation > grant.generation {
                    let generation = record.generation;
                    *grant = grant_of(record.access, record.refresh_token, generation);
                    session.mark_saved(generation);
                    drop(grant);
                } else if record.generation < grant.generation {
                    // This replica refreshed while its write failed: write it again.
                    drop(grant);
                    self.retry_save(Arc::clone(&session), None);
                } else {
                    session.mark_saved(record.generation);
                    drop(grant);
                }
                Ok(Some(session))
            }
            Ok(SessionLookup::Deleted) => {
                if let Some(session) = local {
                    session.mark_forgotten();
                    self.inner.sessions.remove(&session.id()).await;
                }
                Ok(None)
            }
            Ok(SessionLookup::Absent) => {
                // Held here but not there: its first write failed, or Redis lost it (a restart
                // without persistence, an eviction). Write it back rather than log the user out.
                if let Some(session) = &local
                    && session.owner() == owner
                    && !session.is_forgotten()
                {
                    tracing::info!(
                        caller = %session.owner(),
                        tenant = %session.key().tenant,
                        environment = %session.key().environment,
                        "a user session this replica holds is missing from the shared cache; writing it back"
                    );
                    let grant = session.grant().await;
                    session.mark_unsaved();
                    self.save(session, &grant, None).await;
                }
                Ok(local)
            }
            Err(error) => match local {
                Some(session) => {
                    tracing::debug!(%error, "shared cache unreachable; serving a user session from memory");
                    Ok(Some(session))
                }
                None => {
                    tracing::warn!(%error, "a user session could not be looked up in the shared cache");
                    Err(UserError::SharedUnavailable {
                        retry_after: SHARED_RETRY_AFTER,
                    })
                }
            },
        }
    }

    /// A fresh access token for `session`, refreshed if nobody did meanwhile. Runs in a task
    /// of its own (see [`UserTokens::token`]).
    pub(super) async fn renew(
        &self,
        session: &Arc<Session>,
        environment: &EnvironmentSettings,
        required: Duration,
        started: SystemTime,
    ) -> Result<Lease, UserError> {
        let mut grant = session.grant().await;
        if session.is_forgotten() {
            return Err(UserError::UnknownHandle);
        }
        if let Some(lease) = servable(&grant, required, started, CacheStatus::Hit) {
            return Ok(lease);
        }
        let Some(shared) = self.shared().cloned() else {
            return self
                .refresh_with_idp(session, &mut grant, environment, required)
                .await;
        };
        let id = session.id();
        let deadline = Instant::now() + shared.wait_for_peer();
        loop {
            let lock = match shared.lock_session(&id).await {
                Ok(lock) => lock,
                Err(error) => {
                    tracing::debug!(%error, "shared cache unreachable; refreshing a user token from memory");
                    return self
                        .refresh_and_save(session, &mut grant, environment, required, None)
                        .await;
                }
            };
            match shared.load_session(&id, self.inner.idle_timeout).await {
                Ok(SessionLookup::Found(record)) if record.generation > grant.generation => {
                    let generation = record.generation;
                    *grant = grant_of(record.access, record.refresh_token, generation);
                    session.mark_saved(generation);
                }
                Ok(SessionLookup::Deleted) => {
                    self.release(&shared, &id, lock).await;
                    session.mark_forgotten();
                    self.inner.sessions.remove(&id).await;
                    return Err(UserError::UnknownHandle);
                }
                Ok(_) => {}
                Err(error) if lock.is_none() => {
                    tracing::debug!(%error, "shared cache unreachable; refreshing a user token from memory");
                    return self
                        .refresh_and_save(session, &mut grant, environment, required, None)
                        .await;
                }
                Err(_) => {}
            }
            // Another replica's refresh counts as a hit: this one did not ask the IdP.
            if let Some(lease) = servable(&grant, required, started, CacheStatus::Hit) {
                self.release(&shared, &id, lock).await;
                return Ok(lease);
            }
            if let Some(lock) = lock {
                return self
                    .refresh_and_save(session, &mut grant, environment, required, Some(lock))
                    .await;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    tenant = %session.key().tenant,
                    environment = %session.key().environment,
                    "another replica's refresh of a user token outlasted shared_cache.wait_for_peer"
                );
                return Err(UserError::PeerRefreshing {
                    retry_after: SHARED_RETRY_AFTER,
                });
            }
            tokio::time::sleep(PEER_POLL_INTERVAL).await;
        }
    }

    /// Refreshes with the IdP, then writes the new tokens to the shared level before they are
    /// handed out, releasing `lock` once they are written.
    async fn refresh_and_save(
        &self,
        session: &Arc<Session>,
        grant: &mut Grant,
        environment: &EnvironmentSettings,
        required: Duration,
        lock: Option<LockToken>,
    ) -> Result<Lease, UserError> {
        let before = grant.generation;
        let result = self
            .refresh_with_idp(session, grant, environment, required)
            .await;
        if grant.generation > before && !session.is_forgotten() {
            if !self.save(session, grant, lock).await {
                return Err(UserError::UnknownHandle);
            }
        } else if let Some(shared) = self.shared().cloned() {
            self.release(&shared, &session.id(), lock).await;
        }
        result
    }

    /// Writes `grant` (which `session` holds) to the shared level and then releases `lock`;
    /// on failure keeps it in memory and retries in the background, releasing `lock` after the
    /// write. `false` when the session was deleted there meanwhile (it is forgotten here too).
    pub(super) async fn save(
        &self,
        session: &Arc<Session>,
        grant: &Grant,
        lock: Option<LockToken>,
    ) -> bool {
        let Some(shared) = self.shared().cloned() else {
            return true;
        };
        let id = session.id();
        let record = session.record(grant);
        match shared
            .store_session(&id, &record, self.inner.idle_timeout)
            .await
        {
            Ok(SessionWrite::Stored | SessionWrite::Superseded) => {
                session.mark_saved(grant.generation);
                self.release(&shared, &id, lock).await;
                true
            }
            Ok(SessionWrite::Deleted) => {
                self.release(&shared, &id, lock).await;
                session.mark_forgotten();
                self.inner.sessions.remove(&id).await;
                false
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    tenant = %session.key().tenant,
                    environment = %session.key().environment,
                    "a user session could not be written to the shared cache; this replica keeps it and retries"
                );
                self.retry_save(Arc::clone(session), lock);
                true
            }
        }
    }

    /// Retries writing `session` until the write lands, a newer write or a deletion makes it
    /// moot, or the session would have gone idle; then releases `lock`. One task per session.
    pub(super) fn retry_save(&self, session: Arc<Session>, lock: Option<LockToken>) {
        let Some(shared) = self.shared().cloned() else {
            return;
        };
        if !session.claim_saving() {
            // The running task writes the latest tokens; this lock simply expires.
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let give_up = Instant::now() + this.inner.idle_timeout;
            let mut wait = SAVE_BACKOFF.0;
            while Instant::now() < give_up && !session.is_forgotten() {
                tokio::time::sleep(wait).await;
                let record = {
                    let grant = session.grant().await;
                    if !session.unsaved(grant.generation) {
                        break;
                    }
                    session.record(&grant)
                };
                let id = session.id();
                match shared
                    .store_session(&id, &record, this.inner.idle_timeout)
                    .await
                {
                    Ok(SessionWrite::Stored | SessionWrite::Superseded) => {
                        session.mark_saved(record.generation);
                        tracing::info!(
                            tenant = %session.key().tenant,
                            environment = %session.key().environment,
                            "a user session kept in memory is written to the shared cache again"
                        );
                        break;
                    }
                    Ok(SessionWrite::Deleted) => {
                        session.mark_forgotten();
                        this.inner.sessions.remove(&id).await;
                        break;
                    }
                    Err(_) => wait = (wait * 2).min(SAVE_BACKOFF.1),
                }
            }
            session.release_saving();
            this.release(&shared, &session.id(), lock).await;
        });
    }

    /// Releases `lock` when there is one; a failure only means it expires by itself.
    async fn release(
        &self,
        shared: &Arc<dyn SharedSessions>,
        id: &HandleId,
        lock: Option<LockToken>,
    ) {
        if let Some(lock) = lock
            && let Err(error) = shared.unlock_session(id, lock).await
        {
            tracing::debug!(%error, "a user session's refresh lock is left to expire");
        }
    }

    /// Forgets `session` here and deletes it from the shared level, so no replica serves it.
    pub(super) async fn forget_session(&self, session: &Session) -> Result<(), UserError> {
        session.mark_forgotten();
        self.inner.sessions.remove(&session.id()).await;
        let Some(shared) = self.shared() else {
            return Ok(());
        };
        shared
            .delete_session(&session.id(), self.inner.idle_timeout)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "a user session could not be deleted from the shared cache");
                UserError::SharedUnavailable {
                    retry_after: SHARED_RETRY_AFTER,
                }
            })
    }
}
