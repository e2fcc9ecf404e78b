//! Fetches that belong to the broker: one flight per key, whoever waits on it.
//!
//! A fetch others wait on must not die with the request that started it: when a caller gives
//! up (it disconnects, or its request times out), the IdP request it started goes on, its token
//! is cached, and everyone else still waiting receives it. So a flight runs in a task of its own
//! and publishes its outcome on a `watch` channel; requests only subscribe. A cold miss, a
//! caller who needs more validity, a refetch a `DELETE` asked for and a background refresh of one
//! key are all the same flight, so the IdP sees one request per key at a time.
//!
//! Starting a flight is what costs: the caller whose request starts it spends one IdP request of
//! its budget (refunded when no IdP request was needed after all) and, for a key not cached, one
//! of its `max_keys` slots. Joining a flight costs nothing; refreshes cost nobody. A panic in the
//! fetch is caught at the task boundary and becomes an error for the waiters, never a flight
//! left registered forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use moka::ops::compute::{CompResult, Op};
use rand::Rng as _;
use tokio::sync::watch;

use super::failure::Remembered;
use super::replicas::Wanted;
use super::{Broker, BrokerError, CachedToken, KeyHasher, TokenKey, lock};
use crate::idp::EnvironmentSettings;
use crate::limits::{IdpBudget, KeySlot};

/// What a flight hands its waiters.
pub(super) type Outcome = Result<Arc<CachedToken>, Arc<BrokerError>>;

/// The flights under way, by key.
#[derive(Default)]
pub(super) struct Flights(Mutex<HashMap<TokenKey, watch::Receiver<Option<Outcome>>, KeyHasher>>);

impl Flights {
    /// Unregisters the flight of `key` if it is still `own` (a reload may have put another in
    /// its place).
    fn remove(&self, key: &TokenKey, own: &watch::Receiver<Option<Outcome>>) {
        let mut flights = lock(&self.0);
        if flights
            .get(key)
            .is_some_and(|flight| flight.same_channel(own))
        {
            flights.remove(key);
        }
    }

    /// Unregisters the flights of keys that `changed` selects: they run on (their tokens will not
    /// be installed), but new requests start new flights under the new settings.
    pub(super) fn detach(&self, changed: impl Fn(&TokenKey) -> bool) {
        lock(&self.0).retain(|key, _| !changed(key));
    }
}

/// The caller whose request asks for a flight, and so who pays if it starts one.
pub(super) struct Starter<'a> {
    /// The caller's budget.
    pub(super) budget: &'a Arc<IdpBudget>,
    /// No token of the key is cached: a start takes one of the caller's `max_keys` slots.
    pub(super) new_key: bool,
}

/// What a started flight charged, settled when it lands.
struct Charge {
    budget: Arc<IdpBudget>,
    /// The key slot a start for a key not cached took: the new token holds it, else dropping it
    /// gives it back.
    key_slot: Option<KeySlot>,
}

impl Charge {
    /// Keeps the IdP request when one was sent, else gives it back.
    fn settle(self, asked_idp: bool) {
        if asked_idp {
            self.budget.record_idp_request();
        } else {
            self.budget.refund();
        }
    }
}

/// What the fetch task found.
enum Found {
    /// A token already in this replica's cache serves the flight (another flight landed in
    /// between); nothing to install.
    Cached(Arc<CachedToken>),
    /// A new token, from the shared level or the IdP.
    New(Arc<CachedToken>),
}

impl Broker {
    /// Joins the flight of `key`, or starts one on behalf of `starter`, and waits for its outcome.
    pub(super) async fn fly(
        &self,
        environment: &Arc<EnvironmentSettings>,
        key: &TokenKey,
        wanted: Wanted,
        starter: Starter<'_>,
    ) -> Outcome {
        let mut flight = self.join_or_start(environment, key, wanted, starter)?;
        loop {
            if let Some(outcome) = flight.borrow_and_update().as_ref() {
                return outcome.clone();
            }
            if flight.changed().await.is_err() {
                // The sender is gone without an outcome: only when the runtime shuts down.
                return flight
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| Err(Arc::new(BrokerError::Internal)));
            }
        }
    }

    /// Starts a background refresh of `key` unless a flight of it is already under way.
    pub(super) fn start_refresh(
        &self,
        environment: &Arc<EnvironmentSettings>,
        key: &TokenKey,
        current: &CachedToken,
    ) {
        let mut flights = lock(&self.inner.flights.0);
        if flights.contains_key(key) {
            // That flight lands a token, or fails and backs this one off; either way a later
            // request may claim the refresh again.
            current.release_refresh();
            return;
        }
        self.inner
            .metrics
            .cache_refresh(&environment.tenant, &environment.environment);
        let (done, receiver) = watch::channel(None);
        flights.insert(key.clone(), receiver);
        drop(flights);
        let wanted = Wanted::FetchedAfter(current.fetched_at);
        self.spawn_flight(Arc::clone(environment), key.clone(), wanted, None, done);
    }

    /// The receiver of `key`'s flight: an existing one (free), or a new one, charged to the
    /// starter; refused when the starter's budget or `max_keys` is spent.
    fn join_or_start(
        &self,
        environment: &Arc<EnvironmentSettings>,
        key: &TokenKey,
        wanted: Wanted,
        starter: Starter<'_>,
    ) -> Result<watch::Receiver<Option<Outcome>>, Arc<BrokerError>> {
        let mut flights = lock(&self.inner.flights.0);
        if let Some(flight) = flights.get(key) {
            return Ok(flight.clone());
        }
        let Starter { budget, new_key } = starter;
        let key_slot = if new_key { budget.key_slot() } else { None };
        if new_key && key_slot.is_none() {
            budget.record_refused_keys();
            tracing::warn!(
                caller = budget.caller(),
                tenant = %key.tenant,
                environment = %key.environment,
                max_keys = budget.max_keys(),
                "caller has max_keys keys cached; not creating another"
            );
            return Err(Arc::new(BrokerError::TooManyKeys {
                max_keys: budget.max_keys(),
            }));
        }
        if let Err(retry_after) = budget.spend(self.inner.clock.instant()) {
            drop(key_slot);
            budget.record_refused_budget();
            tracing::warn!(
                caller = budget.caller(),
                tenant = %key.tenant,
                environment = %key.environment,
                "caller over its idp_requests_per_minute; not asking the IdP for it"
            );
            return Err(Arc::new(BrokerError::CallerOverBudget { retry_after }));
        }
        let charge = Some(Charge {
            budget: Arc::clone(budget),
            key_slot,
        });
        let (done, receiver) = watch::channel(None);
        flights.insert(key.clone(), receiver.clone());
        drop(flights);
        self.spawn_flight(Arc::clone(environment), key.clone(), wanted, charge, done);
        Ok(receiver)
    }

    /// Runs one flight in a task of its own: fetch, install, settle, publish.
    fn spawn_flight(
        &self,
        environment: Arc<EnvironmentSettings>,
        key: TokenKey,
        wanted: Wanted,
        charge: Option<Charge>,
        done: watch::Sender<Option<Outcome>>,
    ) {
        let broker = self.clone();
        // The settings this flight fetches with, not the broker's latest: a request that read
        // them before a reload must not install what they fetch after it.
        let generation = environment.generation;
        let own = done.subscribe();
        tokio::spawn(async move {
            // The work in a task of its own, so that a panic anywhere in it is a `JoinError`
            // here: the flight is unregistered and its waiters answered whatever happens.
            let landed = tokio::spawn({
                let (broker, key) = (broker.clone(), key.clone());
                async move {
                    broker
                        .land(&environment, &key, wanted, charge, generation)
                        .await
                }
            })
            .await;
            let outcome = landed.unwrap_or_else(|error| {
                tracing::error!(
                    tenant = %key.tenant,
                    environment = %key.environment,
                    %error,
                    "a token fetch failed unexpectedly"
                );
                Err(Arc::new(BrokerError::Internal))
            });
            broker.inner.flights.remove(&key, &own);
            let _ = done.send(Some(outcome));
        });
    }

    /// One flight's work: find a token, install it, settle the charge, and record a failure.
    async fn land(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
        wanted: Wanted,
        mut charge: Option<Charge>,
        generation: u64,
    ) -> Outcome {
        let asked = AtomicBool::new(false);
        let key_slot = charge.as_mut().and_then(|charge| charge.key_slot.take());
        let outcome = match self.find(environment, key, wanted, &asked).await {
            Ok(Found::Cached(token)) => Ok(token),
            Ok(Found::New(token)) => self.install(key, token, generation, key_slot).await,
            Err(error) => Err(Arc::new(error)),
        };
        match charge {
            Some(charge) => charge.settle(asked.load(Ordering::Relaxed)),
            // Only background refreshes start a flight on nobody's behalf.
            None if outcome.is_err() => self
                .inner
                .metrics
                .cache_refresh_failed(&environment.tenant, &environment.environment),
            None => {}
        }
        if outcome.is_err()
            && let Some(current) = self.inner.tokens.get(key).await
        {
            current.refresh_failed(self.inner.clock.now(), rand::rng().random());
        }
        outcome
    }

    /// The token a flight lands: one already cached that serves it (another flight may have
    /// landed since the caller looked), else a new one.
    async fn find(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
        wanted: Wanted,
        asked: &AtomicBool,
    ) -> Result<Found, BrokerError> {
        if let Some(current) = self.inner.tokens.get(key).await {
            let now = self.inner.clock.now();
            let settings = &self.inner.settings;
            if wanted.accepts(
                current.fetched_at,
                current.remaining(now),
                settings.min_remaining,
            ) && !current.refetch_due(now, settings.min_refetch_interval)
            {
                return Ok(Found::Cached(current));
            }
        }
        self.fetch(environment, key, wanted, asked)
            .await
            .map(Found::New)
    }

    /// Caches a new token for `key` unless a reload changed its environment since the flight
    /// began (`generation`) or it lives too short to serve. Returns the token in the cache. A
    /// token that creates the key holds `key_slot`; otherwise dropping it gives it back.
    async fn install(
        &self,
        key: &TokenKey,
        token: Arc<CachedToken>,
        generation: u64,
        key_slot: Option<KeySlot>,
    ) -> Result<Arc<CachedToken>, Arc<BrokerError>> {
        if self.generation(key) > generation {
            return Err(Arc::new(BrokerError::SettingsChanged));
        }
        let settings = &self.inner.settings;
        let lifetime = token.lifetime();
        if lifetime < settings.min_remaining {
            tracing::warn!(
                tenant = %key.tenant,
                environment = %key.environment,
                lifetime_s = lifetime.as_secs(),
                min_remaining_s = settings.min_remaining.as_secs(),
                "the IdP issued a token that lives less than cache.min_remaining; remembering it for cache.negative_ttl"
            );
            if !settings.negative_ttl.is_zero() {
                let remembered = Remembered::TooShort { lifetime };
                self.remember(key, remembered).await;
            }
            return Err(Arc::new(BrokerError::LifetimeBelowMinimum {
                lifetime,
                min_remaining: settings.min_remaining,
            }));
        }
        let candidate = Arc::clone(&token);
        let installed = self
            .inner
            .tokens
            .entry_by_ref(key)
            .and_compute_with(|entry| async move {
                match entry {
                    // A newer token arrived meanwhile (another replica's, announced): keep it.
                    Some(entry) if entry.value().fetched_at > candidate.fetched_at => Op::Nop,
                    Some(entry) => {
                        if let Some(owner) = entry.value().owner() {
                            candidate.set_owner(Arc::clone(owner));
                        }
                        Op::Put(candidate)
                    }
                    None => {
                        if let Some(slot) = key_slot {
                            candidate.set_owner(Arc::new(slot));
                        }
                        Op::Put(candidate)
                    }
                }
            })
            .await;
        let installed = match installed {
            CompResult::Inserted(entry) | CompResult::ReplacedWith(entry) => {
                self.inner.by_shared_key.insert(key, entry.value());
                entry.into_value()
            }
            CompResult::Unchanged(entry) => entry.into_value(),
            CompResult::StillNone(_) | CompResult::Removed(_) => Arc::clone(&token),
        };
        // A reload that bumped the generation after the check above invalidates entries after
        // bumping; this second check catches this flight's token inserted in between (and leaves
        // alone a newer one that was there).
        if self.generation(key) > generation {
            if Arc::ptr_eq(&installed, &token) {
                self.forget_entry(key, &installed).await;
            }
            return Err(Arc::new(BrokerError::SettingsChanged));
        }
        Ok(installed)
    }

    /// The latest generation of `key`'s environment (see `Inner::generations`).
    pub(super) fn generation(&self, key: &TokenKey) -> u64 {
        let generations = lock(&self.inner.generations);
        generations
            .get(&(key.tenant.clone(), key.environment.clone()))
            .copied()
            .unwrap_or(0)
    }
}
