//! TLS for `https://` and `wss://`: one rustls configuration (ring, the Mozilla roots of
//! `webpki-roots`, plus any roots the application adds) shared by the HTTP client (SSE, long
//! polling, publishing) and the WebSocket connector, so every transport trusts the same
//! certificates.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::{Error, Result};

/// Reads every certificate of a PEM text.
pub(crate) fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|error| Error::Tls(format!("reading PEM certificates: {error}")))?;
    if certificates.is_empty() {
        return Err(Error::Tls("no certificate in the PEM text".to_owned()));
    }
    Ok(certificates)
}

/// The client configuration: the public web's roots and `extra_roots`.
pub(crate) fn client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for certificate in extra_roots {
        roots
            .add(certificate.clone())
            .map_err(|error| Error::Tls(format!("adding a root certificate: {error}")))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| Error::Tls(error.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
