//! A sandbox's own CA: the only thing that sandbox trusts for intercepted
//! TLS, so a leaf minted for one sandbox is worthless in any other.

use std::fmt;
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use super::{certificate_pem, crypto_provider, sha256_hex, TlsError};

/// How long a freshly made CA is valid. Sandboxes are short-lived; a CA that
/// outlives its sandbox by weeks is only a liability.
const CA_LIFETIME: Duration = Duration::days(30);

/// Backdating tolerates a sandbox clock slightly behind the host's.
pub(super) const BACKDATE: Duration = Duration::hours(1);

/// X.520 upper bound for a common name.
const MAX_COMMON_NAME: usize = 64;

/// A sandbox's CA: ECDSA P-256, unique per sandbox, made at registration.
pub struct SandboxCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: OffsetDateTime,
    fingerprint: String,
}

impl SandboxCa {
    /// A new CA for `sandbox_name`: fresh key, random serial, valid from an
    /// hour ago for 30 days, allowed to sign leaves only (path length 0).
    pub fn generate(sandbox_name: &str) -> Result<Self, TlsError> {
        let failed = |source| TlsError::CaGenerate { sandbox: sandbox_name.to_owned(), source };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(failed)?;

        // Whole seconds, as the certificate stores them, so `not_after()` is
        // the same before and after a PEM round trip.
        let now = OffsetDateTime::now_utc();
        let now = now - Duration::nanoseconds(now.nanosecond().into());
        let mut params = CertificateParams::default();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = ca_subject(sandbox_name, &key);

        let cert = params.self_signed(&key).map_err(failed)?;
        let cert_der = cert.der().clone();
        Ok(Self {
            cert_pem: cert.pem(),
            fingerprint: sha256_hex(&cert_der),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
            cert_der,
        })
    }

    /// Restores a CA written by [`Self::cert_pem`] and
    /// [`Self::key_pem_for_storage`], so sandboxes keep trusting sluice across
    /// a daemon restart. Refuses a certificate that is not a CA, has expired,
    /// or does not match the key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let invalid = |reason: String| TlsError::CaCertificate { reason };
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|error| invalid(format!("not PEM: {error}")))?;
        if pem.label != "CERTIFICATE" {
            return Err(invalid(format!("PEM block is {:?}, not CERTIFICATE", pem.label)));
        }
        let cert = pem.parse_x509().map_err(|error| invalid(format!("not an X.509 certificate: {error}")))?;
        let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|constraints| constraints.value.ca);
        if !is_ca {
            return Err(invalid("not a CA certificate".to_owned()));
        }
        let not_after = cert.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(TlsError::CaExpired { not_after: not_after.to_string() });
        }

        let key = KeyPair::from_pem(key_pem).map_err(|source| TlsError::CaKey { source })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(TlsError::CaKeyMismatch);
        }

        let cert_der = CertificateDer::from(pem.contents.clone());
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|error| invalid(format!("cannot sign with it: {error}")))?;
        Ok(Self {
            cert_pem: certificate_pem(&cert_der),
            fingerprint: sha256_hex(&cert_der),
            not_after,
            issuer,
            cert_der,
        })
    }

    /// The CA certificate a sandbox must trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's PKCS#8 private key, for a root-only state file and nothing
    /// else. Wiped from memory when dropped.
    pub fn key_pem_for_storage(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// Lowercase hex SHA-256 of the CA certificate's DER, for logs.
    pub fn fingerprint_sha256(&self) -> String {
        self.fingerprint.clone()
    }

    /// When the CA stops being valid; leaves never outlive it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after.into()
    }

    pub(super) fn not_after_utc(&self) -> OffsetDateTime {
        self.not_after
    }

    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

impl fmt::Debug for SandboxCa {
    // Only public facts: the key stays out of logs and panics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxCa")
            .field("fingerprint_sha256", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// "CN=sluice sandbox <name> CA, O=sluice, OU=<key id>". The key id keeps a
/// regenerated CA for the same sandbox name distinguishable from the old one
/// in trust stores and in issuer lookups.
fn ca_subject(sandbox_name: &str, key: &KeyPair) -> DistinguishedName {
    const PREFIX: &str = "sluice sandbox ";
    const SUFFIX: &str = " CA";
    let budget = MAX_COMMON_NAME - PREFIX.len() - SUFFIX.len();
    let name: String = sandbox_name
        .chars()
        .scan(0, |used, c| {
            *used += c.len_utf8();
            (*used <= budget).then_some(c)
        })
        .collect();
    let key_id = sha256_hex(key.public_key_raw());

    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, format!("{PREFIX}{name}{SUFFIX}"));
    subject.push(DnType::OrganizationName, "sluice");
    subject.push(DnType::OrganizationalUnitName, format!("ephemeral CA {}", &key_id[..16]));
    subject
}

/// A random positive serial of 16 bytes (126 random bits). Serials must differ between
/// certificates from one issuer: clients such as Firefox reject a reused
/// issuer-and-serial pair, and rcgen's default derives the serial from the
/// subject key, which every leaf of a sandbox shares.
pub(super) fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0_u8; 16];
    crypto_provider().secure_random.fill(&mut bytes).map_err(|_| TlsError::Random)?;
    bytes[0] &= 0x7f;
    // A leading zero byte would not be minimal DER; keep the length fixed.
    bytes[0] |= 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::public_key::PublicKey;

    use super::*;

    fn parse(ca: &SandboxCa) -> X509Certificate<'_> {
        let (rest, cert) = X509Certificate::from_der(ca.cert_der()).expect("CA certificate parses");
        assert!(rest.is_empty());
        cert
    }

    #[test]
    fn generated_ca_is_a_p256_ca_with_pathlen_zero() {
        let ca = SandboxCa::generate("agent-1").expect("generate");
        let cert = parse(&ca);

        let constraints = cert.basic_constraints().expect("well-formed").expect("present").value;
        assert!(constraints.ca);
        assert_eq!(constraints.path_len_constraint, Some(0));
        let usage = cert.key_usage().expect("well-formed").expect("present").value;
        assert!(usage.key_cert_sign() && usage.crl_sign());
        assert!(!usage.digital_signature());

        match cert.public_key().parsed().expect("public key parses") {
            PublicKey::EC(point) => assert_eq!(point.key_size(), 256),
            other => panic!("CA key is not EC: {other:?}"),
        }
        assert_eq!(
            cert.public_key().algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|oid| oid.to_id_string()),
            Some("1.2.840.10045.3.1.7".to_owned()),
            "curve is P-256"
        );
        let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok());
        assert_eq!(common_name, Some("sluice sandbox agent-1 CA"));
        assert_eq!(cert.subject(), cert.issuer(), "self-signed");
    }

    #[test]
    fn validity_is_backdated_an_hour_and_lasts_thirty_days() {
        let ca = SandboxCa::generate("agent-1").expect("generate");
        let cert = parse(&ca);
        let now = OffsetDateTime::now_utc();
        let not_before = cert.validity().not_before.to_datetime();
        let not_after = cert.validity().not_after.to_datetime();
        assert!((now - BACKDATE - not_before).abs() < Duration::minutes(1), "not_before {not_before}");
        assert!((not_after - now - CA_LIFETIME).abs() < Duration::minutes(1), "not_after {not_after}");
    }

    #[test]
    fn every_generate_makes_a_different_ca() {
        let first = SandboxCa::generate("same").expect("generate");
        let second = SandboxCa::generate("same").expect("generate");
        assert_ne!(first.fingerprint_sha256(), second.fingerprint_sha256());
        assert_ne!(parse(&first).public_key().raw, parse(&second).public_key().raw);
        assert_ne!(parse(&first).subject(), parse(&second).subject(), "subjects differ too");
        assert_ne!(parse(&first).serial, parse(&second).serial);
    }

    #[test]
    fn pem_round_trips() {
        let ca = SandboxCa::generate("agent-1").expect("generate");
        let restored = SandboxCa::from_pem(ca.cert_pem(), &ca.key_pem_for_storage()).expect("from_pem");
        assert_eq!(restored.cert_pem(), ca.cert_pem());
        assert_eq!(restored.cert_der(), ca.cert_der());
        assert_eq!(restored.fingerprint_sha256(), ca.fingerprint_sha256());
        assert_eq!(*restored.key_pem_for_storage(), *ca.key_pem_for_storage());
        assert_eq!(restored.not_after(), ca.not_after());
    }

    #[test]
    fn from_pem_refuses_a_key_from_another_ca() {
        let ca = SandboxCa::generate("one").expect("generate");
        let other = SandboxCa::generate("two").expect("generate");
        let error = SandboxCa::from_pem(ca.cert_pem(), &other.key_pem_for_storage()).expect_err("mismatch");
        assert!(matches!(error, TlsError::CaKeyMismatch), "{error}");
    }

    #[test]
    fn from_pem_refuses_garbage_and_non_ca_certificates() {
        let ca = SandboxCa::generate("one").expect("generate");
        let key = ca.key_pem_for_storage();
        assert!(matches!(SandboxCa::from_pem("nonsense", &key), Err(TlsError::CaCertificate { .. })));
        assert!(matches!(SandboxCa::from_pem(ca.cert_pem(), "nonsense"), Err(TlsError::CaKey { .. })));

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf = CertificateParams::new(vec!["not-a-ca.test".to_owned()])
            .expect("params")
            .self_signed(&leaf_key)
            .expect("self-signed");
        let error = SandboxCa::from_pem(&leaf.pem(), &leaf_key.serialize_pem()).expect_err("not a CA");
        assert!(error.to_string().contains("not a CA"), "{error}");
    }

    #[test]
    fn from_pem_refuses_an_expired_ca() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.not_before = OffsetDateTime::now_utc() - Duration::days(40);
        params.not_after = OffsetDateTime::now_utc() - Duration::days(10);
        let cert = params.self_signed(&key).expect("self-signed");
        let error = SandboxCa::from_pem(&cert.pem(), &key.serialize_pem()).expect_err("expired");
        assert!(matches!(error, TlsError::CaExpired { .. }), "{error}");
    }

    #[test]
    fn debug_and_errors_never_show_the_key() {
        let ca = SandboxCa::generate("agent-1").expect("generate");
        let key = ca.key_pem_for_storage();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "storage form is PKCS#8 PEM");
        let debug = format!("{ca:?} {ca:#?}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        let key_body: String = key.lines().nth(1).expect("a base64 line").chars().take(24).collect();
        assert!(!debug.contains(&key_body), "{debug}");

        let other = SandboxCa::generate("two").expect("generate");
        let error = SandboxCa::from_pem(other.cert_pem(), &key).expect_err("mismatch");
        assert!(!format!("{error} {error:?}").contains(&key_body));
    }

    #[test]
    fn long_sandbox_names_keep_the_common_name_within_64_bytes() {
        let ca = SandboxCa::generate(&"é".repeat(100)).expect("generate");
        let cert = parse(&ca);
        let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).expect("CN");
        assert!(common_name.len() <= MAX_COMMON_NAME, "{common_name}");
        assert!(common_name.starts_with("sluice sandbox éé") && common_name.ends_with(" CA"));
    }
}
