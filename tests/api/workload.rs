//! Callers without keys: a workload token (a JWT of a configured issuer, as a cluster gives a
//! pod) proves a caller by its subject. Every bad token is a 401 that names the check it failed,
//! keys rotate without a restart, an outage of the issuer's JWKS keeps verified callers working,
//! and the OAuth2 facade takes the same tokens as client assertions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::*;

/// The `auth.workload.audience` of these tests.
pub const AUDIENCE: &str = "token-broker";
/// The subject of the `pods` caller's prefix rule (any service account of namespace billing).
pub const POD: &str = "system:serviceaccount:billing:worker";
/// The exact subject of the `billing` caller.
pub const API_POD: &str = "system:serviceaccount:billing:api";

/// A key that signs workload tokens.
pub struct Signer {
    kid: String,
    algorithm: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    fn new(kid: &str, algorithm: Algorithm, key: EncodingKey) -> Self {
        let mut jwk = Jwk::from_encoding_key(&key, algorithm).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        Self {
            kid: kid.to_owned(),
            algorithm,
            key,
            jwk: serde_json::to_value(jwk).unwrap(),
        }
    }

    /// A fresh RSA-2048 key for `algorithm` (RS… or PS…).
    pub fn rsa(kid: &str, algorithm: Algorithm) -> Self {
        let pkcs8 = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .unwrap()
            .as_der()
            .unwrap();
        let pkcs1 = token_broker::idp::pkcs1_from_pkcs8(pkcs8.as_ref()).unwrap();
        Self::new(kid, algorithm, EncodingKey::from_rsa_der(pkcs1))
    }

    /// A fresh EC key: P-256 for ES256, P-384 for ES384.
    pub fn ec(kid: &str, algorithm: Algorithm) -> Self {
        let curve = match algorithm {
            Algorithm::ES256 => &ECDSA_P256_SHA256_FIXED_SIGNING,
            _ => &ECDSA_P384_SHA384_FIXED_SIGNING,
        };
        let key = EcdsaKeyPair::generate(curve).unwrap();
        let pkcs8 = key.to_pkcs8v1().unwrap();
        Self::new(kid, algorithm, EncodingKey::from_ec_der(pkcs8.as_ref()))
    }

    /// A fresh Ed25519 key.
    pub fn ed25519(kid: &str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate().unwrap().to_pkcs8v1().unwrap();
        Self::new(
            kid,
            Algorithm::EdDSA,
            EncodingKey::from_ed_der(pkcs8.as_ref()),
        )
    }

    /// Signs `claims` with a header naming this key.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    /// Signs `claims` naming another `kid`.
    fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// Seconds since the epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The JWKS answer, which a test changes (`None`: the issuer is down).
#[derive(Clone, Default)]
struct Keys {
    published: Arc<Mutex<Option<Value>>>,
    fetches: Arc<AtomicU64>,
}

impl Respond for Keys {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        match &*self.published.lock().unwrap() {
            Some(jwks) => ResponseTemplate::new(200).set_body_json(jwks),
            None => ResponseTemplate::new(503),
        }
    }
}

/// A workload issuer: OIDC discovery and a JWKS that tests change and count.
pub struct TestIssuer {
    server: MockServer,
    keys: Keys,
}

impl TestIssuer {
    /// Starts an issuer publishing `signers`' keys.
    pub async fn start(signers: &[&Signer]) -> Self {
        let server = MockServer::start().await;
        let keys = Keys::default();
        let issuer = Self { server, keys };
        issuer.publish(signers);
        Mock::given(method("GET"))
            .and(path("/.well-known/openid-configuration"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "issuer": issuer.uri(),
                "jwks_uri": format!("{}/keys", issuer.uri()),
            })))
            .mount(&issuer.server)
            .await;
        Mock::given(method("GET"))
            .and(path("/keys"))
            .respond_with(issuer.keys.clone())
            .mount(&issuer.server)
            .await;
        issuer
    }

    /// The issuer, as `iss` and in configuration.
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Publishes exactly these keys.
    pub fn publish(&self, signers: &[&Signer]) {
        let keys: Vec<&Value> = signers.iter().map(|signer| &signer.jwk).collect();
        *self.keys.published.lock().unwrap() = Some(json!({ "keys": keys }));
    }

    /// The `Authorization` headers the issuer received (discovery and JWKS).
    pub async fn authorizations(&self) -> Vec<String> {
        let requests = self.server.received_requests().await.unwrap_or_default();
        requests
            .iter()
            .filter_map(|request| request.headers.get("authorization"))
            .map(|value| value.to_str().unwrap().to_owned())
            .collect()
    }

    /// Makes the JWKS answer 503 from now on.
    fn fail(&self) {
        *self.keys.published.lock().unwrap() = None;
    }

    /// How many times the JWKS was fetched.
    fn fetches(&self) -> u64 {
        self.keys.fetches.load(Ordering::SeqCst)
    }

    /// Waits until the broker fetched the JWKS at least once (it does so at start).
    async fn wait_for_first_fetch(&self) {
        eventually("the JWKS is fetched", async || self.fetches() > 0).await;
    }

    /// Claims of a valid token for `subject`, valid ten minutes.
    pub fn claims(&self, subject: &str) -> Value {
        json!({
            "iss": self.uri(),
            "sub": subject,
            "aud": AUDIENCE,
            "iat": now(),
            "exp": now() + 600,
        })
    }
}

/// `[auth.workload]` with this issuer, `billing` also proven by [`API_POD`] and `pods` by any
/// service account of namespace billing.
pub fn workload_config(issuer: &str, refresh: &str) -> String {
    format!(
        r#"
        [auth.workload]
        audience = "{AUDIENCE}"
        jwks_refresh_interval = "{refresh}"
        [[auth.workload.issuers]]
        issuer = "{issuer}"

        [callers.billing]
        workload = [{{ issuer = "{issuer}", subject = "{API_POD}" }}]

        [callers.pods]
        workload = [{{ issuer = "{issuer}", subject = "system:serviceaccount:billing:*" }}]
        allow = ["acme/production"]
        "#
    )
}

impl TestAppBuilder {
    /// Trusts `issuer`'s workload tokens ([`workload_config`]), re-reading its JWKS every
    /// `refresh`.
    pub fn with_workload_issuer(self, issuer: &TestIssuer, refresh: &str) -> Self {
        self.with_config(workload_config(&issuer.uri(), refresh))
    }
}

#[tokio::test]
async fn a_workload_token_proves_its_caller_and_is_verified_once() {
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let issuer = TestIssuer::start(&[&signer]).await;
    let app = TestApp::init()
        .with_workload_issuer(&issuer, "30s")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    issue_tokens(&app.idp, "globex", TokenIssuer::new(3600)).await;

    let pod = signer.sign(&issuer.claims(POD));
    let first = app.get_token("acme/production", Some(&pod)).await;
    assert_eq!(first.status, 200, "{}", first.body);
    for _ in 0..5 {
        let again = app.get_token("acme/production", Some(&pod)).await;
        assert_eq!(again.token(), first.token());
        assert_eq!(again.header("x-cache"), Some("hit"));
    }
    // Keys keep working beside workload tokens, and share the cached token.
    assert_eq!(app.billing("acme/production").await.token(), first.token());

    // An exact subject beats the prefix: the API pod is billing, which may use globex.
    let api = signer.sign(&issuer.claims(API_POD));
    assert_eq!(
        app.get_token("globex/production?audience=urn:globex", Some(&api))
            .await
            .status,
        200
    );
    let refused = app
        .get_token("globex/production?audience=urn:globex", Some(&pod))
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.body["error_description"]
            .as_str()
            .unwrap()
            .contains("'pods'"),
        "{}",
        refused.body
    );

    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
    assert_eq!(app.idp_requests().await.to("globex").len(), 1);
    assert_eq!(issuer.fetches(), 1, "the JWKS is fetched once");
}

#[tokio::test]
async fn every_bad_token_is_a_401_that_names_the_failed_check_and_costs_no_idp_request() {
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let stranger = Signer::rsa("k1", Algorithm::RS256);
    let issuer = TestIssuer::start(&[&signer]).await;
    let app = TestApp::init()
        .with_workload_issuer(&issuer, "30s")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    issuer.wait_for_first_fetch().await;

    let with = |changes: Value| {
        let mut claims = issuer.claims(POD);
        for (name, value) in changes.as_object().unwrap() {
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(name);
            } else {
                claims[name] = value.clone();
            }
        }
        claims
    };
    let encode = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
    let unsigned = format!(
        "{}.{}.",
        encode(&json!({"alg": "none", "typ": "JWT"})),
        encode(&issuer.claims(POD))
    );
    // HS256 with the issuer's public key as the secret: the classic key-confusion forgery.
    let public_key = signer.jwk["n"].as_str().unwrap().to_owned();
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &issuer.claims(POD),
        &EncodingKey::from_secret(public_key.as_bytes()),
    )
    .unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown issuer",
            signer.sign(&with(json!({"iss": "https://elsewhere.example"}))),
            "issuer (iss)",
        ),
        (
            "wrong audience",
            signer.sign(&with(json!({"aud": "someone-else"}))),
            "audience (aud)",
        ),
        (
            "audience array without ours",
            signer.sign(&with(json!({"aud": ["a", "b"]}))),
            "audience (aud)",
        ),
        (
            "expired beyond the leeway",
            signer.sign(&with(json!({"exp": now() - 120}))),
            "expired",
        ),
        (
            "not valid yet",
            signer.sign(&with(json!({"nbf": now() + 120}))),
            "not valid yet (nbf)",
        ),
        (
            "issued in the future",
            signer.sign(&with(json!({"iat": now() + 120}))),
            "issued in the future (iat)",
        ),
        (
            "without exp",
            signer.sign(&with(json!({"exp": null}))),
            "no expiry (exp)",
        ),
        ("alg none", unsigned, "algorithm (alg)"),
        (
            "a critical header",
            {
                let mut header = Header::new(Algorithm::RS256);
                header.kid = Some("k1".into());
                header.crit = Some(vec!["exp".into()]);
                jsonwebtoken::encode(&header, &issuer.claims(POD), &signer.key).unwrap()
            },
            "critical header parameters (crit)",
        ),
        ("HS256 with the public key", confused, "algorithm (alg)"),
        (
            "unknown kid",
            signer.sign_as("k-unknown", &issuer.claims(POD)),
            "key id (kid)",
        ),
        (
            "signed by another key with the same kid",
            stranger.sign(&issuer.claims(POD)),
            "signature",
        ),
        (
            "malformed",
            "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln".to_owned(),
            "well-formed",
        ),
        (
            "a second spelling of a valid signature (stray trailing bits)",
            {
                // A 2048-bit signature is 342 base64url characters; the last carries 2 bits,
                // and canonical encoding leaves its 4 low bits zero.
                let token = signer.sign(&issuer.claims(POD));
                let (rest, last) = token.split_at(token.len() - 1);
                let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                let value = alphabet
                    .iter()
                    .position(|c| *c == last.as_bytes()[0])
                    .unwrap();
                format!("{rest}{}", alphabet[value | 1] as char)
            },
            "well-formed",
        ),
        (
            "a subject of no caller",
            signer.sign(&with(json!({"sub": "system:serviceaccount:other:app"}))),
            "subject (sub)",
        ),
    ];
    for (case, token, expected) in &cases {
        let answer = app.get_token("acme/production", Some(token)).await;
        assert_eq!(answer.status, 401, "{case}: {}", answer.body);
        assert_eq!(answer.body["error"], "unauthorized", "{case}");
        let description = answer.body["error_description"].as_str().unwrap();
        assert!(description.contains(expected), "{case}: {description}");
        for secret in [
            token.as_str(),
            &issuer.uri(),
            AUDIENCE,
            "serviceaccount",
            "elsewhere",
        ] {
            assert!(!description.contains(secret), "{case}: {description}");
        }
    }

    // A token that names no key is checked against the issuer's keys.
    let kidless = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &issuer.claims(POD),
        &signer.key,
    )
    .unwrap();
    assert_eq!(
        app.get_token("acme/production", Some(&kidless))
            .await
            .status,
        200
    );

    let scrape = app.scrape().await;
    for check in [
        "issuer",
        "audience",
        "expired",
        "algorithm",
        "unknown_key",
        "signature",
    ] {
        let line = format!("token_broker_workload_rejections_total{{check=\"{check}\"}}");
        assert!(metric(&scrape, &line) >= Some(1.0), "{line} in:\n{scrape}");
    }
    let fetched = format!(
        "token_broker_workload_key_fetches_total{{issuer=\"{}\",outcome=\"ok\"}}",
        issuer.uri()
    );
    // The fetch at start, and one on demand for the unknown kid.
    assert_eq!(metric(&scrape, &fetched), Some(2.0), "{scrape}");

    // Within the leeway (30 s by default), a just-expired token still works.
    let late = signer.sign(&with(json!({"exp": now() - 10})));
    assert_eq!(
        app.get_token("acme/production", Some(&late)).await.status,
        200
    );
    assert_eq!(
        app.idp_requests().await.to("acme").len(),
        1,
        "only the good token cost an IdP request"
    );
}

#[tokio::test]
async fn every_accepted_algorithm_verifies() {
    let signers = [
        Signer::rsa("rs256", Algorithm::RS256),
        Signer::rsa("rs384", Algorithm::RS384),
        Signer::rsa("rs512", Algorithm::RS512),
        Signer::rsa("ps256", Algorithm::PS256),
        Signer::rsa("ps384", Algorithm::PS384),
        Signer::rsa("ps512", Algorithm::PS512),
        Signer::ec("es256", Algorithm::ES256),
        Signer::ec("es384", Algorithm::ES384),
        Signer::ed25519("ed25519"),
    ];
    let issuer = TestIssuer::start(&signers.iter().collect::<Vec<_>>()).await;
    let app = TestApp::init()
        .with_workload_issuer(&issuer, "30s")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    for signer in &signers {
        let answer = app
            .get_token("acme/production", Some(&signer.sign(&issuer.claims(POD))))
            .await;
        assert_eq!(answer.status, 200, "{}: {}", signer.kid, answer.body);
    }
}

#[tokio::test]
async fn a_new_key_is_picked_up_without_a_restart_and_a_removed_one_stops_verifying() {
    let old = Signer::rsa("old", Algorithm::RS256);
    let new = Signer::ec("new", Algorithm::ES256);
    let issuer = TestIssuer::start(&[&old]).await;
    let app = TestApp::init()
        .with_workload_issuer(&issuer, "1s")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    let by_old = old.sign(&issuer.claims(POD));
    assert_eq!(
        app.get_token("acme/production", Some(&by_old)).await.status,
        200
    );

    // The issuer rotates: the new key in, the old one out.
    issuer.publish(&[&new]);
    let by_new = new.sign(&issuer.claims(POD));
    eventually("a token of the new key verifies", async || {
        let answer = app.get_token("acme/production", Some(&by_new)).await;
        assert!(matches!(answer.status, 200 | 401), "{}", answer.body);
        answer.status == 200
    })
    .await;
    // The remembered token of the old key is not served once its key left the JWKS.
    let answer = app.get_token("acme/production", Some(&by_old)).await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert!(
        answer.body["error_description"]
            .as_str()
            .unwrap()
            .contains("key id (kid)"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn unknown_key_ids_refetch_the_keys_at_most_once_per_interval() {
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let issuer = TestIssuer::start(&[&signer]).await;
    let app = TestApp::init()
        .with_workload_issuer(&issuer, "1h")
        .start()
        .await;
    issuer.wait_for_first_fetch().await;
    let requests = (0..20).map(|i| {
        let token = signer.sign_as(&format!("k-{i}"), &issuer.claims(POD));
        let app = &app;
        async move { app.get_token("acme/production", Some(&token)).await }
    });
    for answer in futures::future::join_all(requests).await {
        assert_eq!(answer.status, 401, "{}", answer.body);
    }
    assert_eq!(
        issuer.fetches(),
        2,
        "the fetch at start and one on demand, whatever kids arrive within the interval"
    );
}

#[tokio::test]
async fn an_outage_of_the_jwks_keeps_verified_callers_working() {
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let issuer = TestIssuer::start(&[&signer]).await;
    let app = TestApp::init()
        .with_workload_issuer(&issuer, "1s")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    let verified = signer.sign(&issuer.claims(POD));
    assert_eq!(
        app.get_token("acme/production", Some(&verified))
            .await
            .status,
        200
    );
    issuer.fail();

    // Remembered, and a new token of a known key: both still served.
    assert_eq!(
        app.get_token("acme/production", Some(&verified))
            .await
            .status,
        200
    );
    let fresh = signer.sign(&issuer.claims(API_POD));
    assert_eq!(
        app.get_token("acme/production", Some(&fresh)).await.status,
        200
    );

    // A key the broker has never seen cannot be checked now: 503, never a 401.
    let unknown = signer.sign_as("k2", &issuer.claims(POD));
    eventually("an unknown kid during the outage is a 503", async || {
        let answer = app.get_token("acme/production", Some(&unknown)).await;
        if answer.status == 503 {
            assert_eq!(answer.body["error"], "upstream_unavailable");
            assert!(answer.header("retry-after").is_some());
        }
        answer.status == 503
    })
    .await;
    assert_eq!(
        app.get_token("acme/production", Some(&verified))
            .await
            .status,
        200
    );
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}

#[tokio::test]
async fn keys_never_fetched_are_a_503_with_retry_after() {
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let issuer = TestIssuer::start(&[]).await;
    issuer.fail();
    let app = TestApp::init()
        .with_workload_issuer(&issuer, "30s")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let answer = app
        .get_token("acme/production", Some(&signer.sign(&issuer.claims(POD))))
        .await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.body["error"], "upstream_unavailable");
    assert!(answer.header("retry-after").is_some());
    assert_eq!(app.idp_requests().await.to("acme").len(), 0);
}

/// `POST /t/acme/production/oauth/token` with a form body.
async fn facade(app: &TestApp, fields: &[(&str, &str)]) -> Answer {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    let response = app
        .http
        .post(format!("{}/t/acme/production/oauth/token", app.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    answer(response).await
}

#[tokio::test]
async fn the_facade_takes_a_workload_token_as_a_client_assertion() {
    const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let issuer = TestIssuer::start(&[&signer]).await;
    let app = TestApp::init()
        .with_workload_issuer(&issuer, "30s")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let pod = signer.sign(&issuer.claims(POD));
    let grant = ("grant_type", "client_credentials");
    let kind = ("client_assertion_type", JWT_BEARER);

    let plain = facade(&app, &[grant, kind, ("client_assertion", &pod)]).await;
    assert_eq!(plain.status, 200, "{}", plain.body);
    assert!(plain.body["expires_in"].as_u64().unwrap() > 0);
    let named = facade(
        &app,
        &[
            grant,
            kind,
            ("client_assertion", &pod),
            ("client_id", "pods"),
        ],
    )
    .await;
    assert_eq!(named.token(), plain.token());

    let mut expired = issuer.claims(POD);
    expired["exp"] = json!(now() - 600);
    let expired = signer.sign(&expired);
    let refused = facade(&app, &[grant, kind, ("client_assertion", &expired)]).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.body["error"], "invalid_client");
    assert!(
        refused.body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{}",
        refused.body
    );
    assert!(refused.header("www-authenticate").is_some());

    // Another caller's name, a secret as well, no type, another type.
    for fields in [
        vec![
            grant,
            kind,
            ("client_assertion", &pod),
            ("client_id", "billing"),
        ],
        vec![
            grant,
            kind,
            ("client_assertion", &pod),
            ("client_secret", "x"),
        ],
        vec![grant, ("client_assertion", &pod)],
        vec![
            grant,
            ("client_assertion_type", "urn:other"),
            ("client_assertion", &pod),
        ],
    ] {
        let answer = facade(&app, &fields).await;
        assert_eq!(answer.status, 401, "{fields:?}: {}", answer.body);
        assert_eq!(answer.body["error"], "invalid_client");
    }
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}

#[tokio::test]
async fn a_jwks_file_is_read_again_when_it_changes() {
    let old = Signer::rsa("old", Algorithm::RS256);
    let new = Signer::ed25519("new");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    let write = |signer: &Signer| {
        std::fs::write(&file, json!({ "keys": [signer.jwk] }).to_string()).unwrap();
    };
    write(&old);
    let issuer = "https://cluster.example";
    let config = workload_config(issuer, "1s").replace(
        &format!("issuer = \"{issuer}\"\n\n"),
        &format!(
            "issuer = \"{issuer}\"\njwks_file = \"{}\"\n\n",
            file.display()
        ),
    );
    assert!(config.contains("jwks_file"), "{config}");
    let app = TestApp::init().with_config(&config).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let claims = json!({"iss": issuer, "sub": POD, "aud": AUDIENCE, "exp": now() + 600});

    let by_old = old.sign(&claims);
    assert_eq!(
        app.get_token("acme/production", Some(&by_old)).await.status,
        200
    );
    write(&new);
    let by_new = new.sign(&claims);
    eventually("the rewritten file's key verifies", async || {
        app.get_token("acme/production", Some(&by_new)).await.status == 200
    })
    .await;
}

/// Serves `jwks` at `https://127.0.0.1:PORT/keys` with a certificate made here; the URL and
/// the certificate's PEM file.
async fn https_jwks(dir: &std::path::Path, jwks: Value) -> (String, std::path::PathBuf) {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use rustls::pki_types::PrivateKeyDer;

    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let ca = dir.join("issuer-ca.pem");
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certified.cert.der().clone()],
            PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/keys", listener.local_addr().unwrap());
    let router = axum::Router::new().route(
        "/keys",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate ends the handshake: no answer.
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
                        .await;
                }
            });
        }
    });
    (url, ca)
}

#[tokio::test]
async fn keys_over_https_are_trusted_through_ca_file_and_a_wrong_ca_is_a_503() {
    let signer = Signer::ec("k1", Algorithm::ES384);
    let dir = tempfile::tempdir().unwrap();
    let (jwks_uri, ca) = https_jwks(dir.path(), json!({ "keys": [signer.jwk] })).await;
    let issuer = "https://cluster.example";
    let claims = json!({"iss": issuer, "sub": POD, "aud": AUDIENCE, "exp": now() + 600});
    let token = signer.sign(&claims);
    let with_keys = |extra: &str| {
        workload_config(issuer, "30s").replace(
            &format!("issuer = \"{issuer}\"\n\n"),
            &format!("issuer = \"{issuer}\"\njwks_uri = \"{jwks_uri}\"\n{extra}\n"),
        )
    };

    let trusting = TestApp::init()
        .with_config(with_keys(&format!("ca_file = \"{}\"", ca.display())))
        .start()
        .await;
    issue_tokens(&trusting.idp, "acme", TokenIssuer::new(3600)).await;
    let answer = trusting.get_token("acme/production", Some(&token)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(trusting.idp_requests().await.to("acme").len(), 1);

    // Without ca_file the system roots do not know the certificate: the keys cannot be fetched.
    let doubting = TestApp::init().with_config(with_keys("")).start().await;
    issue_tokens(&doubting.idp, "acme", TokenIssuer::new(3600)).await;
    let answer = doubting.get_token("acme/production", Some(&token)).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(answer.header("retry-after").is_some());
    // Callers with keys are served meanwhile.
    assert_eq!(doubting.billing("acme/production").await.status, 200);
    assert_eq!(doubting.idp_requests().await.to("acme").len(), 1);
}

#[tokio::test]
async fn frequent_reloads_do_not_stop_the_background_refresh_of_an_issuers_keys() {
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let other = Signer::rsa("k2", Algorithm::RS256);
    let issuer = TestIssuer::start(&[&signer]).await;
    let idp = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    let config = format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        [auth]
        admin_key_sha256 = "{admin}"
        [auth.workload]
        audience = "{AUDIENCE}"
        jwks_refresh_interval = "1h"
        [[auth.workload.issuers]]
        issuer = "{issuer}"
        [callers.pods]
        workload = [{{ issuer = "{issuer}", subject = "system:serviceaccount:billing:*" }}]
        allow = ["acme/production"]
        [tenants.acme.environments.production]
        token_url = "{idp}/acme/oauth/token"
        client_id = "acme-production-id"
        client_secret = "{ACME_PRODUCTION_SECRET}"
        audience = "{ACME_AUDIENCE}"
        "#,
        admin = token_broker::auth::KeyHash::of(ADMIN_KEY).to_hex(),
        issuer = issuer.uri(),
        idp = idp.uri(),
    );
    std::fs::write(&file, &config).unwrap();
    let app = TestApp::init().with_idp(idp).with_file(&file).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let reload = async || {
        let reloaded = app.reload().await;
        assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    };
    // The issuer's settings change once (its keys by URL rather than by discovery): the keys the
    // broker started with are no longer the ones in use.
    let by_url = config.replace(
        &format!("issuer = \"{}\"\n", issuer.uri()),
        &format!(
            "issuer = \"{0}\"\n        jwks_uri = \"{0}/keys\"\n",
            issuer.uri()
        ),
    );
    assert_ne!(by_url, config);
    std::fs::write(&file, &by_url).unwrap();
    reload().await;
    let by_k1 = signer.sign(&issuer.claims(POD));
    assert_eq!(
        app.get_token("acme/production", Some(&by_k1)).await.status,
        200
    );

    // The issuer withdraws k1 while the configuration is reloaded every minute: within one
    // background period (5 min) the broker must have fetched the keys again.
    issuer.publish(&[&other]);
    for _ in 0..6 {
        reload().await;
        app.clock.advance(std::time::Duration::from_secs(60));
    }
    eventually("the token of the withdrawn key is refused", async || {
        app.get_token("acme/production", Some(&by_k1)).await.status == 401
    })
    .await;
}

#[tokio::test]
async fn no_token_is_handed_out_for_the_brokers_own_workload_audience() {
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let issuer = TestIssuer::start(&[&signer]).await;
    let app = TestApp::init()
        .with_users()
        .with_workload_issuer(&issuer, "1h")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let own = format!("audience={AUDIENCE}");

    let machine = app.billing(&format!("acme/production?{own}")).await;
    assert_eq!(machine.status, 403, "{}", machine.body);
    assert_eq!(machine.body["error"], "forbidden");
    assert!(
        machine.body["error_description"]
            .as_str()
            .unwrap()
            .contains("auth.workload.audience")
    );
    let at_the_facade = facade(
        &app,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "billing"),
            ("client_secret", BILLING_KEY),
            ("audience", AUDIENCE),
        ],
    )
    .await;
    assert_eq!(at_the_facade.status, 400, "{}", at_the_facade.body);
    assert_eq!(at_the_facade.body["error"], "invalid_target");
    let user = app
        .authorize(
            "acme/production",
            BILLING_KEY,
            json!({ "audience": AUDIENCE }),
        )
        .await;
    assert_eq!(user.status, 403, "{}", user.body);
    assert!(app.idp_requests().await.is_empty());
    // Another audience is served as ever.
    assert_eq!(app.billing("acme/production").await.status, 200);
}

/// An issuer whose discovery document says `issuer` (when given) and names its JWKS on another
/// host, trusted with a `bearer_token_file`; answers the app and the two servers.
async fn issuer_with_keys_elsewhere(
    signer: &Signer,
    issuer_in_document: Option<&str>,
    bearer: &std::path::Path,
) -> (TestApp, MockServer, MockServer) {
    let issuer = MockServer::start().await;
    let keys = MockServer::start().await;
    let mut document = json!({ "jwks_uri": format!("{}/keys", keys.uri()) });
    if let Some(name) = issuer_in_document {
        document["issuer"] = json!(name.replace("{issuer}", &issuer.uri()));
    }
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(document))
        .mount(&issuer)
        .await;
    Mock::given(method("GET"))
        .and(path("/keys"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "keys": [signer.jwk] })))
        .mount(&keys)
        .await;
    let app = TestApp::init()
        .with_config(format!(
            r#"
            [auth.workload]
            audience = "{AUDIENCE}"
            [[auth.workload.issuers]]
            issuer = "{issuer}"
            bearer_token_file = "{bearer}"
            [callers.pods]
            workload = [{{ issuer = "{issuer}", subject = "system:serviceaccount:billing:*" }}]
            allow = ["acme/production"]
            "#,
            issuer = issuer.uri(),
            bearer = bearer.display(),
        ))
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    (app, issuer, keys)
}

#[tokio::test]
async fn the_bearer_token_goes_only_to_the_issuers_origin_and_discovery_must_name_the_issuer() {
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let dir = tempfile::tempdir().unwrap();
    let bearer = dir.path().join("token");
    std::fs::write(&bearer, "the-brokers-own-service-account-token").unwrap();
    let authorizations = async |server: &MockServer| -> Vec<String> {
        let requests = server.received_requests().await.unwrap_or_default();
        requests
            .iter()
            .filter_map(|request| request.headers.get("authorization"))
            .map(|value| value.to_str().unwrap().to_owned())
            .collect()
    };
    let claims = |issuer: &MockServer| {
        json!({
            "iss": issuer.uri(), "sub": POD, "aud": AUDIENCE, "iat": now(), "exp": now() + 600,
        })
    };

    // A document naming its issuer, with the JWKS on another host: keys are used, the bearer
    // token went to the issuer only.
    let (app, issuer, keys) = issuer_with_keys_elsewhere(&signer, Some("{issuer}"), &bearer).await;
    let token = signer.sign(&claims(&issuer));
    assert_eq!(
        app.get_token("acme/production", Some(&token)).await.status,
        200
    );
    assert_eq!(
        authorizations(&issuer).await,
        ["Bearer the-brokers-own-service-account-token"; 1]
    );
    assert!(!keys.received_requests().await.unwrap().is_empty());
    assert!(
        authorizations(&keys).await.is_empty(),
        "no bearer token to another host"
    );

    // A document that names no issuer is not trusted: its keys are never fetched.
    let (app, issuer, keys) = issuer_with_keys_elsewhere(&signer, None, &bearer).await;
    let token = signer.sign(&claims(&issuer));
    let refused = app.get_token("acme/production", Some(&token)).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(keys.received_requests().await.unwrap().is_empty());
}
