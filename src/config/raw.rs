//! The raw serde shapes of the configuration layers, before validation.
//!
//! Every table denies unknown fields, so a misspelled setting is an error rather than silently
//! ignored. [`RawSettings::read`] reads each table on its own (each caller, each environment),
//! so one wrong value is reported without hiding the problems of the others. Sections whose validated form is the same as their raw form (`[server]`, `[cache]`,
//! `[users]`, `[telemetry]`) are deserialised into their owners' types directly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, File, FileFormat, Value};
use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::DEFAULT_TOML;
use super::describe::{describe, describe_at};

use super::server::ServerSettings;
use crate::broker::CacheSettings;
use crate::idp::{
    AudienceParam, ClientAuth, DEFAULT_LIFETIME, DEFAULT_MAX_CONCURRENT_FETCHES,
    DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT, RequestFormat,
};
use crate::telemetry::audit::TelemetrySettings;
use crate::user_tokens::UserSettings;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    pub(super) server: ServerSettings,
    pub(super) cache: CacheSettings,
    pub(super) auth: RawAuth,
    pub(super) users: UserSettings,
    #[serde(default)]
    pub(super) callers: BTreeMap<String, RawCaller>,
    #[serde(default)]
    pub(super) tenants: BTreeMap<String, RawTenant>,
    pub(super) shared_cache: RawSharedCache,
    pub(super) telemetry: TelemetrySettings,
    /// Callers that could not be read (their problems are listed already).
    #[serde(skip)]
    pub(super) unreadable_callers: usize,
    /// Settings (`server.listen`, `callers.billing.allow`) set aside because they could not be
    /// read: their problem is listed already, so what their absence causes is not.
    #[serde(skip)]
    pub(super) set_aside: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSharedCache {
    pub(super) url: Option<SecretString>,
    pub(super) key_prefix: String,
    pub(super) encryption_key_env: Option<String>,
    pub(super) previous_encryption_key_env: Option<String>,
    #[serde(with = "humantime_serde")]
    pub(super) timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) lock_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) wait_for_peer: Duration,
    #[serde(default)]
    pub(super) tls: Option<RawRedisTls>,
    #[serde(default)]
    pub(super) username: Option<String>,
    #[serde(default)]
    pub(super) password_env: Option<String>,
    #[serde(default)]
    pub(super) password_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) sentinels: Vec<String>,
    /// `None` when not set, so that an empty list is reported.
    #[serde(default)]
    pub(super) cluster_nodes: Option<Vec<String>>,
    #[serde(default)]
    pub(super) master_name: Option<String>,
    #[serde(default)]
    pub(super) sentinel_username: Option<String>,
    #[serde(default)]
    pub(super) sentinel_password_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedisTls {
    pub(super) ca_file: Option<PathBuf>,
    pub(super) certificate_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) admin_key_sha256: Option<String>,
    pub(super) metrics_key_sha256: Option<String>,
    pub(super) allow_anonymous: bool,
    pub(super) default_idp_requests_per_minute: u32,
    #[serde(default)]
    pub(super) workload: Option<RawWorkload>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkload {
    pub(super) audience: Option<String>,
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub(super) leeway: Duration,
    #[serde(default = "default_jwks_refresh_interval", with = "humantime_serde")]
    pub(super) jwks_refresh_interval: Duration,
    #[serde(default = "default_max_remembered")]
    pub(super) max_remembered: usize,
    #[serde(default)]
    pub(super) issuers: Vec<RawIssuer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuer {
    pub(super) issuer: String,
    pub(super) jwks_uri: Option<String>,
    pub(super) jwks_file: Option<PathBuf>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) bearer_token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkloadRule {
    pub(super) issuer: String,
    pub(super) subject: String,
}

fn default_leeway() -> Duration {
    crate::auth::DEFAULT_LEEWAY
}
fn default_jwks_refresh_interval() -> Duration {
    crate::auth::DEFAULT_JWKS_REFRESH_INTERVAL
}
fn default_max_remembered() -> usize {
    crate::auth::DEFAULT_MAX_REMEMBERED
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCaller {
    pub(super) key_sha256: Option<String>,
    #[serde(default)]
    pub(super) allow: Vec<String>,
    #[serde(default)]
    pub(super) organizations: Vec<String>,
    #[serde(default)]
    pub(super) workload: Vec<RawWorkloadRule>,
    pub(super) rate_limit: Option<u32>,
    pub(super) idp_requests_per_minute: Option<u32>,
    pub(super) max_keys: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    #[serde(default)]
    pub(super) environments: BTreeMap<String, RawEnvironment>,
    /// Environments that could not be read (their problems are listed already).
    #[serde(skip)]
    pub(super) unreadable: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEnvironment {
    pub(super) token_url: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<SecretString>,
    pub(super) client_secret_env: Option<String>,
    pub(super) client_secret_file: Option<PathBuf>,
    pub(super) private_key_file: Option<PathBuf>,
    pub(super) private_key_env: Option<String>,
    pub(super) fallback_client_secret_env: Option<String>,
    pub(super) fallback_client_secret_file: Option<PathBuf>,
    pub(super) fallback_private_key_file: Option<PathBuf>,
    pub(super) key_id: Option<String>,
    pub(super) assertion_audience: Option<String>,
    pub(super) audience: Option<String>,
    #[serde(default = "default_request_format")]
    pub(super) request_format: RequestFormat,
    #[serde(default = "default_client_auth")]
    pub(super) client_auth: ClientAuth,
    #[serde(default = "default_audience_param")]
    pub(super) audience_param: AudienceParam,
    #[serde(default)]
    pub(super) extra_params: BTreeMap<String, String>,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub(super) timeout: Duration,
    #[serde(default = "default_lifetime", with = "humantime_serde")]
    pub(super) default_lifetime: Duration,
    pub(super) max_fetches_per_hour: Option<u32>,
    #[serde(default = "default_max_concurrent_fetches")]
    pub(super) max_concurrent_fetches: usize,
    #[serde(default = "default_max_response_bytes")]
    pub(super) max_response_bytes: usize,
    pub(super) authorize_url: Option<String>,
    pub(super) redirect_uri: Option<String>,
    pub(super) revocation_url: Option<String>,
    pub(super) rotation: Option<RawRotation>,
}

/// The raw `rotation` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRotation {
    pub(super) endpoint: Option<String>,
    pub(super) authorized_by: Option<String>,
    #[serde(default = "default_scope")]
    pub(super) scope: String,
    #[serde(default, with = "humantime_serde")]
    pub(super) every: Option<Duration>,
    pub(super) secret_file: Option<PathBuf>,
}

/// The scope asked of the authorising token unless configured: Auth0's for rotating secrets.
fn default_scope() -> String {
    "update:client_keys".to_owned()
}

fn default_max_concurrent_fetches() -> usize {
    DEFAULT_MAX_CONCURRENT_FETCHES
}

fn default_max_response_bytes() -> usize {
    DEFAULT_MAX_RESPONSE_BYTES
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
    DEFAULT_TIMEOUT
}
fn default_lifetime() -> Duration {
    DEFAULT_LIFETIME
}

/// The top-level tables.
const SECTIONS: [&str; 8] = [
    "server",
    "cache",
    "auth",
    "users",
    "callers",
    "tenants",
    "shared_cache",
    "telemetry",
];

impl RawSettings {
    /// The built-in defaults alone (which always read: a unit test says so).
    fn defaults() -> Self {
        Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .build()
            .and_then(Config::try_deserialize)
            .unwrap_or_else(|error| panic!("the built-in defaults do not read: {error}"))
    }

    /// Reads the merged layers table by table; what cannot be read goes to `problems`, and a
    /// table that cannot be read is left at its default (a caller or environment is left out),
    /// so that the others are still validated.
    pub(super) fn read(config: &Config, file: Option<&Path>, problems: &mut Vec<String>) -> Self {
        let mut raw = Self::defaults();
        let top: BTreeMap<String, Value> = match config.clone().try_deserialize() {
            Ok(top) => top,
            Err(error) => {
                problems.push(describe(&error, file));
                return raw;
            }
        };
        for name in top.keys() {
            if !SECTIONS.contains(&name.as_str()) {
                problems.push(format!(
                    "{name}: not a section; the sections are {}",
                    SECTIONS.join(", ")
                ));
            }
        }
        let section = |name: &str| top.get(name).cloned();
        read_into(
            &mut raw.server,
            section("server"),
            "server",
            problems,
            &mut raw.set_aside,
        );
        read_into(
            &mut raw.cache,
            section("cache"),
            "cache",
            problems,
            &mut raw.set_aside,
        );
        read_into(
            &mut raw.auth,
            section("auth"),
            "auth",
            problems,
            &mut raw.set_aside,
        );
        read_into(
            &mut raw.users,
            section("users"),
            "users",
            problems,
            &mut raw.set_aside,
        );
        read_into(
            &mut raw.shared_cache,
            section("shared_cache"),
            "shared_cache",
            problems,
            &mut raw.set_aside,
        );
        read_into(
            &mut raw.telemetry,
            section("telemetry"),
            "telemetry",
            problems,
            &mut raw.set_aside,
        );
        for (name, value) in table(section("callers"), "callers", problems) {
            let at = format!("callers.{name}");
            match read_one(value, &at, problems, &mut raw.set_aside) {
                Some(caller) => {
                    raw.callers.insert(name, caller);
                }
                None => raw.unreadable_callers += 1,
            }
        }
        for (tenant, value) in table(section("tenants"), "tenants", problems) {
            let at = format!("tenants.{tenant}");
            let mut environments = BTreeMap::new();
            let mut unreadable = 0;
            for (key, value) in table(Some(value), &at, problems) {
                if key != "environments" {
                    problems.push(format!(
                        "{at}.{key}: unknown; a tenant has only environments"
                    ));
                    continue;
                }
                let at = format!("{at}.environments");
                for (name, value) in table(Some(value), &at, problems) {
                    let at = format!("{at}.{name}");
                    match read_one(value, &at, problems, &mut raw.set_aside) {
                        Some(environment) => {
                            environments.insert(name, environment);
                        }
                        None => unreadable += 1,
                    }
                }
            }
            raw.tenants.insert(
                tenant,
                RawTenant {
                    environments,
                    unreadable,
                },
            );
        }
        raw
    }
}

/// `value` as `T`, or `None` with the problem (at `at`) in `problems`.
///
/// serde stops at a table's first problem; to list every one, the setting it names is set
/// aside and the table read again, until it reads or a problem names no setting. A setting
/// that is then missing because it was set aside is not a problem of its own.
fn read_one<T: DeserializeOwned>(
    value: Value,
    at: &str,
    problems: &mut Vec<String>,
    set_aside: &mut Vec<String>,
) -> Option<T> {
    let origin = value.origin().map(str::to_owned);
    let mut entries = match value.clone().into_table() {
        Ok(entries) => entries,
        Err(_) => {
            return value
                .try_deserialize()
                .map_err(|error| problems.push(describe_at(&error, at)))
                .ok();
        }
    };
    let mut keys = Vec::new();
    let mut read = None;
    // Each round sets one entry aside, so a table of n entries takes at most n + 1 rounds.
    for _ in 0..=entries.len() {
        let attempt = Value::new(origin.as_ref(), entries.clone());
        let error = match attempt.try_deserialize::<T>() {
            Ok(value) => {
                read = Some(value);
                break;
            }
            Err(error) => error,
        };
        if missing_key(&error).is_some_and(|missing| keys.contains(&missing)) {
            break;
        }
        problems.push(describe_at(&error, at));
        let culprit = named_in(&error.to_string(), "unknown field `").or_else(|| error_key(&error));
        match culprit.filter(|key| entries.remove(key).is_some()) {
            Some(key) => {
                set_aside.push(format!("{at}.{key}"));
                keys.push(key);
            }
            None => break,
        }
    }
    // What still reads is returned even after problems: the configuration is refused anyway, and
    // the checks that follow find the problems of the other settings.
    read
}

/// The setting a reading error is about, when it says (its first path segment).
fn error_key(error: &config::ConfigError) -> Option<String> {
    use config::ConfigError as E;
    let key = match error {
        E::Type { key, .. } | E::At { key, .. } => key.as_deref()?,
        _ => return None,
    };
    key.split(['.', '[']).next().map(str::to_owned)
}

/// The setting a reading error says is missing.
fn missing_key(error: &config::ConfigError) -> Option<String> {
    use config::ConfigError as E;
    match error {
        E::NotFound(key) => Some(key.split(['.', '[']).next().unwrap_or(key).to_owned()),
        E::At { error, .. } => missing_key(error),
        other => named_in(&other.to_string(), "missing field `"),
    }
}

/// The name in backticks right after `prefix` in `text`, as serde writes field names.
fn named_in(text: &str, prefix: &str) -> Option<String> {
    let start = text.find(prefix)? + prefix.len();
    let rest = text.get(start..)?;
    rest.find('`')
        .and_then(|end| rest.get(..end))
        .map(str::to_owned)
}

/// Replaces `slot` with `value` read as `T`, when present and readable.
fn read_into<T: DeserializeOwned>(
    slot: &mut T,
    value: Option<Value>,
    at: &str,
    problems: &mut Vec<String>,
    set_aside: &mut Vec<String>,
) {
    if let Some(read) = value.and_then(|value| read_one(value, at, problems, set_aside)) {
        *slot = read;
    }
}

/// The entries of a table (none when absent); a value that is not a table is a problem.
fn table(value: Option<Value>, at: &str, problems: &mut Vec<String>) -> BTreeMap<String, Value> {
    match value.map(Value::into_table) {
        None => BTreeMap::new(),
        Some(Ok(table)) => table.into_iter().collect(),
        Some(Err(_)) => {
            problems.push(format!("{at}: must be a table"));
            BTreeMap::new()
        }
    }
}
