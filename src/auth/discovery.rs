//! OIDC discovery for workload issuers: which JWKS an issuer's discovery document names, whether
//! the document may be trusted (it names the issuer it was asked for, OpenID Connect Discovery
//! 1.0 section 4.3), and whether the broker's bearer token may go to that JWKS (only at the
//! issuer's own origin).

use super::settings::is_fetchable_url;

/// The JWKS a discovery document names.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Discovered {
    /// Where the keys are.
    pub(super) jwks_uri: String,
    /// Whether it is at the issuer's origin, where `bearer_token_file` may be sent.
    pub(super) same_origin: bool,
}

/// Why a discovery document is not used.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DiscoveryProblem {
    /// Not a JSON object.
    NotJson,
    /// `issuer` names another issuer.
    OtherIssuer,
    /// No `issuer`.
    NoIssuer,
    /// No `jwks_uri`, or one keys may not be fetched from.
    NoJwksUri,
}

/// The JWKS `document` names for `issuer`.
pub(super) fn jwks_of(document: &[u8], issuer: &str) -> Result<Discovered, DiscoveryProblem> {
    #[derive(serde::Deserialize)]
    struct Document {
        issuer: Option<String>,
        jwks_uri: Option<String>,
    }
    let document: Document =
        serde_json::from_slice(document).map_err(|_| DiscoveryProblem::NotJson)?;
    match document.issuer {
        Some(named) if named == issuer => {}
        Some(_) => return Err(DiscoveryProblem::OtherIssuer),
        None => return Err(DiscoveryProblem::NoIssuer),
    }
    // The same rule as configured URLs: keys never travel in the clear beyond this host.
    let jwks_uri = document
        .jwks_uri
        .filter(|uri| is_fetchable_url(uri).is_ok())
        .ok_or(DiscoveryProblem::NoJwksUri)?;
    let same_origin = matches!(
        (reqwest::Url::parse(&jwks_uri), reqwest::Url::parse(issuer)),
        (Ok(keys), Ok(issuer)) if keys.origin() == issuer.origin()
    );
    Ok(Discovered {
        jwks_uri,
        same_origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUER: &str = "https://issuer.example";

    #[test]
    fn a_document_must_name_its_issuer_and_a_fetchable_jwks() {
        let of = |document: &str| jwks_of(document.as_bytes(), ISSUER);
        assert_eq!(
            of(r#"{"issuer":"https://issuer.example","jwks_uri":"https://issuer.example/keys"}"#),
            Ok(Discovered {
                jwks_uri: "https://issuer.example/keys".into(),
                same_origin: true,
            })
        );
        assert_eq!(
            of(r#"{"issuer":"https://issuer.example","jwks_uri":"https://keys.example/k"}"#),
            Ok(Discovered {
                jwks_uri: "https://keys.example/k".into(),
                same_origin: false,
            })
        );
        assert_eq!(
            of(r#"{"jwks_uri":"https://issuer.example/keys"}"#),
            Err(DiscoveryProblem::NoIssuer)
        );
        assert_eq!(
            of(r#"{"issuer":"https://other.example","jwks_uri":"https://issuer.example/k"}"#),
            Err(DiscoveryProblem::OtherIssuer)
        );
        assert_eq!(
            of(r#"{"issuer":"https://issuer.example","jwks_uri":"http://issuer.example/k"}"#),
            Err(DiscoveryProblem::NoJwksUri)
        );
        assert_eq!(of("[]"), Err(DiscoveryProblem::NotJson));
    }
}
