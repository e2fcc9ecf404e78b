//! PEM files named by settings (`ca_file`, `certificate_file`, `key_file`): read and checked
//! when the configuration loads, so a wrong path or a file of the wrong kind is a problem that
//! names its setting, rather than a failure at the first connection.

use std::path::Path;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::SecretSlice;

/// The file at `path`, or a problem naming `setting`.
fn read(setting: &str, path: &Path, problems: &mut Vec<String>) -> Option<Vec<u8>> {
    std::fs::read(path)
        .map_err(|error| {
            problems.push(format!(
                "{setting}: cannot read {}: {error}",
                path.display()
            ));
        })
        .ok()
}

/// The bytes of `setting`'s file, when it holds at least one PEM certificate.
pub(super) fn certificates(
    setting: &str,
    path: &Path,
    problems: &mut Vec<String>,
) -> Option<Vec<u8>> {
    let pem = read(setting, path, problems)?;
    let found = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .is_ok_and(|certificates| !certificates.is_empty());
    if !found {
        problems.push(format!(
            "{setting}: {} holds no PEM certificate",
            path.display()
        ));
        return None;
    }
    Some(pem)
}

/// The bytes of `setting`'s file, kept secret, when it holds a PEM private key (PKCS#8, PKCS#1
/// or SEC1).
pub(super) fn private_key(
    setting: &str,
    path: &Path,
    problems: &mut Vec<String>,
) -> Option<SecretSlice<u8>> {
    let pem = SecretSlice::from(read(setting, path, problems)?);
    if PrivateKeyDer::from_pem_slice(secrecy::ExposeSecret::expose_secret(&pem)).is_err() {
        problems.push(format!(
            "{setting}: {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ));
        return None;
    }
    Some(pem)
}
