//! `private_key_jwt` client authentication (RFC 7523 §2.2, OpenID Connect Core §9): the client's
//! private key, read once from PEM, and a freshly signed assertion for every token request.
//!
//! Signing uses aws-lc-rs directly rather than jsonwebtoken's `EncodingKey`, because aws-lc-rs
//! reads every PEM form operators have (PKCS#8 and PKCS#1 RSA, PKCS#8 and SEC1 EC) and parses the
//! key once at start-up, so a bad key fails configuration instead of the first token request.
//! A JWS compact serialisation is three base64url parts; nothing more is needed here.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeyPair as RsaKeyPair;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, RSA_PKCS1_SHA256};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;

/// The `client_assertion_type` of a JWT client assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid: long enough for clock skew, short enough to be useless if
/// captured.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// A private key that signs client assertions; neither `Debug` nor errors show key material.
pub struct ClientKey {
    signer: Signer,
    key_id: Option<String>,
}

enum Signer {
    Rs256(RsaKeyPair),
    Es256(EcdsaKeyPair),
}

/// Why an assertion could not be signed (aws-lc-rs gives no detail).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("could not sign the client assertion")]
pub struct SigningError;

#[derive(Serialize)]
struct JwsHeader<'a> {
    alg: &'static str,
    typ: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<&'a str>,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

impl ClientKey {
    /// Reads an RSA (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`, signs RS256) or EC P-256
    /// (PKCS#8 or SEC1 `EC PRIVATE KEY`, signs ES256) private key from PEM text. A PEM squeezed
    /// onto one line with literal `\n` escapes, as environment variables often hold it, is accepted.
    pub fn from_pem(pem: &str, key_id: Option<String>) -> Result<Self, &'static str> {
        let pem = pem.replace("\\n", "\n");
        let (label, der) = pem_document(&pem)?;
        let signer = match label {
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der).map(Signer::Rs256).ok(),
            "EC PRIVATE KEY" => ec_key(&der),
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der)
                .map(Signer::Rs256)
                .ok()
                .or_else(|| ec_key(&der)),
            "ENCRYPTED PRIVATE KEY" => {
                return Err(
                    "the key is encrypted; store it unencrypted (openssl pkcs8 -topk8 -nocrypt) and protect the file or variable instead",
                );
            }
            _ => {
                return Err(
                    "not a PEM private key (expected BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
                );
            }
        };
        let signer = signer.ok_or(
            "the key is neither an RSA key of 2048 bits or more nor an EC P-256 key, or it is damaged",
        )?;
        Ok(Self { signer, key_id })
    }

    /// The JWS algorithm the key signs with: `RS256` or `ES256`.
    pub fn algorithm(&self) -> &'static str {
        match self.signer {
            Signer::Rs256(_) => "RS256",
            Signer::Es256(_) => "ES256",
        }
    }

    /// The `kid` put in each assertion's header, when configured.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// A new signed assertion: `iss` = `sub` = `client_id`, `aud` = `audience`, a random `jti`,
    /// `iat` = `now` and `exp` = `now` + [`ASSERTION_LIFETIME`].
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<String, SigningError> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| SigningError)?
            .as_secs();
        let header = JwsHeader {
            alg: self.algorithm(),
            typ: "JWT",
            kid: self.key_id(),
        };
        let claims = AssertionClaims {
            iss: client_id,
            sub: client_id,
            aud: audience,
            jti: format!("{:032x}", rand::random::<u128>()),
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        let signing_input = format!("{}.{}", base64_json(&header), base64_json(&claims));
        let signature = self.sign(signing_input.as_bytes())?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SigningError> {
        let rng = SystemRandom::new();
        match &self.signer {
            Signer::Rs256(key) => {
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                    .map_err(|_| SigningError)?;
                Ok(signature)
            }
            Signer::Es256(key) => key
                .sign(&rng, message)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|_| SigningError),
        }
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("algorithm", &self.algorithm())
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A JSON part of a JWS, base64url-encoded.
fn base64_json(value: &impl Serialize) -> String {
    let json = serde_json::to_vec(value).expect("header and claims are plain strings and numbers");
    URL_SAFE_NO_PAD.encode(json)
}

fn ec_key(der: &[u8]) -> Option<Signer> {
    EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
        .map(Signer::Es256)
        .ok()
}

/// The label and decoded contents of the first PEM block in `text` that holds a private key, or
/// of the first block when none does. Other blocks (the `EC PARAMETERS` that `openssl ecparam`
/// writes first, a certificate) are skipped.
fn pem_document(text: &str) -> Result<(&str, Vec<u8>), &'static str> {
    const NOT_PEM: &str = "not PEM: expected -----BEGIN ...----- and -----END ...----- lines";
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some((_, after)) = rest.split_once("-----BEGIN ") {
        let (label, after) = after.split_once("-----").ok_or(NOT_PEM)?;
        let end = format!("-----END {label}-----");
        let (body, after) = after.split_once(end.as_str()).ok_or(NOT_PEM)?;
        blocks.push((label, body));
        rest = after;
    }
    let (label, body) = blocks
        .iter()
        .find(|(label, _)| label.ends_with("PRIVATE KEY"))
        .or(blocks.first())
        .copied()
        .ok_or(NOT_PEM)?;
    if body.contains(':') {
        return Err(
            "the PEM block has headers (an encrypted legacy key?); store the key unencrypted",
        );
    }
    let base64: String = body.split_ascii_whitespace().collect();
    let der = STANDARD
        .decode(base64)
        .map_err(|_| "the PEM block is not valid base64")?;
    Ok((label, der))
}

/// Unwraps the PKCS#1 `RSAPrivateKey` that jsonwebtoken signs with from the PKCS#8 document
/// aws-lc-rs exports (RFC 5208: `SEQUENCE { INTEGER, SEQUENCE, OCTET STRING, .. }`).
pub fn pkcs1_from_pkcs8(pkcs8: &[u8]) -> Option<&[u8]> {
    let (info, _) = der_element(pkcs8, 0x30)?;
    let (_version, rest) = der_element(info, 0x02)?;
    let (_algorithm, rest) = der_element(rest, 0x30)?;
    let (private_key, _) = der_element(rest, 0x04)?;
    Some(private_key)
}

/// Splits one DER element tagged `tag` off the front of `input`: (contents, rest).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let ([found, first], rest) = input.split_first_chunk::<2>()?;
    if *found != tag {
        return None;
    }
    let (len, rest) = match *first {
        short @ 0..0x80 => (usize::from(short), rest),
        long => {
            let (len_bytes, rest) = rest.split_at_checked(usize::from(long & 0x7f))?;
            let len = len_bytes
                .iter()
                .fold(0, |len, &byte| len << 8 | usize::from(byte));
            (len, rest)
        }
    };
    rest.split_at_checked(len)
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::KeyPair as _;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    use crate::clock::Clock;
    use serde_json::Value;

    use super::*;

    fn pem(label: &str, der: &[u8]) -> String {
        let body = STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn verify(token: &str, key: &DecodingKey, algorithm: Algorithm) -> Value {
        let mut validation = Validation::new(algorithm);
        validation.set_audience(&["https://idp.test/oauth/token"]);
        validation.set_issuer(&["client-1"]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Value>(token, key, &validation)
            .unwrap()
            .claims
    }

    #[test]
    fn rsa_keys_in_pkcs8_and_pkcs1_sign_rs256() {
        let key = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let pkcs8 = key.as_der().unwrap();
        let pkcs1 = pkcs1_from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = DecodingKey::from_rsa_der(key.public_key().as_ref());
        for text in [
            pem("PRIVATE KEY", pkcs8.as_ref()),
            pem("RSA PRIVATE KEY", pkcs1),
        ] {
            let client_key = ClientKey::from_pem(&text, Some("k1".into())).unwrap();
            assert_eq!(client_key.algorithm(), "RS256");
            let now = Clock::system().now();
            let token = client_key
                .assertion("client-1", "https://idp.test/oauth/token", now)
                .unwrap();
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.kid.as_deref(), Some("k1"));
            let claims = verify(&token, &public, Algorithm::RS256);
            assert_eq!(claims["sub"], "client-1");
            let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
            assert_eq!(lifetime, ASSERTION_LIFETIME.as_secs());
            assert!(!format!("{client_key:?}").contains(&text[40..80]));
        }
    }

    #[test]
    fn ec_keys_in_sec1_and_pkcs8_sign_es256_with_unique_ids() {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let sec1 = key.private_key().as_der().unwrap();
        let pkcs8 = key.to_pkcs8v1().unwrap();
        let public = DecodingKey::from_ec_der(key.public_key().as_ref());
        let one_line = pem("EC PRIVATE KEY", sec1.as_ref()).replace('\n', "\\n");
        // `openssl ecparam -genkey` without -noout writes the curve parameters first.
        let with_parameters = format!(
            "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{}",
            pem("EC PRIVATE KEY", sec1.as_ref())
        );
        for text in [
            one_line,
            with_parameters,
            pem("PRIVATE KEY", pkcs8.as_ref()),
        ] {
            let client_key = ClientKey::from_pem(&text, None).unwrap();
            assert_eq!(client_key.algorithm(), "ES256");
            let sign = || {
                let token = client_key
                    .assertion(
                        "client-1",
                        "https://idp.test/oauth/token",
                        Clock::system().now(),
                    )
                    .unwrap();
                assert_eq!(jsonwebtoken::decode_header(&token).unwrap().kid, None);
                verify(&token, &public, Algorithm::ES256)["jti"].clone()
            };
            assert_ne!(sign(), sign());
        }
    }

    #[test]
    fn unusable_keys_are_refused_without_echoing_them() {
        let cases = [
            "no pem here",
            "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
        ];
        for text in cases {
            let error = ClientKey::from_pem(text, None).unwrap_err();
            assert!(!error.contains("AAAA"), "{error}");
        }
    }
}
