//! One SHA-256 id type for everything the broker names by digest: where a token lives in the
//! shared level ([`SharedKey`]), a token itself ([`TokenDigest`]), a user session ([`HandleId`])
//! and a pending authorization ([`PendingId`]). The kinds cannot be mixed up (each is its own
//! type), share one hex form, and those that name a secret never show it in `Debug`.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use sha2::{Digest as _, Sha256};

use crate::idp::EnvironmentSettings;
use crate::token::TokenKey;

/// What a [`Sha256Id`] names, and whether its `Debug` may show the digest.
pub trait IdKind {
    /// The name `Debug` prints.
    const NAME: &'static str;
    /// Whether `Debug` shows the hex (`false` where the digest stands for a bearer secret, such as
    /// a handle: knowing it finds the session in Redis).
    const SHOWN: bool;
}

/// A SHA-256 digest that names one kind of thing.
pub struct Sha256Id<K: IdKind>([u8; 32], PhantomData<fn() -> K>);

impl<K: IdKind> Sha256Id<K> {
    /// The id whose digest is `bytes`.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes, PhantomData)
    }

    /// The SHA-256 of `parts`, each length-prefixed so that no two different tuples hash the
    /// same bytes.
    fn of_fields<'a>(parts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut hash = Sha256::new();
        for part in parts {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        Self::from_bytes(hash.finalize().into())
    }

    /// Lower-case hex, as it appears in Redis keys and announcements.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses [`Sha256Id::to_hex`] output.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self::from_bytes(bytes))
    }
}

impl<K: IdKind> Clone for Sha256Id<K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: IdKind> Copy for Sha256Id<K> {}

impl<K: IdKind> PartialEq for Sha256Id<K> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<K: IdKind> Eq for Sha256Id<K> {}

impl<K: IdKind> Hash for Sha256Id<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl<K: IdKind> fmt::Debug for Sha256Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match K::SHOWN {
            true => write!(f, "{}({})", K::NAME, self.to_hex()),
            false => write!(f, "{}(..)", K::NAME),
        }
    }
}

/// The kind of [`SharedKey`].
pub enum SharedKeyKind {}
impl IdKind for SharedKeyKind {
    const NAME: &'static str = "SharedKey";
    const SHOWN: bool = true;
}

/// The kind of [`TokenDigest`].
pub enum TokenDigestKind {}
impl IdKind for TokenDigestKind {
    const NAME: &'static str = "TokenDigest";
    const SHOWN: bool = true;
}

/// The kind of [`HandleId`].
pub enum HandleIdKind {}
impl IdKind for HandleIdKind {
    const NAME: &'static str = "HandleId";
    const SHOWN: bool = false;
}

/// The kind of [`PendingId`].
pub enum PendingIdKind {}
impl IdKind for PendingIdKind {
    const NAME: &'static str = "PendingId";
    const SHOWN: bool = false;
}

/// Where one token lives in the shared level: SHA-256 of its whole identity (token URL, client
/// id and request shape, tenant, environment, audience, scope, organization), so a changed
/// identity never reads an old token and no audience appears in clear.
pub type SharedKey = Sha256Id<SharedKeyKind>;

/// SHA-256 of an access token: how replicas name a token without revealing it.
pub type TokenDigest = Sha256Id<TokenDigestKind>;

/// SHA-256 of a user session's handle: how a session is found without holding the handle.
pub type HandleId = Sha256Id<HandleIdKind>;

/// Where a pending authorization lives: SHA-256 of its state and of the caller, tenant and
/// environment it was started for, so a redemption by anyone else looks in the wrong place.
pub type PendingId = Sha256Id<PendingIdKind>;

impl SharedKey {
    /// The key of `key`'s token as `environment`'s IdP client issues it.
    pub fn new(environment: &EnvironmentSettings, key: &TokenKey) -> Self {
        let shape = format!(
            "{:?}/{:?}/{:?}",
            environment.request_format, environment.client_auth, environment.audience_param
        );
        let mut fields = vec![
            "token-broker shared key v1",
            environment.token_url.as_str(),
            &environment.client_id,
            &shape,
        ];
        for (name, value) in &environment.extra_params {
            fields.push(name);
            fields.push(value);
        }
        fields.extend([
            &*key.tenant,
            &*key.environment,
            &*key.audience,
            key.scope.as_str(),
        ]);
        // Only when set, so that the keys of tenant-wide tokens stay what they were.
        if let Some(organization) = &key.organization {
            fields.extend(["organization", organization]);
        }
        Self::of_fields(fields)
    }

    /// Where the rotated secret of `environment`'s client lives: its token URL, client id,
    /// tenant and environment, so a changed client never reads another's secret.
    pub fn for_secret(environment: &EnvironmentSettings) -> Self {
        Self::of_fields([
            "token-broker rotated secret v1",
            environment.token_url.as_str(),
            &environment.client_id,
            &environment.tenant,
            &environment.environment,
        ])
    }
}

impl TokenDigest {
    /// The digest of `access_token`.
    pub fn of(access_token: &str) -> Self {
        Self::from_bytes(Sha256::digest(access_token.as_bytes()).into())
    }
}

impl HandleId {
    /// The id of a presented handle.
    pub fn of(handle: &str) -> Self {
        Self::from_bytes(Sha256::digest(handle.as_bytes()).into())
    }
}

impl PendingId {
    /// The id of `state` as `owner` redeems it for `tenant`/`environment`.
    pub fn new(state: &str, owner: &str, tenant: &str, environment: &str) -> Self {
        Self::of_fields(["token-broker pending v1", state, owner, tenant, environment])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idp::ClientCredential;

    #[test]
    fn the_shared_key_covers_the_whole_identity() {
        let environment = |client_id: &str| {
            let url = reqwest::Url::parse("https://acme.example/oauth/token").unwrap();
            let secret = ClientCredential::Secret("s".to_owned().into());
            EnvironmentSettings::new("acme", "production", url, client_id, secret)
        };
        let (production, other) = (environment("id"), environment("another-id"));
        let (production, other) = (&production, &other);
        let key = TokenKey::new("acme", "production", "https://api", "b a");
        let shared = SharedKey::new(production, &key);
        assert_eq!(
            shared,
            SharedKey::new(
                production,
                &TokenKey::new("acme", "production", "https://api", "a b")
            )
        );
        for different in [
            SharedKey::new(other, &key),
            SharedKey::new(
                production,
                &TokenKey::new("acme", "production", "https://api2", "a b"),
            ),
            SharedKey::new(
                production,
                &TokenKey::new("acme", "production", "https://api", "a"),
            ),
            SharedKey::new(
                production,
                &TokenKey::new("acme", "staging", "https://api", "a b"),
            ),
        ] {
            assert_ne!(shared, different);
        }
        assert!(!shared.to_hex().contains("api"));
    }

    #[test]
    fn ids_round_trip_through_hex_and_secret_ones_hide_it() {
        let digest = TokenDigest::of("secret-token");
        assert_eq!(TokenDigest::from_hex(&digest.to_hex()), Some(digest));
        assert!(!format!("{digest:?}").contains("secret-token"));
        assert_eq!(TokenDigest::from_hex("zz"), None);
        let key = SharedKey::from_bytes([7; 32]);
        assert_eq!(SharedKey::from_hex(&key.to_hex()), Some(key));
        let handle = HandleId::of("uth_secret");
        assert_eq!(format!("{handle:?}"), "HandleId(..)");
        let pending = PendingId::new("state", "billing", "acme", "production");
        assert_eq!(format!("{pending:?}"), "PendingId(..)");
        assert_ne!(
            pending,
            PendingId::new("state", "reports", "acme", "production")
        );
    }
}
