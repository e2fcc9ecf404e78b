//! The listener's TLS configuration: rustls with the aws-lc-rs provider (already the IdP
//! client's), TLS 1.2 and 1.3, HTTP/1.1 by ALPN, certificate chain and key from PEM files.
//!
//! The certificate is served from a [`ServerCertificate`] that a reload replaces
//! ([`ServerCertificate::read`], then [`ServerCertificate::install`]): new connections get the new certificate, open ones finish
//! with theirs, and files that do not make a usable certificate and key change nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsSettings;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("server.tls: cannot read {what} from {}: {source}", path.display())]
    Pem {
        /// `certificates` or `a private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// The file has no certificate.
    #[error("server.tls: {} holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    /// rustls refused the certificate and key (a key that does not match, say).
    #[error("server.tls: the certificate and key are not usable together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate and key new connections are served, replaced whole by a reload.
#[derive(Debug)]
pub struct ServerCertificate {
    current: ArcSwap<CertifiedKey>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertificate {
    /// Reads `settings`' certificate and key, checked to match, for [`ServerCertificate::install`].
    pub fn read(&self, settings: &TlsSettings) -> Result<CertifiedKey, TlsError> {
        certified_key(settings, &self.provider)
    }

    /// Serves `key` to new connections from now on; open ones finish with theirs.
    pub fn install(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The certificate chain and key of `settings`, checked to match.
fn certified_key(
    settings: &TlsSettings,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let pem_error = |what, path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Pem { what, path, source }
    };
    let certificates = CertificateDer::pem_file_iter(&settings.certificate_file)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(pem_error("certificates", &settings.certificate_file))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate(settings.certificate_file.clone()));
    }
    let key = PrivateKeyDer::from_pem_file(&settings.key_file)
        .map_err(pem_error("a private key", &settings.key_file))?;
    Ok(CertifiedKey::from_der(certificates, key, provider)?)
}

/// Builds the acceptor that terminates TLS on accepted connections, and the certificate it
/// serves, which a reload replaces.
pub fn acceptor(settings: &TlsSettings) -> Result<(TlsAcceptor, Arc<ServerCertificate>), TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certificate = Arc::new(ServerCertificate {
        current: ArcSwap::from_pointee(certified_key(settings, &provider)?),
        provider: Arc::clone(&provider),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&certificate) as Arc<dyn ResolvesServerCert>);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), certificate))
}
