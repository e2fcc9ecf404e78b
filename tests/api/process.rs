//! The real binary: `serve` with logs at debug, graceful shutdown, `dev`, `check-config`,
//! `hash-key` and `healthcheck`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use token_broker::auth::KeyHash;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

/// A child process whose stderr (or stdout) lines arrive on a channel; killed on drop, so a
/// failing test leaves no broker behind.
pub(crate) struct Running {
    child: ChildGuard,
    lines: mpsc::Receiver<String>,
}

impl Running {
    pub(crate) fn wait_for(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no line containing {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Sends `signal` (`TERM`, `HUP`) to the process.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub(crate) fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        self.signal("TERM");
        let status = self.child.child().wait().expect("wait");
        (status, self.lines.iter().collect())
    }
}

pub(crate) fn spawn(command: &mut Command, read_stdout: bool) -> Running {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start token-broker");
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let forward = |reader: Box<dyn std::io::Read + Send>, tx: mpsc::Sender<String>| {
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        })
    };
    if read_stdout {
        forward(Box::new(stdout), tx.clone());
        std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    } else {
        forward(Box::new(stderr), tx.clone());
        std::thread::spawn(move || std::io::copy(&mut { stdout }, &mut std::io::sink()));
    }
    drop(tx);
    Running {
        child: ChildGuard::new(child),
        lines,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_never_show_a_secret_a_key_or_a_token_and_sigterm_exits_0() {
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    Mock::given(method("POST"))
        .and(path("/acme-staging/oauth/token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({
            "error": "access_denied",
            "error_description": format!("bad secret {ACME_STAGING_SECRET}"),
        })))
        .mount(&idp)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    let toml = base_config(&idp.uri()).replace(
        &format!(r#"client_secret = "{ACME_PRODUCTION_SECRET}""#),
        r#"client_secret_env = "ACME_PRODUCTION_SECRET""#,
    );
    std::fs::write(&config, toml).unwrap();

    let server = spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "debug")
            .env("ACME_PRODUCTION_SECRET", ACME_PRODUCTION_SECRET),
        false,
    );
    let line = server.wait_for("listening address=");
    let address = line
        .split("address=")
        .nth(1)
        .expect("the listening line names the address")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let url = format!("http://{address}");
    let http = reqwest::Client::new();
    let get = |path: &str, key: &str| {
        http.get(format!("{url}/v1/tokens/{path}"))
            .bearer_auth(key)
            .send()
    };

    let ok = answer(get("acme/production", BILLING_KEY).await.unwrap()).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let token = ok.token().to_owned();
    assert_eq!(
        get("acme/production", BILLING_KEY).await.unwrap().status(),
        200
    );
    assert_eq!(
        get("acme/staging", BILLING_KEY).await.unwrap().status(),
        502
    );
    assert_eq!(
        get("acme/production", "tbk_a-wrong-key")
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        get("acme/production", REPORTS_KEY).await.unwrap().status(),
        200
    );
    assert_eq!(idp_requests(&idp).await.to("acme").len(), 1);

    let (status, lines) = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    let log = lines.join("\n");
    assert!(log.contains("DEBUG"), "logs were at debug level");
    for secret in [
        ACME_PRODUCTION_SECRET,
        ACME_STAGING_SECRET,
        BILLING_KEY,
        REPORTS_KEY,
        "tbk_a-wrong-key",
        token.as_str(),
    ] {
        assert!(
            !log.contains(secret),
            "{secret:?} appears in the log:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_prints_a_curl_line_that_works_as_printed() {
    let dev = spawn(
        Command::new(BIN)
            .args(["dev", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn"),
        true,
    );
    let curl_line = dev.wait_for("curl ").trim().to_owned();
    let url = curl_line
        .rsplit('\'')
        .nth(1)
        .expect("the curl line ends with a quoted URL")
        .to_owned();
    // The second line uses the printed workload token instead of the key.
    let workload_line = dev.wait_for("curl ").trim().to_owned();
    assert!(
        workload_line.contains("Bearer eyJ") && !workload_line.contains("tbk_"),
        "{workload_line}"
    );

    let run = |line: String| async move {
        let printed = tokio::task::spawn_blocking(move || {
            Command::new("sh")
                .args(["-c", &line])
                .output()
                .expect("run the printed curl line")
        })
        .await
        .unwrap();
        assert!(printed.status.success(), "{printed:?}");
        let body: serde_json::Value = serde_json::from_slice(&printed.stdout).expect("JSON");
        body
    };
    let rotate_line = dev.wait_for("rotate-secret").trim().to_owned();
    let body = run(curl_line.clone()).await;
    let token = body["access_token"].as_str().expect("a token");
    assert_eq!(token.split('.').count(), 3, "a JWT");
    assert_eq!(body["token_type"], "Bearer");
    let by_workload = run(workload_line).await;
    assert_eq!(
        by_workload["access_token"], body["access_token"],
        "the workload caller is the same caller and gets the cached token: {by_workload}"
    );

    // The printed rotation: the development IdP takes only the new secret from then on, the
    // cached token is still served, and a new key is fetched with the new secret.
    let rotated = run(rotate_line).await;
    assert_eq!(
        rotated["fingerprint"].as_str().map(str::len),
        Some(16),
        "{rotated}"
    );
    assert_eq!(
        run(curl_line.clone()).await["access_token"],
        body["access_token"]
    );
    let new_key = curl_line.replace("/demo/production'", "/demo/production?scope=after'");
    let fresh = run(new_key).await;
    assert!(fresh["access_token"].is_string(), "{fresh}");
    assert_ne!(fresh["access_token"], body["access_token"]);

    let livez = url.split("/v1/").next().unwrap().to_owned() + "/livez";
    let health = Command::new(BIN)
        .args(["healthcheck", "--url", &livez])
        .status()
        .unwrap();
    assert!(health.success());

    let (status, _) = dev.terminate();
    assert!(status.success(), "{status:?}");
    let health = Command::new(BIN)
        .args(["healthcheck", "--url", &livez])
        .output()
        .unwrap();
    assert!(!health.status.success());
}

#[test]
fn check_config_lists_every_problem_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
        [callers.billing]
        key_sha256 = "nothex"
        allow = ["acme/production"]
        [tenants.acme.environments.production]
        client_id = "x"
        client_secret_env = "TOKEN_BROKER_TEST_UNSET_VARIABLE"
        "#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for problem in [
        "key_sha256",
        "token_url: missing",
        "TOKEN_BROKER_TEST_UNSET_VARIABLE",
    ] {
        assert!(stderr.contains(problem), "{problem} not in {stderr}");
    }

    let good = dir.path().join("good.toml");
    std::fs::write(&good, base_config("http://127.0.0.1:9")).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn hash_key_prints_a_key_and_its_hash() {
    let out = Command::new(BIN).arg("hash-key").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    let key = field("key:");
    let hash = field("key_sha256:");
    assert_eq!(KeyHash::of(&key), KeyHash::from_hex(&hash).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configuration() {
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    let original = base_config(&idp.uri());
    std::fs::write(&config, &original).unwrap();
    let server = spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info"),
        false,
    );
    let line = server.wait_for("listening address=");
    let address = line.split("address=").nth(1).unwrap().trim().to_owned();
    let url = format!("http://{address}/v1/tokens/acme/production");
    let http = reqwest::Client::new();
    let new_key = "tbk_test-added-by-reload";
    let status = |key: &'static str| {
        let request = http.get(&url).bearer_auth(key);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(new_key).await, 401);

    let added = format!(
        "{original}\n[callers.added]\nkey_sha256 = \"{}\"\nallow = [\"acme/*\"]\n",
        KeyHash::of(new_key).to_hex()
    );
    std::fs::write(&config, added).unwrap();
    server.signal("HUP");
    server.wait_for("configuration reloaded");
    assert_eq!(status(new_key).await, 200);
    assert_eq!(status(BILLING_KEY).await, 200);
    let (exit, _) = server.terminate();
    assert!(exit.success());
}

/// The broker URL a dev-mode banner prints.
fn banner_url(dev: &Running) -> String {
    dev.wait_for("broker:")
        .split_whitespace()
        .last()
        .expect("a URL")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_layers_config_and_variables_and_fits_min_remaining_to_the_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dev.toml");
    std::fs::write(&file, "[cache]\nrefresh_ahead = 0.5\n").unwrap();
    let dev = spawn(
        Command::new(BIN)
            .args(["dev", "--listen", "127.0.0.1:0", "--token-lifetime", "90s"])
            .arg("--config")
            .arg(&file)
            .env(
                "TOKEN_BROKER__AUTH__ADMIN_KEY_SHA256",
                KeyHash::of(ADMIN_KEY).to_hex(),
            )
            .env("RUST_LOG", "warn"),
        true,
    );
    let url = banner_url(&dev);
    // 90 s tokens: min_remaining 30 s; refresh_ahead 0.5 from the file: refresh from 30 s on.
    let cache = dev.wait_for("cache:");
    assert!(cache.contains("min_remaining 30s"), "{cache}");
    assert!(cache.contains("from 30s on"), "{cache}");

    let http = reqwest::Client::new();
    let reload = http
        .post(format!("{url}/v1/admin/reload"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200, "the admin key came from a variable");
    let (status, _) = dev.terminate();
    assert!(status.success(), "{status:?}");

    // Without --config there is nothing to re-read.
    let dev = spawn(
        Command::new(BIN)
            .args(["dev", "--listen", "127.0.0.1:0"])
            .env(
                "TOKEN_BROKER__AUTH__ADMIN_KEY_SHA256",
                KeyHash::of(ADMIN_KEY).to_hex(),
            )
            .env("RUST_LOG", "warn"),
        true,
    );
    let url = banner_url(&dev);
    assert!(dev.wait_for("cache:").contains("min_remaining 1m"));
    let reload = http
        .post(format!("{url}/v1/admin/reload"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 409);
    dev.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_shows_the_user_token_flow_end_to_end() {
    let dev = spawn(
        Command::new(BIN)
            .args(["dev", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn"),
        true,
    );
    let key = dev
        .wait_for("caller key:")
        .split_whitespace()
        .nth(2)
        .expect("the caller key")
        .to_owned();
    let authorize_line = dev.wait_for("/authorize'").trim().to_owned();
    let run = |line: String| async move {
        let output = tokio::task::spawn_blocking(move || {
            Command::new("sh").args(["-c", &line]).output().unwrap()
        })
        .await
        .unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("JSON")
    };
    let authorization = run(authorize_line).await;
    let url = authorization["authorization_url"].as_str().unwrap();

    // The browser's part: the IdP redirects at once to its /callback page.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let redirect = browser.get(url).send().await.unwrap();
    assert_eq!(redirect.status(), 302);
    let callback = redirect.headers()["location"].to_str().unwrap().to_owned();
    assert!(callback.contains("/callback?code="), "{callback}");
    let page = browser
        .get(&callback)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let redeem = page
        .split("<pre>")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .expect("the redeem line")
        .replace("&#39;", "'")
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    assert!(redeem.contains("$CALLER_KEY"), "{redeem}");
    let sessions = redeem.rsplit('\'').nth(1).unwrap().to_owned();
    let base = sessions.split("/v1/").next().unwrap().to_owned();
    // Run as pasted: the line as printed, with CALLER_KEY set as the page says (and PATH, to
    // find curl), nothing replaced by hand.
    let pasted = {
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            Command::new("bash")
                .args(["-c", &redeem])
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("CALLER_KEY", key)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    assert!(pasted.status.success(), "{pasted:?}");
    let session: serde_json::Value = serde_json::from_slice(&pasted.stdout).expect("JSON");
    let handle = session["handle"].as_str().expect("a handle");

    let token = reqwest::Client::new()
        .get(format!("{base}/v1/users/handles/{handle}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), 200);
    let token: serde_json::Value = serde_json::from_str(&token.text().await.unwrap()).unwrap();
    assert_eq!(
        token["access_token"].as_str().unwrap().split('.').count(),
        3
    );
}
