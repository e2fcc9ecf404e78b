//! Authorizations under way: the `state` and PKCE verifier of each authorization URL, until the
//! calling service brings back the code.
//!
//! The `state` is 256 random bits, and verifying it is finding it here: a forged, expired or
//! already used state is simply absent. It is bound to the caller, tenant and environment that
//! started the authorization and is consumed by the first matching redemption, atomically, so a
//! code can be exchanged once; a redemption by anyone else leaves it in place, so another caller
//! cannot burn it. The PKCE verifier (RFC 7636, S256) never leaves the broker; only its challenge
//! goes into the URL.
//!
//! [`PendingAuthorizations`] keeps them in this replica's memory; with a shared level they are
//! kept there instead (under a hash of the state and what it is bound to, [`super::shared`]) and
//! here only while that level cannot be reached.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use rand::RngCore as _;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::UserSettings;
use crate::idp::{AudienceParam, EnvironmentSettings, UserLoginSettings};
use crate::token::TokenKey;

/// An authorization URL for a user to open, and the `state` it carries. `Debug` shows neither
/// the state nor the URL's query, which carries it.
#[derive(Clone)]
pub struct Authorization {
    /// The IdP's authorization endpoint with every parameter of the request.
    pub url: reqwest::Url,
    /// The `state` parameter; the IdP hands it back with the code.
    pub state: String,
    /// How long the state can be redeemed.
    pub expires_in: Duration,
}

impl fmt::Debug for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut endpoint = self.url.clone();
        endpoint.set_query(None);
        f.debug_struct("Authorization")
            .field("endpoint", &endpoint.as_str())
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// What the broker remembers about an authorization URL it handed out.
pub struct PendingAuthorization {
    /// The caller that asked for it.
    pub owner: Arc<str>,
    /// Tenant, environment, audience and scopes of the user token.
    pub key: TokenKey,
    code_verifier: SecretString,
    /// The redirect URI the URL named; the exchange must repeat it exactly.
    pub redirect_uri: String,
}

impl fmt::Debug for PendingAuthorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingAuthorization")
            .field("owner", &self.owner)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Authorizations by `state`, in this replica's memory, each forgotten after
/// `users.authorization_timeout`.
pub struct PendingAuthorizations {
    /// Each with the time it lapses at, by the broker's clock (moka drops it on its own timer
    /// too, to bound memory).
    by_state: Cache<String, (Arc<PendingAuthorization>, SystemTime)>,
    /// `users.authorization_timeout`.
    timeout: Duration,
    /// Pending authorizations per caller, so one caller cannot fill the set.
    per_owner: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    max_per_owner: usize,
}

impl PendingAuthorizations {
    /// An empty set bounded by `users.max_sessions`, and by `users.max_pending_per_caller` for
    /// each caller.
    pub fn new(settings: &UserSettings) -> Self {
        let per_owner: Arc<Mutex<HashMap<Arc<str>, usize>>> = Arc::default();
        let counts = Arc::clone(&per_owner);
        let by_state = Cache::builder()
            .max_capacity(settings.max_sessions)
            .time_to_live(settings.authorization_timeout)
            .eviction_listener(
                move |_state,
                      (pending, _lapses): (Arc<PendingAuthorization>, SystemTime),
                      _cause| {
                    // Redeemed, expired or evicted: each state leaves once, and frees its slot.
                    let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(count) = counts.get_mut(&pending.owner) {
                        *count = count.saturating_sub(1);
                        if *count == 0 {
                            counts.remove(&pending.owner);
                        }
                    }
                },
            )
            .build();
        Self {
            by_state,
            timeout: settings.authorization_timeout,
            per_owner,
            max_per_owner: settings.max_pending_per_caller,
        }
    }

    /// Remembers `pending` under `state` from `now` on; `false` when its owner has
    /// `users.max_pending_per_caller` authorizations pending already.
    pub async fn insert(
        &self,
        state: String,
        pending: PendingAuthorization,
        now: SystemTime,
    ) -> bool {
        {
            let mut counts = self
                .per_owner
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let count = counts.entry(Arc::clone(&pending.owner)).or_insert(0);
            if *count >= self.max_per_owner {
                return false;
            }
            *count += 1;
        }
        let lapses = now.checked_add(self.timeout).unwrap_or(now);
        self.by_state
            .insert(state, (Arc::new(pending), lapses))
            .await;
        true
    }

    /// Takes the authorization of `state` if `owner` started it for `tenant`/`environment` and
    /// it has not lapsed at `now` (a lapsed one is forgotten).
    pub async fn take(
        &self,
        state: &str,
        owner: &str,
        tenant: &str,
        environment: &str,
        now: SystemTime,
    ) -> Option<Arc<PendingAuthorization>> {
        let result = self
            .by_state
            .entry_by_ref(state)
            .and_compute_with(|entry| async move {
                match entry {
                    Some(entry)
                        if *entry.value().0.owner == *owner
                            && *entry.value().0.key.tenant == *tenant
                            && *entry.value().0.key.environment == *environment =>
                    {
                        Op::Remove
                    }
                    _ => Op::Nop,
                }
            })
            .await;
        match result {
            CompResult::Removed(entry) => {
                let (pending, lapses) = entry.into_value();
                (now < lapses).then_some(pending)
            }
            _ => None,
        }
    }
}

/// A new authorization for `owner` and the user token `key`: its URL (with a new `state` and
/// PKCE challenge) and what the broker must remember to redeem it.
pub fn prepare(
    owner: Arc<str>,
    key: TokenKey,
    environment: &EnvironmentSettings,
    login: &UserLoginSettings,
    expires_in: Duration,
) -> (Authorization, PendingAuthorization) {
    let state = random_token();
    let code_verifier = random_token();
    let url = authorization_url(environment, login, &key, &state, &code_verifier);
    let pending = PendingAuthorization {
        owner,
        key,
        code_verifier: SecretString::from(code_verifier),
        redirect_uri: login.redirect_uri.to_string(),
    };
    let authorization = Authorization {
        url,
        state,
        expires_in,
    };
    (authorization, pending)
}

/// 256 random bits, base64url: a `state`, and a PKCE verifier of 43 characters (RFC 7636 §4.1).
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The S256 challenge of a PKCE verifier: `BASE64URL(SHA256(verifier))`.
pub fn code_challenge(code_verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(code_verifier.as_bytes()))
}

/// The IdP's authorization URL with `response_type=code`, client, redirect, scope, audience,
/// state and PKCE parameters added to any it already has.
fn authorization_url(
    environment: &EnvironmentSettings,
    login: &UserLoginSettings,
    key: &TokenKey,
    state: &str,
    code_verifier: &str,
) -> reqwest::Url {
    let audience_name = match environment.audience_param {
        AudienceParam::Audience => "audience",
        AudienceParam::Resource => "resource",
    };
    let mut url = login.authorize_url.clone();
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", &environment.client_id)
            .append_pair("redirect_uri", login.redirect_uri.as_str());
        if !key.scope.is_empty() {
            query.append_pair("scope", key.scope.as_str());
        }
        query
            .append_pair(audience_name, &key.audience)
            .append_pair("state", state)
            .append_pair("code_challenge", &code_challenge(code_verifier))
            .append_pair("code_challenge_method", "S256");
    }
    url
}

impl PendingAuthorization {
    /// An authorization read back from the shared level.
    pub fn new(
        owner: Arc<str>,
        key: TokenKey,
        code_verifier: SecretString,
        redirect_uri: String,
    ) -> Self {
        Self {
            owner,
            key,
            code_verifier,
            redirect_uri,
        }
    }

    /// The verifier, for the code exchange request only.
    pub fn expose_code_verifier(&self) -> &str {
        self.code_verifier.expose_secret()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_state() {
        let authorization = Authorization {
            url: reqwest::Url::parse("https://idp.test/authorize?state=s3cr3t&x=1").unwrap(),
            state: "s3cr3t".into(),
            expires_in: Duration::from_secs(600),
        };
        let shown = format!("{authorization:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("https://idp.test/authorize"), "{shown}");
    }

    #[test]
    fn challenge_is_the_rfc7636_example() {
        // RFC 7636, appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert_eq!(
            code_challenge(verifier),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert_eq!(random_token().len(), 43);
        assert_ne!(random_token(), random_token());
    }
}
