//! `[tenants.T.environments.E.rotation]`: how the broker rotates an environment's client
//! secret, validated into [`RotationSettings`]; then, across environments, each
//! `authorized_by` checked and the environments it names marked as the broker's own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::TenantSettings;
use super::raw::RawRotation;
use crate::auth::is_valid_name;
use crate::idp::{ClientAuth, RotationSettings};

/// Shortest `every`: a secret rotated more often than hourly only spends the IdP's quota.
const MIN_EVERY: Duration = Duration::from_secs(3600);
/// Longest `every`.
const MAX_EVERY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl RawRotation {
    /// The rotation of the environment at `at`, whose client is `client_id`; `None` with its
    /// problems listed.
    pub(super) fn validate(
        self,
        at: &str,
        client_id: Option<&str>,
        client_auth: ClientAuth,
        problems: &mut Vec<String>,
    ) -> Option<RotationSettings> {
        let at = format!("{at}.rotation");
        let before = problems.len();
        if client_auth == ClientAuth::PrivateKeyJwt {
            problems.push(format!(
                "{at}: rotates a client secret, and client_auth = \"private_key_jwt\" has none; rotate the key at the IdP and use fallback_private_key_file"
            ));
        }
        let endpoint = match (self.endpoint.as_deref(), client_id) {
            (None, _) => {
                problems.push(format!(
                    "{at}.endpoint: missing; for Auth0: https://DOMAIN/api/v2/clients/{{client_id}}/rotate-secret"
                ));
                None
            }
            (Some(template), client_id) => {
                let id: String =
                    form_urlencoded::byte_serialize(client_id.unwrap_or_default().as_bytes())
                        .collect();
                super::environments::http_url(
                    &at,
                    "endpoint",
                    &template.replace("{client_id}", &id),
                    problems,
                )
            }
        };
        let authorized_by = match self.authorized_by.as_deref().map(|v| v.split_once('/')) {
            None => {
                problems.push(format!(
                    "{at}.authorized_by: missing; name the \"tenant/environment\" of the client allowed to rotate secrets (for Auth0: a Management API client with update:client_keys)"
                ));
                None
            }
            Some(Some((tenant, environment)))
                if is_valid_name(tenant) && is_valid_name(environment) =>
            {
                Some((Arc::from(tenant), Arc::from(environment)))
            }
            Some(_) => {
                problems.push(format!(
                    "{at}.authorized_by: must be \"tenant/environment\", two configured names"
                ));
                None
            }
        };
        if self.scope.chars().any(char::is_control) {
            problems.push(format!("{at}.scope: has non-printable characters"));
        }
        if let Some(every) = self.every
            && !(MIN_EVERY..=MAX_EVERY).contains(&every)
        {
            problems.push(format!(
                "{at}.every: must be between 1h and 10 years; leave it out to rotate only on demand"
            ));
        }
        if problems.len() != before {
            return None;
        }
        Some(RotationSettings {
            endpoint: endpoint?,
            authorized_by: authorized_by?,
            scope: self.scope,
            every: self.every,
            secret_file: self.secret_file,
        })
    }
}

/// Checks every rotation against the other environments and marks each environment some
/// `authorized_by` names as the broker's own: it must exist, not be the rotated environment,
/// and have a default audience (the Management API's); without a shared level the rotated
/// secret needs `secret_file` to survive a restart.
pub(super) fn link(
    tenants: &mut BTreeMap<String, TenantSettings>,
    shared_level: bool,
    problems: &mut Vec<String>,
) {
    let mut authorities = Vec::new();
    for (tenant, settings) in tenants.iter() {
        for (name, environment) in &settings.environments {
            let Some(rotation) = &environment.rotation else {
                continue;
            };
            let at = format!("tenants.{tenant}.environments.{name}.rotation");
            let (by_tenant, by_environment) = &rotation.authorized_by;
            if **by_tenant == **tenant && **by_environment == **name {
                problems.push(format!(
                    "{at}.authorized_by: names this environment itself; name the environment of the client allowed to rotate secrets (for Auth0: a Management API client)"
                ));
                continue;
            }
            if !shared_level && rotation.secret_file.is_none() {
                problems.push(format!(
                    "{at}.secret_file: required without a shared cache, so that a restart does not lose the rotated secret"
                ));
            }
            let authority = tenants
                .get(&**by_tenant)
                .and_then(|t| t.environments.get(&**by_environment));
            match authority {
                None => problems.push(format!(
                    "{at}.authorized_by: no environment {by_tenant}/{by_environment} is configured"
                )),
                Some(authority) if authority.audience.is_none() => problems.push(format!(
                    "{at}.authorized_by: {by_tenant}/{by_environment} has no audience; set it to the Management API's (for Auth0: https://DOMAIN/api/v2/)"
                )),
                Some(_) => authorities.push((by_tenant.clone(), by_environment.clone())),
            }
        }
    }
    for (tenant, environment) in authorities {
        if let Some(settings) = tenants
            .get_mut(&*tenant)
            .and_then(|t| t.environments.get_mut(&*environment))
            // Freshly validated settings are not shared yet.
            && let Some(settings) = Arc::get_mut(settings)
        {
            settings.rotation_authority = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{HASH, Settings, no_env, problems};

    fn config(production: &str, management: &str) -> String {
        format!(
            r#"
            [callers.billing]
            key_sha256 = "{HASH}"
            allow = ["acme/*"]
            [tenants.acme.environments.production]
            token_url = "https://acme.example/oauth/token"
            client_id = "prod id"
            client_secret = "s"
            {production}
            [tenants.acme.environments.management]
            token_url = "https://acme.example/oauth/token"
            client_id = "mgmt"
            client_secret = "m"
            {management}
            "#
        )
    }

    const ROTATION: &str = r#"
            [tenants.acme.environments.production.rotation]
            endpoint = "https://acme.example/api/v2/clients/{client_id}/rotate-secret"
            authorized_by = "acme/management"
            secret_file = "/var/lib/token-broker/acme-production.secret"
            every = "30d"
    "#;

    #[test]
    fn a_rotation_names_its_client_and_marks_its_authority_as_the_broker_s_own() {
        let toml = config(
            "",
            &format!("audience = \"https://acme.example/api/v2/\"\n{ROTATION}"),
        );
        let settings = Settings::from_toml(&toml, &no_env).unwrap();
        let production = settings.environment("acme", "production").unwrap();
        let rotation = production.rotation.as_ref().unwrap();
        assert_eq!(
            rotation.endpoint.as_str(),
            "https://acme.example/api/v2/clients/prod+id/rotate-secret"
        );
        assert_eq!(rotation.scope, "update:client_keys");
        assert_eq!(
            rotation.every,
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        assert!(!production.rotation_authority);
        assert!(
            settings
                .environment("acme", "management")
                .unwrap()
                .rotation_authority
        );
    }

    #[test]
    fn bad_rotations_are_configuration_errors() {
        let audience = "audience = \"https://acme.example/api/v2/\"";
        let cases = [
            (
                ROTATION.replace("acme/management", "acme/nowhere"),
                "authorized_by: no environment acme/nowhere is configured",
            ),
            (
                ROTATION.replace("acme/management", "acme/production"),
                "authorized_by: names this environment itself",
            ),
            (
                ROTATION.replace("acme/management", "management"),
                "authorized_by: must be \"tenant/environment\"",
            ),
            (
                ROTATION.replace("secret_file", "# secret_file"),
                "rotation.secret_file: required without a shared cache",
            ),
            (
                ROTATION.replace("30d", "5m"),
                "rotation.every: must be between 1h",
            ),
            (
                ROTATION.replace("endpoint = ", "# endpoint = "),
                "rotation.endpoint: missing",
            ),
        ];
        for (rotation, expected) in cases {
            let found = problems(&config("", &format!("{audience}\n{rotation}")), &no_env);
            assert!(found.contains(expected), "{expected}: {found}");
        }
        let with_key = problems(
            &config(
                "client_auth = \"private_key_jwt\"",
                &format!("{audience}\n{ROTATION}"),
            ),
            &no_env,
        );
        assert!(
            with_key.contains(
                "rotates a client secret, and client_auth = \"private_key_jwt\" has none"
            ),
            "{with_key}"
        );
        let no_audience = problems(&config("", ROTATION), &no_env);
        assert!(
            no_audience.contains("acme/management has no audience"),
            "{no_audience}"
        );
    }
}
