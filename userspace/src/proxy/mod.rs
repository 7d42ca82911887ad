//! The proxy: every TCP connection a sandbox opens arrives here,
//! redirected by the kernel, and goes through named phases. Each concern
//! sits in exactly one of them; a new one (content inspection, handlers,
//! metrics) is one more step in the phase it belongs to.
//!
//! Connection phases (this module):
//! - **connect** ([`connect`]): the flow record gives the original
//!   destination, the sandbox and the pid (or, on a listener for
//!   iptables/nftables REDIRECT, conntrack and the listener do, see
//!   [`Attribution`]); the sandbox's [`limits`] admit it; a connection back
//!   into sluice is refused. The result is the connection's [`Flow`].
//! - **client hello** ([`client_hello`]): the first bytes say TLS (SNI,
//!   ALPN), HTTP/1 (Host) or other; the name the connection is judged
//!   under is chosen ([`authority`]); connect-level policy decides and an
//!   `ask` waits for an operator ([`hold`]). Then the connection is
//!   intercepted ([`intercept`]), served as plain HTTP, or spliced.
//!
//! Request phases ([`http::Connection`]), per request: **request head**
//! (authority, request policy, approval, upgrades), **request body**
//! (credential injection), **upstream** (the one pooled connection),
//! **response head** (what cannot be scrubbed is refused; headers
//! scrubbed), **response body** (the secret scrub), **done** (the one
//! allow record).
//!
//! Every phase stops with one [`Refusal`]; it is recorded from the flow and
//! turned into what the client sees in one place ([`refusal`]). Limit
//! refusals are summed into one record per interval rather than logged one
//! by one.

mod authority;
pub mod classify;
mod flow;
mod http;
mod idle;
mod intercept;
pub mod limits;
mod prefixed;
mod redirected;
pub mod refusal;
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
    rules,
    sandbox::{Registry, Sandbox},
};
use classify::{classify, Classified, MAX_PREFIX};
pub use flow::{container_for_records, Flow, TlsFacts};
use limits::{Aggregator, DescriptorGauge, Limit, Limits, LimitsConfig, Noted};
use prefixed::Prefixed;
use redirected::Attributed;
pub use redirected::Attribution;
pub use refusal::Refusal;

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

/// Admits a new connection of `flow`'s sandbox under its limits and the
/// daemon's descriptor reserve; `None` when refused (the refusal is
/// recorded, summed with others, and dropping the client closes it).
fn admit(ctx: &Arc<ProxyContext>, flow: &Flow, client: &TcpStream) -> Option<limits::Slot> {
    let now = Instant::now();
    let config = ctx.limits.config();
    let open = ctx.descriptors.open(client.as_raw_fd(), now);
    let limit = if limits::within_reserve(open, limits::open_files_limit(), config.descriptor_reserve) {
        Limit::Descriptors
    } else {
        match ctx.limits.admit(flow.sandbox.name(), now) {
            Ok(slot) => return Some(slot),
            Err(limit) => limit,
        }
    };
    record_limit(ctx, flow.record(Kind::Connect), limit);
    None
}

/// Records a refusal by a limit: at once if it is the first of its sandbox
/// and rule in a while, else summed into the next record of the interval.
fn record_limit(ctx: &Arc<ProxyContext>, mut decision: Decision, limit: Limit) {
    let sandbox = decision.sandbox.clone().unwrap_or_default();
    let mut records = crate::sync::lock(&ctx.refusals);
    if records.aggregator.note(&sandbox, limit, Instant::now()) == Noted::RecordNow {
        decision.verdict = Verdict::Deny;
        decision.rule = limit.rule().to_owned();
        decision.reason = limit.reason(ctx.limits.config(), ctx.approvals.max_per_sandbox(), 1);
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
            let mut records = crate::sync::lock(&ctx.refusals);
            let due = records.aggregator.due(Instant::now());
            let quiet = records.aggregator.is_empty();
            if quiet {
                records.flushing = false;
            }
            (due, quiet)
        };
        for summary in due {
            let kind = if summary.refusal == Limit::Approvals { Kind::Request } else { Kind::Connect };
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

/// One connection through the connection phases: connect, client hello,
/// then the route the client hello phase chose (requests through
/// [`http::Connection`]'s phases, or a splice). A refusal of any phase is
/// recorded and answered in [`answer`].
async fn handle(ctx: &Arc<ProxyContext>, attribution: &Attribution, mut client: TcpStream, peer: SocketAddr) {
    // Held for as long as this connection is served.
    let Some((mut flow, _slot)) = connect(ctx, attribution, &client, peer) else {
        return;
    };
    let mut prefix = Vec::with_capacity(4096);
    let mut decision = flow.record(Kind::Connect);
    let route = match client_hello(ctx, &mut flow, &mut client, &mut prefix, &mut decision).await {
        Ok(route) => route,
        Err(refusal) => {
            if !refusal.is_recorded() {
                decision.rule.clone_from(&refusal.rule);
                decision.reason.clone_from(&refusal.reason);
                ctx.log.record(decision);
            }
            answer(ctx, flow, client, prefix, refusal).await;
            return;
        }
    };
    decision.verdict = Verdict::Allow;
    ctx.log.record(decision);

    match route {
        Route::Http => {
            let upstream = http::Upstream { destination: flow.destination, tls: None, h2: false };
            let opened = upstream.connect(ctx).await.map(|(io, _)| io).map_err(|e| Refusal::upstream(e.to_string()));
            let connection = http::Connection::new(ctx.clone(), Arc::new(flow), upstream, opened).await;
            connection.serve(Prefixed::new(prefix, client)).await;
        }
        Route::Intercept => intercept::intercept(ctx, flow, client, prefix, None).await,
        Route::Splice => splice_through(ctx, &flow, client, &prefix).await,
    }
}

/// The connect phase: who the connection belongs to (the flow record, or
/// conntrack and the listener), admission under the sandbox's limits, and
/// never a connection back into sluice. `None`: refused and recorded.
fn connect(
    ctx: &Arc<ProxyContext>,
    attribution: &Attribution,
    client: &TcpStream,
    peer: SocketAddr,
) -> Option<(Flow, limits::Slot)> {
    let Attributed { destination, sandbox, pid } = match attribution.attribute(ctx, client, peer) {
        Ok(attributed) => attributed,
        Err(decision) => {
            ctx.log.record(*decision);
            return None;
        }
    };
    let flow = Flow::new(sandbox, pid, destination, &ctx.secrets.load());
    let slot = admit(ctx, &flow, client)?;
    if ctx.own_addrs.iter().any(|own| {
        own.port() == destination.port() && (own.ip() == destination.ip() || destination.ip().is_unspecified())
    }) {
        let mut decision = flow.record(Kind::Connect);
        rules::SLUICE_ITSELF.clone_into(&mut decision.rule);
        decision.reason = "a sandbox may not connect to sluice's own listeners".into();
        ctx.log.record(decision);
        return None;
    }
    Some((flow, slot))
}

/// Where an allowed connection goes after the client hello phase.
enum Route {
    /// Plain HTTP: every request through the request phases.
    Http,
    /// TLS terminated with the sandbox's CA, then the request phases.
    Intercept,
    /// Bytes spliced to the destination (opaque TCP, TLS passthrough).
    Splice,
}

/// The client hello phase: the first bytes say TLS (server name, ALPN),
/// HTTP/1 (Host) or other; the name the connection is judged under is
/// chosen ([`authority`]); the connect-level policy decides, and an `ask`
/// waits for the operator. `decision` is the connect record, filled with
/// what was judged; the caller records it.
async fn client_hello(
    ctx: &Arc<ProxyContext>,
    flow: &mut Flow,
    client: &mut TcpStream,
    prefix: &mut Vec<u8>,
    decision: &mut Decision,
) -> Result<Route, Refusal> {
    let Some(classified) = classify_client(ctx, &flow.sandbox, flow.destination, client, prefix).await else {
        return Err(Refusal::forbidden(
            rules::CLIENT_SILENT,
            format!(
                "the client sent nothing within {} s; sluice decides a connection on its first bytes and relays none \
                 it could not classify (where the server speaks first, a `tls = \"passthrough\"` rule allows it)",
                ctx.first_bytes_timeout.as_secs()
            ),
        ));
    };
    flow.protocol = classified.protocol();
    decision.protocol = Some(flow.protocol.to_owned());
    if let Classified::Tls { sni, alpn } = &classified {
        flow.tls = Some(TlsFacts { sni: sni.clone(), alpn: alpn.clone() });
    }
    if let Classified::Malformed(why) = classified {
        return Err(Refusal::forbidden(rules::MALFORMED_REQUEST, why));
    }

    let destination = flow.destination;
    let mut named = authority::name_connection(&flow.sandbox.names, &classified, destination.ip())
        .map_err(|reason| Refusal::forbidden(rules::HOST_MISMATCH, reason))?;
    decision.host = Some(named.name.clone().unwrap_or_else(|| destination.ip().to_string()));
    decision.host_source = Some(named.source);

    let ruling = decide_connection(&flow.sandbox, &mut named, &classified, destination);
    if named.proof == authority::Proof::Claimed {
        // What an operator approves, and what `--always` remembers, is the
        // address: the name is only the client's word.
        decision.host = Some(destination.ip().to_string());
        decision.host_source = Some(HostSource::Ip);
    }
    flow.named = Some(named);
    decision.rule = ruling.rule.to_string();
    decision.reason = ruling.reason.to_string();
    decision.bundle = ruling.bundle.as_deref().map(str::to_owned);
    match ruling.verdict {
        // A connection whose requests are not seen: the connection itself
        // is what the operator answers for.
        PolicyVerdict::Ask => hold(ctx, decision).await?,
        PolicyVerdict::Allow => {}
        PolicyVerdict::Deny => return Err(Refusal::forbidden(&*ruling.rule, &*ruling.reason)),
    }
    decision.would_deny = ruling.would_deny;
    Ok(match classified {
        Classified::Http { .. } => Route::Http,
        Classified::Tls { .. } if !ruling.passthrough => Route::Intercept,
        _ => Route::Splice,
    })
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
    let ruling = evaluate(named.believed());
    if ruling.passthrough && named.proof == authority::Proof::Certificate {
        // Spliced, the upstream's certificate is never checked by sluice:
        // the server name is only the client's word.
        named.proof = authority::Proof::Claimed;
    }
    if named.proof != authority::Proof::Claimed {
        return ruling;
    }
    authority::decide(named.name.as_deref(), false, destination.ip(), evaluate)
}

/// The approval step of the head phases: waits for an operator's answer on
/// a held connection or request, recording the hold and the outcome.
/// `decision` comes back ready to record as an allow (Ok, not yet
/// recorded); a denial comes back as a refusal already recorded.
pub(crate) async fn hold(ctx: &Arc<ProxyContext>, decision: &mut Decision) -> Result<(), Refusal> {
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
    let mut status = hyper::StatusCode::FORBIDDEN;
    match outcome {
        Outcome::Approved { id } => {
            decision.approval = Some(id);
            decision.reason = format!("approved by an operator (approval {id}, rule {})", decision.rule);
            return Ok(());
        }
        Outcome::Denied { id } => {
            decision.approval = Some(id);
            decision.verdict = Verdict::Deny;
            decision.reason = format!("denied by an operator (approval {id}, rule {})", decision.rule);
            ctx.log.record(decision.clone());
        }
        Outcome::Refused { .. } => {
            // Summed with the sandbox's other refusals of the kind, so a
            // flood of held requests does not flood the log either; the
            // client may try again later.
            status = hyper::StatusCode::TOO_MANY_REQUESTS;
            decision.verdict = Verdict::Deny;
            decision.rule = Limit::Approvals.rule().to_owned();
            decision.reason = Limit::Approvals.reason(ctx.limits.config(), ctx.approvals.max_per_sandbox(), 1);
            record_limit(ctx, decision.clone(), Limit::Approvals);
        }
        Outcome::TimedOut { id, after } => {
            decision.approval = Some(id);
            decision.verdict = Verdict::Deny;
            decision.reason =
                format!("no operator answered within {} s (approval {id}, rule {})", after.as_secs(), decision.rule);
            ctx.log.record(decision.clone());
        }
    }
    Err(Refusal::new(status, decision.rule.clone(), decision.reason.clone()).recorded())
}

/// The upstream phase of a connection that is not inspected (opaque TCP,
/// TLS passthrough): relays it.
async fn splice_through(ctx: &ProxyContext, flow: &Flow, client: TcpStream, prefix: &[u8]) {
    let destination = flow.destination;
    match tokio::time::timeout(ctx.connect_timeout, TcpStream::connect(destination)).await {
        Ok(Ok(upstream)) => relay(client, upstream, prefix).await,
        failed => {
            let why = match failed {
                Ok(Err(error)) => http::UpstreamError::Connect { destination, source: error },
                _ => http::UpstreamError::Timeout(destination),
            };
            let mut decision = flow.record(Kind::Connect);
            rules::UPSTREAM_UNREACHABLE.clone_into(&mut decision.rule);
            decision.reason = why.to_string();
            ctx.log.record(decision);
        }
    }
}

/// Tells a client refused at connect level why, when its protocol allows
/// it: plain HTTP gets the refusal written out; TLS gets a completed
/// handshake (with a leaf from the sandbox's CA) and the refusal for every
/// request. Opaque and malformed connections are closed.
async fn answer(ctx: &Arc<ProxyContext>, flow: Flow, mut client: TcpStream, prefix: Vec<u8>, refusal: Refusal) {
    // Whatever the phase said (a 429 for too many held requests), a
    // connection refused as a whole is told 403.
    let refusal = Refusal::forbidden(refusal.rule, refusal.reason);
    match flow.protocol {
        "http" => refusal.write_http1(&mut client).await,
        "tls" => intercept::intercept(ctx, flow, client, prefix, Some(refusal)).await,
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
