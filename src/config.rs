//! Configuration: loads the layers, validates them, and composes each component's settings.
//!
//! Settings are layered with the `config` crate: the built-in `config/default.toml`, then the file
//! named by `--config` / `TOKEN_BROKER_CONFIG`, then environment variables
//! `TOKEN_BROKER__SECTION__KEY`. The raw layers are deserialised into the serde shapes of [`raw`]
//! and then validated section by section ([`server`], [`callers`], [`environments`],
//! [`shared_cache`], with [`secrets`] resolving client secrets), collecting every problem so that
//! one start-up lists them all. The validated types belong to the components that consume them
//! (`idp`, `broker`, `auth`, `user_tokens`, `shared_cache`); this module only builds them. Secrets
//! are kept as `SecretString` and never printed.

mod callers;
mod describe;
mod environments;
mod pem;
mod raw;
mod rotation;
mod secrets;
mod server;
mod shared_cache;
mod workload;

use describe::{describe, with_source};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};

use crate::auth::{AuthSettings, CallerSettings, is_valid_name};
use crate::broker::CacheSettings;
use crate::idp::EnvironmentSettings;
use crate::shared_cache::SharedCacheSettings;
use crate::telemetry::audit::TelemetrySettings;
use crate::user_tokens::UserSettings;

use raw::RawSettings;
pub use server::{MIN_HEADER_BYTES, ServerSettings, TlsSettings};

/// One configuration layer, over the built-in defaults and the layers before it.
#[derive(Debug, Clone, Copy)]
pub enum Layer<'a> {
    /// TOML text.
    Toml(&'a str),
    /// A TOML file, which must exist.
    File(&'a Path),
}

/// The documented defaults, compiled in so the binary runs from any working directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of environment variables that override settings (`TOKEN_BROKER__SERVER__LISTEN`).
pub const ENV_PREFIX: &str = "TOKEN_BROKER";

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layers describe no usable service; every problem is listed. A problem names the file,
    /// line and column of a syntax error, or the setting and its source, and never quotes a value
    /// or a source line: either may hold a secret.
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
    /// The audit trail.
    pub telemetry: TelemetrySettings,
    /// The configuration file and every file it names (`*_file` settings), which
    /// `server.watch_interval` checks for a change.
    pub watched_files: Vec<PathBuf>,
}

/// `[tenants.NAME]`: one tenant and its environments.
pub struct TenantSettings {
    /// Environments by name (`production`, `staging`, ...).
    pub environments: BTreeMap<String, Arc<EnvironmentSettings>>,
}

impl Settings {
    /// Loads defaults, then `file` when given, then `TOKEN_BROKER__…` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let layers: Vec<Layer<'_>> = file.map(Layer::File).into_iter().collect();
        Self::from_layers(&layers, true, &|name| std::env::var(name).ok())
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
        let layers: Vec<Layer<'_>> = layers.iter().copied().map(Layer::Toml).collect();
        Self::from_layers(&layers, false, env)
    }

    /// Loads the built-in defaults, then `layers` in order, then (with `variables`) the
    /// `TOKEN_BROKER__…` environment variables. Settings that name an environment variable
    /// (`client_secret_env`, …) are looked up with `env`. Every problem is listed at once: each
    /// table is read on its own, so a wrong value in one hides nothing in another.
    pub fn from_layers(
        layers: &[Layer<'_>],
        variables: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        let mut file = None;
        for layer in layers {
            builder = match layer {
                Layer::Toml(text) => builder.add_source(File::from_str(text, FileFormat::Toml)),
                Layer::File(path) => {
                    file = Some(*path);
                    builder.add_source(File::from(*path).format(FileFormat::Toml).required(true))
                }
            };
        }
        if variables {
            builder = builder.add_source(Environment::with_prefix(ENV_PREFIX).separator("__"));
        }
        // A syntax error (or a missing file) leaves nothing to read: it is the one problem.
        let config = builder
            .build()
            .map_err(|error| ConfigError::Invalid(vec![describe(&error, file)]))?;
        let mut problems = Vec::new();
        let raw = RawSettings::read(&config, file, &mut problems);
        let watched_files = named_files(&config, file);
        let mut settings = raw.validate(problems, env).map_err(|error| match error {
            ConfigError::Invalid(problems) if variables || file.is_some() => ConfigError::Invalid(
                problems
                    .into_iter()
                    .map(|problem| with_source(problem, file))
                    .collect(),
            ),
            other => other,
        })?;
        settings.watched_files = watched_files;
        Ok(settings)
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

    /// The settings that differ from `running`'s but are read only at start, so a reload cannot
    /// apply them (named by path, never by value).
    pub fn needing_restart(&self, running: &Settings) -> Vec<String> {
        let mut changed = server::needing_restart(&self.server, &running.server);
        if self.cache != running.cache {
            changed.push("cache".to_owned());
        }
        if self.users != running.users {
            changed.push("users".to_owned());
        }
        if self.telemetry != running.telemetry {
            changed.push("telemetry".to_owned());
        }
        let same_shared = match (&self.shared_cache, &running.shared_cache) {
            (None, None) => true,
            // New credentials are applied; another place needs a restart.
            (Some(new), Some(old)) => new.same_place(old),
            _ => false,
        };
        if !same_shared {
            changed.push("shared_cache".to_owned());
        }
        changed
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

impl RawSettings {
    /// Validates the layers read into `self`; `problems` holds what reading them found already.
    fn validate(
        mut self,
        mut problems: Vec<String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let read_problems = problems.len();
        let set_aside = std::mem::take(&mut self.set_aside);
        let configured_callers = self.callers.len() + self.unreadable_callers;
        server::check(&self.server, &mut problems);
        for (path, value) in [
            ("server.request_timeout", self.server.request_timeout),
            ("server.drain_delay", self.server.drain_delay),
            ("server.shutdown_grace", self.server.shutdown_grace),
            ("shared_cache.timeout", self.shared_cache.timeout),
            ("shared_cache.lock_ttl", self.shared_cache.lock_ttl),
            (
                "shared_cache.wait_for_peer",
                self.shared_cache.wait_for_peer,
            ),
        ] {
            at_most(path, value, HOUR, &mut problems);
        }
        check_cache(&self.cache, &mut problems);
        check_users(&self.users, &mut problems);
        check_telemetry(&self.telemetry, &mut problems);
        let auth = callers::auth(&self.auth, &mut problems);
        // Issuers configured, valid or not: a rule naming an invalid one has its cause listed.
        let configured_issuers: Vec<&str> = self
            .auth
            .workload
            .iter()
            .flat_map(|workload| workload.issuers.iter().map(|raw| raw.issuer.as_str()))
            .collect();
        let callers = callers::callers(self.callers, &auth, &configured_issuers, &mut problems);
        if auth.allow_anonymous {
            check_anonymous(&self.server, !callers.is_empty(), &mut problems);
        }
        // A caller that is only unreadable has its problem listed already.
        // A caller whose settings are wrong has its problems listed; "none" is only for none.
        if configured_callers == 0 && !auth.allow_anonymous {
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
            if raw_tenant.environments.is_empty() && raw_tenant.unreadable == 0 {
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
        rotation::link(&mut tenants, shared_cache.is_some(), &mut problems);
        if let Some(shared) = &shared_cache {
            check_timings(&self.server, &tenants, shared, &mut problems);
        }

        if !problems.is_empty() {
            // A setting set aside while reading has its problem listed: what its absence
            // causes (a default in its place, "missing") is a consequence, not news.
            let mut index = 0;
            problems.retain(|problem| {
                index += 1;
                index <= read_problems
                    || !set_aside.iter().any(|path| {
                        problem
                            .strip_prefix(path.as_str())
                            .is_some_and(|rest| rest.starts_with([':', '.', '[', ' ']))
                    })
            });
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Settings {
            server: self.server,
            cache: self.cache,
            auth,
            users: self.users,
            callers,
            tenants,
            shared_cache,
            telemetry: self.telemetry,
            watched_files: Vec::new(),
        })
    }
}

/// The files a merged configuration names: the value of every `*_file` setting, in tables and
/// in arrays of tables alike, after `file` (the configuration file itself) when there is one.
fn named_files(config: &Config, file: Option<&Path>) -> Vec<PathBuf> {
    fn walk(value: &config::Value, key: Option<&str>, found: &mut Vec<PathBuf>) {
        match &value.kind {
            config::ValueKind::Table(table) => {
                for (name, value) in table {
                    walk(value, Some(name), found);
                }
            }
            config::ValueKind::Array(values) => {
                for value in values {
                    walk(value, None, found);
                }
            }
            // `rotation.secret_file` is the broker's to write, not a source to watch.
            config::ValueKind::String(path)
                if key.is_some_and(|key| key.ends_with("_file") && key != "secret_file") =>
            {
                found.push(PathBuf::from(path));
            }
            _ => {}
        }
    }
    let mut found: Vec<PathBuf> = file.map(Path::to_path_buf).into_iter().collect();
    if let Ok(table) = config
        .clone()
        .try_deserialize::<BTreeMap<String, config::Value>>()
    {
        for (name, value) in &table {
            walk(value, Some(name), &mut found);
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The timings of the shared level against each other: the fetch lock outlives any fetch, a
/// replica waits for a peer as long as a fetch may take, and a request waits for both.
fn check_timings(
    server: &ServerSettings,
    tenants: &BTreeMap<String, TenantSettings>,
    shared: &SharedCacheSettings,
    problems: &mut Vec<String>,
) {
    let Some((longest, at)) = tenants
        .iter()
        .flat_map(|(tenant, t)| {
            t.environments.iter().map(move |(name, environment)| {
                (
                    environment.timeout,
                    format!("tenants.{tenant}.environments.{name}.timeout"),
                )
            })
        })
        .max_by_key(|(timeout, _)| *timeout)
    else {
        return;
    };
    let show = |d: std::time::Duration| humantime::format_duration(d).to_string();
    // The lock holder looks in Redis, asks the IdP, then stores: two Redis calls besides.
    let fetch = longest.saturating_add(shared.timeout.saturating_mul(2));
    if shared.lock_ttl <= fetch {
        problems.push(format!(
            "shared_cache.lock_ttl: must be longer than the longest environment timeout ({} at {at}) plus two shared_cache.timeout ({} in all), or a slow fetch outlives its lock and another replica asks the IdP too",
            show(longest),
            show(fetch)
        ));
    }
    if shared.wait_for_peer < fetch {
        problems.push(format!(
            "shared_cache.wait_for_peer: must be at least the longest environment timeout ({} at {at}) plus two shared_cache.timeout ({} in all), or replicas stop waiting for a fetch still under way and ask the IdP too",
            show(longest),
            show(fetch)
        ));
    }
    let needed = shared.wait_for_peer.saturating_add(longest);
    if server.request_timeout < needed {
        problems.push(format!(
            "server.request_timeout: must be at least shared_cache.wait_for_peer plus the longest environment timeout ({}), or requests time out while the fetch they wait on can still succeed",
            show(needed)
        ));
    }
}

/// Anonymous access is for a sidecar alone on loopback: never beside configured callers (a
/// request without a key would get every tenant), never on an address others can reach.
fn check_anonymous(server: &ServerSettings, has_callers: bool, problems: &mut Vec<String>) {
    if has_callers {
        problems.push(
            "auth.allow_anonymous: refused together with [callers]: a request without a key would be served every tenant; remove it (callers present their keys) or remove the callers".to_owned(),
        );
    }
    if server
        .listen
        .parse::<SocketAddr>()
        .is_ok_and(|address| !address.ip().is_loopback())
    {
        problems.push(
            "auth.allow_anonymous: refused while server.listen is not a loopback address (127.0.0.1 or [::1]): anyone who reaches the port would get tokens; bind to loopback, or configure callers".to_owned(),
        );
    }
}

/// An hour, a day and a year, the bounds of durations in the configuration: far beyond any
/// sensible value, and far from where time arithmetic could overflow.
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// A problem when the duration at `path` is above `max`.
fn at_most(path: &str, value: Duration, max: Duration, problems: &mut Vec<String>) {
    if value > max {
        problems.push(format!(
            "{path}: must be at most {}",
            humantime::format_duration(max)
        ));
    }
}

/// Every problem of `[cache]`.
fn check_cache(cache: &CacheSettings, problems: &mut Vec<String>) {
    at_most("cache.min_remaining", cache.min_remaining, YEAR, problems);
    at_most("cache.negative_ttl", cache.negative_ttl, DAY, problems);
    at_most(
        "cache.min_refetch_interval",
        cache.min_refetch_interval,
        DAY,
        problems,
    );
    if cache.max_entries == 0 {
        problems.push("cache.max_entries: must be at least 1".to_owned());
    }
    if !(0.0..1.0).contains(&cache.refresh_ahead) {
        problems.push(
            "cache.refresh_ahead: must be in [0, 1): it is the fraction of a token's servable life left when a refresh starts".to_owned(),
        );
    }
}

/// Every problem of `[users]`.
fn check_users(users: &UserSettings, problems: &mut Vec<String>) {
    at_most(
        "users.authorization_timeout",
        users.authorization_timeout,
        DAY,
        problems,
    );
    at_most("users.idle_timeout", users.idle_timeout, YEAR, problems);
    if users.max_sessions == 0 {
        problems.push("users.max_sessions: must be at least 1".to_owned());
    }
    if users.max_pending_per_caller == 0 {
        problems.push("users.max_pending_per_caller: must be at least 1".to_owned());
    }
    if users.authorization_timeout.is_zero() || users.idle_timeout.is_zero() {
        problems
            .push("users.authorization_timeout and users.idle_timeout: must be above 0".to_owned());
    }
}

/// Every problem of `[telemetry]`.
fn check_telemetry(telemetry: &TelemetrySettings, problems: &mut Vec<String>) {
    at_most(
        "telemetry.audit_interval",
        telemetry.audit_interval,
        DAY,
        problems,
    );
    if telemetry.audit_max_counters > crate::telemetry::audit::MAX_COUNTERS {
        problems.push(format!(
            "telemetry.audit_max_counters: at most {} (about 200 bytes each); 0 writes every hand-out as a line",
            crate::telemetry::audit::MAX_COUNTERS
        ));
    }
    if telemetry.audit_interval < Duration::from_secs(1) {
        problems.push(
            "telemetry.audit_interval: must be at least 1s (it is how often counted hand-outs are written)"
                .to_owned(),
        );
    }
}

/// Helpers of the tests of every configuration section.
#[cfg(test)]
mod test_support {
    use secrecy::ExposeSecret as _;

    pub(super) use super::{ConfigError, Settings};
    use crate::idp::{ClientCredential, EnvironmentSettings};

    /// A SHA-256 in hex.
    pub(super) const HASH: &str =
        "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";

    /// An environment with no variables set.
    pub(super) fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The client secret of an environment configured with one.
    pub(super) fn secret(environment: &EnvironmentSettings) -> &str {
        match &environment.credential {
            ClientCredential::Secret(secret) => secret.expose_secret(),
            ClientCredential::PrivateKey { .. } => panic!("expected a client secret"),
        }
    }

    /// Every validation problem of `toml`, one per line; panics if it is valid.
    pub(super) fn problems(toml: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
        match Settings::from_toml(toml, env) {
            Err(ConfigError::Invalid(problems)) => problems.join("\n"),
            Ok(_) => panic!("expected validation problems"),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy as _;

    use super::test_support::*;
    use crate::idp::RequestFormat;

    #[test]
    fn the_audit_interval_is_bounded() {
        for (interval, problem) in [("0s", "at least 1s"), ("2d", "telemetry.audit_interval")] {
            let toml = format!("[telemetry]\naudit_interval = \"{interval}\"\n");
            let problems = problems(&toml, &no_env);
            assert!(problems.contains(problem), "{interval}: {problems}");
        }
        let problems = problems("[telemetry]\naudit_every = \"1m\"\n", &no_env);
        assert!(problems.contains("audit_every"), "{problems}");
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
            "callers.Billing.allow[0]",
            "token_url",
            "client_id: missing",
            "more than one of client_secret",
            "extra_params.grant_type",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn every_problem_of_one_table_is_listed_and_no_consequence() {
        let toml = r#"
            [server]
            bogus = 1
            listen = "nowhere"
            [cache]
            min_remaining = "soon"
            refresh_ahead = "half"
            [callers.billing]
            key_sha256 = "abc"
            allow = "acme/*"
            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = ["not", "a", "string"]
            client_secret = "s"
        "#;
        let Err(ConfigError::Invalid(problems)) = Settings::from_toml(toml, &no_env) else {
            panic!("expected a validation error");
        };
        let all = problems.join("\n");
        for expected in [
            "server: unknown field `bogus`",
            "server.listen: not an address",
            "cache.min_remaining:",
            "cache.refresh_ahead:",
            "callers.billing.allow: invalid type",
            "callers.billing.key_sha256: not a SHA-256",
            "tenants.acme.environments.production.client_id: must be a string",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        // Consequences of what is listed already: a caller with a bad key is still configured,
        // a setting that could not be read is not also "missing" or "empty".
        for consequence in [
            "callers: none configured",
            "callers.billing.allow: empty",
            "client_id: missing",
            "cache: min_remaining",
        ] {
            assert!(!all.contains(consequence), "{consequence:?} in:\n{all}");
        }
    }

    #[test]
    fn a_rule_naming_an_issuer_with_an_unreadable_ca_reports_only_the_ca() {
        let toml = r#"
            [auth.workload]
            audience = "token-broker"
            [[auth.workload.issuers]]
            issuer = "https://kubernetes.default.svc"
            jwks_uri = "https://kubernetes.default.svc/openid/v1/jwks"
            ca_file = "/nonexistent/ca.crt"
            [callers.billing]
            allow = ["acme/*"]
            workload = [{ issuer = "https://kubernetes.default.svc", subject = "system:serviceaccount:billing:app" }]
            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = "x"
            client_secret = "y"
        "#;
        let Err(ConfigError::Invalid(problems)) = Settings::from_toml(toml, &no_env) else {
            panic!("expected a validation error");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("auth.workload.issuers[0].ca_file: cannot read"),
            "{problems:?}"
        );
    }

    proptest::proptest! {
        /// Any text as a configuration layer is settings or a configuration error, never a
        /// panic; and no problem repeats the line it came from.
        #[test]
        fn arbitrary_layers_never_panic(layer in "\\PC{0,200}") {
            let _ = Settings::from_toml(&layer, &no_env);
        }

        /// Keys and values of the right sections in arbitrary shapes.
        #[test]
        fn arbitrary_values_of_known_settings_never_panic(
            section in proptest::sample::select(vec!["server", "cache", "auth", "users", "shared_cache", "tenants.acme.environments.production", "callers.billing"]),
            name in "[a-z_]{1,24}",
            value in proptest::prop_oneof![
                "-?[0-9]{1,25}".boxed(),
                "\"[ -~]{0,30}\"".boxed(),
                proptest::strategy::Just("true".to_owned()).boxed(),
                "\\[\"[a-z/*]{0,12}\"\\]".boxed(),
            ],
        ) {
            let _ = Settings::from_toml(&format!("[{section}]\n{name} = {value}\n"), &no_env);
        }
    }

    #[test]
    fn shared_cache_timings_are_checked_against_each_other() {
        let env = |name: &str| {
            (name == "CACHE_KEY").then(|| "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=".to_owned())
        };
        let base = r#"
            [server]
            listen = "127.0.0.1:8080"
            [auth]
            allow_anonymous = true
            [shared_cache]
            url = "redis://127.0.0.1:6379"
            encryption_key_env = "CACHE_KEY"
            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = "id"
            client_secret = "s"
            timeout = "25s"
        "#;
        let all = problems(base, &env);
        for expected in [
            "shared_cache.lock_ttl: must be longer than the longest environment timeout (25s at tenants.acme.environments.production.timeout) plus two shared_cache.timeout (25s 400ms in all)",
            "shared_cache.wait_for_peer: must be at least the longest environment timeout",
            "server.request_timeout: must be at least shared_cache.wait_for_peer plus the longest environment timeout (36s)",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        let fixed = "[shared_cache]\nlock_ttl = \"30s\"\nwait_for_peer = \"26s\"\n[server]\nrequest_timeout = \"51s\"\n";
        assert!(Settings::from_toml_layers(&[base, fixed], &env).is_ok());
    }

    #[test]
    fn errors_never_quote_a_source_line_or_a_value() {
        let syntax = "[tenants.acme.environments.production]\nclient_secret = \"hunter2\" oops\n";
        let message = problems(syntax, &no_env);
        assert!(
            message.contains("TOML syntax error at line 2, column 27"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
        for layer in [
            "[server]\nmax_body_bytes = \"hunter2\"\n",
            "[server]\nrequest_timeout = \"hunter2\"\n",
            "[cache]\nrefresh_ahead = \"hunter2\"\n",
            "[auth]\nallow_anonymous = \"hunter2\"\n",
        ] {
            let Err(error) = Settings::from_toml(layer, &no_env) else {
                panic!("expected an error for {layer}");
            };
            let message = error.to_string();
            assert!(!message.contains("hunter2"), "{message}");
            assert!(
                message.contains("server.")
                    || message.contains("cache.")
                    || message.contains("auth."),
                "{message}"
            );
        }
        let invalid = "[server]\nlisten = \"hunter2\"\n[auth]\nallow_anonymous = true\n";
        let all = problems(invalid, &no_env);
        assert!(
            all.contains("server.listen") && !all.contains("hunter2"),
            "{all}"
        );
    }

    #[test]
    fn anonymous_access_is_only_for_a_lone_sidecar_on_loopback() {
        let on = |listen: &str| {
            format!("[server]\nlisten = \"{listen}\"\n[auth]\nallow_anonymous = true\n")
        };
        assert!(Settings::from_toml(&on("127.0.0.1:8080"), &no_env).is_ok());
        assert!(Settings::from_toml(&on("[::1]:8080"), &no_env).is_ok());
        assert!(problems(&on("0.0.0.0:8080"), &no_env).contains("not a loopback address"));
        let with_callers = format!(
            "{}[callers.billing]\nkey_sha256 = \"{HASH}\"\nallow = [\"acme/*\"]\n",
            on("127.0.0.1:8080")
        );
        assert!(problems(&with_callers, &no_env).contains("refused together with [callers]"));
    }

    #[test]
    fn every_table_is_read_on_its_own_so_every_problem_is_listed() {
        let toml = r#"
            [cache]
            min_remaining = "sixty"
            [callers.billing]
            key_sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
            allow = ["acme/*"]
            rate_limit = "fast"
            [callers.reports]
            min_remainin = "5s"
            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = "id"
            client_secret = "s"
            timeout = "soon"
            [tenants.acme.environments.staging]
            token_url = "ftp://acme.example"
            client_id = "id"
            client_secret = "s"
            [bogus]
            x = 1
        "#;
        let all = problems(toml, &no_env);
        for expected in [
            "cache.min_remaining: invalid value",
            "callers.billing.rate_limit: must be an integer",
            "callers.reports: unknown field `min_remainin`",
            "tenants.acme.environments.production.timeout: invalid value",
            "tenants.acme.environments.staging.token_url: not an http(s) URL",
            "bogus: not a section",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert!(
            !all.contains("no environments") && !all.contains("sixty") && !all.contains("fast"),
            "{all}"
        );
    }

    #[test]
    fn the_built_in_defaults_read() {
        let _ = super::raw::RawSettings::read(
            &config::Config::builder()
                .add_source(config::File::from_str(
                    super::DEFAULT_TOML,
                    config::FileFormat::Toml,
                ))
                .build()
                .unwrap(),
            None,
            &mut Vec::new(),
        );
    }

    #[test]
    fn reading_errors_never_carry_the_value() {
        for (message, secret) in [
            (
                "invalid value: string \"a\\\"hunter2\", expected a duration",
                "hunter2",
            ),
            (
                "invalid type: integer `123456`, expected a string",
                "123456",
            ),
            (
                "enum ClientAuth does not have variant constructor hunter2",
                "hunter2",
            ),
            (
                "unknown variant `hunter2`, expected one of `post`, `basic`",
                "hunter2",
            ),
            ("invalid value: string \"unterminated hunter2", "hunter2"),
        ] {
            let cleaned = super::describe::without_quoted_values(message);
            assert!(!cleaned.contains(secret), "{message} -> {cleaned}");
        }
        let fields =
            super::describe::without_quoted_values("unknown field `listenn`, expected `listen`");
        assert_eq!(fields, "unknown field `listenn`, expected `listen`");
        let all = problems(
            "[auth]\nallow_anonymous = true\n[server]\nlisten = \"127.0.0.1:1\"\n[tenants.acme.environments.production]\ntoken_url = \"https://x\"\nclient_id = \"i\"\nclient_secret = \"s\"\nclient_auth = \"hunter2\"\n",
            &no_env,
        );
        assert!(
            all.contains("client_auth") && !all.contains("hunter2"),
            "{all}"
        );
    }

    #[test]
    fn durations_are_bounded_far_from_overflow() {
        let toml = r#"
            [server]
            listen = "127.0.0.1:1"
            request_timeout = "1000years"
            [cache]
            negative_ttl = "400days"
            [auth]
            allow_anonymous = true
            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = "id"
            client_secret = "s"
            timeout = "2h"
        "#;
        let all = problems(toml, &no_env);
        for expected in [
            "server.request_timeout: must be at most 1h",
            "cache.negative_ttl: must be at most 1day",
            "tenants.acme.environments.production.timeout: must be at most 1h",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }
}
