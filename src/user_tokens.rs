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
//! Like the broker, this module knows nothing about HTTP routes; `api` maps [`UserError`].

pub mod pending;
mod settings;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::broker::{BrokerError, CacheStatus, CachedToken, Lease, TokenKey};
use crate::idp::{EnvironmentSettings, IdpClient, IdpError, UserLoginSettings};

pub use pending::{Authorization, PendingAuthorization};
pub use settings::UserSettings;
pub use store::Session;

use pending::PendingAuthorizations;
use store::{Grant, HandleId, SessionStore};

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
    /// A token could not be handed out, for the same reasons as a broker token.
    #[error(transparent)]
    Token(#[from] BrokerError),
}

/// The user-token service: pending authorizations and sessions; cheap to clone.
#[derive(Clone)]
pub struct UserTokens {
    inner: Arc<Inner>,
}

struct Inner {
    idp: IdpClient,
    pending: PendingAuthorizations,
    sessions: SessionStore,
    min_remaining: Duration,
    max_pending_per_caller: usize,
}

impl UserTokens {
    /// An empty service; tokens are handed out with at least `min_remaining` left, as the broker's.
    pub fn new(settings: &UserSettings, min_remaining: Duration, idp: IdpClient) -> Self {
        Self {
            inner: Arc::new(Inner {
                idp,
                pending: PendingAuthorizations::new(settings),
                sessions: SessionStore::new(settings),
                min_remaining,
                max_pending_per_caller: settings.max_pending_per_caller,
            }),
        }
    }

    /// Starts an authorization for `owner` and the user token `key`.
    pub async fn start(
        &self,
        owner: Arc<str>,
        key: TokenKey,
        environment: &EnvironmentSettings,
    ) -> Result<Authorization, UserError> {
        let login = user_login(environment)?;
        self.inner
            .pending
            .start(owner, key, environment, login)
            .await
            .ok_or(UserError::TooManyPending {
                max: self.inner.max_pending_per_caller,
            })
    }

    /// Redeems `state`: the authorization `owner` started for `tenant`/`environment`, once.
    pub async fn redeem(
        &self,
        owner: &str,
        tenant: &str,
        environment: &str,
        state: &str,
    ) -> Result<Arc<PendingAuthorization>, UserError> {
        self.inner
            .pending
            .take(state, owner, tenant, environment)
            .await
            .ok_or(UserError::UnknownState)
    }

    /// Exchanges the code of a redeemed authorization and returns the new session's handle.
    pub async fn exchange(
        &self,
        pending: &PendingAuthorization,
        environment: &EnvironmentSettings,
        code: &str,
    ) -> Result<String, UserError> {
        user_login(environment)?;
        let grant = self
            .inner
            .idp
            .exchange_code(
                environment,
                code,
                &pending.redirect_uri,
                pending.expose_code_verifier(),
            )
            .await
            .map_err(|error| match error {
                IdpError::Rejected { ref code, .. } => UserError::CodeRejected {
                    code: code.clone(),
                    source: error,
                },
                other => UserError::Token(other.into()),
            })?;
        let refreshable = grant.refresh_token.is_some();
        let (handle, id) = store::new_handle();
        let session = Session::new(
            id,
            Arc::clone(&pending.owner),
            pending.key.clone(),
            Grant {
                access: Arc::new(CachedToken::new(
                    grant.token,
                    SystemTime::now(),
                    0.0,
                    Duration::ZERO,
                    0.0,
                )),
                refresh_token: grant.refresh_token,
            },
        );
        tracing::info!(
            caller = %pending.owner,
            tenant = %pending.key.tenant,
            environment = %pending.key.environment,
            refreshable,
            "user session created"
        );
        self.inner.sessions.insert(Arc::new(session)).await;
        Ok(handle)
    }

    /// The session of `handle`, if `owner` created it.
    pub async fn session(&self, owner: &str, handle: &str) -> Result<Arc<Session>, UserError> {
        self.inner
            .sessions
            .get(&HandleId::of(handle))
            .await
            .filter(|session| session.owner() == owner)
            .ok_or(UserError::UnknownHandle)
    }

    /// An access token of `session` with at least `max(min_ttl, cache.min_remaining)` left,
    /// refreshed when the current one has less.
    pub async fn token(
        &self,
        session: &Session,
        environment: &EnvironmentSettings,
        min_ttl: Option<Duration>,
    ) -> Result<Lease, UserError> {
        let min_remaining = self.inner.min_remaining;
        let required = min_ttl.map_or(min_remaining, |ttl| ttl.max(min_remaining));
        let mut grant = session.grant().await;
        let now = SystemTime::now();
        if grant.access.remaining(now) >= required {
            grant.access.record_hit();
            return Ok(Lease {
                token: Arc::clone(&grant.access),
                status: CacheStatus::Hit,
                at: now,
            });
        }
        let Some(refresh_token) = &grant.refresh_token else {
            return Err(self.reauthorize(session, environment).await);
        };
        let fresh = match self.inner.idp.refresh(environment, refresh_token).await {
            Ok(fresh) => fresh,
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
            Err(error) => return Err(UserError::Token(error.into())),
        };
        let access = Arc::new(CachedToken::new(
            fresh.token,
            SystemTime::now(),
            0.0,
            Duration::ZERO,
            0.0,
        ));
        grant.access = Arc::clone(&access);
        let rotated = fresh.refresh_token.is_some();
        if let Some(refresh_token) = fresh.refresh_token {
            grant.refresh_token = Some(refresh_token);
        }
        tracing::info!(
            tenant = %session.key().tenant,
            environment = %session.key().environment,
            lifetime_s = access.lifetime().as_secs(),
            rotated,
            "refreshed a user token"
        );
        let lifetime = access.lifetime();
        if lifetime < required {
            return Err(UserError::Token(if lifetime < min_remaining {
                BrokerError::LifetimeBelowMinimum {
                    lifetime,
                    min_remaining,
                }
            } else {
                BrokerError::MinTtlTooLong { required, lifetime }
            }));
        }
        access.record_hit();
        Ok(Lease {
            token: access,
            status: CacheStatus::Miss,
            at: SystemTime::now(),
        })
    }

    /// Forgets the session of `handle` if `owner` created it; otherwise does nothing.
    pub async fn forget(&self, owner: &str, handle: &str) -> bool {
        match self.session(owner, handle).await {
            Ok(session) => {
                self.inner.sessions.remove(&session.id()).await;
                true
            }
            Err(_) => false,
        }
    }

    /// Forgets `session` and starts a new authorization for the same caller and user token.
    async fn reauthorize(&self, session: &Session, environment: &EnvironmentSettings) -> UserError {
        self.inner.sessions.remove(&session.id()).await;
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
