//! TLS interception material for sandboxes: each sandbox's ephemeral CA
//! ([`SandboxCa`]), the leaf certificates sluice presents to a sandbox for the
//! names it connects to ([`LeafMinter`], [`MintingResolver`],
//! [`server_config`]), and the verified client side sluice speaks upstream
//! ([`UpstreamRoots`]).
//!
//! Everything here uses one explicitly chosen crypto provider
//! ([`crypto_provider`]) instead of rustls' process-wide default, so another
//! crate in the build enabling a second rustls backend cannot change, or
//! panic, what this module does.

mod ca;
mod leaf;
mod upstream;

#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, Error as RustlsError};

pub use ca::SandboxCa;
pub use leaf::{server_config, LeafMinter, MintingResolver, DEFAULT_LEAF_CACHE_CAPACITY};
pub use upstream::{trust_bundle, UpstreamRoots};

/// The crypto provider for every TLS config and key this module makes.
///
/// aws-lc-rs is rustls' default backend and the one offering the hybrid
/// post-quantum key exchange modern clients prefer; intercepting should not
/// negotiate something weaker than the client would have got directly.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())).clone()
}

/// Lowercase hex SHA-256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().fold(String::with_capacity(64), |mut hex, byte| {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

/// Encodes a DER certificate as PEM with `\n` line endings (the `pem`
/// crate's default is `\r\n`).
fn certificate_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the CA for sandbox {sandbox:?}: {source}")]
    CaGenerate {
        sandbox: String,
        #[source]
        source: rcgen::Error,
    },

    /// A stored CA certificate cannot be used; `reason` says why.
    #[error("stored sandbox CA certificate: {reason}")]
    CaCertificate { reason: String },

    #[error("stored sandbox CA key cannot be parsed: {source}")]
    CaKey {
        #[source]
        source: rcgen::Error,
    },

    #[error("stored sandbox CA key does not belong to the stored CA certificate")]
    CaKeyMismatch,

    #[error("stored sandbox CA expired at {not_after}")]
    CaExpired { not_after: String },

    #[error("generating the leaf key pair: {source}")]
    LeafKey {
        #[source]
        source: rcgen::Error,
    },

    #[error("loading the leaf key pair into rustls: {source}")]
    LeafKeyLoad {
        #[source]
        source: RustlsError,
    },

    /// The name came from a sandbox (SNI or destination), so it is printed
    /// escaped.
    #[error("{name:?} is neither a DNS name nor an IP address")]
    InvalidServerName { name: String },

    #[error("minting a leaf certificate for {name:?}: {source}")]
    Mint {
        name: String,
        #[source]
        source: rcgen::Error,
    },

    #[error("the system random number generator failed")]
    Random,

    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} holds no PEM certificate", path.display())]
    NoCertificates { path: PathBuf },

    #[error("parsing PEM in {}: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },

    #[error("a certificate in {} cannot be a trust anchor: {source}", path.display())]
    TrustAnchor {
        path: PathBuf,
        #[source]
        source: RustlsError,
    },

    #[error("no system root certificates found: {reason}")]
    SystemRoots { reason: String },
}

/// The rustls error inside an I/O error from a tokio-rustls handshake, if
/// the handshake failed for a TLS reason rather than a socket one.
pub fn rustls_error(error: &std::io::Error) -> Option<&RustlsError> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<RustlsError>())
}

/// Describes an upstream certificate failure in words an operator
/// understands ("certificate expired", "certificate is not valid for name X",
/// "unknown issuer"). Other TLS errors keep rustls' own wording.
pub fn describe_verify_error(error: &RustlsError) -> String {
    let RustlsError::InvalidCertificate(certificate) = error else {
        return match error {
            RustlsError::NoCertificatesPresented => "the server presented no certificate".to_owned(),
            RustlsError::AlertReceived(alert) => format!("the server refused the handshake ({alert:?})"),
            other => format!("TLS handshake failed: {other}"),
        };
    };
    #[allow(deprecated)] // Older rustls versions still return the context-free variants.
    match certificate {
        CertificateError::Expired => "certificate expired".to_owned(),
        CertificateError::ExpiredContext { time, not_after } => format!(
            "certificate expired {} ago (not valid after unix time {}, now {})",
            humanize_seconds(time.as_secs().saturating_sub(not_after.as_secs())),
            not_after.as_secs(),
            time.as_secs()
        ),
        CertificateError::NotValidYet => "certificate is not valid yet".to_owned(),
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "certificate is not valid yet (valid from unix time {}, now {}); check the clocks",
            not_before.as_secs(),
            time.as_secs()
        ),
        CertificateError::NotValidForName => "certificate is not valid for the requested name".to_owned(),
        CertificateError::NotValidForNameContext { expected, presented } => {
            let expected = expected.to_str();
            if presented.is_empty() {
                format!("certificate is not valid for name {expected} (it names no host)")
            } else {
                format!("certificate is not valid for name {expected} (it is for {})", presented.join(", "))
            }
        }
        CertificateError::UnknownIssuer => {
            "unknown issuer: the certificate is not signed by a trusted root CA".to_owned()
        }
        CertificateError::BadSignature => "certificate has a bad signature".to_owned(),
        CertificateError::BadEncoding => "certificate is malformed".to_owned(),
        CertificateError::Revoked => "certificate was revoked".to_owned(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "certificate is not for TLS server authentication".to_owned()
        }
        CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "certificate uses an unsupported signature algorithm".to_owned()
        }
        CertificateError::UnhandledCriticalExtension => {
            "certificate has a critical extension that cannot be checked".to_owned()
        }
        other => format!("certificate rejected: {other}"),
    }
}

/// "3d 4h", "5m 2s": coarse enough to read at a glance in a log line.
fn humanize_seconds(seconds: u64) -> String {
    let (days, hours, minutes) = (seconds / 86_400, seconds / 3_600 % 24, seconds / 60 % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m {}s", seconds % 60),
        (0, _, _) => format!("{hours}h {minutes}m"),
        _ => format!("{days}d {hours}h"),
    }
}
