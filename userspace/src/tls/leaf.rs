//! Leaf certificates a sandbox sees for the names it connects to: minted on
//! first use from the sandbox's CA, cached, and chosen per connection by SNI.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use lru::LruCache;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256,
};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::{DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use tracing::{debug, warn};

use super::ca::{random_serial, BACKDATE};
use super::{crypto_provider, SandboxCa, TlsError};

/// Leaves a sandbox keeps cached when the caller has no better figure.
pub const DEFAULT_LEAF_CACHE_CAPACITY: usize = 1024;

/// Short, so a leaf copied out of a sandbox is soon useless.
const LEAF_LIFETIME: Duration = Duration::hours(24);

/// A cached leaf older than this is minted again, so a long-running
/// connection pattern never gets a leaf that is about to expire.
const LEAF_REFRESH_AFTER: std::time::Duration = std::time::Duration::from_hours(12);

/// X.520 upper bound for a common name.
const MAX_COMMON_NAME: usize = 64;

/// Mints and caches leaf certificates for one sandbox.
///
/// All leaves of a sandbox share one key pair, so minting is a single
/// signature; the key never leaves sluice, and the CA (unique per sandbox)
/// is what ties a leaf to its sandbox.
pub struct LeafMinter {
    ca: Arc<SandboxCa>,
    /// Only the public half is kept for minting; the private half lives in
    /// `signing_key` alone.
    leaf_public: SubjectPublicKeyInfo,
    signing_key: Arc<dyn SigningKey>,
    cache: Mutex<LruCache<String, CachedLeaf>>,
    refresh_after: std::time::Duration,
}

struct CachedLeaf {
    certified: Arc<CertifiedKey>,
    minted_at: Instant,
}

/// A validated server name: the cache key and the SAN to put in the leaf.
struct LeafName {
    key: String,
    san: SanType,
}

impl LeafName {
    fn parse(server_name: &str) -> Result<Self, TlsError> {
        let invalid = || TlsError::InvalidServerName { name: server_name.to_owned() };
        let lower = server_name.to_ascii_lowercase();
        if let Ok(ip) = lower.parse::<IpAddr>() {
            // The canonical form keys the cache, so "::0001" and "::1" share a leaf.
            return Ok(Self { key: ip.to_string(), san: SanType::IpAddress(ip) });
        }
        // Also rejects wildcards and all-numeric final labels, and drops a
        // trailing dot, which a certificate name must not carry.
        let dns = DnsName::try_from(lower.as_str()).map_err(|_| invalid())?;
        let key = dns.as_ref().to_owned();
        let san = SanType::DnsName(key.clone().try_into().map_err(|_| invalid())?);
        Ok(Self { key, san })
    }
}

impl LeafMinter {
    /// `capacity` bounds the cache (a capacity of 0 is taken as 1). Makes the
    /// sandbox's leaf key pair.
    pub fn new(ca: Arc<SandboxCa>, capacity: usize) -> Result<Self, TlsError> {
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| TlsError::LeafKey { source })?;
        let leaf_public = SubjectPublicKeyInfo::from_der(&leaf_key.subject_public_key_info())
            .map_err(|source| TlsError::LeafKey { source })?;
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing_key = crypto_provider()
            .key_provider
            .load_private_key(pkcs8)
            .map_err(|source| TlsError::LeafKeyLoad { source })?;
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            ca,
            leaf_public,
            signing_key,
            cache: Mutex::new(LruCache::new(capacity)),
            refresh_after: LEAF_REFRESH_AFTER,
        })
    }

    /// The leaf for a DNS name or an IP literal, minted on first use and
    /// cached under the lowercased name. Names that are neither are refused:
    /// they come from a sandbox and would otherwise end up in a certificate.
    pub fn leaf(&self, server_name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let name = LeafName::parse(server_name)?;
        if let Some(hit) = self.fresh_cached(&name.key) {
            return Ok(hit);
        }
        // Signing happens outside the lock so one slow mint does not stall
        // every other connection of the sandbox.
        let minted = Arc::new(self.mint(&name)?);
        let mut cache = self.lock_cache();
        // A concurrent connection may have minted the same name meanwhile;
        // keep the first, so every caller of one name shares one leaf.
        if let Some(existing) = cache.get(&name.key).filter(|entry| entry.minted_at.elapsed() < self.refresh_after) {
            return Ok(existing.certified.clone());
        }
        debug!(server_name = %name.key, ca = %self.ca.fingerprint_sha256(), "minted leaf certificate");
        cache.put(name.key, CachedLeaf { certified: minted.clone(), minted_at: Instant::now() });
        Ok(minted)
    }

    /// How many leaves are cached.
    pub fn cached(&self) -> usize {
        self.lock_cache().len()
    }

    /// Mints a leaf without touching the cache, for benchmarks.
    pub fn mint_uncached(&self, server_name: &str) -> Result<CertifiedKey, TlsError> {
        self.mint(&LeafName::parse(server_name)?)
    }

    pub fn ca(&self) -> &Arc<SandboxCa> {
        &self.ca
    }

    fn fresh_cached(&self, key: &str) -> Option<Arc<CertifiedKey>> {
        let mut cache = self.lock_cache();
        let entry = cache.get(key)?;
        (entry.minted_at.elapsed() < self.refresh_after).then(|| entry.certified.clone())
    }

    fn mint(&self, name: &LeafName) -> Result<CertifiedKey, TlsError> {
        let failed = |source| TlsError::Mint { name: name.key.clone(), source };
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.not_before = now - BACKDATE;
        // Never past the CA: a leaf valid longer than its issuer only fails later.
        params.not_after = (now + LEAF_LIFETIME).min(self.ca.not_after_utc());
        params.serial_number = Some(random_serial()?);
        params.subject_alt_names = vec![name.san.clone()];
        params.distinguished_name = leaf_subject(&name.key);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;

        let cert = params.signed_by(&self.leaf_public, self.ca.issuer()).map_err(failed)?;
        // The chain is the leaf alone: the sandbox trusts the CA directly.
        Ok(CertifiedKey::new(vec![cert.der().clone()], self.signing_key.clone()))
    }

    /// The cache holds no invariant a panicking holder could break (entries
    /// are whole `Arc`s), so a poisoned lock is still usable.
    fn lock_cache(&self) -> MutexGuard<'_, LruCache<String, CachedLeaf>> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl fmt::Debug for LeafMinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafMinter")
            .field("ca", &self.ca.fingerprint_sha256())
            .field("cached", &self.cached())
            .finish_non_exhaustive()
    }
}

/// CN = the name when it fits. Clients match on the SAN; the CN only makes
/// the certificate readable in tools that show the subject.
fn leaf_subject(name: &str) -> DistinguishedName {
    let mut subject = DistinguishedName::new();
    if name.len() <= MAX_COMMON_NAME {
        subject.push(DnType::CommonName, name);
    }
    subject.push(DnType::OrganizationName, "sluice (intercepted)");
    subject
}

/// rustls hook: picks the leaf by SNI.
///
/// `fallback_name` is used when the client sent no SNI (for instance the
/// destination IP as a string); `None` refuses such clients, and the
/// handshake fails for want of a certificate.
pub struct MintingResolver {
    minter: Arc<LeafMinter>,
    fallback_name: Option<String>,
}

impl MintingResolver {
    pub fn new(minter: Arc<LeafMinter>, fallback_name: Option<String>) -> Self {
        Self { minter, fallback_name }
    }
}

impl fmt::Debug for MintingResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintingResolver")
            .field("minter", &self.minter)
            .field("fallback_name", &self.fallback_name)
            .finish()
    }
}

impl ResolvesServerCert for MintingResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = client_hello.server_name().or(self.fallback_name.as_deref()) else {
            debug!("client sent no SNI and there is no fallback name; refusing");
            return None;
        };
        match self.minter.leaf(name) {
            Ok(leaf) => Some(leaf),
            Err(error) => {
                warn!(%error, server_name = ?name, "no leaf certificate for intercepted connection");
                None
            }
        }
    }
}

/// `ServerConfig` for intercepting one client connection: leaves from
/// `resolver`, TLS 1.2 and 1.3, ALPN offering `alpn` in that order of
/// preference.
pub fn server_config(resolver: Arc<MintingResolver>, alpn: Vec<Vec<u8>>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the built-in provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn;
    // A config lives for one connection, so a session could never be
    // resumed; resuming would also skip the resolver (and its checks).
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;

    fn minter(capacity: usize) -> LeafMinter {
        let ca = Arc::new(SandboxCa::generate("leaf-tests").expect("CA"));
        LeafMinter::new(ca, capacity).expect("minter")
    }

    fn leaf_der(leaf: &CertifiedKey) -> &[u8] {
        assert_eq!(leaf.cert.len(), 1, "chain is the leaf alone");
        &leaf.cert[0]
    }

    fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
        let san = cert.subject_alternative_name().expect("well-formed").expect("SAN present");
        san.value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => format!("dns:{dns}"),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => format!("ip:{}", Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).expect("4 bytes"))),
                    16 => format!("ip:{}", Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).expect("16 bytes"))),
                    n => panic!("IP SAN of {n} bytes"),
                },
                other => format!("other:{other:?}"),
            })
            .collect()
    }

    #[test]
    fn dns_leaf_names_the_host_and_is_a_short_lived_server_certificate() {
        let minter = minter(DEFAULT_LEAF_CACHE_CAPACITY);
        let leaf = minter.leaf("API.Example.test").expect("leaf");
        let (_, cert) = X509Certificate::from_der(leaf_der(&leaf)).expect("parses");
        let (_, ca) = X509Certificate::from_der(minter.ca().cert_der()).expect("CA parses");

        assert_eq!(sans(&cert), ["dns:api.example.test"]);
        let constraints = cert.basic_constraints().expect("well-formed").expect("present").value;
        assert!(!constraints.ca, "leaf must not be a CA");
        let eku = cert.extended_key_usage().expect("well-formed").expect("present").value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(cert.key_usage().expect("well-formed").expect("present").value.digital_signature());

        assert_eq!(cert.issuer(), ca.subject());
        let ski = |c: &X509Certificate<'_>| {
            c.iter_extensions().find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
        };
        let aki = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                _ => None,
            })
            .expect("AKI present");
        assert_eq!(Some(aki), ski(&ca), "AKI is the CA's SKI");
        assert!(ski(&cert).is_some(), "SKI present");

        let validity = cert.validity().not_after.to_datetime() - cert.validity().not_before.to_datetime();
        assert!(validity <= Duration::hours(25), "validity {validity}");
        assert!(cert.validity().is_valid(), "valid now");
        cert.verify_signature(Some(ca.public_key())).expect("signed by the sandbox CA");
    }

    #[test]
    fn ip_leaf_has_an_ip_san() {
        let minter = minter(DEFAULT_LEAF_CACHE_CAPACITY);
        let leaf = minter.leaf("10.1.2.3").expect("v4 leaf");
        let (_, cert) = X509Certificate::from_der(leaf_der(&leaf)).expect("parses");
        assert_eq!(sans(&cert), ["ip:10.1.2.3"]);

        let leaf = minter.leaf("FD00:231::0001").expect("v6 leaf");
        let (_, cert) = X509Certificate::from_der(leaf_der(&leaf)).expect("parses");
        assert_eq!(sans(&cert), ["ip:fd00:231::1"]);
    }

    #[test]
    fn leaves_share_the_key_but_not_the_serial() {
        let minter = minter(DEFAULT_LEAF_CACHE_CAPACITY);
        let one = minter.leaf("one.test").expect("leaf");
        let two = minter.leaf("two.test").expect("leaf");
        let (_, one_cert) = X509Certificate::from_der(leaf_der(&one)).expect("parses");
        let (_, two_cert) = X509Certificate::from_der(leaf_der(&two)).expect("parses");
        assert_eq!(one_cert.public_key().raw, two_cert.public_key().raw);
        assert_ne!(one_cert.serial, two_cert.serial, "issuer+serial must be unique");
        one.keys_match().expect("leaf key matches certificate");
    }

    #[test]
    fn leaf_never_outlives_the_ca() {
        let minter = minter(DEFAULT_LEAF_CACHE_CAPACITY);
        let leaf = minter.leaf("x.test").expect("leaf");
        let (_, cert) = X509Certificate::from_der(leaf_der(&leaf)).expect("parses");
        assert!(cert.validity().not_after.to_datetime() <= minter.ca().not_after_utc());
    }

    #[test]
    fn second_lookup_returns_the_cached_leaf() {
        let minter = minter(DEFAULT_LEAF_CACHE_CAPACITY);
        assert_eq!(minter.cached(), 0);
        let first = minter.leaf("api.example.test").expect("leaf");
        let second = minter.leaf("API.EXAMPLE.TEST.").expect("leaf");
        assert!(Arc::ptr_eq(&first, &second), "same name (any case, trailing dot) shares the cached leaf");
        assert_eq!(minter.cached(), 1);
        minter.leaf("other.example.test").expect("leaf");
        assert_eq!(minter.cached(), 2);
    }

    #[test]
    fn cache_is_bounded_and_evicts_least_recently_used() {
        let minter = minter(2);
        let a = minter.leaf("a.test").expect("leaf");
        minter.leaf("b.test").expect("leaf");
        minter.leaf("a.test").expect("leaf"); // a is now the most recent
        minter.leaf("c.test").expect("leaf"); // evicts b
        assert_eq!(minter.cached(), 2);
        assert!(Arc::ptr_eq(&a, &minter.leaf("a.test").expect("leaf")), "a stayed cached");
    }

    #[test]
    fn zero_capacity_still_caches_one() {
        let minter = minter(0);
        let first = minter.leaf("a.test").expect("leaf");
        assert!(Arc::ptr_eq(&first, &minter.leaf("a.test").expect("leaf")));
        assert_eq!(minter.cached(), 1);
    }

    #[test]
    fn stale_leaves_are_minted_again() {
        let mut minter = minter(DEFAULT_LEAF_CACHE_CAPACITY);
        minter.refresh_after = std::time::Duration::ZERO;
        let first = minter.leaf("a.test").expect("leaf");
        let second = minter.leaf("a.test").expect("leaf");
        assert!(!Arc::ptr_eq(&first, &second), "a leaf past its refresh age is replaced");
        assert_eq!(minter.cached(), 1);
    }

    #[test]
    fn names_that_are_neither_dns_nor_ip_are_rejected() {
        let minter = minter(DEFAULT_LEAF_CACHE_CAPACITY);
        for name in
            ["", "a b", "-x..y", "*.example.test", "exa\u{0}mple.test", "bücher.test", "1.2.3", "a..b", "x-.test"]
        {
            match minter.leaf(name) {
                Err(TlsError::InvalidServerName { name: rejected }) => assert_eq!(rejected, name),
                other => panic!("{name:?} was not rejected: {other:?}"),
            }
        }
        assert!(minter.leaf(&format!("{}.test", "a".repeat(64))).is_err(), "label over 63 bytes");
        assert_eq!(minter.cached(), 0, "nothing minted for rejected names");
        let error = minter.leaf("a\nb").expect_err("newline");
        assert!(error.to_string().contains(r#""a\nb""#), "sandbox-supplied name is escaped: {error}");
    }

    #[test]
    fn unusual_but_valid_names_are_accepted() {
        let minter = minter(DEFAULT_LEAF_CACHE_CAPACITY);
        for name in ["xn--bcher-kva.test", "_acme.example.test", "localhost", "a-b.c-d.test", "::1"] {
            minter.leaf(name).unwrap_or_else(|error| panic!("{name:?}: {error}"));
        }
        let long = format!("{}.test", "a".repeat(63));
        let leaf = minter.leaf(&long).expect("long name");
        let (_, cert) = X509Certificate::from_der(leaf_der(&leaf)).expect("parses");
        assert!(cert.subject().iter_common_name().next().is_none(), "CN over 64 bytes is left out");
        assert_eq!(sans(&cert), [format!("dns:{long}")]);
    }

    #[test]
    fn minting_uncached_leaves_the_cache_alone() {
        let minter = minter(DEFAULT_LEAF_CACHE_CAPACITY);
        minter.mint_uncached("a.test").expect("leaf");
        assert_eq!(minter.cached(), 0);
    }

    #[test]
    fn debug_shows_no_key_material() {
        let minter = Arc::new(minter(DEFAULT_LEAF_CACHE_CAPACITY));
        let resolver = MintingResolver::new(minter.clone(), Some("10.0.0.1".to_owned()));
        let debug = format!("{resolver:?}");
        assert!(debug.contains("10.0.0.1") && debug.contains(&minter.ca().fingerprint_sha256()), "{debug}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
    }
}
