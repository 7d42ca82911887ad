//! Real handshakes over loopback: a sandbox-side client against the
//! intercepting server config, and the upstream client config against test
//! servers with certificates from a test CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;

const GREETING: &[u8] = b"hello from the server";

/// Accepts one connection on loopback, completes the handshake and writes
/// [`GREETING`]. The task's result is the server side's view.
async fn serve_once(config: Arc<ServerConfig>) -> (SocketAddr, JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(config).accept(tcp).await?;
        tls.write_all(GREETING).await?;
        tls.shutdown().await
    });
    (addr, task)
}

/// Connects and reads the greeting; the error, if any, is the client's.
async fn connect(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let server_name = ServerName::try_from(server_name.to_owned()).expect("test server name is valid");
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = TlsConnector::from(config).connect(server_name, tcp).await?;
    let mut greeting = vec![0; GREETING.len()];
    tls.read_exact(&mut greeting).await?;
    assert_eq!(greeting, GREETING);
    Ok(tls)
}

fn client_trusting(ca_der: &CertificateDer<'static>, alpn: &[&[u8]]) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone()).expect("CA is a valid trust anchor");
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("provider supports the defaults")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

fn intercepting(ca: &Arc<SandboxCa>, fallback: Option<&str>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let minter = Arc::new(LeafMinter::new(ca.clone(), DEFAULT_LEAF_CACHE_CAPACITY).expect("minter"));
    let resolver = Arc::new(MintingResolver::new(minter, fallback.map(str::to_owned)));
    server_config(resolver, alpn.iter().map(|p| p.to_vec()).collect())
}

fn peer_sans(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<String> {
    let chain = tls.get_ref().1.peer_certificates().expect("server sent a certificate");
    let (_, cert) = X509Certificate::from_der(&chain[0]).expect("leaf parses");
    let san = cert.subject_alternative_name().expect("well-formed").expect("SAN present");
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => (*dns).to_owned(),
            GeneralName::IPAddress(bytes) => format!("ip {bytes:?}"),
            other => format!("{other:?}"),
        })
        .collect()
}

fn tls_error(error: &std::io::Error) -> &rustls::Error {
    rustls_error(error).unwrap_or_else(|| panic!("not a TLS error: {error}"))
}

/// The handshake failed because the resolver gave no certificate, not for
/// any other reason: the client got rustls' access-denied alert and the
/// server's error is the unresolved chain.
async fn assert_refused_for_want_of_a_leaf(
    client: std::io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
    server: JoinHandle<std::io::Result<()>>,
) {
    let Err(client) = client else { panic!("handshake succeeded") };
    assert!(
        matches!(tls_error(&client), rustls::Error::AlertReceived(rustls::AlertDescription::AccessDenied)),
        "{client}"
    );
    let server = server.await.expect("server task").expect_err("server refused");
    assert!(server.to_string().contains("no server certificate chain resolved"), "{server}");
}

#[tokio::test]
async fn sandbox_client_trusting_its_ca_gets_a_leaf_for_its_sni_with_h2() {
    let ca = Arc::new(SandboxCa::generate("e2e").expect("CA"));
    let (addr, server) = serve_once(intercepting(&ca, None, &[b"h2", b"http/1.1"])).await;

    let client = client_trusting(ca.cert_der(), &[b"http/1.1", b"h2"]);
    let tls = connect(Arc::new(client), addr, "api.example.test").await.expect("handshake with the sandbox CA");

    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "server's ALPN preference wins");
    assert_eq!(peer_sans(&tls), ["api.example.test"]);
    server.await.expect("server task").expect("server side of the handshake");
}

#[tokio::test]
async fn tls12_clients_are_intercepted_too() {
    let ca = Arc::new(SandboxCa::generate("e2e-tls12").expect("CA"));
    let (addr, server) = serve_once(intercepting(&ca, None, &[b"http/1.1"])).await;

    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).expect("anchor");
    let mut client = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("TLS 1.2")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = connect(Arc::new(client), addr, "old.example.test").await.expect("TLS 1.2 handshake");

    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    server.await.expect("server task").expect("server side");
}

#[tokio::test]
async fn client_trusting_another_sandboxs_ca_is_refused() {
    let ca = Arc::new(SandboxCa::generate("victim").expect("CA"));
    let other = SandboxCa::generate("other").expect("CA");
    let (addr, server) = serve_once(intercepting(&ca, None, &[b"h2"])).await;

    let client = client_trusting(other.cert_der(), &[b"h2"]);
    let error = connect(Arc::new(client), addr, "api.example.test").await.expect_err("wrong CA must fail");
    assert!(
        matches!(tls_error(&error), rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)),
        "{error}"
    );
    assert!(server.await.expect("server task").is_err(), "server sees the client's alert");
}

#[tokio::test]
async fn restored_ca_mints_leaves_the_sandbox_still_trusts() {
    let original = SandboxCa::generate("restart").expect("CA");
    let restored =
        Arc::new(SandboxCa::from_pem(original.cert_pem(), &original.key_pem_for_storage()).expect("from_pem"));
    let (addr, server) = serve_once(intercepting(&restored, None, &[b"h2"])).await;

    // The sandbox was given the original PEM before the restart.
    let client = client_trusting(original.cert_der(), &[b"h2"]);
    connect(Arc::new(client), addr, "api.example.test").await.expect("leaf from the restored CA verifies");
    server.await.expect("server task").expect("server side");
}

#[tokio::test]
async fn no_sni_without_fallback_is_refused() {
    let ca = Arc::new(SandboxCa::generate("no-sni").expect("CA"));

    // rustls never sends SNI for an IP server name.
    let (addr, server) = serve_once(intercepting(&ca, None, &[b"h2"])).await;
    let client = client_trusting(ca.cert_der(), &[b"h2"]);
    assert_refused_for_want_of_a_leaf(connect(Arc::new(client), addr, "10.1.2.3").await, server).await;

    // Same with a DNS server name and SNI switched off.
    let (addr, server) = serve_once(intercepting(&ca, None, &[b"h2"])).await;
    let mut client = client_trusting(ca.cert_der(), &[b"h2"]);
    client.enable_sni = false;
    assert_refused_for_want_of_a_leaf(connect(Arc::new(client), addr, "api.example.test").await, server).await;
}

#[tokio::test]
async fn no_sni_uses_the_fallback_name() {
    let ca = Arc::new(SandboxCa::generate("fallback").expect("CA"));
    let (addr, server) = serve_once(intercepting(&ca, Some("10.1.2.3"), &[b"h2"])).await;

    let client = client_trusting(ca.cert_der(), &[b"h2"]);
    let tls = connect(Arc::new(client), addr, "10.1.2.3").await.expect("fallback leaf for the IP");
    assert_eq!(peer_sans(&tls), ["ip [10, 1, 2, 3]"]);
    server.await.expect("server task").expect("server side");
}

#[tokio::test]
async fn invalid_sni_fallback_is_refused_not_minted() {
    let ca = Arc::new(SandboxCa::generate("bad-fallback").expect("CA"));
    let (addr, server) = serve_once(intercepting(&ca, Some("not a name"), &[b"h2"])).await;
    let client = client_trusting(ca.cert_der(), &[b"h2"]);
    assert_refused_for_want_of_a_leaf(connect(Arc::new(client), addr, "10.1.2.3").await, server).await;
}

/// A test CA made with rcgen directly (not [`SandboxCa`]), as an operator's
/// private CA would be, written to a PEM file that is removed on drop.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem_file: PathBuf,
}

impl TestCa {
    fn new(tag: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, format!("sluice test upstream CA {tag}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).expect("CA cert");
        let pem_file = std::env::temp_dir().join(format!("sluice-tls-test-ca-{}-{tag}.pem", std::process::id()));
        std::fs::write(&pem_file, cert.pem()).expect("write CA PEM");
        Self { issuer: Issuer::new(params, key), pem_file }
    }

    /// A server config presenting a leaf for `name` valid over `[not_before, not_after]`.
    fn server(&self, name: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Arc<ServerConfig> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("leaf params");
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("defaults")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server cert");
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    fn valid_server(&self, name: &str) -> Arc<ServerConfig> {
        let now = OffsetDateTime::now_utc();
        self.server(name, now - Duration::hours(1), now + Duration::days(1))
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pem_file);
    }
}

#[tokio::test]
async fn upstream_with_a_valid_leaf_from_an_extra_root_connects() {
    let test_ca = TestCa::new("valid");
    let roots = UpstreamRoots::system_and(std::slice::from_ref(&test_ca.pem_file)).expect("roots");
    let (addr, server) = serve_once(test_ca.valid_server("upstream.test")).await;

    let tls = connect(roots.client_config(vec![b"h2".to_vec()]), addr, "upstream.test").await.expect("verified");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    server.await.expect("server task").expect("server side");
}

#[tokio::test]
async fn upstream_with_an_expired_leaf_is_refused_as_expired() {
    let test_ca = TestCa::new("expired");
    let roots = UpstreamRoots::system_and(std::slice::from_ref(&test_ca.pem_file)).expect("roots");
    let now = OffsetDateTime::now_utc();
    let (addr, _server) =
        serve_once(test_ca.server("upstream.test", now - Duration::days(10), now - Duration::days(3))).await;

    let error = connect(roots.client_config(vec![]), addr, "upstream.test").await.expect_err("expired");
    let described = describe_verify_error(tls_error(&error));
    assert!(described.starts_with("certificate expired"), "{described}");
    assert!(described.contains("3d"), "says how long ago: {described}");
}

#[tokio::test]
async fn upstream_with_a_leaf_for_another_name_is_refused_naming_it() {
    let test_ca = TestCa::new("wrong-name");
    let roots = UpstreamRoots::system_and(std::slice::from_ref(&test_ca.pem_file)).expect("roots");
    let (addr, _server) = serve_once(test_ca.valid_server("elsewhere.test")).await;

    let error = connect(roots.client_config(vec![]), addr, "upstream.test").await.expect_err("wrong name");
    let described = describe_verify_error(tls_error(&error));
    assert!(described.contains("not valid for name upstream.test"), "{described}");
    assert!(described.contains("elsewhere.test"), "{described}");
}

#[tokio::test]
async fn upstream_from_a_ca_not_in_the_roots_is_an_unknown_issuer() {
    let test_ca = TestCa::new("unknown");
    let roots = UpstreamRoots::system_and(&[]).expect("system roots only");
    let (addr, _server) = serve_once(test_ca.valid_server("upstream.test")).await;

    let error = connect(roots.client_config(vec![]), addr, "upstream.test").await.expect_err("unknown issuer");
    let described = describe_verify_error(tls_error(&error));
    assert!(described.starts_with("unknown issuer"), "{described}");
}

#[tokio::test]
async fn upstream_trusts_no_sandbox_ca() {
    // A sandbox CA must never be trusted upstream, or a leaf sluice minted
    // (and a sandbox could replay) would pass as a real server.
    let ca = Arc::new(SandboxCa::generate("not-upstream").expect("CA"));
    let roots = UpstreamRoots::system_and(&[]).expect("roots");
    let (addr, _server) = serve_once(intercepting(&ca, None, &[])).await;
    let error = connect(roots.client_config(vec![]), addr, "upstream.test").await.expect_err("sandbox CA");
    assert!(describe_verify_error(tls_error(&error)).starts_with("unknown issuer"));
}

#[test]
fn describe_verify_error_covers_the_common_failures() {
    use rustls::CertificateError as E;
    let described = |e: E| describe_verify_error(&rustls::Error::InvalidCertificate(e));
    assert_eq!(described(E::Expired), "certificate expired");
    assert_eq!(described(E::NotValidYet), "certificate is not valid yet");
    assert!(described(E::UnknownIssuer).starts_with("unknown issuer"));
    assert!(described(E::NotValidForName).contains("not valid for the requested name"));
    assert!(described(E::Revoked).contains("revoked"));
    let other = describe_verify_error(&rustls::Error::General("boom".to_owned()));
    assert!(other.contains("boom"), "{other}");
}
