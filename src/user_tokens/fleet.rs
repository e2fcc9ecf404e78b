//! Sessions kept in step with the shared level: look-ups, writes and their retries, deletions,
//! and the refresh that is single flight across replicas.
//!
//! The shared level is the truth while it answers: each request reads the session there (which
//! also starts its idle timeout again) and this replica's copy follows it. A refresh takes the
//! session's lock in the shared level, reads the session again (another replica may have just
//! refreshed it), asks the IdP only when the token is still too old, and writes the rotated
//! refresh token before the new access token is handed out. A replica that finds the lock taken
//! waits for the holder's write (at most `shared_cache.wait_for_peer`) and never refreshes on
//! its own after that, since it would present the refresh token the holder is rotating, which
//! the IdP takes for reuse.
//!
//! While the level does not answer, a session this replica holds is served and refreshed from
//! memory; the tokens a write could not store are kept (beyond the store's bounds) and written
//! again by a task of the session's own, and every session held is written back as soon as the
//! level answers again, so that the others read the rotated refresh token, and a level that lost
//! its data (a restart without persistence) gets it back. A session this replica does not hold
//! is a 503 meanwhile, never a 404, since the caller would log its user out.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use super::refresh::servable;
use super::shared::{SessionLookup, SessionRecord, SessionWrite, SharedSessions};
use super::store::{Grant, Session};
use super::{Asking, Inner, SHARED_RETRY_AFTER, UserError, UserTokens};
use crate::idp::EnvironmentSettings;
use crate::limits::IdpBudget;
use crate::token::{HandleId, Lease, LockToken, SharedCacheError};

/// How often a replica waiting for another one's refresh looks again.
const PEER_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// First and longest wait between two attempts to write a session that could not be written.
/// Short: the other replicas read the older refresh token until the write lands.
const WRITE_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(2));

fn unavailable() -> UserError {
    UserError::SharedUnavailable {
        retry_after: SHARED_RETRY_AFTER,
    }
}

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
                    let session = Arc::new(Session::from_record(id, *record, self.clock().now()));
                    return Ok(Some(self.inner.sessions.insert_or_get(session).await));
                };
                let mut grant = session.grant().await;
                if record.generation > grant.generation {
                    session.adopt(&mut grant, *record);
                } else if record.generation < grant.generation {
                    // This replica refreshed while its write failed: write it now, before any
                    // other replica refreshes with the older refresh token.
                    self.write_back(&session, &grant);
                } else {
                    session.mark_saved(record.generation);
                }
                drop(grant);
                Ok(Some(session))
            }
            Ok(SessionLookup::Deleted) => {
                if let Some(session) = local {
                    self.inner.sessions.forget(&session).await;
                }
                Ok(None)
            }
            Ok(SessionLookup::Absent) => {
                // Held here but not there: its first write failed, or Redis lost it (a restart
                // without persistence, an eviction). Write it back rather than log the user out.
                if let Some(session) = &local
                    && session.owner() == owner
                    && !session.is_forgotten()
                    && self.write_back(session, &*session.grant().await)
                {
                    tracing::info!(
                        caller = %session.owner(),
                        tenant = %session.key().tenant,
                        environment = %session.key().environment,
                        "a user session this replica holds is missing from the shared cache; writing it back"
                    );
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
                    Err(unavailable())
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
        budget: &IdpBudget,
    ) -> Result<Lease, UserError> {
        let mut grant = session.grant().await;
        if session.is_forgotten() {
            return Err(UserError::UnknownHandle);
        }
        if let Some(lease) = servable(&grant, required, started, self.clock().now()) {
            return Ok(lease);
        }
        let Some(shared) = self.shared().cloned() else {
            return self
                .refresh_with_idp(
                    session,
                    &mut grant,
                    environment,
                    required,
                    Asking {
                        budget,
                        permit: None,
                        prepaid: false,
                    },
                )
                .await;
        };
        let id = session.id();
        // How long to wait for another replica's refresh counts from when it is first seen, not
        // from this request's wait for a permit of the IdP client.
        let mut deadline = None;
        // Once another replica is seen refreshing, this one never refreshes without the lock.
        let mut peer_refreshing = false;
        loop {
            // The IdP client's permit first, the lock second: a wait for a permit (machine-token
            // misses may hold them all) must not eat into the lock's time to live, or another
            // replica could take the lapsed lock and send the same refresh token.
            // Once a peer is seen refreshing, the wait for its refresh bounds this one too.
            let permit = match deadline {
                None => self.inner.broker.idp_permit(environment).await,
                Some(deadline) => {
                    let permit = self.inner.broker.idp_permit(environment);
                    match tokio::time::timeout_at(deadline, permit).await {
                        Ok(permit) => permit,
                        Err(_) => {
                            return Err(UserError::PeerRefreshing {
                                retry_after: SHARED_RETRY_AFTER,
                            });
                        }
                    }
                }
            };
            let lock = match shared.lock_session(&id).await {
                Ok(lock) => lock,
                Err(error) if !peer_refreshing => {
                    tracing::debug!(%error, "shared cache unreachable; refreshing a user token from memory");
                    return self
                        .refresh_and_save(
                            session,
                            &mut grant,
                            environment,
                            required,
                            None,
                            Asking {
                                budget,
                                permit: Some(permit),
                                prepaid: false,
                            },
                        )
                        .await;
                }
                Err(_) => None,
            };
            peer_refreshing |= lock.is_none();
            match shared.load_session(&id, self.inner.idle_timeout).await {
                Ok(SessionLookup::Found(record)) if record.generation > grant.generation => {
                    session.adopt(&mut grant, *record);
                }
                Ok(SessionLookup::Deleted) => {
                    self.release(&shared, &id, lock).await;
                    self.inner.sessions.forget(session).await;
                    return Err(UserError::UnknownHandle);
                }
                Ok(_) => {}
                Err(error) => {
                    // A refresh could not tell whether another replica rotated the refresh
                    // token meanwhile: not worth the grant.
                    tracing::debug!(%error, "a user session could not be read again before its refresh");
                    if lock.is_some() {
                        self.release(&shared, &id, lock).await;
                        return Err(unavailable());
                    }
                }
            }
            // Another replica's refresh counts as a hit: this one did not ask the IdP.
            if let Some(lease) = servable(&grant, required, started, self.clock().now()) {
                self.release(&shared, &id, lock).await;
                return Ok(lease);
            }
            if let Some(lock) = lock {
                return self
                    .refresh_and_save(
                        session,
                        &mut grant,
                        environment,
                        required,
                        Some(lock),
                        Asking {
                            budget,
                            permit: Some(permit),
                            prepaid: false,
                        },
                    )
                    .await;
            }
            let now = tokio::time::Instant::now();
            if now >= *deadline.get_or_insert_with(|| now + shared.wait_for_peer()) {
                tracing::warn!(
                    tenant = %session.key().tenant,
                    environment = %session.key().environment,
                    "another replica's refresh of a user token outlasted shared_cache.wait_for_peer"
                );
                return Err(UserError::PeerRefreshing {
                    retry_after: SHARED_RETRY_AFTER,
                });
            }
            drop(permit);
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
        asking: Asking<'_>,
    ) -> Result<Lease, UserError> {
        let before = grant.generation;
        let result = self
            .refresh_with_idp(session, grant, environment, required, asking)
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
    /// on failure keeps the tokens to write them again in the background (releasing `lock` only
    /// once they are written: until then it expires by itself). `false` when the session was
    /// deleted there meanwhile (it is forgotten here too).
    pub(super) async fn save(
        &self,
        session: &Arc<Session>,
        grant: &Grant,
        lock: Option<LockToken>,
    ) -> bool {
        let Some(shared) = self.shared().cloned() else {
            return true;
        };
        let record = Arc::new(session.record(grant));
        match self.write_record(&shared, session, &record).await {
            Ok(exists) => {
                self.release(&shared, &session.id(), lock).await;
                exists
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    tenant = %session.key().tenant,
                    environment = %session.key().environment,
                    "a user session could not be written to the shared cache; this replica keeps it and writes it again"
                );
                session.keep_unwritten(record);
                self.inner.sessions.hold_unwritten(session).await;
                self.write_later(Arc::clone(session), lock, WRITE_BACKOFF.0);
                true
            }
        }
    }

    /// Writes the session's unwritten tokens until they land, a newer write or a deletion makes
    /// them moot, or the session would have gone idle; then releases `lock`. One task per
    /// session; it never waits for the session's grant, so a refresh never waits for it.
    fn write_later(&self, session: Arc<Session>, lock: Option<LockToken>, first_wait: Duration) {
        let Some(shared) = self.shared().cloned() else {
            return;
        };
        if !session.claim_writing() {
            // The running task writes the latest tokens; this lock expires by itself.
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut give_up = this.clock().instant() + this.inner.idle_timeout;
            let mut wait = first_wait;
            let gave_up = loop {
                tokio::time::sleep(wait).await;
                if this.write_unwritten(&shared, &session).await.is_err() {
                    if this.clock().instant() < give_up && !session.is_forgotten() {
                        wait = (wait * 2).clamp(WRITE_BACKOFF.0, WRITE_BACKOFF.1);
                        continue;
                    }
                    tracing::warn!(
                        tenant = %session.key().tenant,
                        environment = %session.key().environment,
                        "gave up writing a user session to the shared cache after users.idle_timeout"
                    );
                    session.release_writing();
                    break true;
                }
                session.release_writing();
                // Tokens kept after the last look, before the claim was released, are this
                // task's still: nobody else would write them.
                if session.unwritten().is_none()
                    || session.is_forgotten()
                    || !session.claim_writing()
                {
                    break false;
                }
                wait = WRITE_BACKOFF.0;
                give_up = this.clock().instant() + this.inner.idle_timeout;
            };
            this.inner.sessions.written(&session, gave_up);
            this.release(&shared, &session.id(), lock).await;
        });
    }

    /// Writes `session` back in a task of its own (nothing a caller's going away could cancel),
    /// when this replica received its current tokens from the IdP (or could not write them): a
    /// copy read from the shared level may be older than one another replica holds. `false`
    /// when it is not written.
    fn write_back(&self, session: &Arc<Session>, grant: &Grant) -> bool {
        if !session.produced(grant.generation) && session.unwritten().is_none() {
            return false;
        }
        session.keep_unwritten(Arc::new(session.record(grant)));
        self.write_later(Arc::clone(session), None, Duration::ZERO);
        true
    }

    /// Writes the latest unwritten tokens of `session`, and any newer that arrive meanwhile;
    /// `Err` while the level does not take them.
    async fn write_unwritten(
        &self,
        shared: &Arc<dyn SharedSessions>,
        session: &Arc<Session>,
    ) -> Result<(), ()> {
        while let Some(record) = session.unwritten() {
            if session.is_forgotten() {
                return Ok(());
            }
            self.write_record(shared, session, &record)
                .await
                .map_err(drop)?;
        }
        Ok(())
    }

    /// Stores `record` of `session`; `Ok(false)` when the session was deleted there meanwhile
    /// (it is forgotten here too).
    async fn write_record(
        &self,
        shared: &Arc<dyn SharedSessions>,
        session: &Session,
        record: &SessionRecord,
    ) -> Result<bool, SharedCacheError> {
        let written = shared
            .store_session(&session.id(), record, self.inner.idle_timeout)
            .await?;
        if written == SessionWrite::Deleted {
            self.inner.sessions.forget(session).await;
            return Ok(false);
        }
        session.mark_saved(record.generation);
        Ok(true)
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

    /// Deletes `session` from the shared level (a tombstone, so no replica serves it and no
    /// late write brings it back), then forgets it here. When the level cannot be reached it is
    /// kept here and the caller gets a 503 to retry.
    pub(super) async fn forget_session(&self, session: &Session) -> Result<(), UserError> {
        if let Some(shared) = self.shared() {
            let id = session.id();
            shared
                .delete_session(&id, self.inner.idle_timeout)
                .await
                .map_err(|error| {
                    tracing::warn!(%error, "a user session could not be deleted from the shared cache");
                    unavailable()
                })?;
        }
        self.inner.sessions.forget(session).await;
        Ok(())
    }
}

/// Writes back every session this replica holds each time the shared level answers again, until
/// the service is dropped: the level may have lost them, or missed this replica's refreshes.
pub(super) async fn write_back_on_recovery(inner: Weak<Inner>) {
    let Some(mut recoveries) = inner
        .upgrade()
        .and_then(|inner| inner.shared.as_ref().map(|shared| shared.recoveries()))
    else {
        return;
    };
    while recoveries.changed().await.is_ok() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let this = UserTokens { inner };
        let Some(shared) = this.shared().cloned() else {
            return;
        };
        let (mut written, mut unreachable) = (0u64, false);
        for session in this.inner.sessions.all() {
            if session.is_forgotten() {
                continue;
            }
            // The latest tokens: those a failed write kept, else the grant's when this replica
            // received them from the IdP (unless a refresh holds it: that refresh writes its
            // own). Copies read from the level may be older than another replica's.
            let record = match session.unwritten() {
                Some(record) => record,
                None => match session.try_grant() {
                    Some(grant) if session.produced(grant.generation) => {
                        Arc::new(session.record(&grant))
                    }
                    _ => continue,
                },
            };
            match this.write_record(&shared, &session, &record).await {
                Ok(_) => written = written.saturating_add(1),
                // This one session is in the way of nothing else: it stays held and is tried
                // again by its own writer; the others are still written back.
                Err(SharedCacheError::Blocked) => {
                    session.keep_unwritten(record);
                    this.inner.sessions.hold_unwritten(&session).await;
                    this.write_later(Arc::clone(&session), None, WRITE_BACKOFF.1);
                }
                Err(_) => {
                    unreachable = true;
                    break;
                }
            }
        }
        tracing::info!(
            sessions = written,
            complete = !unreachable,
            "user sessions held in memory written back to the shared cache"
        );
    }
}
