//! The trust sluice itself applies upstream: the host's roots (plus any the
//! operator or a test adds), verified exactly as an ordinary client would,
//! and the bundle a sandbox gets so it trusts both the world and its CA.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tracing::{debug, warn};

use super::{certificate_pem, crypto_provider, SandboxCa, TlsError};

/// Where distributions keep the system bundle (Debian/Ubuntu/Alpine first,
/// then Fedora/RHEL). A sandbox image almost always has the same layout.
const SYSTEM_BUNDLES: &[&str] = &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

/// Roots for verifying upstream servers: system roots plus extra PEM files.
pub struct UpstreamRoots {
    roots: Arc<RootCertStore>,
    /// One config per ALPN list: there are only a few, and sharing a config
    /// shares its session cache, so upstream connections resume.
    configs: Mutex<HashMap<Vec<Vec<u8>>, Arc<ClientConfig>>>,
}

impl UpstreamRoots {
    /// The host's roots (the native store; Mozilla's bundled roots if the
    /// store is empty) plus every certificate in `extra_pem_files`.
    pub fn system_and(extra_pem_files: &[PathBuf]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            warn!(%error, "skipping part of the system certificate store");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            warn!("no usable system root certificates; using the bundled Mozilla roots");
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        debug!(added, ignored, "loaded system root certificates");

        for path in extra_pem_files {
            for cert in read_pem_certificates(path)? {
                roots.add(cert).map_err(|source| TlsError::TrustAnchor { path: path.clone(), source })?;
            }
        }
        Ok(Self { roots: Arc::new(roots), configs: Mutex::new(HashMap::new()) })
    }

    /// A client config that verifies upstream certificates normally (expired,
    /// wrong name or unknown issuer all fail the handshake) and offers `alpn`.
    pub fn client_config(&self, alpn: Vec<Vec<u8>>) -> Arc<ClientConfig> {
        // Nothing is left half-done under this lock, so poison is harmless.
        let mut configs = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
        configs
            .entry(alpn)
            .or_insert_with_key(|alpn| {
                let mut config = ClientConfig::builder_with_provider(crypto_provider())
                    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                    .expect("the built-in provider supports TLS 1.2 and 1.3")
                    .with_root_certificates(self.roots.clone())
                    .with_no_client_auth();
                config.alpn_protocols.clone_from(alpn);
                Arc::new(config)
            })
            .clone()
    }

    /// How many trust anchors there are.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

impl fmt::Debug for UpstreamRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamRoots").field("roots", &self.roots.len()).finish_non_exhaustive()
    }
}

fn read_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates { path: path.to_owned() });
    }
    Ok(certs)
}

/// The PEM bundle a sandbox should trust: the system roots (the system
/// bundle file as is, or else the native store) followed by the sandbox's CA.
/// Installed in place of the sandbox's own bundle, it keeps tools that pin
/// that one file working for hosts sluice does not intercept.
pub fn trust_bundle(ca: &SandboxCa) -> Result<String, TlsError> {
    let mut bundle = system_bundle_pem()?;
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    // Writing to a String cannot fail.
    let _ = writeln!(bundle, "# sluice sandbox CA, SHA-256 {}", ca.fingerprint_sha256());
    bundle.push_str(ca.cert_pem());
    Ok(bundle)
}

fn system_bundle_pem() -> Result<String, TlsError> {
    for path in SYSTEM_BUNDLES.iter().map(Path::new) {
        match std::fs::read_to_string(path) {
            Ok(pem) => return Ok(pem),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(TlsError::Read { path: path.to_owned(), source }),
        }
    }
    let native = rustls_native_certs::load_native_certs();
    if native.certs.is_empty() {
        let reason = native.errors.first().map_or_else(|| "the native store is empty".to_owned(), ToString::to_string);
        return Err(TlsError::SystemRoots { reason });
    }
    Ok(native.certs.iter().map(|cert| certificate_pem(cert)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_bundle_is_the_system_bundle_then_the_sandbox_ca() {
        let ca = SandboxCa::generate("bundle").expect("CA");
        let bundle = trust_bundle(&ca).expect("bundle");
        assert!(bundle.ends_with(ca.cert_pem()), "sandbox CA comes last");
        let certs = CertificateDer::pem_slice_iter(bundle.as_bytes()).collect::<Result<Vec<_>, _>>().expect("PEM");
        assert!(certs.len() > 1, "system roots are there too");
        assert_eq!(certs.last(), Some(ca.cert_der()));
        if let Ok(system) = std::fs::read_to_string(SYSTEM_BUNDLES[0]) {
            assert!(bundle.starts_with(&system), "system bundle copied as is");
        }
    }

    #[test]
    fn system_roots_are_loaded() {
        let roots = UpstreamRoots::system_and(&[]).expect("roots");
        assert!(roots.len() > 10, "{roots:?}");
    }

    #[test]
    fn client_configs_are_cached_per_alpn() {
        let roots = UpstreamRoots::system_and(&[]).expect("roots");
        let h2 = roots.client_config(vec![b"h2".to_vec()]);
        let h2_again = roots.client_config(vec![b"h2".to_vec()]);
        let h1 = roots.client_config(vec![b"http/1.1".to_vec()]);
        assert!(Arc::ptr_eq(&h2, &h2_again));
        assert!(!Arc::ptr_eq(&h2, &h1));
        assert_eq!(h1.alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[test]
    fn extra_files_must_hold_certificates() {
        let missing = UpstreamRoots::system_and(&[PathBuf::from("/nonexistent/sluice-test-ca.pem")]);
        assert!(matches!(missing, Err(TlsError::Read { .. })), "{missing:?}");

        let dir = std::env::temp_dir().join(format!("sluice-tls-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").expect("write");
        let result = UpstreamRoots::system_and(std::slice::from_ref(&empty));
        std::fs::remove_dir_all(&dir).expect("clean up");
        let error = result.expect_err("no certificates");
        assert!(error.to_string().contains("holds no PEM certificate"), "{error}");
    }
}
