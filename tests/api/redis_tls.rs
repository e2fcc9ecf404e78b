//! The shared cache over TLS, as managed Redis requires: a `redis-server` of the test's own with
//! `--tls-port` and certificates made here (the server's with an IP SAN for 127.0.0.1), with
//! and without client certificates, and an ACL user. A wrong CA or password leaves the broker
//! serving from memory and the IdP.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use wiremock::MockServer;

use crate::helpers::*;

const REDIS_USER: &str = "broker";
const REDIS_PASSWORD: &str = "redis-acl-password-for-tests";
const PASSWORD_ENV: &str = "TEST_REDIS_PASSWORD";

/// A CA and the server and client certificates it signed, as PEM files in a directory.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "token-broker test CA");
        let ca = write("ca.crt", ca_params.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.extended_key_usages = vec![usage];
            let certificate = params.signed_by(&key, &issuer).unwrap();
            (
                write(&format!("{name}.crt"), certificate.pem()),
                write(&format!("{name}.key"), key.serialize_pem()),
            )
        };
        let server = leaf(
            "server",
            vec!["127.0.0.1".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf(
            "client",
            vec!["broker".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Self {
            _dir: dir,
            ca,
            server,
            client,
        }
    }
}

/// A `redis-server` that speaks only TLS (client certificates required when
/// `client_certificates`), with ACL user [`REDIS_USER`] and no default user.
async fn tls_redis(pki: &Pki, client_certificates: bool) -> RedisServer {
    let port = free_port();
    let read = |path: &Path| std::fs::read(path).unwrap();
    let client = redis::Client::build_with_tls(
        format!("rediss://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{port}"),
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read(&pki.client.0),
                client_key: read(&pki.client.1),
            }),
            root_cert: Some(read(&pki.ca)),
        },
    )
    .unwrap();
    let path = |path: &Path| path.display().to_string();
    let (port_arg, password) = (port.to_string(), format!(">{REDIS_PASSWORD}"));
    let (certificate, key, ca) = (path(&pki.server.0), path(&pki.server.1), path(&pki.ca));
    let args = [
        "--port",
        "0",
        "--tls-port",
        &port_arg,
        "--tls-cert-file",
        &certificate,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        if client_certificates { "yes" } else { "no" },
        "--user",
        REDIS_USER,
        "on",
        &password,
        "~*",
        "&*",
        "+@all",
        "--user",
        "default",
        "off",
    ];
    RedisServer::start_with(port, &args, client).await
}

/// The `[shared_cache]` layer for `redis`, with `tls` lines for `[shared_cache.tls]`.
fn tls_cache_config(redis: &RedisServer, password_env: &str, tls: &str) -> String {
    format!(
        r#"
        [shared_cache]
        url = "rediss://127.0.0.1:{port}"
        encryption_key_env = "{CACHE_KEY_ENV}"
        username = "{REDIS_USER}"
        password_env = "{password_env}"
        [shared_cache.tls]
        {tls}
        "#,
        port = redis.port(),
    )
}

/// A broker of the standard configuration whose IdP is `idp`, plus `cache`, with the Redis
/// passwords in its environment.
async fn replica(idp: &Arc<MockServer>, cache: &str) -> TestApp {
    TestApp::init()
        .with_idp(Arc::clone(idp))
        .with_config(cache)
        .with_env(PASSWORD_ENV, REDIS_PASSWORD)
        .with_env("WRONG_PASSWORD", "not-the-password")
        .start()
        .await
}

#[tokio::test]
async fn replicas_sharing_mutual_tls_redis_make_one_idp_request_per_key() {
    let pki = Pki::new();
    let redis = tls_redis(&pki, true).await;
    let idp = Arc::new(MockServer::start().await);
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let tls = format!(
        "ca_file = \"{}\"\ncertificate_file = \"{}\"\nkey_file = \"{}\"",
        pki.ca.display(),
        pki.client.0.display(),
        pki.client.1.display()
    );
    let cache = tls_cache_config(&redis, PASSWORD_ENV, &tls);
    let first = replica(&idp, &cache).await;
    let second = replica(&idp, &cache).await;
    first.wait_for_shared_cache(true).await;
    second.wait_for_shared_cache(true).await;

    let token = first.billing("acme/production").await;
    assert_eq!(token.status, 200, "{}", token.body);
    let shared = second.billing("acme/production").await;
    assert_eq!(shared.token(), token.token());
    assert_eq!(
        idp_requests(&idp).await.to("acme").len(),
        1,
        "one IdP request for the fleet"
    );
}

#[tokio::test]
async fn tls_without_client_certificates_needs_only_the_ca() {
    let pki = Pki::new();
    let redis = tls_redis(&pki, false).await;
    let idp = Arc::new(MockServer::start().await);
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let cache = tls_cache_config(
        &redis,
        PASSWORD_ENV,
        &format!("ca_file = \"{}\"", pki.ca.display()),
    );
    let first = replica(&idp, &cache).await;
    let second = replica(&idp, &cache).await;
    first.wait_for_shared_cache(true).await;
    second.wait_for_shared_cache(true).await;
    let token = first.billing("acme/production").await;
    assert_eq!(
        second.billing("acme/production").await.token(),
        token.token()
    );
    assert_eq!(idp_requests(&idp).await.to("acme").len(), 1);
}

#[tokio::test]
async fn a_wrong_ca_or_password_leaves_the_broker_serving_with_no_failed_request() {
    let pki = Pki::new();
    let other = Pki::new();
    let redis = tls_redis(&pki, false).await;
    let idp = Arc::new(MockServer::start().await);
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let wrong_ca = tls_cache_config(
        &redis,
        PASSWORD_ENV,
        &format!("ca_file = \"{}\"", other.ca.display()),
    );
    let wrong_password = tls_cache_config(
        &redis,
        "WRONG_PASSWORD",
        &format!("ca_file = \"{}\"", pki.ca.display()),
    );
    for cache in [wrong_ca, wrong_password] {
        let app = replica(&idp, &cache).await;
        app.wait_for_shared_cache(false).await;
        for _ in 0..5 {
            let answer = app.billing("acme/production").await;
            assert_eq!(answer.status, 200, "{}", answer.body);
        }
    }
    assert_eq!(
        idp_requests(&idp).await.to("acme").len(),
        2,
        "each broker fetched once and served the rest from memory"
    );
}

#[tokio::test]
async fn a_user_in_the_url_takes_its_password_from_password_env() {
    let pki = Pki::new();
    let redis = tls_redis(&pki, false).await;
    let idp = Arc::new(MockServer::start().await);
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let cache = tls_cache_config(
        &redis,
        PASSWORD_ENV,
        &format!("ca_file = \"{}\"", pki.ca.display()),
    )
    .replace(
        "rediss://127.0.0.1:",
        &format!("rediss://{REDIS_USER}@127.0.0.1:"),
    )
    .replace(&format!("username = \"{REDIS_USER}\"\n"), "");
    assert!(!cache.contains("username"), "{cache}");
    let first = replica(&idp, &cache).await;
    let second = replica(&idp, &cache).await;
    first.wait_for_shared_cache(true).await;
    second.wait_for_shared_cache(true).await;
    let token = first.billing("acme/production").await;
    assert_eq!(
        second.billing("acme/production").await.token(),
        token.token()
    );
    assert_eq!(idp_requests(&idp).await.to("acme").len(), 1);
}
