//! The client of the identity provider's token endpoint.
//!
//! [`IdpClient::fetch`] turns one environment's credentials, an audience and a scope into exactly
//! one client-credentials request (Auth0 JSON or RFC 6749 form body, `audience` or `resource`)
//! and one parsed [`IssuedToken`] or one classified [`IdpError`]. [`IdpClient::exchange_code`]
//! and [`IdpClient::refresh`] do the same for the two user-token grants (always a form body).
//! Every request authenticates the client the environment's way: secret in the body, HTTP Basic,
//! or a fresh `private_key_jwt` assertion ([`assertion`]). Nothing here retries or keeps state:
//! retries, single flight and caching belong to the broker and the user-token store.
//! One `reqwest::Client` (rustls, connection pool) is shared by every environment.

mod assertion;
mod response;
mod rotation;
mod settings;

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::{self, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};

use crate::clock::Clock;

pub use assertion::{
    ASSERTION_LIFETIME, ASSERTION_TYPE, ClientKey, SigningError, pkcs1_from_pkcs8,
};
pub use response::{IssuedToken, MAX_LIFETIME, MAX_PAUSE, QuotaRemaining, RateLimitHeaders};
pub use rotation::{MAX_SECRET_LEN, RotationSettings};
pub use settings::{
    AudienceParam, ClientAuth, ClientCredential, CredentialFallbacks, CredentialFile,
    DEFAULT_LIFETIME, DEFAULT_MAX_CONCURRENT_FETCHES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT,
    EnvironmentSettings, RequestFormat, UserLoginSettings,
};

/// Bound on establishing a TCP + TLS connection to an IdP, below any request timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An access token; its `Debug` never shows the value. The bytes may be shared with the
/// pre-serialised response body that carries the same token, so a cached token is stored once.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(bytes::Bytes);

impl AccessToken {
    /// Wraps a token value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(bytes::Bytes::from(value.into()))
    }

    /// Wraps bytes already known to hold the token, as UTF-8.
    pub(crate) fn from_shared(value: bytes::Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&value).is_ok());
        Self(value)
    }

    /// The token value, for the response body that hands it to a caller.
    pub fn expose(&self) -> &str {
        std::str::from_utf8(&self.0).expect("an access token is built from a string")
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken([redacted])")
    }
}

/// A failed token request, classified by what the broker should do about it.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    /// The IdP refused the request (4xx other than 429); retrying will not help.
    #[error("the IdP rejected the token request with HTTP {status} and error code '{code}'")]
    Rejected {
        /// HTTP status of the answer.
        status: u16,
        /// The IdP's OAuth2 `error` code, sanitised (never its description).
        code: String,
    },
    /// The IdP is rate limiting this client (429); wait `retry_after` before asking again.
    #[error("the IdP is rate limiting this client (HTTP 429)")]
    RateLimited {
        /// How long the IdP asked us to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The IdP did not answer within the environment's timeout.
    #[error("the IdP did not answer within {0:?}")]
    Timeout(Duration),
    /// The IdP could not be reached or the connection broke.
    #[error("cannot reach the IdP")]
    Connect(#[source] reqwest::Error),
    /// The IdP answered with a server error.
    #[error("the IdP answered HTTP {0}")]
    ServerError(u16),
    /// The answer's body is longer than the environment's `max_response_bytes`. Not retried: a
    /// 2xx may already have minted (and billed) a token.
    #[error(
        "the IdP's answer is longer than max_response_bytes ({limit} bytes); raise it if the IdP's tokens are that large"
    )]
    ResponseTooLarge {
        /// The environment's `max_response_bytes`.
        limit: usize,
    },
    /// The IdP answered 2xx with a body that is not a usable token.
    #[error("the IdP's answer is not a token: {0}")]
    InvalidResponse(&'static str),
    /// The `private_key_jwt` assertion could not be signed, so nothing was sent.
    #[error(transparent)]
    Signing(#[from] SigningError),
}

impl IdpError {
    /// Whether the same request may succeed when tried again soon.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Timeout(_) | Self::Connect(_) | Self::ServerError(_) | Self::InvalidResponse(_)
        )
    }
}

/// The answer to a successful token request: the token and the IdP's rate-limit headers.
#[derive(Debug)]
pub struct Fetched {
    /// The parsed token.
    pub token: IssuedToken,
    /// Auth0-style `x-ratelimit-*` headers, when the IdP sent them.
    pub rate_limit: RateLimitHeaders,
}

/// The answer to an authorization-code or refresh-token grant.
pub struct UserGrant {
    /// The user's access token.
    pub token: IssuedToken,
    /// A refresh token, when the IdP issued one (a rotated one replaces the one used).
    pub refresh_token: Option<SecretString>,
}

impl fmt::Debug for UserGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserGrant")
            .field("token", &self.token)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// A successful answer before it is shaped for one grant.
struct Answer {
    token: IssuedToken,
    refresh_token: Option<SecretString>,
    rate_limit: RateLimitHeaders,
}

/// How the broker's HTTP clients start: rustls, the broker's user agent, a bounded connect, and
/// no redirects (a redirect would resend credentials).
pub fn http_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
}

/// A response's body, read in chunks and never more than `limit` bytes (an endless body costs
/// `limit`); `None` when it is longer.
pub async fn read_bounded(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|length| length > u64::try_from(limit).unwrap_or(u64::MAX))
    {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Sends token requests to any OAuth2 token endpoint.
#[derive(Clone)]
pub struct IdpClient {
    http: reqwest::Client,
    /// What token lifetimes, 429 pauses and client assertions are reckoned from.
    clock: Clock,
}

impl IdpClient {
    /// Builds the shared HTTP client, reading time from `clock`.
    pub fn new(clock: Clock) -> Result<Self, reqwest::Error> {
        let http = http_client()
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self { http, clock })
    }

    /// Requests one token for `audience` and `scope` (space-separated, may be empty), for
    /// `organization` when one is given (Auth0's `organization` parameter).
    pub async fn fetch(
        &self,
        environment: &EnvironmentSettings,
        credential: &ClientCredential,
        audience: &str,
        scope: &str,
        organization: Option<&str>,
    ) -> Result<Fetched, IdpError> {
        let audience_name = match environment.audience_param {
            AudienceParam::Audience => "audience",
            AudienceParam::Resource => "resource",
        };
        let mut params = vec![(audience_name, audience)];
        if !scope.is_empty() {
            params.push(("scope", scope));
        }
        if let Some(organization) = organization {
            params.push(("organization", organization));
        }
        let answer = self
            .send(
                environment,
                credential,
                environment.request_format,
                "client_credentials",
                &params,
            )
            .await?;
        Ok(Fetched {
            token: answer.token,
            rate_limit: answer.rate_limit,
        })
    }

    /// Exchanges an authorization code (with its PKCE verifier) for the user's tokens.
    pub async fn exchange_code(
        &self,
        environment: &EnvironmentSettings,
        credential: &ClientCredential,
        code: &str,
        redirect_uri: &str,
        code_verifier: &str,
    ) -> Result<UserGrant, IdpError> {
        let params = [
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", code_verifier),
        ];
        let answer = self
            .send(
                environment,
                credential,
                RequestFormat::Form,
                "authorization_code",
                &params,
            )
            .await?;
        Ok(UserGrant {
            token: answer.token,
            refresh_token: answer.refresh_token,
        })
    }

    /// Trades a refresh token for a new access token (and perhaps a rotated refresh token).
    pub async fn refresh(
        &self,
        environment: &EnvironmentSettings,
        credential: &ClientCredential,
        refresh_token: &SecretString,
    ) -> Result<UserGrant, IdpError> {
        let params = [("refresh_token", refresh_token.expose_secret())];
        let answer = self
            .send(
                environment,
                credential,
                RequestFormat::Form,
                "refresh_token",
                &params,
            )
            .await?;
        Ok(UserGrant {
            token: answer.token,
            refresh_token: answer.refresh_token,
        })
    }

    /// Revokes `refresh_token` at `revocation_url` (RFC 7009), authenticating as the token
    /// requests of `environment` do. The IdP's body is never read: 200 is done, anything else
    /// an error.
    pub async fn revoke(
        &self,
        environment: &EnvironmentSettings,
        credential: &ClientCredential,
        revocation_url: &reqwest::Url,
        refresh_token: &SecretString,
    ) -> Result<(), IdpError> {
        let params = [
            ("token", refresh_token.expose_secret()),
            ("token_type_hint", "refresh_token"),
        ];
        let request = self.build_request(
            environment,
            credential,
            revocation_url,
            RequestFormat::Form,
            None,
            &params,
        )?;
        let timeout = environment.timeout;
        let response = request.send().await.map_err(|e| classify(e, timeout))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(IdpError::RateLimited {
                retry_after: response::retry_after(response.headers(), self.clock.now()),
            });
        }
        if status.is_client_error() {
            return Err(IdpError::Rejected {
                status: status.as_u16(),
                code: format!("http_{}", status.as_u16()),
            });
        }
        Err(IdpError::ServerError(status.as_u16()))
    }

    /// Sends one token request and classifies the answer.
    async fn send(
        &self,
        environment: &EnvironmentSettings,
        credential: &ClientCredential,
        format: RequestFormat,
        grant_type: &str,
        grant_params: &[(&str, &str)],
    ) -> Result<Answer, IdpError> {
        let request = self.build_request(
            environment,
            credential,
            &environment.token_url,
            format,
            Some(grant_type),
            grant_params,
        )?;
        let timeout = environment.timeout;
        let mut response = request.send().await.map_err(|e| classify(e, timeout))?;
        let status = response.status();
        let headers = response.headers().clone();
        let rate_limit = RateLimitHeaders::from_headers(&headers);
        let limit = environment.max_response_bytes;
        let body = read_bounded(&mut response, limit)
            .await
            .map_err(|e| classify(e, timeout))?
            .ok_or(IdpError::ResponseTooLarge { limit })?;

        if status.is_success() {
            let (token, refresh_token) =
                response::parse_grant(&body, environment.default_lifetime, self.clock.now())?;
            return Ok(Answer {
                token,
                refresh_token,
                rate_limit,
            });
        }
        Err(self.refusal(status, &headers, &body))
    }

    /// What a non-2xx answer means: a 429 pauses (for the answer's `Retry-After`), another 4xx
    /// is a rejection with the body's OAuth2 `error` code (else `http_<status>`), a 5xx a
    /// server error.
    fn refusal(&self, status: reqwest::StatusCode, headers: &HeaderMap, body: &[u8]) -> IdpError {
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return IdpError::RateLimited {
                retry_after: response::retry_after(headers, self.clock.now()),
            };
        }
        if status.is_client_error() {
            return IdpError::Rejected {
                status: status.as_u16(),
                code: response::error_code(body)
                    .unwrap_or_else(|| format!("http_{}", status.as_u16())),
            };
        }
        IdpError::ServerError(status.as_u16())
    }

    /// A POST to `url` whose body is `grant_type` (for a token request), the client
    /// authentication, `grant_params`, then (for a token request) `extra_params`.
    fn build_request(
        &self,
        environment: &EnvironmentSettings,
        credential: &ClientCredential,
        url: &reqwest::Url,
        format: RequestFormat,
        grant_type: Option<&str>,
        grant_params: &[(&str, &str)],
    ) -> Result<reqwest::RequestBuilder, IdpError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let assertion;
        let mut params: Vec<(&str, &str)> =
            Vec::with_capacity(4 + grant_params.len() + environment.extra_params.len());
        if let Some(grant_type) = grant_type {
            params.push(("grant_type", grant_type));
        }
        match (credential, environment.client_auth) {
            (ClientCredential::Secret(secret), ClientAuth::Basic) => {
                let value = basic_authorization(&environment.client_id, secret.expose_secret());
                headers.insert(header::AUTHORIZATION, value);
            }
            (ClientCredential::Secret(secret), _) => {
                params.push(("client_id", &environment.client_id));
                params.push(("client_secret", secret.expose_secret()));
            }
            (
                ClientCredential::PrivateKey {
                    key,
                    assertion_audience,
                },
                _,
            ) => {
                let now = self.clock.now();
                assertion = key.assertion(&environment.client_id, assertion_audience, now)?;
                params.push(("client_id", &environment.client_id));
                params.push(("client_assertion_type", ASSERTION_TYPE));
                params.push(("client_assertion", &assertion));
            }
        }
        params.extend_from_slice(grant_params);
        if grant_type.is_some() {
            params.extend(
                environment
                    .extra_params
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
        }

        let body = match format {
            RequestFormat::Json => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                let object: serde_json::Map<String, serde_json::Value> = params
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                    .collect();
                serde_json::to_vec(&object).expect("a map of strings serialises")
            }
            RequestFormat::Form => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                );
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(&params)
                    .finish()
                    .into_bytes()
            }
        };
        Ok(self
            .http
            .post(url.clone())
            .headers(headers)
            .timeout(environment.timeout)
            .body(body))
    }
}

/// `Basic base64(urlencode(id):urlencode(secret))`, as RFC 6749 §2.3.1 specifies.
fn basic_authorization(client_id: &str, secret: &str) -> HeaderValue {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let credentials = format!("{}:{}", encode(client_id), encode(secret));
    let mut value = HeaderValue::try_from(format!("Basic {}", STANDARD.encode(credentials)))
        .expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

fn classify(error: reqwest::Error, timeout: Duration) -> IdpError {
    if error.is_timeout() {
        IdpError::Timeout(timeout)
    } else {
        IdpError::Connect(error.without_url())
    }
}
