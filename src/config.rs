//! Typed settings and their validation.
//!
//! Settings are layered with the `config` crate: the built-in `config/default.toml`, then the file
//! named by `--config` / `TOKEN_BROKER_CONFIG`, then environment variables
//! `TOKEN_BROKER__SECTION__KEY`. The raw layers are deserialised into `Raw*` structs and then
//! validated into [`Settings`], collecting every problem so that one start-up lists them all.
//! Client secrets are resolved (inline, from an environment variable or a file) during validation
//! and kept as [`SecretString`]; no type here that holds a secret derives `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::auth::{AllowRule, KeyHash};

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
    /// Callers allowed to ask for tokens, by name.
    pub callers: BTreeMap<String, CallerSettings>,
    /// Tenants by name, each with its environments.
    pub tenants: BTreeMap<String, TenantSettings>,
}

/// `[server]`: the listener and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the listener binds, `host:port`.
    pub listen: String,
    /// How long in-flight requests may take to finish after a shutdown signal.
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

/// Where the client credentials go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the body.
    Post,
    /// HTTP Basic (RFC 6749 §2.3.1), and nothing in the body.
    Basic,
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
    /// OAuth2 client secret; exposed only where the request is built.
    pub client_secret: SecretString,
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
            .field("client_secret", &"[redacted]")
            .field("audience", &self.audience)
            .field("request_format", &self.request_format)
            .field("client_auth", &self.client_auth)
            .field("audience_param", &self.audience_param)
            .field("extra_params", &self.extra_params)
            .field("timeout", &self.timeout)
            .field("max_fetches_per_hour", &self.max_fetches_per_hour)
            .finish_non_exhaustive()
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
        format!(
            "{} tenant(s), {} environment(s), {} caller(s), listening on {}",
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
    #[serde(default)]
    callers: BTreeMap<String, RawCaller>,
    #[serde(default)]
    tenants: BTreeMap<String, RawTenant>,
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
            callers,
            tenants,
        })
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
        let token_url = match self.token_url.as_deref().map(reqwest::Url::parse) {
            Some(Ok(url)) if matches!(url.scheme(), "http" | "https") => Some(url),
            Some(Ok(_)) | Some(Err(_)) => {
                problems.push(format!("{at}.token_url: not an http(s) URL"));
                None
            }
            None => {
                problems.push(format!("{at}.token_url: missing"));
                None
            }
        };
        let client_id = self.client_id.filter(|id| !id.trim().is_empty());
        if client_id.is_none() {
            problems.push(format!("{at}.client_id: missing"));
        }
        let client_secret = resolve_secret(
            at,
            self.client_secret,
            self.client_secret_env.as_deref(),
            self.client_secret_file.as_deref(),
            env,
            problems,
        );
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
        if problems.len() != before {
            return None;
        }
        Some(EnvironmentSettings {
            tenant: tenant.to_owned(),
            environment: environment.to_owned(),
            token_url: token_url?,
            client_id: client_id?,
            client_secret: client_secret?,
            audience: self.audience,
            request_format: self.request_format,
            client_auth: self.client_auth,
            audience_param: self.audience_param,
            extra_params: self.extra_params,
            timeout: self.timeout,
            default_lifetime: self.default_lifetime,
            max_fetches_per_hour: self.max_fetches_per_hour,
        })
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
        assert_eq!(production.client_secret.expose_secret(), "s3cret");
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
        assert_eq!(staging.client_secret.expose_secret(), "from-file");
    }
}
