//! `[auth.workload]` and each caller's `workload` rules: the issuers whose tokens prove callers,
//! validated into the settings `auth` consumes.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::raw::{RawIssuer, RawWorkload, RawWorkloadRule};
use crate::auth::{
    IssuerSettings, KeySource, SubjectPattern, WorkloadRule, WorkloadSettings, is_fetchable_url,
};

/// Most clock skew `leeway` may allow.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Bounds of `jwks_refresh_interval`.
const REFRESH_INTERVAL: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// Most tokens `max_remembered` may keep.
const MAX_REMEMBERED: usize = 1_000_000;

/// Longest `audience`.
const MAX_AUDIENCE_LEN: usize = 1024;

/// Validates `[auth.workload]`; problems go to `problems`.
pub(super) fn workload(raw: &RawWorkload, problems: &mut Vec<String>) -> Option<WorkloadSettings> {
    let at = "auth.workload";
    let audience = match raw.audience.as_deref().map(str::trim) {
        Some(audience) if !audience.is_empty() && audience.len() <= MAX_AUDIENCE_LEN => {
            audience.to_owned()
        }
        Some(_) => {
            problems.push(format!(
                "{at}.audience: empty or over {MAX_AUDIENCE_LEN} bytes"
            ));
            String::new()
        }
        None => {
            problems.push(format!(
                "{at}.audience: missing; set the aud that workload tokens are made for, such as \"token-broker\""
            ));
            String::new()
        }
    };
    if raw.leeway > MAX_LEEWAY {
        problems.push(format!("{at}.leeway: at most 5m"));
    }
    if raw.jwks_refresh_interval < REFRESH_INTERVAL.0
        || raw.jwks_refresh_interval > REFRESH_INTERVAL.1
    {
        problems.push(format!("{at}.jwks_refresh_interval: between 1s and 1h"));
    }
    if raw.max_remembered > MAX_REMEMBERED {
        problems.push(format!("{at}.max_remembered: at most {MAX_REMEMBERED}"));
    }
    if raw.issuers.is_empty() {
        problems.push(format!(
            "{at}.issuers: none; add [[auth.workload.issuers]] with the issuer = \"…\" of your cluster or CI"
        ));
    }
    let mut seen = HashSet::new();
    let mut issuers = Vec::with_capacity(raw.issuers.len());
    for (index, raw) in raw.issuers.iter().enumerate() {
        let at = format!("{at}.issuers[{index}]");
        if !seen.insert(raw.issuer.as_str()) {
            problems.push(format!("{at}.issuer: configured twice"));
        }
        if let Some(issuer) = issuer(raw, &at, problems) {
            issuers.push(issuer);
        }
    }
    Some(WorkloadSettings {
        audience,
        leeway: raw.leeway,
        jwks_refresh_interval: raw.jwks_refresh_interval,
        max_remembered: raw.max_remembered,
        issuers,
    })
}

/// Validates one `[[auth.workload.issuers]]`.
fn issuer(raw: &RawIssuer, at: &str, problems: &mut Vec<String>) -> Option<IssuerSettings> {
    let before = problems.len();
    if raw.issuer.trim().is_empty() || raw.issuer.trim() != raw.issuer {
        problems.push(format!(
            "{at}.issuer: empty or with spaces around it; it must equal the tokens' iss"
        ));
    }
    let keys = match (&raw.jwks_uri, &raw.jwks_file) {
        (Some(_), Some(_)) => {
            problems.push(format!("{at}: both jwks_uri and jwks_file; keep one"));
            KeySource::Discovery
        }
        (Some(uri), None) => {
            if let Err(problem) = is_fetchable_url(uri) {
                problems.push(format!("{at}.jwks_uri: {problem}"));
            }
            KeySource::Uri(uri.clone())
        }
        (None, Some(file)) => {
            if let Err(error) = std::fs::metadata(file) {
                problems.push(format!(
                    "{at}.jwks_file: cannot read {}: {error}",
                    file.display()
                ));
            }
            KeySource::File(file.clone())
        }
        (None, None) => {
            if raw.issuer.contains(['?', '#']) {
                problems.push(format!(
                    "{at}.issuer: has a query or fragment, so its discovery document cannot be found; set jwks_uri"
                ));
            }
            if let Err(problem) = is_fetchable_url(&raw.issuer) {
                problems.push(format!(
                    "{at}.issuer: {problem}; its keys are found by OIDC discovery at the issuer unless jwks_uri or jwks_file is set"
                ));
            }
            KeySource::Discovery
        }
    };
    if raw.jwks_file.is_some() && (raw.ca_file.is_some() || raw.bearer_token_file.is_some()) {
        problems.push(format!(
            "{at}: ca_file and bearer_token_file are for fetching keys over HTTPS, not for jwks_file"
        ));
    }
    let ca_pem = raw
        .ca_file
        .as_deref()
        .and_then(|path| super::pem::certificates(&format!("{at}.ca_file"), path, problems));
    if let Some(path) = &raw.bearer_token_file
        && let Err(error) = std::fs::metadata(path)
    {
        problems.push(format!(
            "{at}.bearer_token_file: cannot read {}: {error}",
            path.display()
        ));
    }
    (problems.len() == before).then(|| IssuerSettings {
        issuer: raw.issuer.clone(),
        keys,
        ca_pem,
        bearer_token_file: raw.bearer_token_file.clone(),
    })
}

/// Validates one caller's `workload` rules against the valid issuers of `workload`;
/// `configured` names every issuer configured, so that a rule naming one whose settings are
/// wrong adds nothing to that issuer's own problem.
pub(super) fn rules(
    raw: &[RawWorkloadRule],
    workload: Option<&WorkloadSettings>,
    configured: &[&str],
    at: &str,
    problems: &mut Vec<String>,
) -> Vec<WorkloadRule> {
    let mut rules = Vec::with_capacity(raw.len());
    for (index, rule) in raw.iter().enumerate() {
        let at = format!("{at}.workload[{index}]");
        let valid = workload.is_some_and(|workload| {
            workload
                .issuers
                .iter()
                .any(|issuer| issuer.issuer == rule.issuer)
        });
        if !valid && configured.contains(&rule.issuer.as_str()) {
            continue;
        }
        let Some(workload) = workload else {
            problems.push(format!(
                "{at}: no [auth.workload] is configured; add it with the issuer"
            ));
            continue;
        };
        if !workload
            .issuers
            .iter()
            .any(|issuer| issuer.issuer == rule.issuer)
        {
            problems.push(format!("{at}.issuer: not one of [[auth.workload.issuers]]"));
            continue;
        }
        match rule.subject.parse::<SubjectPattern>() {
            Ok(subject) => rules.push(WorkloadRule {
                issuer: rule.issuer.clone(),
                subject,
            }),
            Err(problem) => problems.push(format!("{at}.subject: {problem}")),
        }
    }
    rules
}

/// Refuses two callers with the same issuer and subject pattern: a token would prove either.
pub(super) fn check_ties<'a>(
    callers: impl IntoIterator<Item = (&'a str, &'a [WorkloadRule])>,
    problems: &mut Vec<String>,
) {
    let mut owners: BTreeMap<(&str, &SubjectPattern), &str> = BTreeMap::new();
    for (name, rules) in callers {
        for rule in rules {
            match owners.insert((&rule.issuer, &rule.subject), name) {
                Some(other) if other != name => problems.push(format!(
                    "callers.{name}.workload: the same issuer and subject as callers.{other}; a token would prove both, so give each caller its own subject"
                )),
                _ => {}
            }
        }
    }
}
