//! Monitoring with the real tools: Debian's `prometheus` scrapes a running broker and its HTTP API
//! shows the target up, the IdP request the test made and the alert rules evaluated; `promtool`
//! accepts the `/metrics` text, the rules in deploy/prometheus and their unit tests; the rules and
//! the Grafana dashboard name only metrics the broker exports; the ServiceMonitor selects the
//! Kubernetes Service. Tests fail, naming the package to install, when `prometheus` or `promtool`
//! is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};
use yaml_rust2::{Yaml, YamlLoader};

use crate::helpers::*;

const RULES: &str = "deploy/prometheus/alerts.yaml";
const RULE_TESTS: &str = "deploy/prometheus/alerts.test.yaml";
const DASHBOARD: &str = "deploy/grafana/token-broker.json";
const SERVICE_MONITOR: &str = "deploy/kubernetes/servicemonitor.yaml";
const DEPLOYMENT: &str = "deploy/kubernetes/deployment.yaml";

/// The alerts the rules must define.
const ALERTS: [&str; 11] = [
    "TokenBrokerIdpErrors",
    "TokenBrokerIdpRateLimited",
    "TokenBrokerAuth0QuotaLow",
    "TokenBrokerQuotaGuardRefusing",
    "TokenBrokerRefreshesFailing",
    "TokenBrokerSharedCacheDown",
    "TokenBrokerUserSessionsUnwritten",
    "TokenBrokerCallerOverIdpBudget",
    "TokenBrokerClientSecretRotationOverdue",
    "TokenBrokerClientSecretRotationFailing",
    "TokenBrokerNotReady",
];

/// Panels the dashboard must have, by title.
const PANELS: [&str; 8] = [
    "Cache hit ratio",
    "IdP requests by outcome and environment",
    "IdP latency",
    "Auth0 quota remaining",
    "Background refreshes and failures",
    "Shared level health",
    "IdP requests per caller",
    "HTTP responses by status",
];

/// What to do when a tool is missing.
const INSTALL: &str = "the monitoring tests need Debian's prometheus package, which ships \
    `prometheus` and `promtool`: `apt-get install prometheus` (scripts/test.sh and .ci/run install it)";

/// Longest wait for Prometheus to start, scrape and evaluate.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(15);

/// Longest run of one promtool command.
const PROMTOOL_WAIT: Duration = Duration::from_secs(30);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// What a finished promtool run printed.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what}: {}\n{}{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `promtool ARGS` in the repository, with `stdin` piped in, killed after `PROMTOOL_WAIT`.
fn promtool(args: &[&str], stdin: Option<&str>) -> Finished {
    let mut stdout = tempfile::tempfile().unwrap();
    let mut stderr = tempfile::tempfile().unwrap();
    let child = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(stdout.try_clone().unwrap())
        .stderr(stderr.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run promtool ({error}): {INSTALL}"));
    // Killed on any panic below, the timeout's included.
    let mut guard = ChildGuard::new(child);
    let child = guard.child();
    if let Some(text) = stdin {
        // Dropping the pipe closes it: promtool reads to the end.
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let deadline = Instant::now() + PROMTOOL_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            panic!("promtool {args:?} did not finish within {PROMTOOL_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = |file: &mut File| {
        let mut text = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        text
    };
    Finished {
        status,
        stdout: text(&mut stdout),
        stderr: text(&mut stderr),
    }
}

/// A `prometheus` of the test's own on a loopback port, with its data in a temporary directory;
/// killed on drop.
struct Prometheus {
    child: ChildGuard,
    url: String,
    http: reqwest::Client,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts one that scrapes `target`'s `/metrics` (`host:port`) every second as job
    /// `token-broker` and evaluates `rule_file` every second.
    fn start(target: &str, rule_file: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                r#"
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - "{rules}"
scrape_configs:
  - job_name: token-broker
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
"#,
                rules = rule_file.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run prometheus ({error}): {INSTALL}"));
        Self {
            child: ChildGuard::new(child),
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
            log,
            _dir: dir,
        }
    }

    /// `data` of a successful answer of the HTTP API at `path` with `query`; `None` while it does
    /// not answer (yet) or answers with an error.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query).unwrap();
        let response = self.http.get(url).send().await.ok()?;
        let body: Value = serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// The result of an instant query.
    async fn query(&self, promql: &str) -> Option<Vec<Value>> {
        let data = self.api("/api/v1/query", &[("query", promql)]).await?;
        data["result"].as_array().cloned()
    }

    /// Panics, with Prometheus's log, once it has exited or `deadline` has passed.
    fn keep_waiting(&mut self, deadline: Instant, what: &str) {
        if let Ok(Some(status)) = self.child.child().try_wait() {
            panic!(
                "prometheus exited ({status}) before {what}; its log:\n{}",
                self.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "prometheus did not show {what} within {PROMETHEUS_WAIT:?}; its log:\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Sleeps between two looks at Prometheus.
async fn pause() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The metric names a PromQL expression selects: every identifier that is not a function or
/// aggregation, a keyword, a label name (in `{}` or a `by`/`on` list), a string, a number, a
/// duration or a Grafana variable.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 28] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "limitk",
        "limit_ratio",
    ];
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // The index after the string that opens at `i`.
    let after_string = |mut i: usize| {
        let quote = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != quote {
            if chars[i] == '\\' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    // The index after the `close` that ends what opens at `i`, past any strings in between.
    let after = |mut i: usize, close: char| {
        i += 1;
        while i < chars.len() && chars[i] != close {
            i = match chars[i] {
                '"' | '\'' | '`' => after_string(i),
                _ => i + 1,
            };
        }
        i + 1
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        i = match c {
            '"' | '\'' | '`' => after_string(i),
            '{' => after(i, '}'),
            '[' => after(i, ']'),
            '#' => after(i, '\n'),
            '$' if next == Some('{') => after(i + 1, '}'),
            '$' => {
                let mut end = i + 1;
                while end < chars.len() && is_word(chars[end]) {
                    end += 1;
                }
                end
            }
            c if c.is_ascii_digit() || (c == '.' && next.is_some_and(|n| n.is_ascii_digit())) => {
                let mut end = i + 1;
                while end < chars.len() && (is_word(chars[end]) || chars[end] == '.') {
                    end += 1;
                }
                end
            }
            c if is_word(c) => {
                let mut end = i + 1;
                while end < chars.len() && is_word(chars[end]) {
                    end += 1;
                }
                let word: String = chars[i..end].iter().collect();
                let mut look = end;
                while look < chars.len() && chars[look].is_whitespace() {
                    look += 1;
                }
                let call = chars.get(look) == Some(&'(');
                if call && GROUPING.contains(&word.as_str()) {
                    after(look, ')')
                } else {
                    if !call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                        names.insert(word);
                    }
                    end
                }
            }
            _ => i + 1,
        };
    }
    names
}

/// The expression of every rule in the rule file.
fn rule_expressions() -> Vec<String> {
    let doc = &yaml(RULES)[0];
    let groups = doc["groups"].as_vec().expect("groups");
    groups
        .iter()
        .flat_map(|group| group["rules"].as_vec().expect("rules").iter())
        .map(|rule| rule["expr"].as_str().expect("an expr").to_owned())
        .collect()
}

/// The queries of the dashboard: each panel target's `expr`, and the series selector of each
/// `label_values(SELECTOR, LABEL)` variable, with the label it lists.
fn dashboard_queries(dashboard: &Value) -> (Vec<String>, Vec<(String, String)>) {
    fn walk(value: &Value, exprs: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", Value::String(expr)) => exprs.push(expr.clone()),
                        _ => walk(value, exprs),
                    }
                }
            }
            Value::Array(values) => values.iter().for_each(|value| walk(value, exprs)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], &mut exprs);
    let mut label_values = Vec::new();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if variable["type"] != "query" {
            continue;
        }
        let queries = [
            variable["definition"].as_str(),
            variable["query"]
                .as_str()
                .or_else(|| variable["query"]["query"].as_str()),
        ];
        for query in queries.into_iter().flatten() {
            let inner = query
                .trim()
                .strip_prefix("label_values(")
                .and_then(|rest| rest.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable query {query:?} is not label_values(...)"));
            let (selector, label) = inner
                .rsplit_once(',')
                .unwrap_or_else(|| panic!("{query:?} names no series"));
            label_values.push((selector.trim().to_owned(), label.trim().to_owned()));
        }
    }
    (exprs, label_values)
}

/// A dashboard query as Prometheus gets it from Grafana: `$__rate_interval` and its kin as
/// durations, the `job`, `tenant` and `environment` variables at "All" (`.*`).
fn as_promql(query: &str) -> String {
    let query = query
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    let mut out = String::new();
    let mut rest = query.as_str();
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let variable = &rest[at + 1..];
        let length = if let Some(braced) = variable.strip_prefix('{') {
            braced.find('}').map_or(variable.len(), |end| end + 2)
        } else {
            variable
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(variable.len())
        };
        out.push_str(".*");
        rest = &variable[length..];
    }
    out.push_str(rest);
    out
}

/// Every sample name in Prometheus text (histograms with `_bucket`, `_sum` and `_count`).
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_broker_and_shows_the_target_up_the_idp_request_and_the_rules() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    assert_eq!(app.billing("acme/production").await.status, 200);

    let target = app.url.strip_prefix("http://").expect("an http URL");
    let mut prometheus = Prometheus::start(target, &root().join(RULES));
    let deadline = Instant::now() + PROMETHEUS_WAIT;

    // The target, scraped and up.
    loop {
        let targets = prometheus.api("/api/v1/targets", &[]).await;
        let broker = targets.as_ref().and_then(|data| {
            data["activeTargets"]
                .as_array()?
                .iter()
                .find(|t| t["labels"]["job"] == "token-broker")
                .cloned()
        });
        if let Some(broker) = &broker
            && broker["health"] == "up"
        {
            assert_eq!(broker["scrapeUrl"], format!("{}/metrics", app.url));
            break;
        }
        prometheus.keep_waiting(
            deadline,
            &format!("the broker's target up (last: {broker:?})"),
        );
        pause().await;
    }

    // The IdP request made above, in token_broker_idp_requests_total.
    let request = r#"token_broker_idp_requests_total{job="token-broker",tenant="acme",environment="production",outcome="ok"}"#;
    loop {
        let result = prometheus.query(request).await.unwrap_or_default();
        if let [sample] = result.as_slice() {
            assert_eq!(sample["value"][1], "1", "{sample}");
            break;
        }
        prometheus.keep_waiting(deadline, &format!("{request} (last: {result:?})"));
        pause().await;
    }
    let up = prometheus.query(r#"up{job="token-broker"}"#).await;
    assert_eq!(
        up.as_ref().map(|r| r[0]["value"][1].clone()),
        Some(json!("1"))
    );

    // Every alert rule loaded and evaluated against the broker's series without an error.
    loop {
        let data = prometheus.api("/api/v1/rules", &[]).await;
        let rules: Vec<Value> = data
            .iter()
            .flat_map(|data| data["groups"].as_array().cloned().unwrap_or_default())
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        for rule in &rules {
            assert_ne!(
                rule["health"], "err",
                "rule {} fails: {}",
                rule["name"], rule["lastError"]
            );
        }
        if rules.len() == ALERTS.len() && rules.iter().all(|rule| rule["health"] == "ok") {
            break;
        }
        prometheus.keep_waiting(deadline, "every alert rule evaluated");
        pause().await;
    }

    // The dashboard's queries are PromQL Prometheus runs, and its variables list the broker's.
    let (exprs, label_values) = dashboard_queries(&dashboard());
    for expr in &exprs {
        let promql = as_promql(expr);
        assert!(
            prometheus.query(&promql).await.is_some(),
            "Prometheus refuses the dashboard query {promql}"
        );
    }
    let expected = BTreeMap::from([
        ("job", "token-broker"),
        ("tenant", "acme"),
        ("environment", "production"),
    ]);
    for (selector, label) in &label_values {
        let selector = as_promql(selector);
        let values = prometheus
            .api(
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", &selector)],
            )
            .await
            .unwrap_or_else(|| panic!("Prometheus refuses the variable's series {selector}"));
        let wanted = expected.get(label.as_str()).expect("a known variable");
        assert!(
            values.as_array().unwrap().contains(&json!(wanted)),
            "label_values({selector}, {label}) lists {values}"
        );
    }
    drop(prometheus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_and_the_rules_and_dashboard_name_only_exported_metrics() {
    // A replica with a shared cache, and an IdP that sends Auth0's rate-limit and quota headers,
    // so that every metric the broker has shows.
    let redis = RedisServer::start().await;
    let users = format!(
        "[tenants.acme.environments.production]\nauthorize_url = \"{AUTHORIZE_URL}\"\nredirect_uri = \"{REDIRECT_URI}\"\n"
    );
    // A scheduled rotation, for its metrics (its endpoint answers 404: a failed rotation).
    let rotation = r#"
        [tenants.acme.environments.management]
        token_url = "http://127.0.0.1:9/unused"
        client_id = "acme-mgmt-id"
        client_secret = "management-secret"
        audience = "https://acme.example/api/v2/"
        [tenants.globex.environments.production.rotation]
        endpoint = "http://127.0.0.1:9/api/v2/clients/{client_id}/rotate-secret"
        authorized_by = "acme/management"
        every = "30d"
    "#;
    let fleet = TestApp::init()
        .with_redis(&redis)
        .with_config(users)
        .with_config(rotation)
        .start_fleet(1)
        .await;
    let app = &fleet[0];
    app.clock.advance(std::time::Duration::from_secs(61));
    eventually("the rotation schedule checked", async || {
        app.scrape()
            .await
            .contains("token_broker_client_secret_rotation_due_timestamp_seconds")
    })
    .await;
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-ratelimit-limit", "50")
                .insert_header("x-ratelimit-remaining", "49")
                .insert_header(
                    "auth0-client-quota-limit",
                    "b=per_hour;q=100;r=99;t=3540,b=per_day;q=1000;r=999;t=43200",
                )
                .insert_header(
                    "auth0-organization-quota-limit",
                    "b=per_hour;q=500;r=480;t=3540,b=per_day;q=5000;r=4800;t=43200",
                )
                .set_body_json(json!({"access_token": "acme-token", "expires_in": 3600})),
        )
        .mount(&app.idp)
        .await;
    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("miss")
    );
    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("hit")
    );
    // A user's login, for the user-token metrics.
    let started = app
        .authorize("acme/production", BILLING_KEY, json!({}))
        .await;
    let state = started.body["state"].as_str().unwrap();
    let created = app
        .create_session("acme/production", BILLING_KEY, "a-code", state)
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let text = app.scrape().await;

    let checked = promtool(&["check", "metrics"], Some(&text));
    checked.assert_success("promtool check metrics on /metrics");
    assert_eq!(
        format!("{}{}", checked.stdout, checked.stderr).trim(),
        "",
        "promtool check metrics finds problems"
    );

    let exported = exported_names(&text);
    for name in [
        "token_broker_idp_requests_total",
        "token_broker_idp_request_duration_seconds_bucket",
        "token_broker_idp_quota_remaining",
        "token_broker_idp_rate_limit_remaining",
        "token_broker_shared_cache_up",
        "token_broker_user_idp_requests_total",
        "token_broker_user_sessions_unwritten",
        "token_broker_client_secret_rotations_total",
        "token_broker_client_secret_rotation_due_timestamp_seconds",
    ] {
        assert!(exported.contains(name), "{name} not in the scrape:\n{text}");
    }
    let (exprs, label_values) = dashboard_queries(&dashboard());
    let selectors = label_values.into_iter().map(|(selector, _)| selector);
    for (source, queries) in [
        (RULES, rule_expressions()),
        (DASHBOARD, exprs.into_iter().chain(selectors).collect()),
    ] {
        let mut used = BTreeSet::new();
        for query in &queries {
            let names = metric_names(query);
            assert!(!names.is_empty(), "{source}: no metric in {query}");
            let unknown: Vec<_> = names.difference(&exported).collect();
            assert!(
                unknown.is_empty(),
                "{source} names metrics the broker does not export: {unknown:?} in\n{query}"
            );
            used.extend(names);
        }
        assert!(
            used.contains("token_broker_idp_requests_total"),
            "{source}: {used:?}"
        );
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_each_alert_has_a_firing_and_a_quiet_unit_test() {
    promtool(&["check", "rules", RULES], None).assert_success("promtool check rules");
    promtool(&["test", "rules", RULE_TESTS], None).assert_success("promtool test rules");

    let doc = &yaml(RULES)[0];
    let rules: Vec<&Yaml> = doc["groups"]
        .as_vec()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_vec().expect("rules"))
        .collect();
    let names: Vec<&str> = rules
        .iter()
        .map(|rule| rule["alert"].as_str().expect("an alert"))
        .collect();
    assert_eq!(names, ALERTS);
    for rule in &rules {
        let name = rule["alert"].as_str().unwrap();
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        for annotation in ["summary", "description"] {
            let text = rule["annotations"][annotation].as_str().unwrap_or_default();
            assert!(text.len() > 20, "{name}: {annotation} {text:?}");
        }
        let wait = rule["for"].as_str().expect("a for: duration");
        let wait = humantime::parse_duration(wait).unwrap();
        assert!(
            wait >= Duration::from_secs(300),
            "{name} fires after {wait:?}"
        );
    }

    // One test in which each alert fires, and one in which it stays quiet.
    let tests = &yaml(RULE_TESTS)[0];
    let mut seen: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    for test in tests["tests"].as_vec().expect("tests") {
        for check in test["alert_rule_test"].as_vec().expect("alert_rule_test") {
            let alert = check["alertname"].as_str().expect("alertname");
            let fires = !check["exp_alerts"].as_vec().expect("exp_alerts").is_empty();
            let entry = seen.entry(alert).or_default();
            if fires {
                entry.0 = true;
            } else {
                entry.1 = true;
            }
        }
    }
    for alert in ALERTS {
        assert_eq!(
            seen.get(alert),
            Some(&(true, true)),
            "{alert}: (a firing test, a quiet test) in {RULE_TESTS}"
        );
    }
}

#[test]
fn the_metric_name_check_finds_every_selected_name_and_nothing_else() {
    let expr = r#"
        sum by (tenant, le) (rate(token_broker_a_total{route="/v1/{tenant}", x=~"$job"}[$__rate_interval]))
          / on (job) group_left (caller) max without (instance) (token_broker_b)
        > 0.5 * 1e3 and token_broker_c offset 5m
        unless absent(nope{a="b"}) or histogram_quantile(0.99, sum(rate(d_bucket[5m])) by (le))
        or label_replace(up, "dst", "$1", "src", "(.*)") # a comment naming not_a_metric
    "#;
    let expected = [
        "d_bucket",
        "nope",
        "token_broker_a_total",
        "token_broker_b",
        "token_broker_c",
        "up",
    ];
    assert_eq!(
        metric_names(expr),
        BTreeSet::from(expected.map(String::from))
    );
    assert_eq!(
        as_promql(r#"rate(x{job=~"$job",tenant=~"${tenant}"}[$__rate_interval])"#),
        r#"rate(x{job=~".*",tenant=~".*"}[1m])"#
    );
}

#[test]
fn the_dashboard_is_importable_with_the_datasource_as_a_variable() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(
        dashboard["id"].is_null(),
        "no id, so that import creates one"
    );
    assert!(!dashboard["uid"].as_str().unwrap().is_empty());
    assert!(dashboard.get("__inputs").is_none());
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["name"], "datasource");
    assert_eq!(datasource["query"], "prometheus");

    let variable = json!({"type": "prometheus", "uid": "${datasource}"});
    for query_variable in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(query_variable["datasource"], variable, "{query_variable}");
    }
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "{title}: id repeated"
        );
        assert_eq!(panel["datasource"], variable, "{title}");
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{title}: gridPos");
        assert!(
            panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}: description"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: targets");
        for target in targets {
            assert_eq!(target["datasource"], variable, "{title}");
            assert!(
                target["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{title}"
            );
            assert!(target["refId"].as_str().is_some(), "{title}");
        }
    }
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for title in PANELS {
        assert!(titles.contains(&title), "no panel {title:?} in {titles:?}");
    }
    assert!(
        !read(DASHBOARD).contains("${DS_"),
        "no import-time datasource input"
    );
}

#[test]
fn the_service_monitor_selects_the_kubernetes_service_by_its_labels_and_port_name() {
    let monitor = &yaml(SERVICE_MONITOR)[0];
    assert_eq!(
        monitor["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(monitor["kind"].as_str(), Some("ServiceMonitor"));
    let manifests = yaml(DEPLOYMENT);
    let service = manifests
        .iter()
        .find(|m| m["kind"].as_str() == Some("Service"))
        .expect("a Service");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_hash()
        .expect("matchLabels");
    assert!(!selector.is_empty());
    for (label, value) in selector {
        assert_eq!(
            &service["metadata"]["labels"][label.as_str().unwrap()],
            value,
            "the Service is labelled {label:?}"
        );
    }
    let ports: Vec<&str> = service["spec"]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|port| port["name"].as_str())
        .collect();
    let endpoints = monitor["spec"]["endpoints"].as_vec().expect("endpoints");
    assert!(!endpoints.is_empty());
    for endpoint in endpoints {
        let port = endpoint["port"].as_str().unwrap();
        assert!(
            ports.contains(&port),
            "port {port} not in the Service's {ports:?}"
        );
        assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    }
}
