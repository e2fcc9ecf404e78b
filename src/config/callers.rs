//! `[auth]` and `[callers.NAME]`: key hashes, allow rules and limits, validated into the settings
//! `auth` consumes.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use super::raw::{RawAuth, RawCaller};
use crate::auth::{
    AllowRule, AuthSettings, CallerSettings, DEFAULT_MAX_KEYS, KeyHash, OrganizationRule,
    is_valid_name,
};

/// Validates `[auth]`; problems go to `problems`.
pub(super) fn auth(raw: &RawAuth, problems: &mut Vec<String>) -> AuthSettings {
    let mut key = |name: &str, hex: Option<&str>| {
        hex.and_then(|hex| {
            KeyHash::from_hex(hex)
                .map_err(|e| problems.push(format!("auth.{name}: {e}")))
                .ok()
        })
    };
    let admin_key_sha256 = key("admin_key_sha256", raw.admin_key_sha256.as_deref());
    let metrics_key_sha256 = key("metrics_key_sha256", raw.metrics_key_sha256.as_deref());
    let default_idp_requests_per_minute = NonZeroU32::new(raw.default_idp_requests_per_minute)
        .unwrap_or_else(|| {
            problems.push(
                "auth.default_idp_requests_per_minute: must be at least 1; a caller that may start no IdP request could only use tokens others fetched".to_owned(),
            );
            NonZeroU32::MIN
        });
    let workload = raw
        .workload
        .as_ref()
        .and_then(|workload| super::workload::workload(workload, problems));
    AuthSettings {
        admin_key_sha256,
        metrics_key_sha256,
        allow_anonymous: raw.allow_anonymous,
        default_idp_requests_per_minute,
        workload,
    }
}

/// Validates every `[callers.NAME]`; problems go to `problems`, and a caller without a usable key
/// is left out.
pub(super) fn callers(
    raw: BTreeMap<String, RawCaller>,
    auth: &AuthSettings,
    configured_issuers: &[&str],
    problems: &mut Vec<String>,
) -> BTreeMap<String, CallerSettings> {
    let mut callers = BTreeMap::new();
    for (name, raw) in raw {
        let at = format!("callers.{name}");
        if !is_valid_name(&name) {
            problems.push(format!(
                "{at}: caller names are lower-case [a-z0-9_-], 1-64 long"
            ));
        }
        let workload = super::workload::rules(
            &raw.workload,
            auth.workload.as_ref(),
            configured_issuers,
            &at,
            problems,
        );
        let key_sha256 = match raw.key_sha256.as_deref().map(KeyHash::from_hex) {
            Some(Ok(hash)) => Some(Some(hash)),
            Some(Err(e)) => {
                problems.push(format!("{at}.key_sha256: {e}"));
                None
            }
            None if !raw.workload.is_empty() => Some(None),
            None => {
                problems.push(format!(
                    "{at}.key_sha256: missing; make one with `token-broker hash-key`, or give the caller a workload identity"
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
        for (index, rule) in raw.allow.iter().enumerate() {
            match rule.parse::<AllowRule>() {
                Ok(rule) => allow.push(rule),
                Err(e) => problems.push(format!("{at}.allow[{index}]: {e}")),
            }
        }
        let mut organizations = Vec::with_capacity(raw.organizations.len());
        for (index, rule) in raw.organizations.iter().enumerate() {
            match rule.parse::<OrganizationRule>() {
                Ok(rule) => organizations.push(rule),
                Err(e) => problems.push(format!("{at}.organizations[{index}]: {e}")),
            }
        }
        if raw.rate_limit == Some(0) {
            problems.push(format!("{at}.rate_limit: must be above 0, or left out"));
        }
        let idp_requests_per_minute = match raw.idp_requests_per_minute {
            None => auth.default_idp_requests_per_minute,
            Some(per_minute) => NonZeroU32::new(per_minute).unwrap_or_else(|| {
                problems.push(format!(
                    "{at}.idp_requests_per_minute: must be at least 1, or left out for auth.default_idp_requests_per_minute"
                ));
                NonZeroU32::MIN
            }),
        };
        let max_keys = raw.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if max_keys == 0 {
            problems.push(format!("{at}.max_keys: must be at least 1, or left out"));
        }
        if let Some(key_sha256) = key_sha256 {
            callers.insert(
                name,
                CallerSettings {
                    key_sha256,
                    workload,
                    allow,
                    organizations,
                    rate_limit: raw.rate_limit,
                    idp_requests_per_minute,
                    max_keys,
                },
            );
        }
    }
    super::workload::check_ties(
        callers
            .iter()
            .map(|(name, caller)| (name.as_str(), caller.workload.as_slice())),
        problems,
    );
    check_shared_keys(&callers, problems);
    callers
}

/// Refuses two callers with one `key_sha256`: the key would authenticate as whichever the
/// look-up found, with that caller's allow rules. Names both callers, never the hash.
fn check_shared_keys(callers: &BTreeMap<String, CallerSettings>, problems: &mut Vec<String>) {
    let mut first_with: Vec<(KeyHash, &str)> = Vec::new();
    for (name, caller) in callers {
        let Some(key) = caller.key_sha256 else {
            continue;
        };
        match first_with.iter().find(|(seen, _)| *seen == key) {
            Some((_, other)) => problems.push(format!(
                "callers.{name}.key_sha256: the same as callers.{other}.key_sha256, so the key would prove either caller; give each caller a key of its own (`token-broker hash-key`)"
            )),
            None => first_with.push((key, name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn caller_problems_name_the_caller_and_setting() {
        let toml = r#"
            [callers.Billing]
            key_sha256 = "abc"
            allow = ["acme"]
            rate_limit = 0
            [callers.reports]
            allow = []
        "#;
        let all = problems(toml, &no_env);
        for expected in [
            "callers.Billing: caller names",
            "callers.Billing.key_sha256: not a SHA-256",
            "callers.Billing.allow[0]: expected tenant/environment",
            "callers.Billing.rate_limit: must be above 0",
            "callers.reports.key_sha256: missing",
            "callers.reports.allow: empty",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn two_callers_with_one_key_are_refused_by_name_without_the_hash() {
        let hash = "7b4bd6c5a5e1a6f0c8e2b1f7a3d9c2e4f6a8b0c1d3e5f7a9b2c4d6e8f0a1b3c5";
        let toml = format!(
            r#"
            [callers.billing]
            key_sha256 = "{hash}"
            allow = ["acme/*"]
            [callers.reports]
            key_sha256 = "{hash}"
            allow = ["acme/production"]
            "#
        );
        let all = problems(&toml, &no_env);
        assert!(
            all.contains("callers.reports.key_sha256: the same as callers.billing.key_sha256"),
            "{all}"
        );
        assert!(!all.contains(hash), "{all}");
    }

    #[test]
    fn workload_callers_need_a_configured_issuer_and_distinct_subjects() {
        let toml = r#"
            [auth.workload]
            audience = "token-broker"
            leeway = "10m"
            [[auth.workload.issuers]]
            issuer = "https://kubernetes.default.svc"
            [[auth.workload.issuers]]
            issuer = "http://ci.example"
            [[auth.workload.issuers]]
            issuer = "https://both.example"
            jwks_uri = "https://both.example/keys"
            jwks_file = "/etc/keys.json"
            [callers.billing]
            workload = [{ issuer = "https://kubernetes.default.svc", subject = "system:serviceaccount:billing:*" }]
            allow = ["acme/*"]
            [callers.payments]
            workload = [
                { issuer = "https://kubernetes.default.svc", subject = "system:serviceaccount:billing:*" },
                { issuer = "https://elsewhere.example", subject = "x" },
                { issuer = "https://kubernetes.default.svc", subject = "a*b" },
            ]
            allow = ["acme/*"]
        "#;
        let all = problems(toml, &no_env);
        for expected in [
            "auth.workload.leeway: at most 5m",
            "auth.workload.issuers[1].issuer: must be an https URL",
            "auth.workload.issuers[2]: both jwks_uri and jwks_file",
            "callers.payments.workload: the same issuer and subject as callers.billing",
            "callers.payments.workload[1].issuer: not one of [[auth.workload.issuers]]",
            "callers.payments.workload[2].subject: a * may only end the subject",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert!(
            !all.contains("key_sha256"),
            "a workload caller needs no key:\n{all}"
        );

        let without_issuers = r#"
            [callers.billing]
            workload = [{ issuer = "https://kubernetes.default.svc", subject = "x" }]
            allow = ["acme/*"]
        "#;
        assert!(
            problems(without_issuers, &no_env)
                .contains("callers.billing.workload[0]: no [auth.workload] is configured")
        );
        let no_audience = "[auth.workload]\n[[auth.workload.issuers]]\nissuer = \"https://k8s\"\n";
        assert!(problems(no_audience, &no_env).contains("auth.workload.audience: missing"));
    }

    #[test]
    fn admin_and_metrics_keys_are_hashes() {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[auth]\nallow_anonymous = true\nadmin_key_sha256 = \"{HASH}\"\nmetrics_key_sha256 = \"xyz\""
        );
        assert!(problems(&toml, &no_env).contains("auth.metrics_key_sha256: not a SHA-256"));
    }
}
