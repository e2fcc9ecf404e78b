//! `[tenants.T.environments.E]`: the IdP client settings of each environment, validated into
//! the [`EnvironmentSettings`] that `idp` consumes, credential resolved (a bad key fails here).

use std::sync::Arc;

use super::raw::RawEnvironment;
use super::secrets;
use crate::idp::{
    ClientAuth, ClientCredential, ClientKey, CredentialFallbacks, CredentialFile,
    EnvironmentSettings, UserLoginSettings,
};
use crate::telemetry::metrics::EnvironmentHandles;

/// Least `max_response_bytes`: below it even a short opaque token's answer would not fit.
const MIN_RESPONSE_BYTES: usize = 1024;

/// Parameters the broker itself sends; `extra_params` may not override them.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "audience",
    "resource",
    "scope",
    "organization",
    "client_assertion",
    "client_assertion_type",
    "code",
    "code_verifier",
    "redirect_uri",
    "refresh_token",
];

impl RawEnvironment {
    /// The settings of `tenant`/`environment` (at `at` in the configuration), or `None` with
    /// every problem in `problems`.
    pub(super) fn validate(
        mut self,
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
        let fallbacks = self.fallbacks(at, env, problems);
        let user_login = self.user_login(at, problems);
        let client_id = self.client_id.take().filter(|id| !id.trim().is_empty());
        let rotation = self.rotation.take().and_then(|rotation| {
            rotation.validate(at, client_id.as_deref(), self.client_auth, problems)
        });
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
        super::at_most(
            &format!("{at}.timeout"),
            self.timeout,
            super::HOUR,
            problems,
        );
        if self.default_lifetime > crate::idp::MAX_LIFETIME {
            problems.push(format!("{at}.default_lifetime: must be at most a year"));
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
        if self.max_response_bytes < MIN_RESPONSE_BYTES {
            problems.push(format!(
                "{at}.max_response_bytes: must be at least {MIN_RESPONSE_BYTES}, the size of a small token answer"
            ));
        }
        if problems.len() != before {
            return None;
        }
        Some(EnvironmentSettings {
            tenant: tenant.into(),
            environment: environment.into(),
            metrics: EnvironmentHandles::default(),
            token_url: token_url?,
            client_id: client_id?,
            credential: credential?,
            fallbacks,
            audience: self.audience.map(Arc::from),
            request_format: self.request_format,
            client_auth: self.client_auth,
            audience_param: self.audience_param,
            extra_params: self.extra_params,
            timeout: self.timeout,
            default_lifetime: self.default_lifetime,
            max_fetches_per_hour: self.max_fetches_per_hour,
            max_concurrent_fetches: self.max_concurrent_fetches,
            max_response_bytes: self.max_response_bytes,
            generation: 0,
            user_login,
            rotation,
            rotation_authority: false,
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
            return secrets::resolve_secret(
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

    /// Where the configured credential is read again from, and a second credential (at most
    /// one source, of the credential's kind), for when the IdP refuses the first.
    fn fallbacks(
        &self,
        at: &str,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<String>,
    ) -> CredentialFallbacks {
        let with_key = self.client_auth == ClientAuth::PrivateKeyJwt;
        let key_id = self.key_id.clone().filter(|id| !id.trim().is_empty());
        let primary_file = if with_key {
            self.private_key_file
                .clone()
                .map(|path| CredentialFile::Key {
                    path,
                    key_id: key_id.clone(),
                })
        } else {
            self.client_secret_file.clone().map(CredentialFile::Secret)
        };
        let primary_digest = primary_file.as_ref().and_then(CredentialFile::digest_now);
        let mut fallbacks = CredentialFallbacks {
            primary_file,
            primary_digest,
            ..CredentialFallbacks::default()
        };
        let secret_env = self.fallback_client_secret_env.as_deref();
        let secret_file = self.fallback_client_secret_file.as_ref();
        let key_file = self.fallback_private_key_file.as_ref();
        match (with_key, secret_env, secret_file, key_file) {
            (_, None, None, None) => {}
            (false, _, _, Some(_)) => problems.push(format!(
                "{at}.fallback_private_key_file: only with client_auth = \"private_key_jwt\"; use fallback_client_secret_env or fallback_client_secret_file"
            )),
            (true, Some(_), _, _) | (true, _, Some(_), _) => problems.push(format!(
                "{at}: client_auth = \"private_key_jwt\" sends no secret; use fallback_private_key_file"
            )),
            (false, Some(_), Some(_), None) => problems.push(format!(
                "{at}: both fallback_client_secret_env and fallback_client_secret_file; keep one"
            )),
            (false, Some(name), None, None) => {
                let setting = format!("{at}.fallback_client_secret_env");
                fallbacks.fallback = secrets::secret_from_env(&setting, name, env, problems)
                    .map(ClientCredential::Secret);
            }
            (false, None, Some(path), None) => {
                fallbacks.fallback_file = Some(CredentialFile::Secret(path.clone()));
            }
            (true, None, None, Some(path)) => {
                fallbacks.fallback_file = Some(CredentialFile::Key {
                    path: path.clone(),
                    key_id,
                });
            }
        }
        // A fallback file is read (and a key parsed) at each use: one gone or empty (a
        // rotation finished and the old secret removed) leaves the environment without a
        // fallback rather than refusing the configuration.
        if let Some(file) = &fallbacks.fallback_file
            && file.digest_now().is_none()
        {
            tracing::warn!(
                environment = %at,
                "the fallback client credential's file cannot be read; running without it"
            );
        }
        fallbacks
    }

    /// `authorize_url` and `redirect_uri`, both or neither.
    fn user_login(&self, at: &str, problems: &mut Vec<String>) -> Option<UserLoginSettings> {
        match (&self.authorize_url, &self.redirect_uri) {
            (None, None) if self.revocation_url.is_none() => None,
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
                let revocation_url = match &self.revocation_url {
                    Some(url) => Some(http_url(at, "revocation_url", url, problems)?),
                    None => None,
                };
                Some(UserLoginSettings {
                    authorize_url: authorize_url?,
                    redirect_uri: redirect_uri?,
                    revocation_url,
                })
            }
            (None, None) if self.revocation_url.is_some() => {
                problems.push(format!(
                    "{at}.revocation_url: only for user tokens; set authorize_url and redirect_uri too"
                ));
                None
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
pub(super) fn http_url(
    at: &str,
    name: &str,
    url: &str,
    problems: &mut Vec<String>,
) -> Option<reqwest::Url> {
    match reqwest::Url::parse(url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Some(url),
        _ => {
            problems.push(format!("{at}.{name}: not an http(s) URL"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use secrecy::ExposeSecret as _;

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
            [server]
            listen = "127.0.0.1:8080"
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
    fn a_fallback_credential_is_one_source_of_the_credentials_kind() {
        let base = r#"
            [server]
            listen = "127.0.0.1:8080"
            [auth]
            allow_anonymous = true
            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = "id"
            client_secret = "s"
        "#;
        let env = |name: &str| (name == "FALLBACK").then(|| "the-fallback".to_owned());
        let settings = crate::config::Settings::from_toml(
            &format!("{base}fallback_client_secret_env = \"FALLBACK\"\n"),
            &env,
        )
        .expect("valid");
        let production = settings.environment("acme", "production").unwrap();
        assert!(matches!(
            &production.fallbacks.fallback,
            Some(ClientCredential::Secret(secret)) if secret.expose_secret() == "the-fallback"
        ));
        let both = format!(
            "{base}fallback_client_secret_env = \"FALLBACK\"\nfallback_client_secret_file = \"/f\"\n"
        );
        assert!(
            problems(&both, &env)
                .contains("both fallback_client_secret_env and fallback_client_secret_file")
        );
        let key_for_secret = format!("{base}fallback_private_key_file = \"/k.pem\"\n");
        assert!(
            problems(&key_for_secret, &env)
                .contains("fallback_private_key_file: only with client_auth")
        );
        let unset = format!("{base}fallback_client_secret_env = \"NOPE\"\n");
        assert!(
            problems(&unset, &env)
                .contains("fallback_client_secret_env: environment variable NOPE")
        );
    }

    #[test]
    fn user_login_needs_both_urls() {
        let base = r#"
            [server]
            listen = "127.0.0.1:8080"
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
