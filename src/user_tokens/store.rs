//! User sessions behind their handles, in this replica's memory.
//!
//! A session holds one user's current access token and refresh token. It is found by the
//! SHA-256 of its handle, so the store never holds the handles themselves. Each session has its
//! own async mutex around its tokens: whoever finds the access token too old refreshes it while
//! the others wait and then take the new one (single flight per handle in this replica). Sessions
//! are bounded (`users.max_sessions`, least recently used first) and forgotten after
//! `users.idle_timeout` without a request.
//!
//! Without a shared level this is where sessions live. With one ([`super::shared`]) it holds the
//! sessions this replica has served, as they were last seen, so that they can still be served
//! and refreshed while the shared level is unreachable.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use moka::future::Cache;
use rand::RngCore as _;
use secrecy::SecretString;
use tokio::sync::Mutex;

use super::UserSettings;
use super::shared::SessionRecord;
use crate::clock::unix_millis;
use crate::idp::{AccessToken, IssuedToken};
use crate::token::{CachedToken, HandleId, SharedToken, TokenKey, refresh_backoff};

/// Failed refreshes in a row and the pause they set.
#[derive(Default)]
struct RefreshPause {
    failures: u32,
    until: Option<Instant>,
    /// Status and OAuth2 error code of the IdP's refusal, when it refused.
    rejected: Option<(u16, String)>,
}

/// Prefix of handles, so a leaked one is recognisable in a secret scanner.
const HANDLE_PREFIX: &str = "uth_";

/// A new random handle and its id.
pub fn new_handle() -> (String, HandleId) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let handle = format!("{HANDLE_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let id = HandleId::of(&handle);
    (handle, id)
}

/// A user's tokens: what the session's mutex guards.
pub struct Grant {
    /// The current access token.
    pub access: Arc<CachedToken>,
    /// The refresh token; `None` when the IdP gave none or refused it.
    pub refresh_token: Option<SecretString>,
    /// 1 at the code exchange, raised by each refresh (see [`super::shared`]).
    pub generation: u64,
}

impl Grant {
    /// The tokens of a code exchange or a refresh, received at `fetched_at`.
    pub fn issued(
        issued: IssuedToken,
        refresh_token: Option<SecretString>,
        generation: u64,
        fetched_at: SystemTime,
    ) -> Self {
        grant_of(
            SharedToken { issued, fetched_at },
            refresh_token,
            generation,
        )
    }
}

/// One user session, bound to the caller that created it.
pub struct Session {
    id: HandleId,
    owner: Arc<str>,
    key: TokenKey,
    grant: Mutex<Grant>,
    /// The generation of the tokens this replica received from the IdP (a code exchange or a
    /// refresh); 0 for tokens read from the shared level. Only those are worth writing back to
    /// a level that lost them: another replica may hold newer ones.
    produced: AtomicU64,
    /// The latest record whose write to the shared level failed, until a write lands. Kept
    /// outside the grant's mutex, so that the task retrying it never waits for a refresh.
    unwritten: std::sync::Mutex<Option<Arc<SessionRecord>>>,
    /// A task is retrying the write of this session to the shared level.
    writing: AtomicBool,
    /// Forgotten on request or refused by the IdP: no write may bring it back.
    forgotten: AtomicBool,
    /// When this replica last found the session for a request (Unix milliseconds by the
    /// broker's clock), for `users.idle_timeout`.
    last_used_ms: AtomicU64,
    /// Failed refreshes in a row, and when the next may be tried: a caller that keeps asking
    /// while the IdP fails does not make it one request per ask.
    refresh_pause: std::sync::Mutex<RefreshPause>,
}

impl Session {
    /// A session for `owner` with the tokens of a code exchange.
    pub fn new(id: HandleId, owner: Arc<str>, key: TokenKey, grant: Grant) -> Self {
        let produced = grant.generation;
        let created = unix_millis(grant.access.fetched_at);
        Self {
            id,
            owner,
            key,
            grant: Mutex::new(grant),
            produced: AtomicU64::new(produced),
            unwritten: std::sync::Mutex::new(None),
            writing: AtomicBool::new(false),
            forgotten: AtomicBool::new(false),
            last_used_ms: AtomicU64::new(created),
            refresh_pause: std::sync::Mutex::new(RefreshPause::default()),
        }
    }

    /// How long since this replica last found the session for a request, at `now`.
    pub fn idle_for(&self, now: SystemTime) -> Duration {
        let last = self.last_used_ms.load(Ordering::Relaxed);
        Duration::from_millis(unix_millis(now).saturating_sub(last))
    }

    /// Records a request for the session at `now`.
    pub fn touch(&self, now: SystemTime) {
        self.last_used_ms
            .fetch_max(unix_millis(now), Ordering::Relaxed);
    }

    /// A session read from the shared level at `now`, where it is stored at its generation.
    pub fn from_record(id: HandleId, record: SessionRecord, now: SystemTime) -> Self {
        let generation = record.generation;
        let session = Self::new(
            id,
            record.owner,
            record.key,
            grant_of(record.access, record.refresh_token, generation),
        );
        session.produced.store(0, Ordering::Relaxed);
        // Found for a request now: the shared level's idle time started again too.
        session
            .last_used_ms
            .store(unix_millis(now), Ordering::Relaxed);
        session
    }

    /// Records that this replica received generation `generation` from the IdP.
    pub fn mark_produced(&self, generation: u64) {
        self.produced.fetch_max(generation, Ordering::Relaxed);
    }

    /// Whether this replica received the tokens of `generation` from the IdP itself.
    pub fn produced(&self, generation: u64) -> bool {
        self.produced.load(Ordering::Relaxed) == generation
    }

    /// The record that stores `grant` (this session's tokens) in the shared level.
    pub fn record(&self, grant: &Grant) -> SessionRecord {
        let access = &grant.access;
        SessionRecord {
            owner: Arc::clone(&self.owner),
            key: self.key.clone(),
            access: SharedToken {
                issued: IssuedToken {
                    access_token: AccessToken::new(access.access_token().expose()),
                    token_type: access.token_type().to_owned(),
                    lifetime: access.lifetime(),
                    scope: access.scope().map(str::to_owned),
                },
                fetched_at: access.fetched_at,
            },
            refresh_token: grant.refresh_token.clone(),
            generation: grant.generation,
        }
    }

    /// Records that `generation` is in the shared level; a record still to be written that
    /// is no newer is then moot.
    pub fn mark_saved(&self, generation: u64) {
        let mut unwritten = self.unwritten_slot();
        if unwritten
            .as_ref()
            .is_some_and(|record| record.generation <= generation)
        {
            *unwritten = None;
        }
    }

    /// Takes the tokens of `record`, newer than `grant`'s, which another replica wrote: they
    /// are in the shared level, and the IdP answered that replica's refresh.
    pub fn adopt(&self, grant: &mut Grant, record: SessionRecord) {
        let generation = record.generation;
        *grant = grant_of(record.access, record.refresh_token, generation);
        self.mark_saved(generation);
        self.refresh_succeeded();
    }

    /// Keeps `record` to be written again, unless a newer one is kept already.
    pub fn keep_unwritten(&self, record: Arc<SessionRecord>) {
        let mut unwritten = self.unwritten_slot();
        if unwritten
            .as_ref()
            .is_none_or(|kept| kept.generation <= record.generation)
        {
            *unwritten = Some(record);
        }
    }

    /// The latest record still to be written.
    pub fn unwritten(&self) -> Option<Arc<SessionRecord>> {
        self.unwritten_slot().clone()
    }

    fn unwritten_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<SessionRecord>>> {
        self.unwritten
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims the one task that writes this session again; `false` when one runs already.
    pub fn claim_writing(&self) -> bool {
        !self.writing.swap(true, Ordering::AcqRel)
    }

    /// Ends the writing task's claim.
    pub fn release_writing(&self) {
        self.writing.store(false, Ordering::Release);
    }

    /// How long refreshes are paused after failures, if they are now, and the IdP's refusal
    /// when that was the failure (so callers meanwhile get the same answer).
    pub fn refresh_paused(&self, now: Instant) -> Option<(Duration, Option<(u16, String)>)> {
        let pause = self.pause_slot();
        let wait = pause.until?.checked_duration_since(now)?;
        (!wait.is_zero()).then(|| (wait, pause.rejected.clone()))
    }

    /// Records a failed refresh: the next waits as a failed background refresh does
    /// ([`refresh_backoff`]), or as long as the IdP asked (`at_least`, which the IdP client caps
    /// at an hour); returns the wait.
    pub fn refresh_failed(
        &self,
        now: Instant,
        at_least: Option<Duration>,
        rejected: Option<(u16, String)>,
    ) -> Duration {
        let mut pause = self.pause_slot();
        pause.failures = pause.failures.saturating_add(1);
        let wait =
            refresh_backoff(pause.failures.saturating_sub(1)).max(at_least.unwrap_or_default());
        pause.until = now.checked_add(wait);
        pause.rejected = rejected;
        wait
    }

    /// Records a refresh that worked, here or on another replica.
    pub fn refresh_succeeded(&self) {
        *self.pause_slot() = RefreshPause::default();
    }

    fn pause_slot(&self) -> std::sync::MutexGuard<'_, RefreshPause> {
        self.refresh_pause
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the session forgotten, so that no later write stores it again.
    pub fn mark_forgotten(&self) {
        self.forgotten.store(true, Ordering::Relaxed);
    }

    /// Whether the session was forgotten.
    pub fn is_forgotten(&self) -> bool {
        self.forgotten.load(Ordering::Relaxed)
    }

    /// The id of the session's handle.
    pub fn id(&self) -> HandleId {
        self.id
    }

    /// The caller that created the session.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Tenant, environment, audience and scopes of the user token.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// The tokens, locked: one holder at a time, so one refresh at a time.
    pub async fn grant(&self) -> tokio::sync::MutexGuard<'_, Grant> {
        self.grant.lock().await
    }

    /// The tokens, if nobody holds them now (a refresh under way).
    pub fn try_grant(&self) -> Option<tokio::sync::MutexGuard<'_, Grant>> {
        self.grant.try_lock().ok()
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("owner", &self.owner)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The tokens of a record read from the shared level.
pub fn grant_of(
    access: SharedToken,
    refresh_token: Option<SecretString>,
    generation: u64,
) -> Grant {
    Grant {
        access: Arc::new(CachedToken::new(
            access.issued,
            access.fetched_at,
            0.0,
            Duration::ZERO,
            0.0,
        )),
        refresh_token,
        generation,
    }
}

/// Sessions by handle id, in memory.
pub struct SessionStore {
    sessions: Cache<HandleId, Arc<Session>>,
    /// Sessions whose latest tokens are not in the shared level yet, kept even when `sessions`
    /// forgets them, so that this replica never goes back to an older refresh token.
    unwritten: std::sync::Mutex<HashMap<HandleId, Arc<Session>>>,
    /// `users.idle_timeout`.
    idle_timeout: Duration,
}

impl SessionStore {
    /// An empty store bounded by `users.max_sessions` and `users.idle_timeout` (by the
    /// broker's clock; moka also lets idle entries go on its own timer, to bound memory).
    pub fn new(settings: &UserSettings) -> Self {
        let sessions = Cache::builder()
            .max_capacity(settings.max_sessions)
            .time_to_idle(settings.idle_timeout)
            .build();
        Self {
            sessions,
            unwritten: std::sync::Mutex::new(HashMap::new()),
            idle_timeout: settings.idle_timeout,
        }
    }

    /// Keeps a new session.
    pub async fn insert(&self, session: Arc<Session>) {
        self.sessions.insert(session.id, session).await;
    }

    /// Keeps `session` unless one with its id is kept already, and returns the one kept.
    pub async fn insert_or_get(&self, session: Arc<Session>) -> Arc<Session> {
        if let Some(held) = self.held(&session.id) {
            return held;
        }
        self.sessions
            .entry(session.id)
            .or_insert(session)
            .await
            .into_value()
    }

    /// The session of a handle id at `now`, if kept and not idle for `users.idle_timeout`; its
    /// idle time starts again. One whose latest tokens are still to be written comes first: it
    /// is newer than any other copy, and is kept until written whatever its idle time.
    pub async fn get(&self, id: &HandleId, now: SystemTime) -> Option<Arc<Session>> {
        let session = match self.held(id) {
            Some(held) => held,
            None => {
                let session = self.sessions.get(id).await?;
                if session.idle_for(now) >= self.idle_timeout {
                    self.sessions.invalidate(id).await;
                    return None;
                }
                session
            }
        };
        session.touch(now);
        Some(session)
    }

    fn held(&self, id: &HandleId) -> Option<Arc<Session>> {
        self.unwritten_map().get(id).cloned()
    }

    /// Marks `session` forgotten and forgets it here.
    pub async fn forget(&self, session: &Session) {
        session.mark_forgotten();
        self.remove(&session.id).await;
    }

    /// Forgets a session (its refresh token with it).
    pub async fn remove(&self, id: &HandleId) {
        self.sessions.invalidate(id).await;
        self.unwritten_map().remove(id);
    }

    /// Keeps `session` until [`SessionStore::written`], whatever the bounds of the store, and
    /// makes it the one found for its handle.
    pub async fn hold_unwritten(&self, session: &Arc<Session>) {
        self.unwritten_map().insert(session.id, Arc::clone(session));
        self.sessions.insert(session.id, Arc::clone(session)).await;
    }

    /// `session`'s latest tokens are in the shared level (or given up on, with `give_up`): it
    /// no longer needs holding, unless newer ones are still to be written.
    pub fn written(&self, session: &Arc<Session>, give_up: bool) {
        let mut held = self.unwritten_map();
        if held
            .get(&session.id)
            .is_some_and(|kept| Arc::ptr_eq(kept, session))
            && (give_up || session.unwritten().is_none())
        {
            held.remove(&session.id);
        }
    }

    /// Sessions kept (moka's count, which settles shortly after changes), and those held for
    /// tokens still to be written.
    pub fn counts(&self) -> (u64, usize) {
        (self.sessions.entry_count(), self.unwritten_map().len())
    }

    /// Every session kept, for writing them back to a shared level that lost them.
    pub fn all(&self) -> Vec<Arc<Session>> {
        let held: Vec<Arc<Session>> = self.unwritten_map().values().cloned().collect();
        let mut all: Vec<Arc<Session>> = self
            .sessions
            .iter()
            .map(|(_, session)| session)
            .filter(|session| !held.iter().any(|h| Arc::ptr_eq(h, session)))
            .collect();
        all.extend(held);
        all
    }

    fn unwritten_map(&self) -> std::sync::MutexGuard<'_, HashMap<HandleId, Arc<Session>>> {
        self.unwritten
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
