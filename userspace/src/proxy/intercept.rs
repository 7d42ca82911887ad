//! TLS interception: the client's handshake is completed with a leaf for
//! its server name minted from the sandbox's CA, a verified TLS connection
//! goes to the original destination, and the ALPN protocol the upstream
//! chose from the client's offer is the one the client gets.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{
    http::{Connection, Refusal, Upstream},
    Prefixed, ProxyContext,
};
use crate::{
    audit::{Decision, Kind, Verdict},
    sandbox::Sandbox,
    tls::{server_config, MintingResolver},
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

/// Intercepts one client connection whose first bytes (`prefix`) hold its
/// `ClientHello`. With `refusal` set nothing is opened upstream and every
/// request gets that answer inside TLS.
#[allow(clippy::too_many_arguments)]
pub async fn intercept(
    ctx: &Arc<ProxyContext>,
    sandbox: Arc<Sandbox>,
    pid: u32,
    destination: SocketAddr,
    client: TcpStream,
    prefix: Vec<u8>,
    sni: Option<String>,
    alpn: Vec<Vec<u8>>,
    refusal: Option<Refusal>,
) {
    // Only protocols sluice can inspect are offered upstream.
    let offered: Vec<Vec<u8>> = alpn.into_iter().filter(|p| p == H2 || p == HTTP11).collect();
    let server_name = match &sni {
        Some(name) => ServerName::try_from(name.clone()).ok(),
        None => Some(ServerName::IpAddress(destination.ip().into())),
    };
    let mut upstream = Upstream { destination, tls: None, h2: false };
    let (first, negotiated) = match (&refusal, server_name) {
        (Some(_), _) => (Err("refused".to_owned()), offered.first().cloned()),
        (None, None) => (Err(format!("{sni:?} is not a valid TLS server name")), offered.first().cloned()),
        (None, Some(name)) => {
            upstream.tls = Some((ctx.upstream_roots.client_config(offered.clone()), name));
            match upstream.connect(ctx).await {
                Ok((io, negotiated)) => (Ok(io), negotiated),
                Err(error) => {
                    record_tls_failure(ctx, &sandbox, pid, destination, sni.as_deref(), "upstream-tls", error.clone());
                    (Err(error), offered.first().cloned())
                }
            }
        }
    };
    upstream.h2 = negotiated.as_deref() == Some(H2);

    let fallback = sni.is_none().then(|| destination.ip().to_string());
    let resolver = Arc::new(MintingResolver::new(sandbox.tls.minter.clone(), fallback));
    let config = server_config(resolver, negotiated.into_iter().collect());
    let accepted =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(Prefixed::new(prefix, client)));
    let stream = match accepted.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            // Clients that do not trust the sandbox's CA end here.
            let reason = client_failure(&error.to_string());
            record_tls_failure(ctx, &sandbox, pid, destination, sni.as_deref(), "client-tls", reason);
            return;
        }
        Err(_) => {
            let reason = client_failure("handshake timed out");
            record_tls_failure(ctx, &sandbox, pid, destination, sni.as_deref(), "client-tls", reason);
            return;
        }
    };
    let connection = Connection::new(ctx.clone(), sandbox, pid, destination, sni, upstream, first, refusal).await;
    connection.serve(stream).await;
}

/// A TLS handshake that failed on one side: `rule` says which
/// (`upstream-tls` or `client-tls`).
fn record_tls_failure(
    ctx: &ProxyContext,
    sandbox: &Sandbox,
    pid: u32,
    destination: SocketAddr,
    sni: Option<&str>,
    rule: &str,
    reason: String,
) {
    let mut decision = Decision::new(Kind::Connect, Verdict::Deny, rule, reason);
    decision.sandbox = Some(sandbox.name().to_owned());
    decision.pid = Some(pid);
    decision.destination = Some(destination);
    decision.host = sni.map(str::to_owned);
    decision.protocol = Some("tls".into());
    ctx.log.record(decision);
}

fn client_failure(error: &str) -> String {
    format!("TLS handshake with the sandboxed client failed (does it trust the sandbox's CA?): {error}")
}
