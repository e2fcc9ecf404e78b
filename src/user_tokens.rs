//! User tokens through the authorization-code flow (Auth0's "user authorization token").
//!
//! For an environment with `authorize_url` and `redirect_uri`, a calling service asks for an
//! authorization URL ([`UserTokens::start`]: `state` and PKCE S256 in [`pending`]), sends its user
//! there, receives the code at its own redirect URI, and hands code and state back
//! ([`UserTokens::redeem`], then [`UserTokens::exchange`]). The broker exchanges the code, keeps
//! the refresh token to itself, and returns an opaque handle ([`store`]). A token request on the
//! handle ([`UserTokens::token`]) answers from the session while the access token has enough
//! validity left and otherwise refreshes it, once per handle however many ask at the same time;
//! a rotated refresh token replaces the old one. When the IdP refuses the refresh token (consent
//! revoked, token expired) the session is forgotten and the answer carries a new authorization
//! URL for the same user token.
//!
//! With a shared level ([`shared`]), sessions and pending authorizations live there, so any
//! replica serves any handle and a restart keeps them; [`fleet`] keeps this replica's copies in
//! step and makes a refresh single flight across replicas. Code exchanges and refreshes run in
//! tasks of their own: a caller that goes away does not lose a rotated refresh token.
//!
//! Like the broker, this module knows nothing about HTTP routes; `api` maps [`UserError`].

mod fleet;
pub mod pending;
mod refresh;
mod settings;
pub mod shared;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use crate::broker::{Broker, BrokerError, IdpPermit, idp_outcome};
use crate::clock::Clock;
use crate::idp::{EnvironmentSettings, IdpClient, IdpError, UserLoginSettings};
use crate::limits::IdpBudget;
use crate::telemetry::metrics::Metrics;
use crate::token::{HandleId, PendingId, TokenKey};

pub use pending::{Authorization, PendingAuthorization};
pub use settings::UserSettings;
pub use shared::{SessionLookup, SessionRecord, SessionWrite, SharedSessions};
pub use store::Session;

use pending::PendingAuthorizations;
use store::{Grant, SessionStore};

/// Who an IdP request of a user token goes out for: the asking caller's budget, and the IdP
/// client's permit when the request took it before a session's lock.
struct Asking<'a> {
    budget: &'a IdpBudget,
    permit: Option<IdpPermit>,
    /// The request was charged to `budget` already (before a one-time state was spent on it).
    prepaid: bool,
}

/// How long a caller is told to wait when the shared level cannot answer for a session.
const SHARED_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Why a user-token request failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The environment has no `authorize_url` and `redirect_uri`.
    #[error(
        "{tenant}/{environment} is not set up for user tokens; configure authorize_url and redirect_uri"
    )]
    NotEnabled {
        /// The tenant.
        tenant: String,
        /// The environment.
        environment: String,
    },
    /// The state is forged, expired, already used, or not this caller's for this environment.
    #[error("unknown, expired or already used state; start again with a new authorization URL")]
    UnknownState,
    /// No session has this handle for this caller.
    #[error("no such handle: it was forgotten, has expired, or belongs to another caller")]
    UnknownHandle,
    /// The IdP refused the authorization code.
    #[error(
        "the IdP did not accept the authorization code (error '{code}'); start again with a new authorization URL"
    )]
    CodeRejected {
        /// The IdP's OAuth2 error code.
        code: String,
        /// Why, for the log.
        #[source]
        source: IdpError,
    },
    /// The user must log in and consent again; the new authorization URL is attached.
    #[error(
        "the IdP no longer accepts this user's refresh token; send the user to authorization_url"
    )]
    ReauthorizationRequired(Box<Authorization>),
    /// The caller has `users.max_pending_per_caller` authorizations pending already.
    #[error(
        "this caller has {max} authorizations pending (users.max_pending_per_caller); redeem or let some expire first"
    )]
    TooManyPending {
        /// The configured bound.
        max: usize,
    },
    /// The shared level cannot be reached, and this replica cannot answer without it (it does
    /// not hold the handle or state, or the request changes what the level holds).
    #[error(
        "the shared cache (Redis) that holds user sessions cannot be reached; retry after the seconds in Retry-After"
    )]
    SharedUnavailable {
        /// When to try again.
        retry_after: Duration,
    },
    /// The last refresh of this session failed, and the next waits (so that callers asking
    /// meanwhile do not each make an IdP request).
    #[error(
        "the IdP failed this user token's last refresh; the broker tries again after the seconds in Retry-After"
    )]
    RefreshPaused {
        /// When the next refresh may be tried.
        retry_after: Duration,
    },
    /// Another replica is refreshing this session and did not finish in time.
    #[error(
        "another replica is refreshing this user token and did not finish within shared_cache.wait_for_peer; retry after the seconds in Retry-After"
    )]
    PeerRefreshing {
        /// When to try again.
        retry_after: Duration,
    },
    /// A token could not be handed out, for the same reasons as a broker token.
    #[error(transparent)]
    Token(#[from] BrokerError),
}

impl UserError {
    /// How long the caller should wait before retrying, for the errors that are worth a retry.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::SharedUnavailable { retry_after }
            | Self::PeerRefreshing { retry_after }
            | Self::RefreshPaused { retry_after } => Some(*retry_after),
            Self::Token(error) => error.retry_after(),
            _ => None,
        }
    }
}

/// The user-token service: pending authorizations and sessions; cheap to clone.
#[derive(Clone)]
pub struct UserTokens {
    inner: Arc<Inner>,
}

struct Inner {
    idp: IdpClient,
    /// For the guards of each IdP client (the pause after a 429, concurrent requests).
    broker: Broker,
    metrics: Metrics,
    pending: PendingAuthorizations,
    sessions: SessionStore,
    shared: Option<Arc<dyn SharedSessions>>,
    min_remaining: Duration,
    /// `cache.min_refetch_interval`: the least time between two refreshes of one session.
    min_refetch_interval: Duration,
    max_pending_per_caller: usize,
    authorization_timeout: Duration,
    idle_timeout: Duration,
}

impl UserTokens {
    /// An empty service; tokens are handed out with at least `min_remaining` left, and a
    /// session is refreshed at most once per `min_refetch_interval`, as the broker's tokens.
    /// With `shared`, sessions and authorizations are kept there (and this must run inside a
    /// Tokio runtime).
    pub fn new(
        settings: &UserSettings,
        min_remaining: Duration,
        min_refetch_interval: Duration,
        idp: IdpClient,
        broker: Broker,
        metrics: Metrics,
        shared: Option<Arc<dyn SharedSessions>>,
    ) -> Self {
        let with_shared = shared.is_some();
        let inner = Arc::new(Inner {
            idp,
            broker,
            metrics,
            pending: PendingAuthorizations::new(settings),
            sessions: SessionStore::new(settings),
            shared,
            min_remaining,
            min_refetch_interval,
            max_pending_per_caller: settings.max_pending_per_caller,
            authorization_timeout: settings.authorization_timeout,
            idle_timeout: settings.idle_timeout,
        });
        if with_shared {
            tokio::spawn(fleet::write_back_on_recovery(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// The clock every decision of user tokens reads (the broker's).
    fn clock(&self) -> &Clock {
        self.inner.broker.clock()
    }

    /// Starts an authorization for `owner` and the user token `key`.
    pub async fn start(
        &self,
        owner: Arc<str>,
        key: TokenKey,
        environment: &EnvironmentSettings,
    ) -> Result<Authorization, UserError> {
        let login = user_login(environment)?;
        let timeout = self.inner.authorization_timeout;
        let too_many = UserError::TooManyPending {
            max: self.inner.max_pending_per_caller,
        };
        let (authorization, pending) = pending::prepare(owner, key, environment, login, timeout);
        if let Some(shared) = &self.inner.shared {
            let id = PendingId::new(
                &authorization.state,
                &pending.owner,
                &pending.key.tenant,
                &pending.key.environment,
            );
            let max = self.inner.max_pending_per_caller;
            match shared.start_pending(&id, &pending, timeout, max).await {
                Ok(true) => return Ok(authorization),
                Ok(false) => return Err(too_many),
                Err(error) => tracing::warn!(
                    %error,
                    "an authorization could not be kept in the shared cache; keeping it in this replica's memory, so its code must be redeemed here"
                ),
            }
        }
        let state = authorization.state.clone();
        if self
            .inner
            .pending
            .insert(state, pending, self.clock().now())
            .await
        {
            Ok(authorization)
        } else {
            Err(too_many)
        }
    }

    /// Redeems `state`: the authorization `owner` started for `tenant`/`environment`, once.
    pub async fn redeem(
        &self,
        owner: &str,
        tenant: &str,
        environment: &str,
        state: &str,
    ) -> Result<Arc<PendingAuthorization>, UserError> {
        let local = self
            .inner
            .pending
            .take(state, owner, tenant, environment, self.clock().now())
            .await;
        if let Some(pending) = local {
            return Ok(pending);
        }
        let Some(shared) = &self.inner.shared else {
            return Err(UserError::UnknownState);
        };
        let id = PendingId::new(state, owner, tenant, environment);
        match shared.take_pending(&id, owner).await {
            Ok(Some(pending)) => Ok(Arc::new(pending)),
            Ok(None) => Err(UserError::UnknownState),
            Err(error) => {
                tracing::warn!(%error, "an authorization could not be looked up in the shared cache");
                Err(UserError::SharedUnavailable {
                    retry_after: SHARED_RETRY_AFTER,
                })
            }
        }
    }

    /// Charges one code exchange to `budget` before the state is redeemed, so that a caller
    /// over its budget keeps its state for a retry; [`UserTokens::exchange`] then spends that
    /// charge, and [`IdpBudget::refund`] gives it back when the exchange never starts.
    pub fn charge_exchange(&self, budget: &IdpBudget) -> Result<(), UserError> {
        budget.spend(self.clock().instant()).map_err(|retry_after| {
            budget.record_refused_budget();
            UserError::Token(BrokerError::CallerOverBudget { retry_after })
        })
    }

    /// Exchanges the code of a redeemed authorization, charged already with
    /// [`UserTokens::charge_exchange`], and returns the new session's handle. The exchange
    /// runs in a task of its own, so a caller that goes away does not lose the session.
    pub async fn exchange(
        &self,
        pending: Arc<PendingAuthorization>,
        environment: Arc<EnvironmentSettings>,
        code: String,
        budget: &Arc<IdpBudget>,
    ) -> Result<String, UserError> {
        if let Err(error) = user_login(&environment) {
            budget.refund();
            return Err(error);
        }
        let this = self.clone();
        let budget = Arc::clone(budget);
        let task = tokio::spawn(async move {
            this.exchange_now(&pending, &environment, &code, &budget)
                .await
        });
        task.await
            .unwrap_or(Err(UserError::Token(BrokerError::Internal)))
    }

    async fn exchange_now(
        &self,
        pending: &PendingAuthorization,
        environment: &EnvironmentSettings,
        code: &str,
        budget: &IdpBudget,
    ) -> Result<String, UserError> {
        let (credential, _) = self.inner.broker.client_credential(environment).await;
        let exchange = self.inner.idp.exchange_code(
            environment,
            &credential,
            code,
            &pending.redirect_uri,
            pending.expose_code_verifier(),
        );
        let asking = Asking {
            budget,
            permit: None,
            prepaid: true,
        };
        let answer = self.ask_idp(environment, asking, exchange).await?;
        self.count_idp_request(environment, "authorization_code", &answer);
        let grant = answer.map_err(|error| match error {
            IdpError::Rejected { ref code, .. } => UserError::CodeRejected {
                code: code.clone(),
                source: error,
            },
            other => UserError::Token(other.into()),
        })?;
        let refreshable = grant.refresh_token.is_some();
        let (handle, id) = store::new_handle();
        let session = Arc::new(Session::new(
            id,
            Arc::clone(&pending.owner),
            pending.key.clone(),
            Grant::issued(grant.token, grant.refresh_token, 1, self.clock().now()),
        ));
        tracing::info!(
            caller = %pending.owner,
            tenant = %pending.key.tenant,
            environment = %pending.key.environment,
            refreshable,
            "user session started with the IdP's tokens"
        );
        self.inner.sessions.insert(Arc::clone(&session)).await;
        if self.inner.shared.is_some() {
            let grant = session.grant().await;
            self.save(&session, &grant, None).await;
        }
        Ok(handle)
    }

    /// The session of `handle`, if `owner` created it.
    pub async fn session(&self, owner: &str, handle: &str) -> Result<Arc<Session>, UserError> {
        let id = HandleId::of(handle);
        let local = self.inner.sessions.get(&id, self.clock().now()).await;
        let found = match &self.inner.shared {
            None => local,
            Some(shared) => self.look_up(shared.as_ref(), id, owner, local).await?,
        };
        let session = found
            .filter(|session| session.owner() == owner && !session.is_forgotten())
            .ok_or(UserError::UnknownHandle)?;
        session.touch(self.clock().now());
        Ok(session)
    }

    fn count_idp_request<T>(
        &self,
        environment: &EnvironmentSettings,
        grant: &'static str,
        answer: &Result<T, IdpError>,
    ) {
        self.inner.metrics.user_idp_request(
            &environment.tenant,
            &environment.environment,
            grant,
            idp_outcome(answer),
        );
    }

    /// Sends `request` (a code exchange or a refresh) through the guards of `environment`'s IdP
    /// client (with the permit `Asking` holds, if any), charged first to the caller's
    /// `idp_requests_per_minute` (refunded when the guards send nothing), so that one caller's
    /// loop spends only its own budget.
    async fn ask_idp<T>(
        &self,
        environment: &EnvironmentSettings,
        Asking {
            budget,
            permit,
            prepaid,
        }: Asking<'_>,
        request: impl Future<Output = Result<T, IdpError>>,
    ) -> Result<Result<T, IdpError>, UserError> {
        if !prepaid && let Err(retry_after) = budget.spend(self.clock().instant()) {
            budget.record_refused_budget();
            tracing::warn!(
                caller = budget.caller(),
                tenant = %environment.tenant,
                environment = %environment.environment,
                "caller over its idp_requests_per_minute; not asking the IdP for a user token"
            );
            return Err(UserError::Token(BrokerError::CallerOverBudget {
                retry_after,
            }));
        }
        match self
            .inner
            .broker
            .guard_user_request(environment, permit, request)
            .await
        {
            Ok(answer) => {
                budget.record_idp_request();
                Ok(answer)
            }
            Err(refused) => {
                budget.refund();
                Err(refused.into())
            }
        }
    }

    /// Sessions held in memory, and those whose tokens are still to be written to the shared
    /// level (for `/metrics`).
    pub fn session_counts(&self) -> (u64, usize) {
        self.inner.sessions.counts()
    }

    /// Forgets the session of `handle` if `owner` created it, here and in the shared level, and
    /// returns it (`None` when there was none), for its refresh token to be revoked.
    pub async fn forget(
        &self,
        owner: &str,
        handle: &str,
    ) -> Result<Option<Arc<Session>>, UserError> {
        // A handle that neither this replica nor the shared level holds leaves nothing behind:
        // a loop of made-up handles must not fill Redis with tombstones.
        match self.session(owner, handle).await {
            Ok(session) => {
                self.forget_session(&session).await?;
                Ok(Some(session))
            }
            Err(UserError::UnknownHandle) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Revokes the refresh token of a forgotten `session` at `environment`'s
    /// `revocation_url` (RFC 7009), when it names one: in a task of the broker's own, best
    /// effort, counted in `token_broker_user_idp_requests_total{grant="revocation"}`. Without
    /// it, a session copied back into Redis by someone who can write there would still refresh.
    pub fn revoke_later(&self, session: Arc<Session>, environment: Arc<EnvironmentSettings>) {
        let Some(revocation_url) = environment
            .user_login
            .as_ref()
            .and_then(|login| login.revocation_url.clone())
        else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let Some(refresh_token) = session.grant().await.refresh_token.clone() else {
                return;
            };
            let (credential, _) = this.inner.broker.client_credential(&environment).await;
            let revoke =
                this.inner
                    .idp
                    .revoke(&environment, &credential, &revocation_url, &refresh_token);
            let answer = match this
                .inner
                .broker
                .guard_user_request(&environment, None, revoke)
                .await
            {
                Ok(answer) => answer,
                Err(paused) => {
                    tracing::warn!(
                        tenant = %environment.tenant,
                        environment = %environment.environment,
                        error = %paused,
                        "a deleted user session's refresh token was not revoked (the IdP client is paused)"
                    );
                    return;
                }
            };
            this.count_idp_request(&environment, "revocation", &answer);
            if let Err(error) = answer {
                tracing::warn!(
                    tenant = %environment.tenant,
                    environment = %environment.environment,
                    %error,
                    "a deleted user session's refresh token could not be revoked at the IdP"
                );
            }
        });
    }

    /// Forgets `session` and starts a new authorization for the same caller and user token.
    async fn reauthorize(&self, session: &Session, environment: &EnvironmentSettings) -> UserError {
        if self.forget_session(session).await.is_err() {
            // Its refresh token is dead anyway: forgotten here, and refused everywhere else.
            self.inner.sessions.forget(session).await;
        }
        let owner = Arc::from(session.owner());
        match self.start(owner, session.key().clone(), environment).await {
            Ok(authorization) => UserError::ReauthorizationRequired(Box::new(authorization)),
            Err(error) => error,
        }
    }
}

fn user_login(environment: &EnvironmentSettings) -> Result<&UserLoginSettings, UserError> {
    environment
        .user_login
        .as_ref()
        .ok_or_else(|| UserError::NotEnabled {
            tenant: environment.tenant.to_string(),
            environment: environment.environment.to_string(),
        })
}
