//! `[shared_cache]`: the Redis URL, key prefix, encryption keys and timings, validated into the
//! [`SharedCacheSettings`] that `shared_cache` consumes. The URL and the keys are never repeated
//! in a problem.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret as _, SecretBox, SecretString};

use super::pem;
use super::raw::{RawRedisTls, RawSharedCache};
use super::secrets::secret_from_env;
use crate::shared_cache::{
    ClientIdentity, ENCRYPTION_KEY_LEN, EncryptionKey, RedisTarget, RedisTls, SentinelSettings,
    SharedCacheSettings,
};

impl RawSharedCache {
    /// The validated settings; `None` when none of a URL, sentinels and cluster nodes is set
    /// (the shared level is off); problems go to `problems`.
    pub(super) fn validate(
        mut self,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<String>,
    ) -> Option<SharedCacheSettings> {
        let url = self
            .url
            .take()
            .filter(|url| !url.expose_secret().trim().is_empty());
        let cluster_nodes = self.cluster_nodes.take();
        if url.is_none() && self.sentinels.is_empty() && cluster_nodes.is_none() {
            return None;
        }
        let before = problems.len();
        let tls = self.tls.as_ref().and_then(|tls| read_tls(tls, problems));
        let chosen = [
            url.is_some(),
            !self.sentinels.is_empty(),
            cluster_nodes.is_some(),
        ];
        if chosen.iter().filter(|set| **set).count() > 1 {
            problems.push(
                "shared_cache: set exactly one of url (one server), sentinels (Sentinel) and cluster_nodes (Redis Cluster)".to_owned(),
            );
        }
        if self.sentinels.is_empty() && (url.is_some() || cluster_nodes.is_some()) {
            let target = if url.is_some() {
                "shared_cache.url"
            } else {
                "shared_cache.cluster_nodes"
            };
            let sentinel_only = [
                ("master_name", self.master_name.is_some()),
                ("sentinel_username", self.sentinel_username.is_some()),
                (
                    "sentinel_password_env",
                    self.sentinel_password_env.is_some(),
                ),
            ];
            for (name, set) in sentinel_only {
                if set {
                    problems.push(format!(
                        "shared_cache.{name}: only for Sentinel (shared_cache.sentinels), not with {target}"
                    ));
                }
            }
        }
        let (target, in_url) = match (url, cluster_nodes) {
            (Some(url), _) => url_target(url, self.tls.is_some(), problems),
            (None, Some(nodes)) => {
                // A brace in the prefix would end or move the hash tag of every key.
                if self.key_prefix.contains(['{', '}']) {
                    problems.push(
                        "shared_cache.key_prefix: no { or } with cluster_nodes: the broker puts a hash tag in braces after it, so that the keys of one token share a slot".to_owned(),
                    );
                }
                (cluster_target(nodes, problems), None)
            }
            (None, None) => (self.sentinel_target(env, problems), None),
        };
        let (user_in_url, password_in_url) = in_url.unwrap_or_default();
        if user_in_url && self.username.is_some() {
            problems.push(
                "shared_cache.username: the URL names a user already; keep one of them".to_owned(),
            );
        }
        let password = match (self.password_env.as_deref(), self.password_file.as_deref()) {
            (Some(_), Some(_)) => {
                problems
                    .push("shared_cache: both password_env and password_file; keep one".to_owned());
                None
            }
            (env_name, file) if password_in_url && (env_name.is_some() || file.is_some()) => {
                let setting = if env_name.is_some() {
                    "password_env"
                } else {
                    "password_file"
                };
                problems.push(format!(
                    "shared_cache.{setting}: the URL carries a password already; keep one of them (preferably {setting})"
                ));
                None
            }
            (Some(name), None) => secret_from_env("shared_cache.password_env", name, env, problems),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => {
                    Some(SecretString::from(text.trim().to_owned()))
                }
                Ok(_) => {
                    problems.push(format!(
                        "shared_cache.password_file: {} is empty",
                        path.display()
                    ));
                    None
                }
                Err(error) => {
                    problems.push(format!(
                        "shared_cache.password_file: cannot read {}: {error}",
                        path.display()
                    ));
                    None
                }
            },
            (None, None) => None,
        };
        if self.username.as_deref().is_some_and(str::is_empty) {
            problems
                .push("shared_cache.username: empty; leave it out for the default user".to_owned());
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
            target: target?,
            key_prefix: self.key_prefix,
            encryption_key: encryption_key?,
            previous_encryption_key,
            timeout: self.timeout,
            lock_ttl: self.lock_ttl,
            wait_for_peer: self.wait_for_peer,
            tls,
            username: self.username,
            password,
        })
    }
}

/// Validates `shared_cache.url`: the target, and whether the URL names a user and a password.
fn url_target(
    url: SecretString,
    tls: bool,
    problems: &mut Vec<String>,
) -> (Option<RedisTarget>, Option<(bool, bool)>) {
    let scheme = url
        .expose_secret()
        .split_once("://")
        .map(|(scheme, _)| scheme.to_owned())
        .unwrap_or_default();
    let accepted = matches!(
        scheme.as_str(),
        "redis" | "valkey" | "rediss" | "valkeys" | "redis+unix" | "unix" | "valkey+unix"
    );
    let parsed = redis::IntoConnectionInfo::into_connection_info(url.expose_secret());
    if !accepted || parsed.is_err() {
        // The URL itself is not repeated: it may carry a password.
        problems.push(
            "shared_cache.url: not a usable Redis URL; expected redis://[user:password@]host:port[/db], or rediss:// for TLS".to_owned(),
        );
    }
    if tls && accepted && !matches!(scheme.as_str(), "rediss" | "valkeys") {
        problems.push(
            "shared_cache.tls: set, but shared_cache.url is not rediss://; use rediss://host:port for TLS".to_owned(),
        );
    }
    let in_url = parsed.ok().map(|info| {
        let redis = info.redis_settings();
        (redis.username().is_some(), redis.password().is_some())
    });
    (Some(RedisTarget::Url(url)), in_url)
}

/// Validates `shared_cache.cluster_nodes`: at least one seed, each `host:port`.
fn cluster_target(nodes: Vec<String>, problems: &mut Vec<String>) -> Option<RedisTarget> {
    let before = problems.len();
    if nodes.is_empty() {
        problems.push(
            "shared_cache.cluster_nodes: empty; list at least one node of the cluster as host:port (the broker discovers the others)".to_owned(),
        );
    }
    check_addresses(
        "shared_cache.cluster_nodes",
        &nodes,
        "10.0.0.5:6379",
        problems,
    );
    (problems.len() == before).then_some(RedisTarget::Cluster(nodes))
}

/// Reports each entry of `setting` that is not `host:port` (an IPv6 address in brackets).
fn check_addresses(setting: &str, addresses: &[String], example: &str, problems: &mut Vec<String>) {
    for (index, address) in addresses.iter().enumerate() {
        let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
            let bracketed = host.starts_with('[') && host.ends_with(']');
            !host.is_empty()
                && (bracketed || !host.contains(':'))
                && port.parse::<u16>().is_ok_and(|port| port > 0)
        });
        if !valid {
            problems.push(format!(
                "{setting}[{index}]: expected host:port, such as \"{example}\""
            ));
        }
    }
}

impl RawSharedCache {
    /// Validates `shared_cache.sentinels`, `master_name`, `sentinel_username` and
    /// `sentinel_password_env`.
    fn sentinel_target(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<String>,
    ) -> Option<RedisTarget> {
        let before = problems.len();
        // An IPv6 address goes in brackets, as in a URL: [::1]:26379.
        check_addresses(
            "shared_cache.sentinels",
            &self.sentinels,
            "10.0.0.5:26379",
            problems,
        );
        let master_name = self
            .master_name
            .clone()
            .filter(|name| !name.trim().is_empty());
        if master_name.is_none() {
            problems.push(
                "shared_cache.master_name: missing; name the master as the sentinels monitor it (`sentinel monitor NAME …`)".to_owned(),
            );
        }
        let password = self.sentinel_password_env.as_deref().and_then(|name| {
            secret_from_env("shared_cache.sentinel_password_env", name, env, problems)
        });
        (problems.len() == before).then(|| {
            RedisTarget::Sentinel(SentinelSettings {
                sentinels: self.sentinels.clone(),
                master_name: master_name.unwrap_or_default(),
                username: self.sentinel_username.clone(),
                password,
            })
        })
    }
}

/// Reads `[shared_cache.tls]`: each file must exist and hold PEM of the right kind.
fn read_tls(raw: &RawRedisTls, problems: &mut Vec<String>) -> Option<RedisTls> {
    let before = problems.len();
    let ca_pem = raw
        .ca_file
        .as_deref()
        .and_then(|path| pem::certificates("shared_cache.tls.ca_file", path, problems));
    let client = match (&raw.certificate_file, &raw.key_file) {
        (None, None) => None,
        (Some(certificate), Some(key)) => {
            let certificate_pem =
                pem::certificates("shared_cache.tls.certificate_file", certificate, problems);
            let key_pem = pem::private_key("shared_cache.tls.key_file", key, problems);
            Some(ClientIdentity {
                certificate_pem: certificate_pem?,
                key_pem: key_pem?,
            })
        }
        _ => {
            problems.push(
                "shared_cache.tls: certificate_file and key_file go together (mutual TLS); set both or neither".to_owned(),
            );
            None
        }
    };
    (problems.len() == before).then_some(RedisTls { ca_pem, client })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::Settings;
    use super::super::test_support::*;
    use super::*;

    const SHARED_BASE: &str = r#"
        [server]
        listen = "127.0.0.1:8080"
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
    fn tls_acl_and_sentinel_problems_are_listed_without_secrets() {
        let base = "[server]\nlisten = \"127.0.0.1:8080\"\n[auth]\nallow_anonymous = true\n";
        let problems_of = |shared: &str| {
            let toml =
                format!("{base}[shared_cache]\nencryption_key_env = \"CACHE_KEY\"\n{shared}");
            match Settings::from_toml(&toml, &cache_key_env) {
                Ok(_) => String::new(),
                Err(error) => error.to_string(),
            }
        };
        for (shared, expected) in [
            (
                "url = \"redis://redis:6379\"\n[shared_cache.tls]\nca_file = \"/nonexistent/ca.crt\"\n",
                "shared_cache.tls: set, but shared_cache.url is not rediss://",
            ),
            (
                "url = \"rediss://redis:6380\"\n[shared_cache.tls]\ncertificate_file = \"/nonexistent/c.crt\"\n",
                "shared_cache.tls: certificate_file and key_file go together",
            ),
            (
                "url = \"rediss://redis:6380\"\n[shared_cache.tls]\nca_file = \"/nonexistent/ca.crt\"\n",
                "shared_cache.tls.ca_file: cannot read /nonexistent/ca.crt",
            ),
            (
                "url = \"redis://:hunter2@redis:6379\"\npassword_env = \"CACHE_KEY\"\n",
                "shared_cache.password_env: the URL carries a password already",
            ),
            (
                "url = \"redis://broker@redis:6379\"\nusername = \"other\"\n",
                "shared_cache.username: the URL names a user already",
            ),
            (
                "url = \"redis://redis:6379\"\npassword_env = \"UNSET\"\n",
                "shared_cache.password_env: environment variable UNSET is not set",
            ),
            (
                "url = \"redis://redis:6379\"\nsentinels = [\"s1:26379\"]\nmaster_name = \"m\"\n",
                "shared_cache: set exactly one of url (one server), sentinels (Sentinel) and cluster_nodes",
            ),
            (
                "url = \"redis://redis:6379\"\ncluster_nodes = [\"n1:6379\"]\n",
                "shared_cache: set exactly one of url",
            ),
            ("cluster_nodes = []\n", "shared_cache.cluster_nodes: empty"),
            (
                "cluster_nodes = [\"n1:6379\", \"n2\"]\n",
                "shared_cache.cluster_nodes[1]: expected host:port",
            ),
            (
                "cluster_nodes = [\"n1:6379\"]\nkey_prefix = \"app{1}:\"\n",
                "shared_cache.key_prefix: no { or } with cluster_nodes",
            ),
            (
                "cluster_nodes = [\"n1:6379\"]\nmaster_name = \"m\"\n",
                "shared_cache.master_name: only for Sentinel (shared_cache.sentinels), not with shared_cache.cluster_nodes",
            ),
            (
                "sentinels = [\"s1:26379\", \"s2\"]\n",
                "shared_cache.sentinels[1]: expected host:port",
            ),
            (
                "sentinels = [\"s1:26379\"]\n",
                "shared_cache.master_name: missing",
            ),
            (
                "sentinels = [\"s1:26379\"]\nmaster_name = \"m\"\nsentinel_password_env = \"UNSET\"\n",
                "shared_cache.sentinel_password_env: environment variable UNSET is not set",
            ),
        ] {
            let problems = problems_of(shared);
            assert!(problems.contains(expected), "{shared}: {problems}");
            assert!(!problems.contains("hunter2"), "{problems}");
        }
        let cluster = format!(
            "{base}[shared_cache]\nencryption_key_env = \"CACHE_KEY\"\ncluster_nodes = [\"10.0.0.5:6379\", \"10.0.0.6:6379\"]\n"
        );
        let shared = Settings::from_toml(&cluster, &cache_key_env)
            .expect("valid")
            .shared_cache
            .expect("on");
        assert!(matches!(&shared.target, RedisTarget::Cluster(nodes) if nodes.len() == 2));
        assert_eq!(
            shared.endpoint(),
            "cluster of seed nodes 10.0.0.5:6379,10.0.0.6:6379"
        );
        let sentinel = format!(
            "{base}[shared_cache]\nencryption_key_env = \"CACHE_KEY\"\nsentinels = [\"10.0.0.5:26379\", \"10.0.0.6:26379\"]\nmaster_name = \"tokens\"\n"
        );
        let settings = Settings::from_toml(&sentinel, &cache_key_env).expect("valid");
        let shared = settings.shared_cache.expect("on");
        assert!(
            matches!(&shared.target, RedisTarget::Sentinel(s) if s.master_name == "tokens" && s.sentinels.len() == 2)
        );
        assert_eq!(
            shared.endpoint(),
            "master tokens of sentinels 10.0.0.5:26379,10.0.0.6:26379"
        );
    }

    #[test]
    fn the_shared_cache_is_off_without_a_url_and_configured_with_one() {
        let off = Settings::from_toml(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[auth]\nallow_anonymous = true",
            &no_env,
        )
        .expect("valid");
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
        assert_eq!(shared.wait_for_peer, Duration::from_secs(11));
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
            [server]
            listen = "127.0.0.1:8080"
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
}
