//! The settings of one environment's IdP client: where its token endpoint is, how requests are
//! shaped, and the credential the broker proves its identity with.
//!
//! `config` builds these from the `[tenants.T.environments.E]` tables; the IdP client, the broker
//! and the user-token service read them. The credential is secret: no type here that holds it
//! derives `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::{ClientKey, RotationSettings};
use crate::telemetry::metrics::EnvironmentHandles;

/// Bound on one token request, retries included, when the environment sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime assumed when the IdP gives neither `expires_in` nor a JWT `exp`, unless configured.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Requests in flight to one IdP client at once, unless configured.
pub const DEFAULT_MAX_CONCURRENT_FETCHES: usize = 8;
/// Largest token endpoint answer read, unless configured: token bodies are a few KiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How the token request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestFormat {
    /// A JSON object, as Auth0 documents.
    Json,
    /// `application/x-www-form-urlencoded`, as RFC 6749 specifies.
    Form,
}

/// How the broker authenticates to the IdP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the body.
    Post,
    /// HTTP Basic (RFC 6749 §2.3.1), and nothing in the body.
    Basic,
    /// A signed JWT assertion in the body (RFC 7523), no secret.
    PrivateKeyJwt,
}

/// The credential the broker proves its client identity with.
#[derive(Clone)]
pub enum ClientCredential {
    /// A client secret, for `client_auth = "post"` or `"basic"`.
    Secret(SecretString),
    /// A private key, for `client_auth = "private_key_jwt"`.
    PrivateKey {
        /// Signs a fresh assertion for each request.
        key: Arc<ClientKey>,
        /// The assertion's `aud`: the token URL unless configured.
        assertion_audience: String,
    },
}

/// A file a client credential is read from, read again when the IdP refuses the credential
/// in use (a rotated secret written there since).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialFile {
    /// A client secret (surrounding white space trimmed).
    Secret(PathBuf),
    /// A PEM private key, with the key id its assertions name.
    Key {
        /// The PEM file.
        path: PathBuf,
        /// `key_id`, the assertions' `kid`.
        key_id: Option<String>,
    },
}

impl CredentialFile {
    /// The SHA-256 of the file's bytes now, to tell whether it changed since it was read.
    pub fn digest_now(&self) -> Option<[u8; 32]> {
        let path = match self {
            Self::Secret(path) | Self::Key { path, .. } => path,
        };
        std::fs::read(path).ok().map(|bytes| digest(&bytes))
    }

    /// The credential in the file now, of the kind of `like` (whose assertion audience a key
    /// keeps), with the SHA-256 of the file's bytes; `None` when it cannot be read or holds
    /// nothing usable.
    pub async fn read(&self, like: &ClientCredential) -> Option<(ClientCredential, [u8; 32])> {
        match self {
            Self::Secret(path) => {
                let text = tokio::fs::read_to_string(path).await.ok()?;
                let secret = text.trim();
                (!secret.is_empty()).then(|| {
                    (
                        ClientCredential::Secret(secret.to_owned().into()),
                        digest(text.as_bytes()),
                    )
                })
            }
            Self::Key { path, key_id } => {
                let ClientCredential::PrivateKey {
                    assertion_audience, ..
                } = like
                else {
                    return None;
                };
                let pem = tokio::fs::read_to_string(path).await.ok()?;
                let key = ClientKey::from_pem(&pem, key_id.clone()).ok()?;
                Some((
                    ClientCredential::PrivateKey {
                        key: Arc::new(key),
                        assertion_audience: assertion_audience.clone(),
                    },
                    digest(pem.as_bytes()),
                ))
            }
        }
    }
}

/// SHA-256 of a credential file's bytes.
fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(bytes).into()
}

/// What the broker tries when the IdP refuses the client (`invalid_client`, a 401): the
/// configured credential's file read again, then a second credential, once each.
#[derive(Clone, Default)]
pub struct CredentialFallbacks {
    /// Where the configured credential came from, when from a file.
    pub primary_file: Option<CredentialFile>,
    /// The SHA-256 of that file's bytes when the configured credential was read from it: a
    /// file that still holds them is not tried again.
    pub primary_digest: Option<[u8; 32]>,
    /// The second credential, from `fallback_client_secret_env` (read at load: a process's
    /// environment does not change).
    pub fallback: Option<ClientCredential>,
    /// The second credential's file (`fallback_client_secret_file`,
    /// `fallback_private_key_file`), read at each use.
    pub fallback_file: Option<CredentialFile>,
}

/// Where users log in and where the IdP sends them back, for user tokens.
#[derive(Debug)]
pub struct UserLoginSettings {
    /// The IdP's authorization endpoint (Auth0: `https://{domain}/authorize`).
    pub authorize_url: reqwest::Url,
    /// The calling service's callback, registered at the IdP.
    pub redirect_uri: reqwest::Url,
    /// The IdP's token revocation endpoint (RFC 7009; Auth0: `https://{domain}/oauth/revoke`),
    /// where a deleted session's refresh token is revoked; `None`: the IdP is not told.
    pub revocation_url: Option<reqwest::Url>,
}

/// The name under which the audience is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudienceParam {
    /// `audience`, as Auth0 expects.
    Audience,
    /// `resource`, as RFC 8707 specifies.
    Resource,
}

/// `[tenants.T.environments.E]`: the IdP client of one tenant in one environment.
pub struct EnvironmentSettings {
    /// Tenant name, for logs, metrics and cache keys (shared with the keys, so a key costs no
    /// copy of it).
    pub tenant: Arc<str>,
    /// Environment name, for logs, metrics and cache keys.
    pub environment: Arc<str>,
    /// The IdP's token endpoint.
    pub token_url: reqwest::Url,
    /// OAuth2 client id.
    pub client_id: String,
    /// Client secret or private key; used only where the request is built.
    pub credential: ClientCredential,
    /// What to try when the IdP refuses `credential`.
    pub fallbacks: CredentialFallbacks,
    /// Audience used when the caller names none (shared with the keys that use it).
    pub audience: Option<Arc<str>>,
    /// Where its metrics' handles are kept once found, for the hot path.
    pub metrics: EnvironmentHandles,
    /// Body encoding of the token request.
    pub request_format: RequestFormat,
    /// Where the credentials go.
    pub client_auth: ClientAuth,
    /// Name of the audience parameter.
    pub audience_param: AudienceParam,
    /// Extra fields sent with every token request.
    pub extra_params: BTreeMap<String, String>,
    /// Bound on one token request, retries included.
    pub timeout: Duration,
    /// Lifetime assumed when the IdP gives neither `expires_in` nor a JWT `exp`.
    pub default_lifetime: Duration,
    /// Quota guard: most IdP requests per sliding hour for this client, when set.
    pub max_fetches_per_hour: Option<u32>,
    /// Most requests in flight to this client at once, so a hung IdP cannot pile them up.
    pub max_concurrent_fetches: usize,
    /// Largest answer body read from the token endpoint; a longer one is an error, not retried.
    pub max_response_bytes: usize,
    /// The authorization-code flow, when user tokens are configured.
    pub user_login: Option<UserLoginSettings>,
    /// How the broker rotates this client's secret, when it does.
    pub rotation: Option<RotationSettings>,
    /// Named by some environment's `rotation.authorized_by`: its tokens can rotate secrets, so
    /// they are the broker's own and no caller receives them, whatever the allow rules say.
    pub rotation_authority: bool,
    /// The reload that last changed how this environment talks to its IdP (0: none since
    /// start). A fetch under settings older than the broker's latest for the environment is
    /// never installed.
    pub generation: u64,
}

impl EnvironmentSettings {
    /// Settings with the documented defaults for everything but the identity and credential:
    /// a JSON body with the credential in it, the `audience` parameter, no extra fields.
    pub fn new(
        tenant: &str,
        environment: &str,
        token_url: reqwest::Url,
        client_id: &str,
        credential: ClientCredential,
    ) -> Self {
        Self {
            tenant: tenant.into(),
            environment: environment.into(),
            metrics: EnvironmentHandles::default(),
            token_url,
            client_id: client_id.to_owned(),
            credential,
            fallbacks: CredentialFallbacks::default(),
            audience: None,
            request_format: RequestFormat::Json,
            client_auth: ClientAuth::Post,
            audience_param: AudienceParam::Audience,
            extra_params: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
            default_lifetime: DEFAULT_LIFETIME,
            max_fetches_per_hour: None,
            max_concurrent_fetches: DEFAULT_MAX_CONCURRENT_FETCHES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            user_login: None,
            rotation: None,
            rotation_authority: false,
            generation: 0,
        }
    }

    /// Whether `other` talks to the same IdP client in the same way (token URL, client id and
    /// request shape). The secret is not part of the identity: a rotated secret keeps tokens.
    pub fn same_identity(&self, other: &Self) -> bool {
        self.token_url == other.token_url
            && self.client_id == other.client_id
            && self.request_format == other.request_format
            && self.client_auth == other.client_auth
            && self.audience_param == other.audience_param
            && self.extra_params == other.extra_params
    }
}

impl fmt::Debug for EnvironmentSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvironmentSettings")
            .field("tenant", &self.tenant)
            .field("environment", &self.environment)
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("credential", &self.credential)
            .field("audience", &self.audience)
            .field("request_format", &self.request_format)
            .field("client_auth", &self.client_auth)
            .field("audience_param", &self.audience_param)
            .field("extra_params", &self.extra_params)
            .field("timeout", &self.timeout)
            .field("max_fetches_per_hour", &self.max_fetches_per_hour)
            .field("user_login", &self.user_login)
            .field("rotation", &self.rotation)
            .field("rotation_authority", &self.rotation_authority)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret([redacted])"),
            Self::PrivateKey {
                key,
                assertion_audience,
            } => f
                .debug_struct("PrivateKey")
                .field("key", key)
                .field("assertion_audience", assertion_audience)
                .finish(),
        }
    }
}
