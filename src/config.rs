//! Typed settings and their validation.
//!
//! Settings are layered with the `config` crate: the built-in `config/default.toml`, then the file
//! named by `--config` / `TOKEN_BROKER_CONFIG`, then environment variables
//! `TOKEN_BROKER__SECTION__KEY`. The raw layers are deserialised into `Raw*` structs and then
//! validated into [`Settings`], collecting every problem so that one start-up lists them all.
//! Client secrets and `private_key_jwt` keys are resolved (inline, from an environment variable or
//! a file) during validation, secrets kept as [`SecretString`] and keys parsed into [`ClientKey`]
//! so that a bad key fails start-up; the shared cache's URL (it may carry a password) and its
//! encryption keys are secrets too. No type here that holds a secret derives `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::Deserialize;

use crate::auth::{AllowRule, KeyHash};
use crate::idp::ClientKey;

/// The documented defaults, compiled in so the binary runs from any working directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of environment variables that override settings (`TOKEN_BROKER__SERVER__LISTEN`).
pub const ENV_PREFIX: &str = "TOKEN_BROKER";

/// The least `server.max_header_bytes` that hyper accepts as its read buffer.
pub const MIN_HEADER_BYTES: usize = 8192;

/// Parameters the broker itself sends; `extra_params` may not override them.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "audience",
    "resource",
    "scope",
    "client_assertion",
    "client_assertion_type",
    "code",
    "code_verifier",
    "redirect_uri",
    "refresh_token",
];

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or parsed (missing file, bad TOML, wrong type).
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// The layers parsed but describe an unusable service; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The validated settings of the whole service.
pub struct Settings {
    /// HTTP listener and shutdown.
    pub server: ServerSettings,
    /// Token cache behaviour.
    pub cache: CacheSettings,
    /// Admin key and anonymous access.
    pub auth: AuthSettings,
    /// User tokens through the authorization-code flow.
    pub users: UserSettings,
    /// Callers allowed to ask for tokens, by name.
    pub callers: BTreeMap<String, CallerSettings>,
    /// Tenants by name, each with its environments.
    pub tenants: BTreeMap<String, TenantSettings>,
    /// The Redis level shared by replicas, when `shared_cache.url` is set.
    pub shared_cache: Option<SharedCacheSettings>,
}

/// Length of a shared cache encryption key: AES-256.
pub const ENCRYPTION_KEY_LEN: usize = 32;

/// An AES-256 key for tokens in the shared cache; zeroed on drop, never printed.
pub type EncryptionKey = SecretBox<[u8; ENCRYPTION_KEY_LEN]>;

/// `[shared_cache]`: Redis as a second cache level shared by every replica.
pub struct SharedCacheSettings {
    /// `redis://[user:password@]host:port[/db]`; secret because it may carry a password.
    pub url: SecretString,
    /// Prefix of every Redis key and of the invalidation channel.
    pub key_prefix: String,
    /// The key new entries are encrypted with.
    pub encryption_key: EncryptionKey,
    /// A second key entries may be encrypted with, accepted for reading during a rotation.
    pub previous_encryption_key: Option<EncryptionKey>,
    /// Bound on each Redis call.
    pub timeout: Duration,
    /// How long the lock that keeps one IdP request per key across replicas lives at most.
    pub lock_ttl: Duration,
    /// How long a replica waits for a peer's IdP request before making its own.
    pub wait_for_peer: Duration,
}

impl SharedCacheSettings {
    /// `host:port` of the Redis server, for logs (never the password).
    pub fn endpoint(&self) -> String {
        redis_endpoint(self.url.expose_secret())
    }
}

impl fmt::Debug for SharedCacheSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCacheSettings")
            .field("endpoint", &self.endpoint())
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("lock_ttl", &self.lock_ttl)
            .field("wait_for_peer", &self.wait_for_peer)
            .finish_non_exhaustive()
    }
}

/// The `host:port` (or socket path) part of a Redis URL, without credentials.
fn redis_endpoint(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .map(|url| match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => url.path().to_owned(),
        })
        .unwrap_or_else(|| "[unparsable URL]".to_owned())
}

/// `[server]`: the listener and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the listener binds, `host:port`.
    pub listen: String,
    /// How long the listener keeps accepting after a shutdown signal while `/readyz` answers
    /// 503, so load balancers notice before connections are refused.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// How long in-flight requests may take to finish after the listener closes.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Bound on the time one request may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Largest accepted request head (request line and headers) in bytes; larger ones get 431.
    pub max_header_bytes: usize,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
}

/// `[server.tls]`: the listener's certificate chain and private key, PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The certificate chain, leaf first.
    pub certificate_file: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// `[cache]`: how tokens are kept and refreshed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// Most keys held at once.
    pub max_entries: u64,
    /// Least validity a handed-out token has left; entries leave the cache this long before expiry.
    #[serde(with = "humantime_serde")]
    pub min_remaining: Duration,
    /// Last fraction of a token's life in which a background refresh starts.
    pub refresh_ahead: f64,
    /// How long an IdP rejection is remembered per key.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
}

/// `[users]`: how user sessions (authorization-code flow) are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSettings {
    /// Most user sessions (handles) held at once; the least recently used go first.
    pub max_sessions: u64,
    /// How long an authorization URL's `state` can be redeemed for a handle.
    #[serde(with = "humantime_serde")]
    pub authorization_timeout: Duration,
    /// A handle nobody asked a token for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

/// `[auth]`: the admin key and whether anonymous callers are served.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Hash of the key that guards `/v1/admin`; admin routes are closed without one.
    pub admin_key_sha256: Option<KeyHash>,
    /// Hash of the key that `/metrics` requires, when set; without one `/metrics` is open.
    pub metrics_key_sha256: Option<KeyHash>,
    /// Serve requests that carry no caller key (a sidecar on localhost).
    pub allow_anonymous: bool,
}

/// `[callers.NAME]`: one calling service.
#[derive(Debug, Clone)]
pub struct CallerSettings {
    /// Hash of the caller's key.
    pub key_sha256: KeyHash,
    /// What the caller may ask for.
    pub allow: Vec<AllowRule>,
    /// Requests per second the caller may make, when limited.
    pub rate_limit: Option<u32>,
}

/// `[tenants.NAME]`: one tenant and its environments.
pub struct TenantSettings {
    /// Environments by name (`production`, `staging`, ...).
    pub environments: BTreeMap<String, Arc<EnvironmentSettings>>,
}

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

/// Where users log in and where the IdP sends them back, for user tokens.
#[derive(Debug)]
pub struct UserLoginSettings {
    /// The IdP's authorization endpoint (Auth0: `https://{domain}/authorize`).
    pub authorize_url: reqwest::Url,
    /// The calling service's callback, registered at the IdP.
    pub redirect_uri: reqwest::Url,
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
    /// Tenant name, for logs and metrics.
    pub tenant: String,
    /// Environment name, for logs and metrics.
    pub environment: String,
    /// The IdP's token endpoint.
    pub token_url: reqwest::Url,
    /// OAuth2 client id.
    pub client_id: String,
    /// Client secret or private key; used only where the request is built.
    pub credential: ClientCredential,
    /// Audience used when the caller names none.
    pub audience: Option<String>,
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
    /// The authorization-code flow, when user tokens are configured.
    pub user_login: Option<UserLoginSettings>,
}

impl EnvironmentSettings {
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

impl Settings {
    /// Loads defaults, then `file` when given, then `TOKEN_BROKER__…` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        let builder = builder.add_source(Environment::with_prefix(ENV_PREFIX).separator("__"));
        let raw: RawSettings = builder.build()?.try_deserialize()?;
        raw.validate(&|name| std::env::var(name).ok())
    }

    /// Loads defaults and then `toml` alone, without the process environment (for tests and
    /// `token-broker dev`). `client_secret_env` is looked up with `env`.
    pub fn from_toml(
        toml: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::from_toml_layers(&[toml], env)
    }

    /// Like [`Settings::from_toml`] with several TOML layers, each over the one before.
    pub fn from_toml_layers(
        layers: &[&str],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        for layer in layers {
            builder = builder.add_source(File::from_str(layer, FileFormat::Toml));
        }
        let raw: RawSettings = builder.build()?.try_deserialize()?;
        raw.validate(env)
    }

    /// The listen address, parsed (validation guarantees it parses).
    pub fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .parse()
            .expect("server.listen is validated on load")
    }

    /// The settings of one environment, when configured.
    pub fn environment(
        &self,
        tenant: &str,
        environment: &str,
    ) -> Option<&Arc<EnvironmentSettings>> {
        self.tenants.get(tenant)?.environments.get(environment)
    }

    /// Every configured environment as (tenant, environment, settings).
    pub fn environments(&self) -> impl Iterator<Item = (&str, &str, &Arc<EnvironmentSettings>)> {
        self.tenants.iter().flat_map(|(tenant, t)| {
            t.environments
                .iter()
                .map(move |(name, settings)| (tenant.as_str(), name.as_str(), settings))
        })
    }

    /// A one-line summary for logs and `check-config` (names and counts, never secrets).
    pub fn summary(&self) -> String {
        let environments: usize = self.tenants.values().map(|t| t.environments.len()).sum();
        let shared_cache = match &self.shared_cache {
            Some(shared) => format!("shared cache at {}", shared.endpoint()),
            None => "no shared cache".to_owned(),
        };
        format!(
            "{} tenant(s), {} environment(s), {} caller(s), listening on {}, {shared_cache}",
            self.tenants.len(),
            environments,
            self.callers.len(),
            self.server.listen
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    server: ServerSettings,
    cache: CacheSettings,
    auth: RawAuth,
    users: UserSettings,
    #[serde(default)]
    callers: BTreeMap<String, RawCaller>,
    #[serde(default)]
    tenants: BTreeMap<String, RawTenant>,
    shared_cache: RawSharedCache,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharedCache {
    url: Option<SecretString>,
    key_prefix: String,
    encryption_key_env: Option<String>,
    previous_encryption_key_env: Option<String>,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    #[serde(with = "humantime_serde")]
    lock_ttl: Duration,
    #[serde(with = "humantime_serde")]
    wait_for_peer: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    admin_key_sha256: Option<String>,
    metrics_key_sha256: Option<String>,
    allow_anonymous: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    key_sha256: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    rate_limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    #[serde(default)]
    environments: BTreeMap<String, RawEnvironment>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvironment {
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    private_key_file: Option<PathBuf>,
    private_key_env: Option<String>,
    key_id: Option<String>,
    assertion_audience: Option<String>,
    audience: Option<String>,
    #[serde(default = "default_request_format")]
    request_format: RequestFormat,
    #[serde(default = "default_client_auth")]
    client_auth: ClientAuth,
    #[serde(default = "default_audience_param")]
    audience_param: AudienceParam,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_lifetime", with = "humantime_serde")]
    default_lifetime: Duration,
    max_fetches_per_hour: Option<u32>,
    #[serde(default = "default_max_concurrent_fetches")]
    max_concurrent_fetches: usize,
    authorize_url: Option<String>,
    redirect_uri: Option<String>,
}

fn default_max_concurrent_fetches() -> usize {
    8
}

fn default_request_format() -> RequestFormat {
    RequestFormat::Json
}
fn default_client_auth() -> ClientAuth {
    ClientAuth::Post
}
fn default_audience_param() -> AudienceParam {
    AudienceParam::Audience
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_lifetime() -> Duration {
    Duration::from_secs(300)
}

/// Whether `name` is a valid tenant, environment or caller name: lower-case `[a-z0-9_-]`, 1-64 long.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl RawSettings {
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();

        if self.server.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "server.listen: '{}' is not an address like 0.0.0.0:8080",
                self.server.listen
            ));
        }
        if self.server.max_body_bytes == 0 {
            problems.push("server.max_body_bytes: must be above 0".to_owned());
        }
        if self.server.request_timeout.is_zero() {
            problems.push("server.request_timeout: must be above 0".to_owned());
        }
        if self.users.max_sessions == 0 {
            problems.push("users.max_sessions: must be at least 1".to_owned());
        }
        if self.users.authorization_timeout.is_zero() || self.users.idle_timeout.is_zero() {
            problems.push(
                "users.authorization_timeout and users.idle_timeout: must be above 0".to_owned(),
            );
        }
        if self.server.max_header_bytes < MIN_HEADER_BYTES {
            problems.push(format!(
                "server.max_header_bytes: {} is below the least the HTTP server accepts ({MIN_HEADER_BYTES})",
                self.server.max_header_bytes
            ));
        }
        if let Some(tls) = &self.server.tls {
            for (name, path) in [
                ("certificate_file", &tls.certificate_file),
                ("key_file", &tls.key_file),
            ] {
                if let Err(e) = std::fs::File::open(path) {
                    problems.push(format!(
                        "server.tls.{name}: cannot read {}: {e}",
                        path.display()
                    ));
                }
            }
        }
        if self.cache.max_entries == 0 {
            problems.push("cache.max_entries: must be at least 1".to_owned());
        }
        if !(0.0..1.0).contains(&self.cache.refresh_ahead) {
            problems.push(format!(
                "cache.refresh_ahead: {} is outside [0, 1): it is the fraction of a token's life left when a refresh starts",
                self.cache.refresh_ahead
            ));
        }

        let admin_key_sha256 = self.auth.admin_key_sha256.as_deref().and_then(|hex| {
            KeyHash::from_hex(hex)
                .map_err(|e| problems.push(format!("auth.admin_key_sha256: {e}")))
                .ok()
        });
        let metrics_key_sha256 = self.auth.metrics_key_sha256.as_deref().and_then(|hex| {
            KeyHash::from_hex(hex)
                .map_err(|e| problems.push(format!("auth.metrics_key_sha256: {e}")))
                .ok()
        });

        let mut callers = BTreeMap::new();
        for (name, raw) in self.callers {
            let at = format!("callers.{name}");
            if !is_valid_name(&name) {
                problems.push(format!(
                    "{at}: caller names are lower-case [a-z0-9_-], 1-64 long"
                ));
            }
            let key_sha256 = match raw.key_sha256.as_deref().map(KeyHash::from_hex) {
                Some(Ok(hash)) => Some(hash),
                Some(Err(e)) => {
                    problems.push(format!("{at}.key_sha256: {e}"));
                    None
                }
                None => {
                    problems.push(format!(
                        "{at}.key_sha256: missing; make one with `token-broker hash-key`"
                    ));
                    None
                }
            };
            if raw.allow.is_empty() {
                problems.push(format!(
                    "{at}.allow: empty, so the caller may use nothing; add rules like \"acme/production\""
                ));
            }
            let mut allow = Vec::with_capacity(raw.allow.len());
            for rule in &raw.allow {
                match rule.parse::<AllowRule>() {
                    Ok(rule) => allow.push(rule),
                    Err(e) => problems.push(format!("{at}.allow: '{rule}': {e}")),
                }
            }
            if raw.rate_limit == Some(0) {
                problems.push(format!("{at}.rate_limit: must be above 0, or left out"));
            }
            if let Some(key_sha256) = key_sha256 {
                callers.insert(
                    name,
                    CallerSettings {
                        key_sha256,
                        allow,
                        rate_limit: raw.rate_limit,
                    },
                );
            }
        }
        if callers.is_empty() && !self.auth.allow_anonymous && problems.is_empty() {
            problems.push(
                "callers: none configured, so nobody could get a token; add [callers.NAME] with a key from `token-broker hash-key`, or set auth.allow_anonymous = true for a sidecar bound to localhost".to_owned(),
            );
        }

        let mut tenants = BTreeMap::new();
        for (tenant, raw_tenant) in self.tenants {
            if !is_valid_name(&tenant) {
                problems.push(format!(
                    "tenants.{tenant}: tenant names are lower-case [a-z0-9_-], 1-64 long"
                ));
            }
            if raw_tenant.environments.is_empty() {
                problems.push(format!(
                    "tenants.{tenant}: no environments; add [tenants.{tenant}.environments.production]"
                ));
            }
            let mut environments = BTreeMap::new();
            for (environment, raw) in raw_tenant.environments {
                let at = format!("tenants.{tenant}.environments.{environment}");
                if !is_valid_name(&environment) {
                    problems.push(format!(
                        "{at}: environment names are lower-case [a-z0-9_-], 1-64 long"
                    ));
                }
                if let Some(settings) = raw.validate(&tenant, &environment, &at, env, &mut problems)
                {
                    environments.insert(environment, Arc::new(settings));
                }
            }
            tenants.insert(tenant, TenantSettings { environments });
        }

        let shared_cache = self.shared_cache.validate(env, &mut problems);

        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Settings {
            server: self.server,
            cache: self.cache,
            auth: AuthSettings {
                admin_key_sha256,
                metrics_key_sha256,
                allow_anonymous: self.auth.allow_anonymous,
            },
            users: self.users,
            callers,
            tenants,
            shared_cache,
        })
    }
}

impl RawSharedCache {
    /// `None` when no URL is set (the shared level is off); problems go to `problems`.
    fn validate(
        self,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<String>,
    ) -> Option<SharedCacheSettings> {
        let url = self
            .url
            .filter(|url| !url.expose_secret().trim().is_empty())?;
        let before = problems.len();
        let accepted = url
            .expose_secret()
            .split_once("://")
            .is_some_and(|(scheme, _)| {
                matches!(
                    scheme,
                    "redis" | "valkey" | "redis+unix" | "unix" | "valkey+unix"
                )
            });
        if !accepted || redis::Client::open(url.expose_secret()).is_err() {
            // The URL itself is not repeated: it may carry a password.
            problems.push(
                "shared_cache.url: not a usable Redis URL; expected redis://[user:password@]host:port[/db] (TLS, rediss://, is not supported)".to_owned(),
            );
        }
        if self.key_prefix.is_empty() || self.key_prefix.chars().any(char::is_whitespace) {
            problems.push(
                "shared_cache.key_prefix: must be non-empty and without whitespace".to_owned(),
            );
        }
        let encryption_key = match self.encryption_key_env.as_deref() {
            Some(name) => {
                read_encryption_key("shared_cache.encryption_key_env", name, env, problems)
            }
            None => {
                problems.push(
                    "shared_cache.encryption_key_env: missing; name an environment variable holding 32 random bytes in base64 (`openssl rand -base64 32`)".to_owned(),
                );
                None
            }
        };
        let previous_encryption_key =
            self.previous_encryption_key_env
                .as_deref()
                .and_then(|name| {
                    read_encryption_key(
                        "shared_cache.previous_encryption_key_env",
                        name,
                        env,
                        problems,
                    )
                });
        if self.timeout.is_zero() {
            problems.push("shared_cache.timeout: must be above 0".to_owned());
        }
        if self.lock_ttl.is_zero() {
            problems.push("shared_cache.lock_ttl: must be above 0".to_owned());
        }
        if problems.len() != before {
            return None;
        }
        Some(SharedCacheSettings {
            url,
            key_prefix: self.key_prefix,
            encryption_key: encryption_key?,
            previous_encryption_key,
            timeout: self.timeout,
            lock_ttl: self.lock_ttl,
            wait_for_peer: self.wait_for_peer,
        })
    }
}

/// Reads and decodes a 32-byte base64 key from the environment variable `name`.
fn read_encryption_key(
    at: &str,
    name: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Option<EncryptionKey> {
    let Some(value) = env(name).map(SecretString::from) else {
        problems.push(format!("{at}: environment variable {name} is not set"));
        return None;
    };
    // The value is never repeated in a message, not even when it is malformed.
    match STANDARD.decode(value.expose_secret().trim()) {
        Ok(bytes) if bytes.len() == ENCRYPTION_KEY_LEN => {
            let mut key = Box::new([0u8; ENCRYPTION_KEY_LEN]);
            key.copy_from_slice(&bytes);
            let mut bytes = bytes;
            bytes.fill(0);
            Some(SecretBox::new(key))
        }
        _ => {
            problems.push(format!(
                "{at}: {name} must hold exactly 32 bytes in base64 (`openssl rand -base64 32`)"
            ));
            None
        }
    }
}

impl RawEnvironment {
    fn validate(
        self,
        tenant: &str,
        environment: &str,
        at: &str,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<String>,
    ) -> Option<EnvironmentSettings> {
        let before = problems.len();
        let token_url = match self.token_url.as_deref() {
            Some(url) => http_url(at, "token_url", url, problems),
            None => {
                problems.push(format!("{at}.token_url: missing"));
                None
            }
        };
        let credential = self.credential(at, token_url.as_ref(), env, problems);
        let user_login = self.user_login(at, problems);
        let client_id = self.client_id.filter(|id| !id.trim().is_empty());
        if client_id.is_none() {
            problems.push(format!("{at}.client_id: missing"));
        }
        if self
            .audience
            .as_deref()
            .is_some_and(|a| a.trim().is_empty())
        {
            problems.push(format!(
                "{at}.audience: empty; leave it out to have callers name one"
            ));
        }
        for name in self.extra_params.keys() {
            if RESERVED_PARAMS.contains(&name.as_str()) {
                problems.push(format!(
                    "{at}.extra_params.{name}: the broker sets this parameter itself"
                ));
            }
        }
        if self.timeout.is_zero() {
            problems.push(format!("{at}.timeout: must be above 0"));
        }
        if self.default_lifetime.is_zero() {
            problems.push(format!("{at}.default_lifetime: must be above 0"));
        }
        if self.max_fetches_per_hour == Some(0) {
            problems.push(format!(
                "{at}.max_fetches_per_hour: 0 would forbid every request; leave it out for no limit"
            ));
        }
        if self.max_concurrent_fetches == 0 {
            problems.push(format!("{at}.max_concurrent_fetches: must be at least 1"));
        }
        if problems.len() != before {
            return None;
        }
        Some(EnvironmentSettings {
            tenant: tenant.to_owned(),
            environment: environment.to_owned(),
            token_url: token_url?,
            client_id: client_id?,
            credential: credential?,
            audience: self.audience,
            request_format: self.request_format,
            client_auth: self.client_auth,
            audience_param: self.audience_param,
            extra_params: self.extra_params,
            timeout: self.timeout,
            default_lifetime: self.default_lifetime,
            max_fetches_per_hour: self.max_fetches_per_hour,
            max_concurrent_fetches: self.max_concurrent_fetches,
            user_login,
        })
    }

    /// The client secret for `post` and `basic`, or the private key for `private_key_jwt`;
    /// settings of the other mode are refused rather than silently ignored.
    fn credential(
        &self,
        at: &str,
        token_url: Option<&reqwest::Url>,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<String>,
    ) -> Option<ClientCredential> {
        let has_secret = self.client_secret.is_some()
            || self.client_secret_env.is_some()
            || self.client_secret_file.is_some();
        let has_key = self.private_key_file.is_some()
            || self.private_key_env.is_some()
            || self.key_id.is_some()
            || self.assertion_audience.is_some();
        if self.client_auth != ClientAuth::PrivateKeyJwt {
            if has_key {
                problems.push(format!(
                    "{at}: private_key_file, private_key_env, key_id and assertion_audience apply only with client_auth = \"private_key_jwt\""
                ));
            }
            return resolve_secret(
                at,
                self.client_secret.clone(),
                self.client_secret_env.as_deref(),
                self.client_secret_file.as_deref(),
                env,
                problems,
            )
            .map(ClientCredential::Secret);
        }
        if has_secret {
            problems.push(format!(
                "{at}: client_auth = \"private_key_jwt\" signs with a key and sends no secret; remove client_secret, client_secret_env and client_secret_file"
            ));
        }
        let pem = match (&self.private_key_file, &self.private_key_env) {
            (Some(path), None) => match std::fs::read_to_string(path) {
                Ok(pem) => pem,
                Err(e) => {
                    problems.push(format!(
                        "{at}.private_key_file: cannot read {}: {e}",
                        path.display()
                    ));
                    return None;
                }
            },
            (None, Some(name)) => match env(name) {
                Some(pem) => pem,
                None => {
                    problems.push(format!(
                        "{at}.private_key_env: environment variable {name} is not set"
                    ));
                    return None;
                }
            },
            (None, None) => {
                problems.push(format!(
                    "{at}: client_auth = \"private_key_jwt\" needs a PEM key: set private_key_file or private_key_env"
                ));
                return None;
            }
            (Some(_), Some(_)) => {
                problems.push(format!(
                    "{at}: both private_key_file and private_key_env; keep one"
                ));
                return None;
            }
        };
        let key_id = self.key_id.clone().filter(|id| !id.trim().is_empty());
        let key = match ClientKey::from_pem(&pem, key_id) {
            Ok(key) => key,
            Err(e) => {
                let source = if self.private_key_file.is_some() {
                    "private_key_file"
                } else {
                    "private_key_env"
                };
                problems.push(format!("{at}.{source}: {e}"));
                return None;
            }
        };
        let assertion_audience = match &self.assertion_audience {
            Some(audience) if audience.trim().is_empty() => {
                problems.push(format!(
                    "{at}.assertion_audience: empty; leave it out to use the token URL"
                ));
                return None;
            }
            Some(audience) => audience.clone(),
            None => token_url?.to_string(),
        };
        Some(ClientCredential::PrivateKey {
            key: Arc::new(key),
            assertion_audience,
        })
    }

    /// `authorize_url` and `redirect_uri`, both or neither.
    fn user_login(&self, at: &str, problems: &mut Vec<String>) -> Option<UserLoginSettings> {
        match (&self.authorize_url, &self.redirect_uri) {
            (None, None) => None,
            (Some(authorize_url), Some(redirect_uri)) => {
                let authorize_url = http_url(at, "authorize_url", authorize_url, problems);
                let redirect_uri = http_url(at, "redirect_uri", redirect_uri, problems);
                if redirect_uri
                    .as_ref()
                    .is_some_and(|uri| uri.fragment().is_some())
                {
                    problems.push(format!(
                        "{at}.redirect_uri: must not have a #fragment (RFC 6749 §3.1.2)"
                    ));
                    return None;
                }
                Some(UserLoginSettings {
                    authorize_url: authorize_url?,
                    redirect_uri: redirect_uri?,
                })
            }
            _ => {
                problems.push(format!(
                    "{at}: user tokens need both authorize_url and redirect_uri"
                ));
                None
            }
        }
    }
}

/// An absolute http(s) URL, or a problem naming the setting.
fn http_url(at: &str, name: &str, url: &str, problems: &mut Vec<String>) -> Option<reqwest::Url> {
    match reqwest::Url::parse(url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Some(url),
        _ => {
            problems.push(format!("{at}.{name}: not an http(s) URL"));
            None
        }
    }
}

/// Resolves exactly one of `client_secret`, `client_secret_env` and `client_secret_file`.
fn resolve_secret(
    at: &str,
    inline: Option<SecretString>,
    from_env: Option<&str>,
    from_file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Option<SecretString> {
    let given = [inline.is_some(), from_env.is_some(), from_file.is_some()];
    match given.iter().filter(|g| **g).count() {
        0 => {
            problems.push(format!(
                "{at}: no client secret; set one of client_secret_env, client_secret_file or client_secret"
            ));
            return None;
        }
        1 => {}
        _ => {
            problems.push(format!(
                "{at}: more than one of client_secret, client_secret_env and client_secret_file; keep one"
            ));
            return None;
        }
    }
    let secret = if let Some(secret) = inline {
        secret
    } else if let Some(name) = from_env {
        match env(name) {
            Some(value) => SecretString::from(value),
            None => {
                problems.push(format!(
                    "{at}.client_secret_env: environment variable {name} is not set"
                ));
                return None;
            }
        }
    } else {
        let path = from_file?;
        match std::fs::read_to_string(path) {
            Ok(text) => SecretString::from(text.trim().to_owned()),
            Err(e) => {
                problems.push(format!(
                    "{at}.client_secret_file: cannot read {}: {e}",
                    path.display()
                ));
                return None;
            }
        }
    };
    if secret.expose_secret().trim().is_empty() {
        problems.push(format!("{at}: the client secret is empty"));
        return None;
    }
    Some(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn secret(environment: &EnvironmentSettings) -> &str {
        match &environment.credential {
            ClientCredential::Secret(secret) => secret.expose_secret(),
            ClientCredential::PrivateKey { .. } => panic!("expected a client secret"),
        }
    }

    fn problems(toml: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
        match Settings::from_toml(toml, env) {
            Err(ConfigError::Invalid(problems)) => problems.join("\n"),
            Err(other) => panic!("expected validation problems, got {other}"),
            Ok(_) => panic!("expected validation problems"),
        }
    }

    #[test]
    fn defaults_alone_are_refused_without_callers() {
        let Err(ConfigError::Invalid(problems)) = Settings::from_toml("", &no_env) else {
            panic!("expected a validation error");
        };
        assert!(problems[0].contains("allow_anonymous"), "{problems:?}");
    }

    #[test]
    fn a_full_configuration_loads() {
        let toml = format!(
            r#"
            [callers.billing]
            key_sha256 = "{HASH}"
            allow = ["acme/production", "globex/*"]

            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = "00123"
            client_secret_env = "ACME_SECRET"
            audience = "https://api.example"
            request_format = "form"
            client_auth = "basic"
            audience_param = "resource"
            extra_params = {{ tenant = "example.com" }}
            "#
        );
        let env = |name: &str| (name == "ACME_SECRET").then(|| "s3cret".to_owned());
        let settings = Settings::from_toml(&toml, &env).expect("valid");
        let production = settings
            .environment("acme", "production")
            .expect("configured");
        assert_eq!(production.client_id, "00123");
        assert_eq!(secret(production), "s3cret");
        assert_eq!(production.request_format, RequestFormat::Form);
        assert_eq!(production.extra_params["tenant"], "example.com");
        assert!(!format!("{production:?}").contains("s3cret"));
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let toml = r#"
            [server]
            listen = "nowhere"
            [cache]
            refresh_ahead = 1.5
            [callers.Billing]
            key_sha256 = "abc"
            allow = ["acme"]
            [tenants.acme.environments.production]
            token_url = "ftp://x"
            client_secret = "a"
            client_secret_env = "B"
            extra_params = { grant_type = "password" }
        "#;
        let Err(ConfigError::Invalid(problems)) = Settings::from_toml(toml, &no_env) else {
            panic!("expected a validation error");
        };
        let all = problems.join("\n");
        for expected in [
            "server.listen",
            "cache.refresh_ahead",
            "callers.Billing: caller names",
            "callers.Billing.key_sha256",
            "callers.Billing.allow: 'acme'",
            "token_url",
            "client_id: missing",
            "more than one of client_secret",
            "extra_params.grant_type",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    const SHARED_BASE: &str = r#"
        [auth]
        allow_anonymous = true
        [shared_cache]
        url = "redis://:hunter2@redis.internal:6380/2"
        encryption_key_env = "CACHE_KEY"
    "#;

    fn cache_key_env(name: &str) -> Option<String> {
        match name {
            "CACHE_KEY" => Some(STANDARD.encode([7u8; 32])),
            "OLD_CACHE_KEY" => Some(format!("  {}\n", STANDARD.encode([8u8; 32]))),
            "SHORT_KEY" => Some(STANDARD.encode([1u8; 16])),
            "NOT_BASE64" => Some("this is not base64!".to_owned()),
            _ => None,
        }
    }

    #[test]
    fn the_shared_cache_is_off_without_a_url_and_configured_with_one() {
        let off = Settings::from_toml("[auth]\nallow_anonymous = true", &no_env).expect("valid");
        assert!(off.shared_cache.is_none());

        let layers = [
            SHARED_BASE,
            r#"
            [shared_cache]
            previous_encryption_key_env = "OLD_CACHE_KEY"
            timeout = "50ms"
        "#,
        ];
        let settings = Settings::from_toml_layers(&layers, &cache_key_env).expect("valid");
        let shared = settings.shared_cache.as_ref().expect("configured");
        assert_eq!(shared.key_prefix, "token-broker:");
        assert_eq!(shared.timeout, Duration::from_millis(50));
        assert_eq!(shared.lock_ttl, Duration::from_secs(15));
        assert_eq!(shared.wait_for_peer, Duration::from_secs(10));
        assert_eq!(shared.encryption_key.expose_secret(), &[7u8; 32]);
        let previous = shared.previous_encryption_key.as_ref().expect("set");
        assert_eq!(previous.expose_secret(), &[8u8; 32]);
        assert!(
            settings
                .summary()
                .ends_with("shared cache at redis.internal:6380")
        );
        let debug = format!("{shared:?}");
        assert!(debug.contains("redis.internal:6380"), "{debug}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("7, 7"),
            "{debug}"
        );
    }

    #[test]
    fn every_shared_cache_problem_is_listed_without_secrets() {
        let toml = r#"
            [auth]
            allow_anonymous = true
            [shared_cache]
            url = "http://:hunter2@redis.internal"
            key_prefix = ""
            previous_encryption_key_env = "SHORT_KEY"
            timeout = "0s"
            lock_ttl = "0s"
        "#;
        let Err(ConfigError::Invalid(problems)) = Settings::from_toml(toml, &cache_key_env) else {
            panic!("expected a validation error");
        };
        let all = problems.join("\n");
        for expected in [
            "shared_cache.url: not a usable Redis URL",
            "shared_cache.key_prefix",
            "shared_cache.encryption_key_env: missing",
            "shared_cache.previous_encryption_key_env: SHORT_KEY must hold exactly 32 bytes",
            "shared_cache.timeout",
            "shared_cache.lock_ttl",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert!(!all.contains("hunter2"), "{all}");

        for (name, expected) in [
            ("UNSET", "environment variable UNSET is not set"),
            (
                "NOT_BASE64",
                "NOT_BASE64 must hold exactly 32 bytes in base64",
            ),
        ] {
            let layer = format!("[shared_cache]\nencryption_key_env = \"{name}\"");
            let Err(ConfigError::Invalid(problems)) =
                Settings::from_toml_layers(&[SHARED_BASE, &layer], &cache_key_env)
            else {
                panic!("expected a validation error for {name}");
            };
            assert!(problems.join("\n").contains(expected), "{problems:?}");
            assert!(!problems.join("\n").contains("this is not base64"));
        }
    }

    #[test]
    fn secret_file_is_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "from-file\n").expect("write");
        let toml = format!(
            r#"
            [auth]
            allow_anonymous = true
            [tenants.acme.environments.staging]
            token_url = "http://127.0.0.1:1/oauth/token"
            client_id = "id"
            client_secret_file = "{}"
            "#,
            path.display()
        );
        let settings = Settings::from_toml(&toml, &no_env).expect("valid");
        let staging = settings.environment("acme", "staging").expect("configured");
        assert_eq!(secret(staging), "from-file");
    }

    fn ec_key_pem() -> String {
        use aws_lc_rs::encoding::AsDer as _;
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        use base64::Engine as _;
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let der = key.private_key().as_der().unwrap();
        let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        format!("-----BEGIN EC PRIVATE KEY-----\n{body}\n-----END EC PRIVATE KEY-----\n")
    }

    #[test]
    fn private_key_jwt_needs_a_key_and_no_secret() {
        let base = r#"
            [auth]
            allow_anonymous = true
            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = "id"
            client_auth = "private_key_jwt"
        "#;
        let pem = ec_key_pem();
        let env = |name: &str| (name == "ACME_KEY").then(|| pem.clone());
        let toml = format!("{base}private_key_env = \"ACME_KEY\"\nkey_id = \"k1\"\n");
        let settings = Settings::from_toml(&toml, &env).expect("valid");
        let production = settings.environment("acme", "production").unwrap();
        let ClientCredential::PrivateKey {
            key,
            assertion_audience,
        } = &production.credential
        else {
            panic!("expected a private key");
        };
        assert_eq!(key.algorithm(), "ES256");
        assert_eq!(key.key_id(), Some("k1"));
        assert_eq!(assertion_audience, "https://acme.example/oauth/token");
        let debug = format!("{production:?}");
        assert!(!debug.contains(&pem[40..80]), "{debug}");

        let audience = format!(
            "{base}private_key_env = \"ACME_KEY\"\nassertion_audience = \"https://acme.example/\"\n"
        );
        let settings = Settings::from_toml(&audience, &env).expect("valid");
        let production = settings.environment("acme", "production").unwrap();
        assert!(matches!(
            &production.credential,
            ClientCredential::PrivateKey { assertion_audience, .. } if assertion_audience == "https://acme.example/"
        ));

        assert!(problems(base, &env).contains("needs a PEM key"));
        let both = format!("{base}private_key_env = \"ACME_KEY\"\nclient_secret = \"s\"\n");
        assert!(problems(&both, &env).contains("remove client_secret"));
        let unset = format!("{base}private_key_env = \"OTHER\"\n");
        assert!(problems(&unset, &env).contains("OTHER is not set"));
        let garbage = |_: &str| Some("not a key".to_owned());
        let bad = format!("{base}private_key_env = \"ACME_KEY\"\n");
        assert!(problems(&bad, &garbage).contains("private_key_env: not PEM"));
        let key_with_secret = base.replace(
            "client_auth = \"private_key_jwt\"",
            "client_secret = \"s\"\nkey_id = \"k\"",
        );
        assert!(problems(&key_with_secret, &no_env).contains("apply only with client_auth"));
    }

    #[test]
    fn user_login_needs_both_urls() {
        let base = r#"
            [auth]
            allow_anonymous = true
            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = "id"
            client_secret = "s"
        "#;
        let both = format!(
            "{base}authorize_url = \"https://acme.example/authorize\"\nredirect_uri = \"https://app.example/callback\"\n"
        );
        let settings = Settings::from_toml(&both, &no_env).expect("valid");
        let login = settings
            .environment("acme", "production")
            .unwrap()
            .user_login
            .as_ref();
        assert_eq!(
            login.unwrap().redirect_uri.as_str(),
            "https://app.example/callback"
        );
        let one = format!("{base}authorize_url = \"https://acme.example/authorize\"\n");
        assert!(problems(&one, &no_env).contains("both authorize_url and redirect_uri"));
        let fragment = format!(
            "{base}authorize_url = \"https://acme.example/authorize\"\nredirect_uri = \"https://app.example/cb#x\"\n"
        );
        assert!(problems(&fragment, &no_env).contains("fragment"));
    }
}
