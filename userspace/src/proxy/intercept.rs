//! TLS interception: the client's handshake is completed with a leaf for
//! its server name minted from the sandbox's CA, a verified TLS connection
//! goes to the original destination, and the ALPN protocol the upstream
//! chose from the client's offer is the one the client gets.

use std::{sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{
    http::{Connection, Upstream},
    Flow, Prefixed, ProxyContext, Refusal,
};
use crate::{
    audit::Kind,
    rules,
    tls::{server_config, MintingResolver},
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

/// Intercepts one client connection whose first bytes (`prefix`) hold its
/// `ClientHello` (what it said is in `flow.tls`). With `refusal` set
/// nothing is opened upstream and every request gets that answer inside
/// TLS.
pub async fn intercept(
    ctx: &Arc<ProxyContext>,
    flow: Flow,
    client: TcpStream,
    prefix: Vec<u8>,
    refusal: Option<Refusal>,
) {
    let destination = flow.destination;
    let hello = flow.tls.clone().unwrap_or_default();
    // Only protocols sluice can inspect are offered upstream.
    let offered: Vec<Vec<u8>> = hello.alpn.into_iter().filter(|p| p == H2 || p == HTTP11).collect();
    let server_name = match &hello.sni {
        Some(name) => ServerName::try_from(name.clone()).ok(),
        None => Some(ServerName::IpAddress(destination.ip().into())),
    };
    let mut upstream = Upstream { destination, tls: None, h2: false };
    let (opened, negotiated) = match (refusal, server_name) {
        (Some(refusal), _) => (Err(refusal), offered.first().cloned()),
        (None, None) => {
            let invalid = format!("{:?} is not a valid TLS server name", hello.sni);
            (Err(Refusal::upstream(invalid)), offered.first().cloned())
        }
        (None, Some(name)) => {
            upstream.tls = Some((ctx.upstream_roots.client_config(offered.clone()), name));
            match upstream.connect(ctx).await {
                Ok((io, negotiated)) => (Ok(io), negotiated),
                Err(error) => {
                    record_tls_failure(ctx, &flow, rules::UPSTREAM_TLS, error.to_string());
                    (Err(Refusal::upstream(error.to_string())), offered.first().cloned())
                }
            }
        }
    };
    upstream.h2 = negotiated.as_deref() == Some(H2);

    let fallback = hello.sni.is_none().then(|| destination.ip().to_string());
    let resolver = Arc::new(MintingResolver::new(flow.sandbox.tls.minter.clone(), fallback));
    let config = server_config(resolver, negotiated.into_iter().collect());
    let accepted =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(Prefixed::new(prefix, client)));
    let stream = match accepted.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            // Clients that do not trust the sandbox's CA end here.
            record_tls_failure(ctx, &flow, rules::CLIENT_TLS, client_failure(&error.to_string()));
            return;
        }
        Err(_) => {
            record_tls_failure(ctx, &flow, rules::CLIENT_TLS, client_failure("handshake timed out"));
            return;
        }
    };
    let connection = Connection::new(ctx.clone(), Arc::new(flow), upstream, opened).await;
    connection.serve(stream).await;
}

/// A TLS handshake that failed on one side: `rule` says which
/// ([`rules::UPSTREAM_TLS`] or [`rules::CLIENT_TLS`]).
fn record_tls_failure(ctx: &ProxyContext, flow: &Flow, rule: &str, reason: String) {
    let mut decision = flow.record(Kind::Connect);
    rule.clone_into(&mut decision.rule);
    decision.reason = reason;
    decision.host = flow.sni().map(str::to_owned);
    decision.protocol = Some("tls".into());
    ctx.log.record(decision);
}

fn client_failure(error: &str) -> String {
    format!("TLS handshake with the sandboxed client failed (does it trust the sandbox's CA?): {error}")
}
