//! The raw serde shapes of the configuration layers, before validation.
//!
//! Every table denies unknown fields, so a misspelled setting is an error rather than silently
//! ignored. Sections whose validated form is the same as their raw form (`[server]`, `[cache]`,
//! `[users]`) are deserialised into their owners' types directly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::server::ServerSettings;
use crate::broker::CacheSettings;
use crate::idp::{
    AudienceParam, ClientAuth, DEFAULT_LIFETIME, DEFAULT_MAX_CONCURRENT_FETCHES,
    DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT, RequestFormat,
};
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) admin_key_sha256: Option<String>,
    pub(super) metrics_key_sha256: Option<String>,
    pub(super) allow_anonymous: bool,
    pub(super) default_idp_requests_per_minute: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCaller {
    pub(super) key_sha256: Option<String>,
    #[serde(default)]
    pub(super) allow: Vec<String>,
    pub(super) rate_limit: Option<u32>,
    pub(super) idp_requests_per_minute: Option<u32>,
    pub(super) max_keys: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    #[serde(default)]
    pub(super) environments: BTreeMap<String, RawEnvironment>,
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
