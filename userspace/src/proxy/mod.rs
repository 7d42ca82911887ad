//! The connect-level proxy. Every TCP connection a sandbox opens arrives
//! here, redirected by the kernel. Phases, in order:
//! 1. attribute: the flow record gives the original destination, the
//!    sandbox and the pid (or, on a listener for iptables/nftables REDIRECT,
//!    conntrack gives the original destination and the listener names the
//!    sandbox, see [`Attribution`]);
//! 2. classify: the first bytes say TLS (SNI), HTTP/1 (Host) or other;
//! 3. name: SNI, Host, else the name the sandbox resolved for this address
//!    through sluice, else the bare address; a claimed name that contradicts
//!    what the sandbox resolved for the address is refused;
//! 4. decide: the sandbox's policy, by host, address and port;
//! 5. relay or refuse, and log the decision either way.

pub mod classify;
mod http;
mod intercept;
mod prefixed;
mod redirected;
mod relay;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::{timeout_at, Instant},
};

use crate::{
    audit::{Decision, DecisionLog, HostSource, Kind, Verdict},
    datapath::Datapath,
    policy::{ConnectQuery, Verdict as PolicyVerdict},
    sandbox::{Registry, Sandbox},
};
use classify::{classify, Classified, MAX_PREFIX};
use prefixed::Prefixed;
use redirected::Attributed;
pub use redirected::Attribution;

/// What the proxy needs from the daemon.
pub struct ProxyContext {
    pub datapath: Arc<Datapath>,
    pub registry: Arc<Registry>,
    pub log: Arc<DecisionLog>,
    /// sluice's own listening addresses: a sandbox may not loop back into them.
    pub own_addrs: Vec<SocketAddr>,
    /// How long to wait for a client's first bytes before treating the
    /// protocol as server-speaks-first.
    pub first_bytes_timeout: Duration,
    /// How long a client has to send a complete `ClientHello` or request head.
    pub prefix_timeout: Duration,
    pub connect_timeout: Duration,
    /// Roots that upstream servers' certificates are verified against.
    pub upstream_roots: Arc<crate::tls::UpstreamRoots>,
    /// Secrets injected for sandboxes; swapped whole on reload.
    pub secrets: Arc<arc_swap::ArcSwap<crate::credentials::SecretStore>>,
    /// Requests and connections held by `ask` rules.
    pub approvals: Arc<crate::approvals::Approvals>,
}

impl ProxyContext {
    pub fn new(
        datapath: Arc<Datapath>,
        registry: Arc<Registry>,
        log: Arc<DecisionLog>,
        own_addrs: Vec<SocketAddr>,
        upstream_roots: Arc<crate::tls::UpstreamRoots>,
        secrets: Arc<arc_swap::ArcSwap<crate::credentials::SecretStore>>,
    ) -> Self {
        Self {
            datapath,
            registry,
            log,
            own_addrs,
            first_bytes_timeout: Duration::from_secs(1),
            prefix_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            upstream_roots,
            secrets,
            approvals: Arc::new(crate::approvals::Approvals::new(Duration::from_mins(1))),
        }
    }
}

/// Accepts connections until the task is aborted. Errors on one connection
/// never stop the loop.
pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>, attribution: Attribution) {
    let attribution = Arc::new(attribution);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Requests and answers are small writes; Nagle would hold them
                // back for the peer's delayed ACK.
                let _ = stream.set_nodelay(true);
                let (ctx, attribution) = (ctx.clone(), attribution.clone());
                tokio::spawn(async move { handle(&ctx, &attribution, stream, peer).await });
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(ctx: &Arc<ProxyContext>, attribution: &Attribution, mut client: TcpStream, peer: SocketAddr) {
    let flow = match attribution.attribute(ctx, &client, peer) {
        Ok(flow) => flow,
        Err(decision) => {
            ctx.log.record(*decision);
            return;
        }
    };
    let Attributed { destination, sandbox, pid } = flow;
    let mut decision = Decision::new(Kind::Connect, Verdict::Deny, "", "");
    // 0: not known (connections redirected by iptables/nftables).
    decision.pid = (pid != 0).then_some(pid);
    decision.destination = Some(destination);
    decision.sandbox = Some(sandbox.name().to_owned());

    if ctx.own_addrs.iter().any(|own| {
        own.port() == destination.port() && (own.ip() == destination.ip() || destination.ip().is_unspecified())
    }) {
        decision.rule = "sluice-itself".into();
        decision.reason = "a sandbox may not connect to sluice's own listeners".into();
        ctx.log.record(decision);
        return;
    }

    let mut prefix = Vec::with_capacity(4096);
    let classified = read_prefix(ctx, &mut client, &mut prefix).await;
    decision.protocol = Some(classified.protocol().to_owned());
    if let Classified::Malformed(why) = classified {
        decision.rule = "malformed-request".into();
        decision.reason = why.to_owned();
        ctx.log.record(decision);
        return;
    }

    let (host, source) = match name_connection(&sandbox, &classified, destination.ip()) {
        Ok(named) => named,
        Err(reason) => {
            decision.rule = "host-mismatch".into();
            decision.reason = reason;
            ctx.log.record(decision.clone());
            refuse(ctx, Refused { sandbox, pid, destination, client, prefix, classified, decision }).await;
            return;
        }
    };
    decision.host = Some(host.clone().unwrap_or_else(|| destination.ip().to_string()));
    decision.host_source = Some(source);

    // Plain HTTP and TLS are inspected request by request, so rules with
    // request conditions may let them through to that check.
    let inspected = matches!(classified, Classified::Http { .. } | Classified::Tls { .. });
    let query = ConnectQuery { host: host.as_deref(), ip: destination.ip(), port: destination.port() };
    let policy = sandbox.policy.load();
    let verdict = if inspected { policy.evaluate_inspected(&query) } else { policy.evaluate(&query) };
    drop(policy);
    decision.rule = verdict.rule.to_string();
    decision.reason = verdict.reason.to_string();
    decision.bundle = verdict.bundle.as_deref().map(str::to_owned);
    if verdict.verdict == PolicyVerdict::Ask {
        // A connection whose requests are not seen: the connection itself
        // is what the operator answers for.
        if hold(ctx, &mut decision).await.is_err() {
            refuse(ctx, Refused { sandbox, pid: flow.pid, destination, client, prefix, classified, decision }).await;
            return;
        }
    } else if verdict.verdict != PolicyVerdict::Allow {
        ctx.log.record(decision.clone());
        refuse(ctx, Refused { sandbox, pid, destination, client, prefix, classified, decision }).await;
        return;
    }
    decision.verdict = Verdict::Allow;
    decision.would_deny = verdict.would_deny;
    ctx.log.record(decision);

    match classified {
        Classified::Http { .. } => {
            let upstream = http::Upstream { destination, tls: None, h2: false };
            let first = upstream.connect(ctx).await.map(|(io, _)| io);
            let connection =
                http::Connection::new(ctx.clone(), sandbox, pid, destination, None, upstream, first, None).await;
            connection.serve(Prefixed::new(prefix, client)).await;
        }
        Classified::Tls { sni, alpn } if !verdict.passthrough => {
            intercept::intercept(ctx, sandbox, pid, destination, client, prefix, sni, alpn, None).await;
        }
        _ => splice_through(ctx, &sandbox, pid, destination, client, &prefix).await,
    }
}

/// Waits for an operator's answer on a held connection or request, logging
/// the hold and the outcome. `decision` comes back ready to log as an allow
/// (Ok, not yet logged) or already logged as a denial (Err).
pub(crate) async fn hold(ctx: &ProxyContext, decision: &mut Decision) -> Result<(), ()> {
    use crate::approvals::Outcome;
    // What the operator is asked about is what the decision says.
    let pending = crate::approvals::Pending {
        id: 0,
        sandbox: decision.sandbox.clone().unwrap_or_default(),
        pid: decision.pid.unwrap_or_default(),
        destination: decision.destination.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        host: decision.host.clone(),
        method: decision.method.clone(),
        path: decision.path.clone(),
        rule: decision.rule.clone(),
        reason: decision.reason.clone(),
        since: String::new(),
        expires_in: 0,
    };
    let outcome = ctx
        .approvals
        .ask(pending, |held| {
            let mut asked = decision.clone();
            asked.verdict = Verdict::Ask;
            asked.approval = Some(held.id);
            asked.reason = format!(
                "{}; held for an operator: `sluice approve {}` or `sluice deny {}` within {} s",
                decision.reason,
                held.id,
                held.id,
                ctx.approvals.timeout().as_secs()
            );
            ctx.log.record(asked);
        })
        .await;
    match outcome {
        Outcome::Approved { id } => {
            decision.approval = Some(id);
            decision.reason = format!("approved by an operator (approval {id}, rule {})", decision.rule);
            Ok(())
        }
        Outcome::Denied { id } => {
            decision.approval = Some(id);
            decision.verdict = Verdict::Deny;
            decision.reason = format!("denied by an operator (approval {id}, rule {})", decision.rule);
            ctx.log.record(decision.clone());
            Err(())
        }
        Outcome::TimedOut { id, after } => {
            decision.approval = Some(id);
            decision.verdict = Verdict::Deny;
            decision.reason =
                format!("no operator answered within {} s (approval {id}, rule {})", after.as_secs(), decision.rule);
            ctx.log.record(decision.clone());
            Err(())
        }
    }
}

/// Relays an allowed connection that is not inspected (opaque TCP, TLS
/// passthrough).
async fn splice_through(
    ctx: &ProxyContext,
    sandbox: &Sandbox,
    pid: u32,
    destination: SocketAddr,
    client: TcpStream,
    prefix: &[u8],
) {
    match tokio::time::timeout(ctx.connect_timeout, TcpStream::connect(destination)).await {
        Ok(Ok(upstream)) => relay(client, upstream, prefix).await,
        failed => {
            let why = match failed {
                Ok(Err(error)) => format!("connecting to {destination} failed: {error}"),
                _ => format!("connecting to {destination} timed out"),
            };
            let mut decision = Decision::new(Kind::Connect, Verdict::Deny, "upstream-unreachable", why);
            decision.sandbox = Some(sandbox.name().to_owned());
            decision.pid = Some(pid);
            decision.destination = Some(destination);
            ctx.log.record(decision);
        }
    }
}

/// A connection refused at connect level, with what is needed to say so.
struct Refused {
    sandbox: Arc<Sandbox>,
    pid: u32,
    destination: SocketAddr,
    client: TcpStream,
    prefix: Vec<u8>,
    classified: Classified,
    decision: Decision,
}

/// Tells a refused client why when its protocol allows it: plain HTTP gets a
/// 403 naming the rule; TLS gets a completed handshake (with a leaf from the
/// sandbox's CA) and a 403 for every request. Opaque connections are closed.
async fn refuse(ctx: &Arc<ProxyContext>, refused: Refused) {
    let Refused { sandbox, pid, destination, mut client, prefix, classified, decision } = refused;
    match classified {
        Classified::Http { .. } => {
            let body = format!("sluice denied this request\nrule: {}\nreason: {}\n", decision.rule, decision.reason);
            let head = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nx-sluice-rule: {}\r\nconnection: close\r\n\r\n",
                body.len(),
                header_safe(&decision.rule)
            );
            let _ = client.write_all(head.as_bytes()).await;
            let _ = client.write_all(body.as_bytes()).await;
            let _ = client.shutdown().await;
        }
        Classified::Tls { sni, alpn } => {
            let refusal =
                http::Refusal { status: hyper::StatusCode::FORBIDDEN, rule: decision.rule, reason: decision.reason };
            intercept::intercept(ctx, sandbox, pid, destination, client, prefix, sni, alpn, Some(refusal)).await;
        }
        _ => {}
    }
}

/// Reads the client's first bytes until they can be classified. A client
/// that says nothing within `first_bytes_timeout` speaks second (SSH, SMTP):
/// its connection is opaque and keeps an empty prefix.
async fn read_prefix(ctx: &ProxyContext, client: &mut TcpStream, prefix: &mut Vec<u8>) -> Classified {
    let start = Instant::now();
    let mut chunk = [0u8; 4096];
    loop {
        let deadline = if prefix.is_empty() { start + ctx.first_bytes_timeout } else { start + ctx.prefix_timeout };
        match timeout_at(deadline, client.read(&mut chunk)).await {
            Err(_) if prefix.is_empty() => return Classified::Opaque,
            Err(_) => return Classified::Malformed("client stopped before its first message was complete"),
            Ok(Ok(0)) if prefix.is_empty() => return Classified::Malformed("client closed without sending anything"),
            Ok(Ok(0)) => return Classified::Malformed("client closed in the middle of its first message"),
            Ok(Err(_)) => return Classified::Malformed("client connection failed"),
            Ok(Ok(n)) => {
                let room = MAX_PREFIX - prefix.len();
                prefix.extend_from_slice(&chunk[..n.min(room)]);
                let classified = classify(prefix);
                if classified != Classified::NeedMore {
                    return classified;
                }
                if prefix.len() >= MAX_PREFIX {
                    return Classified::Malformed("first message larger than 16 KiB");
                }
            }
        }
    }
}

/// Picks the name the policy sees. A name the client claims (SNI, Host) must
/// agree with the names the sandbox resolved for this address, if it resolved
/// any through sluice: otherwise a client could present an allowed name while
/// connecting to any address.
fn name_connection(
    sandbox: &Sandbox,
    classified: &Classified,
    ip: IpAddr,
) -> Result<(Option<String>, HostSource), String> {
    let claimed = match classified {
        Classified::Tls { sni: Some(name), .. } => Some((name.clone(), HostSource::Sni)),
        Classified::Http { host: Some(name) } if name.parse::<IpAddr>().is_err() => {
            Some((name.clone(), HostSource::Http))
        }
        _ => None,
    };
    match claimed {
        Some((name, source)) => match sandbox.names.agrees(ip, &name) {
            Ok(()) => Ok((Some(name), source)),
            Err(resolved) => Err(format!(
                "the client named {name:?} but the sandbox resolved {ip} for {}",
                resolved.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
            )),
        },
        None => match sandbox.names.names_for(ip).last() {
            Some(name) => Ok((Some(name.to_string()), HostSource::Dns)),
            None => Ok((None, HostSource::Ip)),
        },
    }
}

pub(crate) fn header_safe(value: &str) -> String {
    value.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').collect()
}

async fn relay(mut client: TcpStream, mut upstream: TcpStream, prefix: &[u8]) {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if !prefix.is_empty() && upstream.write_all(prefix).await.is_err() {
        return;
    }
    if let Err(error) = relay::relay(&mut client, &mut upstream).await {
        tracing::debug!(%error, "relay ended with an error");
    }
}
