//! The call that rotates a client's secret at its IdP, as Auth0's Management API does it
//! (`POST /api/v2/clients/{client_id}/rotate-secret`): a `POST` with no body, authorised by a
//! bearer token, whose answer's `client_secret` is the new secret. The old secret stops working
//! at once, so the answer is read whatever the caller does (the broker runs this in a task of its
//! own) and the new secret never appears in a log line, an error or `Debug` output.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{self, HeaderValue};
use secrecy::{ExposeSecret as _, SecretString};

use super::{IdpClient, IdpError, classify, read_bounded};

/// Longest client secret accepted from a rotation answer, in bytes; Auth0's are 64 characters.
pub const MAX_SECRET_LEN: usize = 1024;

/// `[tenants.T.environments.E.rotation]`: how the broker rotates this environment's secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationSettings {
    /// The rotation endpoint, `{client_id}` already substituted.
    pub endpoint: reqwest::Url,
    /// `(tenant, environment)` whose client-credentials token authorises the call.
    pub authorized_by: (Arc<str>, Arc<str>),
    /// The scope asked of that token (`update:client_keys` unless configured).
    pub scope: String,
    /// How often the broker rotates on its own; `None`: only on demand.
    pub every: Option<Duration>,
    /// Where the rotated secret is written (mode 0600) and read at start.
    pub secret_file: Option<PathBuf>,
}

impl IdpClient {
    /// Rotates a client secret: `POST endpoint` with `bearer`, within `timeout`, reading at
    /// most `limit` bytes of answer. The new secret, or why there is none (a 4xx is
    /// [`IdpError::Rejected`] with the answer's `error` code, a 2xx without a usable
    /// `client_secret` is [`IdpError::InvalidResponse`]).
    pub async fn rotate_secret(
        &self,
        endpoint: &reqwest::Url,
        bearer: &str,
        timeout: Duration,
        limit: usize,
    ) -> Result<SecretString, IdpError> {
        let authorization = HeaderValue::try_from(format!("Bearer {bearer}")).map_err(|_| {
            IdpError::InvalidResponse("the authorising token is not a header value")
        })?;
        let mut response = self
            .http
            .post(endpoint.clone())
            .header(header::AUTHORIZATION, authorization)
            .header(header::ACCEPT, HeaderValue::from_static("application/json"))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| classify(e, timeout))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_bounded(&mut response, limit)
            .await
            .map_err(|e| classify(e, timeout))?
            .ok_or(IdpError::ResponseTooLarge { limit })?;
        if status.is_success() {
            return new_secret(&body);
        }
        Err(self.refusal(status, &headers, &body))
    }
}

/// The `client_secret` of a rotation answer: present, not blank, printable, and at most
/// [`MAX_SECRET_LEN`] bytes (it goes into request bodies and headers).
fn new_secret(body: &[u8]) -> Result<SecretString, IdpError> {
    #[derive(serde::Deserialize)]
    struct Rotated {
        client_secret: Option<SecretString>,
    }
    let rotated: Rotated = serde_json::from_slice(body)
        .map_err(|_| IdpError::InvalidResponse("the rotation answer is not a JSON object"))?;
    let secret = rotated.client_secret.ok_or(IdpError::InvalidResponse(
        "the rotation answer has no client_secret",
    ))?;
    let value = secret.expose_secret();
    if value.trim().is_empty()
        || value.len() > MAX_SECRET_LEN
        || value.chars().any(char::is_control)
        || value.trim() != value
    {
        return Err(IdpError::InvalidResponse(
            "the rotation answer's client_secret is empty, too long or not printable",
        ));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_secret_is_read_and_bad_answers_are_refused() {
        let secret = new_secret(br#"{"client_id":"x","client_secret":"s3cr3t"}"#).unwrap();
        assert_eq!(secret.expose_secret(), "s3cr3t");
        for body in [
            &b"{}"[..],
            b"not json",
            br#"{"client_secret":""}"#,
            br#"{"client_secret":" padded "}"#,
            br#"{"client_secret":"a\nb"}"#,
            br#"{"client_secret":42}"#,
        ] {
            let error = new_secret(body).unwrap_err();
            assert!(matches!(error, IdpError::InvalidResponse(_)), "{body:?}");
        }
        let long = format!(
            r#"{{"client_secret":"{}"}}"#,
            "x".repeat(MAX_SECRET_LEN + 1)
        );
        assert!(new_secret(long.as_bytes()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_answers_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = new_secret(&body);
        }
    }
}
