//! The connect-level proxy. Every TCP connection a sandbox opens arrives
//! here, redirected by the kernel. Phases, in order:
//! 1. attribute: the flow record gives the original destination, the
//!    sandbox and the pid (or, on a listener for iptables/nftables REDIRECT,
//!    conntrack gives the original destination and the listener names the
//!    sandbox, see [`Attribution`]);
//! 2. classify: the first bytes say TLS (SNI), HTTP/1 (Host) or other. A
//!    client that is slow to speak is waited for (a late `ClientHello` is
//!    still intercepted); one that stays silent is refused, unless a
//!    passthrough rule lets the server speak first;
//! 3. name ([`authority`]): SNI, Host, else the name the sandbox resolved
//!    for this address through sluice, else the bare address; a claimed
//!    name that contradicts what the sandbox resolved is refused, and one
//!    nothing ties to the address decides nothing;
//! 4. decide: the sandbox's policy, by host, address and port;
//! 5. relay or refuse, and log the decision either way.
//!
//! Before any of that a connection is admitted by the sandbox's
//! [`limits`]: open connections, connection rate, and the daemon's
//! descriptor reserve; refusals there are summed into one record per
//! interval rather than logged one by one.

mod authority;
pub mod classify;
mod http;
mod idle;
mod intercept;
pub mod limits;
mod prefixed;
mod redirected;
mod relay;
mod websocket;

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
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
use limits::{Aggregator, DescriptorGauge, Limits, LimitsConfig, Noted, Refusal};
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
    /// How long a client may stay silent before the server may speak first,
    /// where a passthrough rule allows the destination.
    pub server_first_after: Duration,
    /// How long to wait for a client's first bytes; a client silent this
    /// long is refused (nothing unclassified is relayed).
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
    /// Per-sandbox limits on open connections and their rate.
    pub limits: Arc<Limits>,
    /// How long an HTTP/1 client has for a request head, the first one
    /// after the TLS handshake and each one after a response (so also how
    /// long an idle kept-alive HTTP/1 connection stays open).
    pub header_read_timeout: Duration,
    /// A client connection on which nothing moves either way this long is
    /// closed (HTTP/2 included, whose clients keep connections for long).
    pub idle_timeout: Duration,
    descriptors: DescriptorGauge,
    refusals: Mutex<RefusalRecords>,
}

/// Refusals by a limit waiting to be recorded as one sum.
struct RefusalRecords {
    aggregator: Aggregator,
    /// A task records the sums while there are any.
    flushing: bool,
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
            server_first_after: Duration::from_secs(1),
            first_bytes_timeout: Duration::from_secs(10),
            prefix_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            upstream_roots,
            secrets,
            approvals: Arc::new(crate::approvals::Approvals::new(Duration::from_mins(1))),
            limits: Arc::new(Limits::new(LimitsConfig::default())),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_mins(5),
            descriptors: DescriptorGauge::new(),
            refusals: Mutex::new(RefusalRecords {
                aggregator: Aggregator::new(LimitsConfig::default().record_interval),
                flushing: false,
            }),
        }
    }

    /// Sets the limits (and the interval their refusals are summed over).
    pub fn set_limits(&mut self, config: LimitsConfig) {
        self.limits = Arc::new(Limits::new(config));
        self.refusals =
            Mutex::new(RefusalRecords { aggregator: Aggregator::new(config.record_interval), flushing: false });
    }
}

/// Admits a new connection of `sandbox` under its limits and the daemon's
/// descriptor reserve; `None` when refused (the refusal is recorded, summed
/// with others, and dropping the client closes it).
fn admit(
    ctx: &Arc<ProxyContext>,
    sandbox: &Sandbox,
    client: &TcpStream,
    destination: SocketAddr,
    pid: u32,
) -> Option<limits::Slot> {
    let now = Instant::now();
    let config = ctx.limits.config();
    let open = ctx.descriptors.open(client.as_raw_fd(), now);
    let refusal = if limits::within_reserve(open, limits::open_files_limit(), config.descriptor_reserve) {
        Refusal::Descriptors
    } else {
        match ctx.limits.admit(sandbox.name(), now) {
            Ok(slot) => return Some(slot),
            Err(refusal) => refusal,
        }
    };
    let mut decision = Decision::new(Kind::Connect, Verdict::Deny, "", "");
    decision.sandbox = Some(sandbox.name().to_owned());
    decision.pid = (pid != 0).then_some(pid);
    decision.destination = Some(destination);
    record_limit(ctx, decision, refusal);
    None
}

/// Records a refusal by a limit: at once if it is the first of its sandbox
/// and rule in a while, else summed into the next record of the interval.
fn record_limit(ctx: &Arc<ProxyContext>, mut decision: Decision, refusal: Refusal) {
    let sandbox = decision.sandbox.clone().unwrap_or_default();
    let mut records = ctx.refusals.lock().expect("lock poisoned");
    if records.aggregator.note(&sandbox, refusal, Instant::now()) == Noted::RecordNow {
        decision.verdict = Verdict::Deny;
        decision.rule = refusal.rule().to_owned();
        decision.reason = refusal.reason(ctx.limits.config(), ctx.approvals.max_per_sandbox(), 1);
        ctx.log.record(decision);
    }
    if !records.flushing {
        records.flushing = true;
        tokio::spawn(flush_limit_records(ctx.clone()));
    }
}

/// Records the sums of refusals as their intervals end, until none is left.
async fn flush_limit_records(ctx: Arc<ProxyContext>) {
    let config = *ctx.limits.config();
    let step = (config.record_interval / 10).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(step).await;
        let (due, quiet) = {
            let mut records = ctx.refusals.lock().expect("lock poisoned");
            let due = records.aggregator.due(Instant::now());
            let quiet = records.aggregator.is_empty();
            if quiet {
                records.flushing = false;
            }
            (due, quiet)
        };
        for summary in due {
            let kind = if summary.refusal == Refusal::Approvals { Kind::Request } else { Kind::Connect };
            let reason = summary.refusal.reason(&config, ctx.approvals.max_per_sandbox(), summary.count);
            let mut decision = Decision::new(kind, Verdict::Deny, summary.refusal.rule(), reason);
            decision.sandbox = Some(summary.sandbox);
            ctx.log.record(decision);
        }
        if quiet {
            return;
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
    // Held for as long as this connection is served.
    let Some(_slot) = admit(ctx, &sandbox, &client, destination, pid) else {
        return;
    };
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
    let Some(classified) = classify_client(ctx, &sandbox, destination, &mut client, &mut prefix).await else {
        decision.rule = "client-silent".into();
        decision.reason = format!(
            "the client sent nothing within {} s; sluice decides a connection on its first bytes and relays none \
             it could not classify (where the server speaks first, a `tls = \"passthrough\"` rule allows it)",
            ctx.first_bytes_timeout.as_secs()
        );
        ctx.log.record(decision);
        return;
    };
    decision.protocol = Some(classified.protocol().to_owned());
    if let Classified::Malformed(why) = classified {
        decision.rule = "malformed-request".into();
        decision.reason = why.to_owned();
        ctx.log.record(decision);
        return;
    }

    let mut named = match authority::name_connection(&sandbox.names, &classified, destination.ip()) {
        Ok(named) => named,
        Err(reason) => {
            decision.rule = authority::MISMATCH_RULE.into();
            decision.reason = reason;
            ctx.log.record(decision.clone());
            refuse(ctx, Refused { sandbox, pid, destination, client, prefix, classified, decision }).await;
            return;
        }
    };
    decision.host = Some(named.name.clone().unwrap_or_else(|| destination.ip().to_string()));
    decision.host_source = Some(named.source);

    let verdict = decide_connection(&sandbox, &mut named, &classified, destination);
    if named.proof == authority::Proof::Claimed {
        // What an operator approves, and what `--always` remembers, is the
        // address: the name is only the client's word.
        decision.host = Some(destination.ip().to_string());
        decision.host_source = Some(HostSource::Ip);
    }
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

/// The connect-level decision for a named connection. A TLS server name
/// counts as proven only if the connection is intercepted (the upstream's
/// certificate is then verified for it); spliced, or claimed over plain
/// HTTP for an address the sandbox did not resolve it to, the name decides
/// nothing and `named` says so.
fn decide_connection(
    sandbox: &Sandbox,
    named: &mut authority::Named,
    classified: &Classified,
    destination: SocketAddr,
) -> crate::policy::Decision {
    // Plain HTTP and TLS are inspected request by request, so rules with
    // request conditions may let them through to that check.
    let inspected = matches!(classified, Classified::Http { .. } | Classified::Tls { .. });
    let policy = sandbox.policy.load();
    let evaluate = |host: Option<&str>| {
        let query = ConnectQuery { host, ip: destination.ip(), port: destination.port() };
        if inspected {
            policy.evaluate_inspected(&query)
        } else {
            policy.evaluate(&query)
        }
    };
    let verdict = evaluate(named.believed());
    if verdict.passthrough && named.proof == authority::Proof::Certificate {
        // Spliced, the upstream's certificate is never checked by sluice:
        // the server name is only the client's word.
        named.proof = authority::Proof::Claimed;
    }
    if named.proof != authority::Proof::Claimed {
        return verdict;
    }
    authority::decide(named.name.as_deref(), false, destination.ip(), evaluate)
}

/// Waits for an operator's answer on a held connection or request, logging
/// the hold and the outcome. `decision` comes back ready to log as an allow
/// (Ok, not yet logged) or already logged as a denial (Err).
pub(crate) async fn hold(ctx: &Arc<ProxyContext>, decision: &mut Decision) -> Result<(), ()> {
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
        Outcome::Refused { .. } => {
            // Summed with the sandbox's other refusals of the kind, so a
            // flood of held requests does not flood the log either.
            decision.verdict = Verdict::Deny;
            decision.rule = Refusal::Approvals.rule().to_owned();
            decision.reason = Refusal::Approvals.reason(ctx.limits.config(), ctx.approvals.max_per_sandbox(), 1);
            record_limit(ctx, decision.clone(), Refusal::Approvals);
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

/// Classifies the client's first bytes, waiting generously for them: a
/// client slow to send its `ClientHello` is still intercepted. After
/// `server_first_after` of silence the server may speak first (SSH banners,
/// SMTP) only where a passthrough rule allows the destination, which is not
/// inspected anyway; elsewhere sluice keeps waiting, and `None` says the
/// client stayed silent for `first_bytes_timeout`.
async fn classify_client(
    ctx: &ProxyContext,
    sandbox: &Sandbox,
    destination: SocketAddr,
    client: &mut TcpStream,
    prefix: &mut Vec<u8>,
) -> Option<Classified> {
    let start = Instant::now();
    if let Some(classified) = read_prefix(ctx, client, prefix, start + ctx.server_first_after).await {
        return Some(classified);
    }
    let resolved = sandbox.names.names_for(destination.ip());
    let query = ConnectQuery { host: resolved.last().map(|n| &**n), ip: destination.ip(), port: destination.port() };
    let spliced = sandbox.policy.load().evaluate(&query);
    if spliced.is_allowed() && spliced.passthrough {
        return Some(Classified::Opaque);
    }
    read_prefix(ctx, client, prefix, start + ctx.first_bytes_timeout).await
}

/// Reads the client's first bytes until they can be classified; `None` if
/// nothing arrived before `silent_until`.
async fn read_prefix(
    ctx: &ProxyContext,
    client: &mut TcpStream,
    prefix: &mut Vec<u8>,
    silent_until: Instant,
) -> Option<Classified> {
    let start = Instant::now();
    let mut chunk = [0u8; 4096];
    loop {
        let deadline = if prefix.is_empty() { silent_until } else { start + ctx.prefix_timeout };
        match timeout_at(deadline, client.read(&mut chunk)).await {
            Err(_) if prefix.is_empty() => return None,
            Err(_) => return Some(Classified::Malformed("client stopped before its first message was complete")),
            Ok(Ok(0)) if prefix.is_empty() => {
                return Some(Classified::Malformed("client closed without sending anything"))
            }
            Ok(Ok(0)) => return Some(Classified::Malformed("client closed in the middle of its first message")),
            Ok(Err(_)) => return Some(Classified::Malformed("client connection failed")),
            Ok(Ok(n)) => {
                let room = MAX_PREFIX - prefix.len();
                prefix.extend_from_slice(&chunk[..n.min(room)]);
                let classified = classify(prefix);
                if classified != Classified::NeedMore {
                    return Some(classified);
                }
                if prefix.len() >= MAX_PREFIX {
                    return Some(Classified::Malformed("first message larger than 16 KiB"));
                }
            }
        }
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
