//! `client_auth = "private_key_jwt"`: each token request carries a fresh assertion that the fake
//! IdP verifies with the public key (signature, `iss`, `sub`, `aud`, `exp`, unique `jti`), and no
//! client secret. Keys are generated here, never committed.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::*;

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|line| std::str::from_utf8(line).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A fake token endpoint that accepts only requests whose assertion verifies, and remembers each
/// assertion's `jti` and every reason it refused one.
#[derive(Clone)]
struct AssertionChecker {
    key: DecodingKey,
    algorithm: Algorithm,
    client_id: &'static str,
    audience: String,
    key_id: Option<&'static str>,
    json_body: bool,
    jtis: Arc<Mutex<Vec<String>>>,
    problems: Arc<Mutex<Vec<String>>>,
}

impl AssertionChecker {
    fn fields(&self, request: &Request) -> Vec<(String, String)> {
        if self.json_body {
            let body: serde_json::Map<String, Value> =
                serde_json::from_slice(&request.body).unwrap_or_default();
            body.into_iter()
                .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
                .collect()
        } else {
            form_fields(&request.body)
        }
    }

    fn check(&self, request: &Request) -> Result<(), String> {
        let fields = self.fields(request);
        let mut names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
        let mut expected = vec![
            "grant_type",
            "client_id",
            "client_assertion_type",
            "client_assertion",
            "audience",
            "scope",
        ];
        if self.json_body {
            names.sort_unstable();
            expected.sort_unstable();
        }
        if names != expected {
            return Err(format!("fields {names:?}"));
        }
        let value = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        if request.headers.get("authorization").is_some() {
            return Err("an Authorization header".into());
        }
        if value("grant_type") != Some("client_credentials")
            || value("client_id") != Some(self.client_id)
            || value("client_assertion_type") != Some(ASSERTION_TYPE)
            || value("audience") != Some("urn:initech")
        {
            return Err(format!("values {fields:?}"));
        }
        let assertion = value("client_assertion").unwrap_or_default();
        let header = jsonwebtoken::decode_header(assertion).map_err(|e| e.to_string())?;
        if header.kid.as_deref() != self.key_id {
            return Err(format!("kid {:?}", header.kid));
        }
        let mut validation = Validation::new(self.algorithm);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[self.client_id]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Value>(assertion, &self.key, &validation)
            .map_err(|e| format!("verification: {e}"))?
            .claims;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        if claims["sub"] != self.client_id || iat > now + 1 || exp <= now || exp - iat > 60 {
            return Err(format!("claims {claims}"));
        }
        let jti = claims["jti"].as_str().ok_or("no jti")?;
        self.jtis.lock().unwrap().push(jti.to_owned());
        Ok(())
    }
}

impl Respond for AssertionChecker {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        match self.check(request) {
            Ok(()) => ResponseTemplate::new(200).set_body_json(json!({
                "access_token": format!("token-{}", self.jtis.lock().unwrap().len()),
                "token_type": "Bearer",
                "expires_in": 3600,
            })),
            Err(problem) => {
                self.problems.lock().unwrap().push(problem);
                ResponseTemplate::new(401).set_body_json(json!({ "error": "invalid_client" }))
            }
        }
    }
}

async fn two_tokens(app: &TestApp, tenant_environment: &str, checker: &AssertionChecker) {
    for scope in ["read", "write"] {
        let answer = app
            .billing(&format!("{tenant_environment}?scope={scope}"))
            .await;
        let problems = checker.problems.lock().unwrap().clone();
        assert_eq!(
            answer.status, 200,
            "{}; the IdP saw {problems:?}",
            answer.body
        );
    }
    assert_eq!(app.idp_requests().await.to("initech").len(), 2);
}

fn assert_verified_with_unique_ids(checker: &AssertionChecker) {
    assert_eq!(
        checker.problems.lock().unwrap().as_slice(),
        [] as [String; 0]
    );
    let jtis = checker.jtis.lock().unwrap();
    assert_eq!(jtis.len(), 2);
    assert_ne!(jtis[0], jtis[1]);
}

#[tokio::test]
async fn rs256_assertions_from_a_key_file_in_a_form_body() {
    let idp = MockServer::start().await;
    let key = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("client.pem");
    std::fs::write(
        &key_file,
        pem("PRIVATE KEY", key.as_der().unwrap().as_ref()),
    )
    .unwrap();
    let token_url = format!("{}/initech/oauth/token", idp.uri());
    let toml = format!(
        r#"
        [tenants.initech.environments.production]
        token_url = "{token_url}"
        client_id = "initech-client"
        client_auth = "private_key_jwt"
        private_key_file = "{}"
        key_id = "test-key-1"
        audience = "urn:initech"
        request_format = "form"
        "#,
        key_file.display()
    );
    let checker = AssertionChecker {
        key: DecodingKey::from_rsa_der(key.public_key().as_ref()),
        algorithm: Algorithm::RS256,
        client_id: "initech-client",
        audience: token_url,
        key_id: Some("test-key-1"),
        json_body: false,
        jtis: Arc::default(),
        problems: Arc::default(),
    };
    Mock::given(method("POST"))
        .and(path("/initech/oauth/token"))
        .respond_with(checker.clone())
        .mount(&idp)
        .await;
    let app = TestApp::init()
        .with_idp(idp)
        .with_config(toml)
        .start()
        .await;

    two_tokens(&app, "initech/production", &checker).await;
    assert_verified_with_unique_ids(&checker);
}

#[tokio::test]
async fn es256_assertions_from_an_environment_variable_with_a_configured_audience() {
    let idp = MockServer::start().await;
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let key_pem = pem(
        "EC PRIVATE KEY",
        key.private_key().as_der().unwrap().as_ref(),
    );
    let issuer = format!("{}/", idp.uri());
    let toml = format!(
        r#"
        [tenants.initech.environments.production]
        token_url = "{}/initech/oauth/token"
        client_id = "initech-client"
        client_auth = "private_key_jwt"
        private_key_env = "INITECH_CLIENT_KEY"
        assertion_audience = "{issuer}"
        audience = "urn:initech"
        "#,
        idp.uri()
    );
    let checker = AssertionChecker {
        key: DecodingKey::from_ec_der(key.public_key().as_ref()),
        algorithm: Algorithm::ES256,
        client_id: "initech-client",
        audience: issuer,
        key_id: None,
        json_body: true,
        jtis: Arc::default(),
        problems: Arc::default(),
    };
    Mock::given(method("POST"))
        .and(path("/initech/oauth/token"))
        .respond_with(checker.clone())
        .mount(&idp)
        .await;
    let app = TestApp::init()
        .with_idp(idp)
        .with_config(toml)
        .with_env("INITECH_CLIENT_KEY", key_pem)
        .start()
        .await;

    two_tokens(&app, "initech/production", &checker).await;
    assert_verified_with_unique_ids(&checker);
}
