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
