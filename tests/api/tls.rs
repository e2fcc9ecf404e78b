//! `server.tls`: the listener serves HTTPS with the configured certificate, and only HTTPS.

use std::time::Duration;

use token_broker::config::Settings;
use token_broker::startup::{Application, StartupError};
use tokio::net::TcpListener;
use wiremock::MockServer;

use crate::helpers::*;

/// A self-signed certificate for `localhost`, written as PEM files into `dir`.
fn self_signed(dir: &std::path::Path) -> (String, String, reqwest::Certificate) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let certificate_pem = generated.cert.pem();
    let certificate = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&certificate, &certificate_pem).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (
        certificate.display().to_string(),
        key.display().to_string(),
        reqwest::Certificate::from_pem(certificate_pem.as_bytes()).unwrap(),
    )
}

fn tls_layer(certificate: &str, key: &str) -> String {
    format!(
        r#"
        [server.tls]
        certificate_file = "{certificate}"
        key_file = "{key}"
        "#
    )
}

#[tokio::test]
async fn https_serves_tokens_to_clients_that_trust_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (certificate, key, trusted) = self_signed(dir.path());
    let idp = MockServer::start().await;
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let settings = Settings::from_toml_layers(
        &[&base_config(&idp.uri()), &tls_layer(&certificate, &key)],
        &|_| None,
    )
    .expect("valid");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = Application::with_listener(settings, listener).expect("build");
    let port = app.local_addr().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let https = reqwest::Client::builder()
        .tls_certs_only([trusted])
        .build()
        .unwrap();
    let answer = answer(
        https
            .get(format!(
                "https://localhost:{port}/v1/tokens/acme/production"
            ))
            .bearer_auth(BILLING_KEY)
            .send()
            .await
            .expect("an HTTPS request to a trusted certificate"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.token(), "token-1");

    let untrusting = reqwest::Client::new();
    assert!(
        untrusting
            .get(format!("https://localhost:{port}/livez"))
            .send()
            .await
            .is_err(),
        "a client that does not trust the certificate must fail"
    );
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("http://localhost:{port}/livez"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP on the TLS port: {plain:?}");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn unusable_certificate_files_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (certificate, _key, _) = self_signed(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    let settings = Settings::from_toml_layers(
        &[
            &base_config("http://127.0.0.1:9"),
            &tls_layer(&certificate, &garbage.display().to_string()),
        ],
        &|_| None,
    )
    .expect("the files exist, so the configuration validates");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let Err(error) = Application::with_listener(settings, listener) else {
        panic!("started with a garbage key");
    };
    assert!(matches!(error, StartupError::Tls(_)), "{error}");
    assert!(error.to_string().contains("garbage.pem"), "{error}");

    let missing = Settings::from_toml_layers(
        &[
            &base_config("http://127.0.0.1:9"),
            &tls_layer("/nonexistent/tls.crt", "/nonexistent/tls.key"),
        ],
        &|_| None,
    );
    let Err(error) = missing else {
        panic!("missing certificate files validated");
    };
    let text = error.to_string();
    assert!(
        text.contains("server.tls.certificate_file") && text.contains("server.tls.key_file"),
        "{text}"
    );
}

/// A client that trusts only `certificate`, with a fresh connection pool.
fn trusting(certificate: &reqwest::Certificate) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([certificate.clone()])
        .build()
        .unwrap()
}

async fn livez(client: &reqwest::Client, port: u16) -> bool {
    client
        .get(format!("https://localhost:{port}/livez"))
        .send()
        .await
        .is_ok_and(|response| response.status() == 200)
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_to_new_connections_without_a_restart() {
    let (first_dir, second_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (certificate, key, first) = self_signed(first_dir.path());
    let (new_certificate, new_key, second) = self_signed(second_dir.path());
    let idp = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(
        &file,
        base_config(&idp.uri()) + &tls_layer(&certificate, &key),
    )
    .unwrap();
    let app = TestApp::init().with_idp(idp).with_file(&file).start().await;
    let port: u16 = app.url.rsplit(':').next().unwrap().parse().unwrap();
    let open = trusting(&first);
    assert!(livez(&open, port).await, "the first certificate is served");
    assert!(!livez(&trusting(&second), port).await);

    // A half-written pair (the new certificate, the old key) changes nothing.
    std::fs::copy(&new_certificate, &certificate).unwrap();
    // The watcher may not be asleep yet when the clock moves: move it on each look.
    eventually("the mismatched pair refused", async || {
        app.clock.advance(Duration::from_secs(11));
        metric(
            &app.state.metrics.render(),
            "token_broker_config_reloads_total{trigger=\"file\",outcome=\"refused\"}",
        ) == Some(1.0)
    })
    .await;
    assert!(livez(&trusting(&first), port).await, "still the first");

    // The key follows: the watcher applies the pair, no signal, no restart.
    std::fs::copy(&new_key, &key).unwrap();
    eventually("the new certificate served", async || {
        app.clock.advance(Duration::from_secs(11));
        livez(&trusting(&second), port).await
    })
    .await;
    assert!(
        !livez(&trusting(&first), port).await,
        "new connections get the new one"
    );
    assert!(
        livez(&open, port).await,
        "an open connection finishes with its certificate"
    );
}
