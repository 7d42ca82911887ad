//! One sandbox's listeners and the phases every query goes through.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use hickory_proto::{
    op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RecordType},
};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::{JoinHandle, JoinSet},
    time::{timeout, Instant},
};
use tracing::{debug, info, warn};

use super::{
    bucket::TokenBucket,
    shape::{self, QtypeRule},
    wire::{self, FrameError, RequestView},
    Budget, DenyRcode, DnsError, DnsPolicy, Limits, NameVerdict, Refusal, Upstream,
};

/// RFC 1035 limit for UDP messages without EDNS.
const PLAIN_UDP_MAX: usize = 512;

/// Room for any UDP datagram, so an oversized query is measured, not cut.
const UDP_RECV_BUF: usize = 65_535;

/// How often to try for a port free for both UDP and TCP when asked for port 0.
const BIND_ATTEMPTS: usize = 16;

/// One sandbox's resolver: a UDP socket and a TCP listener on the same
/// loopback port, and the tasks serving them. Dropping it (or [`stop`])
/// aborts the tasks, which closes the sockets and every open connection.
///
/// [`stop`]: SandboxResolver::stop
#[derive(Debug)]
pub struct SandboxResolver {
    local_addr: SocketAddr,
    sandbox: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl SandboxResolver {
    /// Binds UDP and TCP on `addr` (port 0 picks one port free for both),
    /// and spawns the serving tasks on the current runtime.
    pub async fn start(
        addr: SocketAddr,
        sandbox: u64,
        policy: Arc<dyn DnsPolicy>,
        upstream: Arc<Upstream>,
        limits: Limits,
    ) -> Result<SandboxResolver, DnsError> {
        let (udp, tcp) = bind_pair(addr).await?;
        let local_addr = udp.local_addr().map_err(|source| DnsError::Bind { addr, source })?;
        let now = Instant::now();
        let resolver = Arc::new(Resolver {
            sandbox,
            policy,
            upstream,
            all_queries: TokenBucket::new(limits.all_queries, now),
            txt_queries: TokenBucket::new(limits.txt_queries, now),
            name_bytes: TokenBucket::per_minute(limits.name_bytes_per_minute, now),
            limits,
        });
        let tasks =
            vec![tokio::spawn(serve_udp(Arc::clone(&resolver), Arc::new(udp))), tokio::spawn(serve_tcp(resolver, tcp))];
        info!(sandbox, %local_addr, "sandbox resolver listening");
        Ok(Self { local_addr, sandbox, tasks })
    }

    /// The address both listeners are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The opaque sandbox id given at start.
    pub fn sandbox(&self) -> u64 {
        self.sandbox
    }

    /// Stops serving; the same happens on drop.
    pub fn stop(self) {}
}

impl Drop for SandboxResolver {
    fn drop(&mut self) {
        // Each serving task owns its JoinSet of per-query and per-connection
        // tasks, so aborting it aborts those too.
        for task in &self.tasks {
            task.abort();
        }
        debug!(sandbox = self.sandbox, local_addr = %self.local_addr, "sandbox resolver stopped");
    }
}

pub(super) async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let bind_error = |source| DnsError::Bind { addr, source };
    if addr.port() != 0 {
        let udp = UdpSocket::bind(addr).await.map_err(bind_error)?;
        let tcp = TcpListener::bind(addr).await.map_err(bind_error)?;
        return Ok((udp, tcp));
    }
    // The kernel picks a free UDP port; the same TCP port is usually free
    // too, and when it is not, try another.
    let mut last = None;
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind(addr).await.map_err(bind_error)?;
        let picked = udp.local_addr().map_err(bind_error)?;
        match TcpListener::bind(picked).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => last = Some(error),
            Err(error) => return Err(bind_error(error)),
        }
    }
    Err(bind_error(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse))))
}

/// State shared by a sandbox's listeners.
struct Resolver {
    sandbox: u64,
    policy: Arc<dyn DnsPolicy>,
    upstream: Arc<Upstream>,
    limits: Limits,
    all_queries: TokenBucket,
    txt_queries: TokenBucket,
    /// Bytes of query names, per minute.
    name_bytes: TokenBucket,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// The outcome of the phases before forwarding.
enum Screened {
    /// No reply at all: nothing to address it to, or it was itself a reply.
    Ignore,
    /// A reply the resolver makes up (refusals).
    Reply(Vec<u8>),
    Forward(Box<Forward>),
}

/// An allowed query on its way upstream.
struct Forward {
    query: Vec<u8>,
    request: RequestView,
    qname: Name,
    /// Canonical name, as policy saw it.
    name: String,
    qtype: RecordType,
    /// The largest reply the client takes over UDP; `None` over TCP.
    udp_reply_max: Option<usize>,
}

/// A message read far enough to answer it.
struct Incoming {
    header: Header,
    /// The whole message, or why it could not be read.
    parsed: Result<Message, &'static str>,
    request: RequestView,
    audit: Audit,
}

/// Phase form: a plain query with one question and nothing else but an OPT
/// record. UPDATE and NOTIFY give the sections other meanings, so the
/// opcode is judged first.
fn check_form<'m>(header: &Header, message: &'m Message) -> Result<&'m Query, Refusal> {
    if header.op_code() != OpCode::Query {
        return Err(Refusal::OpcodeRefused { opcode: header.op_code().to_string() });
    }
    let [question] = message.queries() else {
        return Err(Refusal::Malformed { detail: "expected exactly one question" });
    };
    // Anything else would ride along to upstream unjudged.
    if !message.answers().is_empty()
        || !message.name_servers().is_empty()
        || !message.additionals().is_empty()
        || !message.signature().is_empty()
    {
        return Err(Refusal::Malformed { detail: "a query may carry only an OPT record" });
    }
    Ok(question)
}

/// Name and type of a query as the audit log gets them.
struct Audit {
    name: String,
    qtype: String,
}

impl Audit {
    const UNREADABLE: Audit = Audit { name: String::new(), qtype: String::new() };
}

impl Resolver {
    /// Every phase but forward. Cheap and synchronous (no I/O), so the UDP
    /// loop runs it inline and spawns only forwarding.
    fn screen(&self, bytes: &[u8], transport: Transport) -> Screened {
        let incoming = match self.read(bytes) {
            Ok(incoming) => incoming,
            Err(screened) => return screened,
        };
        match self.judge(bytes, transport, &incoming) {
            Ok(forward) => Screened::Forward(Box::new(forward)),
            Err(refusal) => self.refuse(&incoming.request, &incoming.audit, &refusal),
        }
    }

    /// Phase parse: the header first, to know whom to answer and whether to
    /// answer at all; then the whole message, when its counts are sane.
    fn read(&self, bytes: &[u8]) -> Result<Incoming, Screened> {
        let Some(id) = bytes.get(..2).map(|id| u16::from_be_bytes([id[0], id[1]])) else {
            debug!(sandbox = self.sandbox, len = bytes.len(), "dropping message too short for an id");
            return Err(Screened::Ignore);
        };
        let Some(header) = wire::read_header(bytes) else {
            if bytes.get(2).is_some_and(|flags| flags & 0x80 != 0) {
                return Err(Screened::Ignore);
            }
            let refusal = Refusal::Malformed { detail: "shorter than a DNS header" };
            return Err(self.refuse(&RequestView::id_only(id), &Audit::UNREADABLE, &refusal));
        };
        // Answering a reply could start a loop between two resolvers.
        if header.message_type() == MessageType::Response {
            debug!(sandbox = self.sandbox, id, "dropping a response sent to the resolver");
            return Err(Screened::Ignore);
        }
        let parsed = if wire::counts_fit(&header, bytes.len()) {
            wire::parse_exact(bytes)
        } else {
            Err("record counts exceed the message")
        };
        let (request, audit) = match &parsed {
            Ok(message) => {
                let audit = message.queries().first().map_or(Audit::UNREADABLE, |q| Audit {
                    name: shape::canonical_name(q.name()).text,
                    qtype: shape::qtype_name(q.query_type()),
                });
                (RequestView::from_message(message), audit)
            }
            Err(_) => (RequestView::from_header(&header), Audit::UNREADABLE),
        };
        Ok(Incoming { header, parsed, request, audit })
    }

    /// Phases budget, size, form, type, shape and policy.
    fn judge(&self, bytes: &[u8], transport: Transport, incoming: &Incoming) -> Result<Forward, Refusal> {
        // Budget before anything else costs work.
        if !self.all_queries.try_take(Instant::now()) {
            return Err(Refusal::RateLimited { budget: Budget::AllQueries });
        }
        let edns_payload =
            incoming.parsed.as_ref().ok().and_then(|message| message.extensions().as_ref()).map(Edns::max_payload);
        let udp_reply_max = self.check_size(bytes.len(), edns_payload, transport)?;
        let message = incoming.parsed.as_ref().map_err(|&detail| Refusal::Malformed { detail })?;
        let question = check_form(&incoming.header, message)?;
        // Volume before type and shape: a tunnel probing those checks
        // spends its budget as well. Wire length: labels and their length bytes.
        let name_bytes = question.name().iter().map(|label| label.len() + 1).sum::<usize>() + 1;
        if !self.name_bytes.try_take_n(name_bytes, Instant::now()) {
            let per_minute = self.limits.name_bytes_per_minute;
            return Err(Refusal::RateLimited { budget: Budget::NameBytes { per_minute } });
        }

        if question.query_class() != DNSClass::IN {
            return Err(Refusal::QueryClassRefused { class: question.query_class().to_string() });
        }
        let qtype = question.query_type();
        let rule = shape::qtype_rule(qtype);
        if rule == QtypeRule::Refused {
            return Err(Refusal::QueryTypeRefused { qtype: incoming.audit.qtype.clone() });
        }

        let canonical = shape::canonical_name(question.name());
        shape::check_shape(question.name(), &canonical, &self.limits)?;
        // Spent only on TXT queries that could otherwise go out.
        if rule == QtypeRule::Txt && !self.txt_queries.try_take(Instant::now()) {
            return Err(Refusal::RateLimited { budget: Budget::Txt });
        }

        match self.policy.check_name(self.sandbox, &canonical.text) {
            NameVerdict::Deny { rule, reason } => Err(Refusal::PolicyDeny { rule, reason }),
            NameVerdict::Allow => Ok(Forward {
                query: bytes.to_vec(),
                request: incoming.request.clone(),
                qname: question.name().clone(),
                name: canonical.text,
                qtype,
                udp_reply_max,
            }),
        }
    }

    /// Phase size: a stub resolver's query is a question and an OPT record;
    /// anything bigger carries something else. Judged before the form, so
    /// an oversized query is refused as oversized even when it is also
    /// malformed (then it counts as having no EDNS). Returns the largest
    /// reply a UDP client takes.
    fn check_size(
        &self,
        len: usize,
        edns_payload: Option<u16>,
        transport: Transport,
    ) -> Result<Option<usize>, Refusal> {
        if transport == Transport::Tcp {
            // The frame reader already bounded the message.
            return Ok(None);
        }
        let (max_query, max_reply) = match edns_payload {
            Some(payload) => (self.limits.max_query_bytes, usize::from(payload).max(PLAIN_UDP_MAX)),
            None => (PLAIN_UDP_MAX, PLAIN_UDP_MAX),
        };
        if len > max_query {
            return Err(Refusal::QueryTooLarge { len, max: max_query });
        }
        Ok(Some(max_reply))
    }

    fn refuse(&self, request: &RequestView, audit: &Audit, refusal: &Refusal) -> Screened {
        let rcode = match refusal {
            Refusal::Malformed { .. } => ResponseCode::FormErr,
            Refusal::OpcodeRefused { .. } => ResponseCode::NotImp,
            Refusal::PolicyDeny { .. } => match self.limits.deny_rcode {
                DenyRcode::NxDomain => ResponseCode::NXDomain,
                DenyRcode::Refused => ResponseCode::Refused,
            },
            _ => ResponseCode::Refused,
        };
        debug!(
            sandbox = self.sandbox,
            name = %audit.name,
            qtype = %audit.qtype,
            %rcode,
            why = %refusal,
            "query refused"
        );
        self.policy.record_refusal(self.sandbox, &audit.name, &audit.qtype, refusal);
        self.synthesize(request, rcode, false).map_or(Screened::Ignore, Screened::Reply)
    }

    fn synthesize(&self, request: &RequestView, rcode: ResponseCode, truncated: bool) -> Option<Vec<u8>> {
        match wire::synthesize(request, rcode, truncated) {
            Ok(reply) => Some(reply),
            Err(error) => {
                warn!(sandbox = self.sandbox, id = request.id, %error, "could not encode a reply");
                None
            }
        }
    }

    /// Phase forward: relay the upstream reply, and report its addresses.
    async fn forward(&self, forward: Box<Forward>) -> Option<Vec<u8>> {
        let reply = match self.upstream.exchange(&forward.query).await {
            Ok(reply) => reply,
            Err(error) => {
                warn!(
                    sandbox = self.sandbox,
                    name = %forward.name,
                    qtype = %forward.qtype,
                    %error,
                    "upstream failed, answering SERVFAIL"
                );
                return self.synthesize(&forward.request, ResponseCode::ServFail, false);
            }
        };
        self.report_answers(&forward, &reply);
        match forward.udp_reply_max {
            // Upstream retried over TCP and got more than this client takes
            // over UDP: tell it to ask again over TCP, as a server would.
            Some(max) if reply.len() > max => {
                let rcode = wire::read_header(&reply).map_or(ResponseCode::NoError, |h| h.response_code());
                debug!(sandbox = self.sandbox, name = %forward.name, len = reply.len(), max, "reply too big for UDP, truncating");
                self.synthesize(&forward.request, rcode, true)
            }
            _ => Some(reply),
        }
    }

    fn report_answers(&self, forward: &Forward, reply: &[u8]) {
        let Some(header) = wire::read_header(reply) else {
            return;
        };
        if header.response_code() != ResponseCode::NoError || header.answer_count() == 0 {
            return;
        }
        if !wire::counts_fit(&header, reply.len()) {
            return;
        }
        let message = match Message::from_vec(reply) {
            Ok(message) => message,
            Err(error) => {
                // Relayed anyway: the client may understand what we do not.
                debug!(sandbox = self.sandbox, name = %forward.name, %error, "could not parse upstream reply; answers not recorded");
                return;
            }
        };
        let answers = wire::answer_addresses(&message, &forward.qname);
        if answers.is_empty() {
            return;
        }
        debug!(sandbox = self.sandbox, name = %forward.name, count = answers.len(), "recording answers");
        self.policy.record_answers(self.sandbox, &forward.name, &answers);
    }
}

async fn serve_udp(resolver: Arc<Resolver>, socket: Arc<UdpSocket>) {
    let in_flight = Arc::new(Semaphore::new(resolver.limits.max_udp_in_flight.min(Semaphore::MAX_PERMITS)));
    let mut forwards = JoinSet::new();
    let mut buf = vec![0_u8; UDP_RECV_BUF];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors from earlier sends surface here; none of them
                // is a reason to stop serving.
                debug!(sandbox = resolver.sandbox, %error, "UDP receive failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        while forwards.try_join_next().is_some() {}

        match resolver.screen(&buf[..len], Transport::Udp) {
            Screened::Ignore => {}
            Screened::Reply(reply) => send_udp(&resolver, &socket, &reply, peer).await,
            Screened::Forward(forward) => {
                let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                    warn!(sandbox = resolver.sandbox, name = %forward.name, "too many queries in flight, answering SERVFAIL");
                    if let Some(reply) = resolver.synthesize(&forward.request, ResponseCode::ServFail, false) {
                        send_udp(&resolver, &socket, &reply, peer).await;
                    }
                    continue;
                };
                let resolver = Arc::clone(&resolver);
                let socket = Arc::clone(&socket);
                forwards.spawn(async move {
                    let _permit: OwnedSemaphorePermit = permit;
                    if let Some(reply) = resolver.forward(forward).await {
                        send_udp(&resolver, &socket, &reply, peer).await;
                    }
                });
            }
        }
    }
}

async fn send_udp(resolver: &Resolver, socket: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if let Err(error) = socket.send_to(reply, peer).await {
        debug!(sandbox = resolver.sandbox, %peer, %error, "UDP reply not sent");
    }
}

async fn serve_tcp(resolver: Arc<Resolver>, listener: TcpListener) {
    let open = Arc::new(Semaphore::new(resolver.limits.max_tcp_connections.min(Semaphore::MAX_PERMITS)));
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically out of file descriptors: back off rather than spin.
                warn!(sandbox = resolver.sandbox, %error, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            debug!(sandbox = resolver.sandbox, %peer, "too many TCP connections, closing");
            drop(stream);
            continue;
        };
        let resolver = Arc::clone(&resolver);
        connections.spawn(async move {
            let _permit: OwnedSemaphorePermit = permit;
            serve_connection(&resolver, stream, peer).await;
        });
    }
}

/// Queries on one connection are answered in order, one at a time; the
/// connection limit bounds the concurrency a sandbox gets over TCP.
async fn serve_connection(resolver: &Resolver, mut stream: TcpStream, peer: SocketAddr) {
    let idle = resolver.limits.tcp_idle_timeout;
    loop {
        let query = match timeout(idle, wire::read_frame(&mut stream, resolver.limits.max_tcp_message_bytes)).await {
            Ok(Ok(query)) => query,
            Ok(Err(FrameError::Closed)) => return,
            Ok(Err(FrameError::BadLength(len))) => {
                debug!(sandbox = resolver.sandbox, %peer, len, "TCP message length out of bounds, closing");
                return;
            }
            Err(_) => {
                debug!(sandbox = resolver.sandbox, %peer, "TCP connection idle, closing");
                return;
            }
        };
        let reply = match resolver.screen(&query, Transport::Tcp) {
            Screened::Ignore => return,
            Screened::Reply(reply) => Some(reply),
            Screened::Forward(forward) => resolver.forward(forward).await,
        };
        let Some(reply) = reply else {
            continue;
        };
        match timeout(idle, wire::write_frame(&mut stream, &reply)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                debug!(sandbox = resolver.sandbox, %peer, %error, "TCP reply not sent, closing");
                return;
            }
            Err(_) => {
                debug!(sandbox = resolver.sandbox, %peer, "TCP client not reading, closing");
                return;
            }
        }
    }
}
