//! TLS for the CLI (https:// and wss:// API URLs): rustls with the ring
//! provider and the system's CA bundle, shared by the HTTP client and the
//! shell's WebSocket. Loaded only when the API URL is https.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Where CA bundles live on common systems (Debian/Ubuntu/Alpine, Fedora/RHEL,
/// openSUSE, macOS and Homebrew), after `$SSL_CERT_FILE`.
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/opt/homebrew/etc/openssl@3/cert.pem",
    "/usr/local/etc/openssl@3/cert.pem",
];

/// A client config trusting the first CA bundle found.
pub fn client_config() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let explicit = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let mut roots = RootCertStore::empty();
    if let Some(path) = &explicit {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read SSL_CERT_FILE {}", path.display()))?;
        add_pem(&mut roots, &pem);
        if roots.is_empty() {
            return Err(anyhow!(
                "SSL_CERT_FILE {} holds no PEM certificates",
                path.display()
            ));
        }
    } else {
        for path in CA_BUNDLES {
            if let Ok(pem) = std::fs::read(path) {
                add_pem(&mut roots, &pem);
                if !roots.is_empty() {
                    break;
                }
            }
        }
    }
    if roots.is_empty() {
        return Err(anyhow!(
            "no CA certificates found for https (looked in {}); set SSL_CERT_FILE to a PEM bundle",
            CA_BUNDLES.join(", ")
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn add_pem(roots: &mut RootCertStore, pem: &[u8]) {
    for cert in CertificateDer::pem_slice_iter(pem).flatten() {
        // A bundle may hold certificates rustls cannot use; skip those.
        let _ = roots.add(cert);
    }
}
