//! End-to-end tests over real loopback sockets: a small authoritative
//! server stands in for upstream and counts what reaches it, a recording
//! policy stands in for the daemon, and clients speak DNS over UDP and TCP.
//! Nothing here sends a packet anywhere but `127.0.0.1` / `::1`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{opt::EdnsOption, A, AAAA, CNAME, TXT},
        Name, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
    time::{sleep, timeout, Instant},
};

use super::{
    server::bind_pair, wire, Budget, DenyRcode, DnsError, DnsPolicy, Limits, NameVerdict, RateLimit, Refusal,
    SandboxResolver, Upstream,
};

const SANDBOX: u64 = 42;
const LOCALHOST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
const WAIT: Duration = Duration::from_secs(5);

const WWW_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const WWW_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

// ---------------------------------------------------------------- upstream

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Udp,
    Tcp,
}

/// A query as the test upstream saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    name: String,
    qtype: RecordType,
    via: Via,
}

/// An authoritative server for `example.test` on 127.0.0.1, UDP and TCP on
/// one port:
/// - `www` A/AAAA, `alias` CNAME to `www`, `txt` TXT;
/// - `big`: 40 A records, answered with TC over UDP and in full over TCP;
/// - `slow`: answered after one second;
/// - anything else: NXDOMAIN.
struct TestUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl TestUpstream {
    async fn start() -> Self {
        let (udp, tcp) = bind_pair(LOCALHOST).await.expect("test upstream binds on loopback");
        let addr = udp.local_addr().expect("bound socket has an address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let udp = Arc::new(udp);
        let udp_task = {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = vec![0_u8; 65_535];
                loop {
                    let Ok((len, peer)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    let query = buf[..len].to_vec();
                    let (udp, seen) = (Arc::clone(&udp), Arc::clone(&seen));
                    // Concurrent, so `slow` does not hold up other answers.
                    tokio::spawn(async move {
                        if let Some(reply) = authoritative_answer(&query, Via::Udp, &seen).await {
                            let _ = udp.send_to(&reply, peer).await;
                        }
                    });
                }
            })
        };
        let tcp_task = {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = tcp.accept().await else {
                        continue;
                    };
                    let seen = Arc::clone(&seen);
                    tokio::spawn(async move {
                        while let Ok(query) = wire::read_frame(&mut stream, 65_535).await {
                            let Some(reply) = authoritative_answer(&query, Via::Tcp, &seen).await else {
                                return;
                            };
                            if wire::write_frame(&mut stream, &reply).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            })
        };
        Self { addr, seen, tasks: vec![udp_task, tcp_task] }
    }

    fn upstream(&self) -> Upstream {
        Upstream::new(vec![self.addr], Duration::from_secs(2))
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn seen_for(&self, name: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|seen| seen.name == name).collect()
    }
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("test names are valid")
}

fn a(owner: &str, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name(owner), 300, RData::A(A(ip)))
}

async fn authoritative_answer(query: &[u8], via: Via, seen: &Mutex<Vec<Seen>>) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.query()?.clone();
    let qname = question.name().to_lowercase().to_ascii();
    let qname = qname.trim_end_matches('.').to_owned();
    seen.lock().unwrap_or_else(PoisonError::into_inner).push(Seen {
        name: qname.clone(),
        qtype: question.query_type(),
        via,
    });

    let mut reply = Message::new();
    reply.set_header(Header::response_from_request(request.header()));
    reply.set_authoritative(true);
    reply.add_query(question.clone());
    if let Some(edns) = request.extensions() {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().max(512));
        reply.set_edns(ours);
    }
    let owner = question.name().to_ascii();
    match (qname.as_str(), question.query_type()) {
        ("www.example.test" | "slow.example.test", RecordType::A) => {
            reply.add_answer(a(&owner, WWW_V4));
        }
        ("www.example.test", RecordType::AAAA) => {
            reply.add_answer(Record::from_rdata(name(&owner), 120, RData::AAAA(AAAA(WWW_V6))));
        }
        ("alias.example.test", RecordType::A) => {
            reply.add_answer(Record::from_rdata(name(&owner), 60, RData::CNAME(CNAME(name("www.example.test.")))));
            reply.add_answer(a("www.example.test.", WWW_V4));
        }
        ("txt.example.test", RecordType::TXT) => {
            let txt = TXT::new(vec!["v=test".to_owned()]);
            reply.add_answer(Record::from_rdata(name(&owner), 300, RData::TXT(txt)));
        }
        ("big.example.test", RecordType::A) if via == Via::Udp => {
            reply.set_truncated(true);
        }
        ("big.example.test", RecordType::A) => {
            for i in 1..=40 {
                reply.add_answer(a(&owner, Ipv4Addr::new(192, 0, 2, i)));
            }
        }
        _ => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
    }
    if qname == "slow.example.test" {
        sleep(Duration::from_secs(1)).await;
    }
    reply.to_vec().ok()
}

// ------------------------------------------------------------------ policy

/// Denies everything under `denied.test`; remembers what it was told.
type Answers = Vec<(IpAddr, Duration)>;
/// (sandbox, name, qtype, why)
type RefusalRecord = (u64, String, String, Refusal);

#[derive(Default)]
struct RecordingPolicy {
    answers: Mutex<Vec<(u64, String, Answers)>>,
    refusals: Mutex<Vec<RefusalRecord>>,
}

impl DnsPolicy for RecordingPolicy {
    fn check_name(&self, _sandbox: u64, name: &str) -> NameVerdict {
        if name == "denied.test" || name.ends_with(".denied.test") {
            NameVerdict::Deny { rule: "deny-test".into(), reason: "test zone is off limits".into() }
        } else {
            NameVerdict::Allow
        }
    }

    fn record_answers(&self, sandbox: u64, name: &str, answers: &[(IpAddr, Duration)]) {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner).push((sandbox, name.to_owned(), answers.to_vec()));
    }

    fn record_refusal(&self, sandbox: u64, name: &str, qtype: &str, why: &Refusal) {
        self.refusals.lock().unwrap_or_else(PoisonError::into_inner).push((
            sandbox,
            name.to_owned(),
            qtype.to_owned(),
            why.clone(),
        ));
    }
}

impl RecordingPolicy {
    fn answers_for(&self, name: &str) -> Vec<Answers> {
        self.answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(sandbox, n, _)| *sandbox == SANDBOX && n == name)
            .map(|(_, _, answers)| answers.clone())
            .collect()
    }

    fn refusals(&self) -> Vec<RefusalRecord> {
        self.refusals.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

// ----------------------------------------------------------------- harness

struct Harness {
    upstream: TestUpstream,
    policy: Arc<RecordingPolicy>,
    resolver: SandboxResolver,
}

impl Harness {
    async fn start() -> Self {
        Self::with_limits(Limits::default()).await
    }

    async fn with_limits(limits: Limits) -> Self {
        let upstream = TestUpstream::start().await;
        let policy = Arc::new(RecordingPolicy::default());
        let resolver = SandboxResolver::start(
            LOCALHOST,
            SANDBOX,
            Arc::clone(&policy) as Arc<dyn DnsPolicy>,
            Arc::new(upstream.upstream()),
            limits,
        )
        .await
        .expect("resolver starts on loopback");
        Self { upstream, policy, resolver }
    }

    fn addr(&self) -> SocketAddr {
        self.resolver.local_addr()
    }
}

static NEXT_ID: AtomicU16 = AtomicU16::new(0x1000);

fn query(qname: &str, qtype: RecordType) -> Message {
    let mut message = Message::new();
    message
        .set_id(NEXT_ID.fetch_add(1, Ordering::Relaxed))
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name(qname), qtype));
    message
}

fn with_edns(mut message: Message, payload: u16) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    message.set_edns(edns);
    message
}

fn encode(message: &Message) -> Vec<u8> {
    message.to_vec().expect("test queries encode")
}

/// Sends raw bytes over UDP; the reply, or `None` if none came in `wait`.
async fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(LOCALHOST).await.expect("client binds on loopback");
    socket.connect(server).await.expect("client connects");
    socket.send(bytes).await.expect("client sends");
    let mut buf = vec![0_u8; 65_535];
    let len = timeout(wait, socket.recv(&mut buf)).await.ok()?.ok()?;
    Some(buf[..len].to_vec())
}

async fn udp_ask(server: SocketAddr, message: &Message) -> Message {
    let reply = udp_raw(server, &encode(message), WAIT).await.expect("a reply over UDP");
    let reply = Message::from_vec(&reply).expect("the reply parses");
    assert_eq!(reply.id(), message.id(), "reply id matches");
    assert_eq!(reply.queries(), message.queries(), "reply echoes the question");
    reply
}

struct TcpClient(TcpStream);

impl TcpClient {
    async fn connect(server: SocketAddr) -> Self {
        Self(TcpStream::connect(server).await.expect("client connects over TCP"))
    }

    async fn ask(&mut self, message: &Message) -> Message {
        wire::write_frame(&mut self.0, &encode(message)).await.expect("client writes");
        let reply = timeout(WAIT, wire::read_frame(&mut self.0, 65_535))
            .await
            .expect("a reply in time")
            .expect("a whole reply");
        let reply = Message::from_vec(&reply).expect("the reply parses");
        assert_eq!(reply.id(), message.id(), "reply id matches");
        reply
    }

    /// Whether the server closed the connection within `wait`.
    async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut byte = [0_u8; 1];
        matches!(timeout(wait, self.0.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
    }
}

fn addresses(reply: &Message) -> Vec<IpAddr> {
    reply
        .answers()
        .iter()
        .filter_map(|record| match record.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect()
}

// ------------------------------------------------------------------- tests

#[tokio::test]
async fn allowed_a_over_udp_is_answered_and_recorded() {
    let h = Harness::start().await;
    let reply = udp_ask(h.addr(), &query("WWW.Example.Test.", RecordType::A)).await;

    assert_eq!(reply.response_code(), ResponseCode::NoError);
    assert_eq!(addresses(&reply), vec![IpAddr::V4(WWW_V4)]);
    assert_eq!(
        h.policy.answers_for("www.example.test"),
        vec![vec![(IpAddr::V4(WWW_V4), Duration::from_mins(5))]],
        "record_answers gets the lowercased name, the address and its TTL"
    );
    assert_eq!(h.upstream.seen_for("www.example.test").len(), 1);
    assert!(h.policy.refusals().is_empty());
}

#[tokio::test]
async fn aaaa_works_over_udp_and_tcp() {
    let h = Harness::start().await;
    let reply = udp_ask(h.addr(), &with_edns(query("www.example.test.", RecordType::AAAA), 1232)).await;
    assert_eq!(addresses(&reply), vec![IpAddr::V6(WWW_V6)]);
    assert!(reply.extensions().is_some(), "EDNS from upstream is relayed");

    let mut tcp = TcpClient::connect(h.addr()).await;
    let reply = tcp.ask(&query("www.example.test.", RecordType::AAAA)).await;
    assert_eq!(addresses(&reply), vec![IpAddr::V6(WWW_V6)]);

    assert_eq!(h.policy.answers_for("www.example.test"), vec![vec![(IpAddr::V6(WWW_V6), Duration::from_mins(2))]; 2]);
}

#[tokio::test]
async fn tcp_answers_several_queries_on_one_connection() {
    let h = Harness::start().await;
    let mut tcp = TcpClient::connect(h.addr()).await;
    let first = tcp.ask(&query("www.example.test.", RecordType::A)).await;
    let second = tcp.ask(&query("www.example.test.", RecordType::AAAA)).await;
    let third = tcp.ask(&query("nothing.example.test.", RecordType::A)).await;
    assert_eq!(addresses(&first), vec![IpAddr::V4(WWW_V4)]);
    assert_eq!(addresses(&second), vec![IpAddr::V6(WWW_V6)]);
    assert_eq!(third.response_code(), ResponseCode::NXDomain, "upstream NXDOMAIN relayed");
}

#[tokio::test]
async fn cname_chain_addresses_are_attributed_to_the_queried_name() {
    let h = Harness::start().await;
    let reply = udp_ask(h.addr(), &query("alias.example.test.", RecordType::A)).await;
    assert_eq!(reply.answers().len(), 2, "CNAME and A relayed unchanged");
    assert_eq!(
        h.policy.answers_for("alias.example.test"),
        vec![vec![(IpAddr::V4(WWW_V4), Duration::from_mins(1))]],
        "the CNAME's shorter TTL bounds the mapping"
    );
    assert!(h.policy.answers_for("www.example.test").is_empty());
}

#[tokio::test]
async fn denied_name_gets_nxdomain_and_never_reaches_upstream() {
    let h = Harness::start().await;
    let reply = udp_ask(h.addr(), &query("secret.Denied.Test.", RecordType::A)).await;
    assert_eq!(reply.response_code(), ResponseCode::NXDomain);
    assert!(reply.answers().is_empty());

    let mut tcp = TcpClient::connect(h.addr()).await;
    let reply = tcp.ask(&query("denied.test.", RecordType::AAAA)).await;
    assert_eq!(reply.response_code(), ResponseCode::NXDomain);

    assert!(h.upstream.seen().is_empty(), "upstream saw {:?}", h.upstream.seen());
    let refusals = h.policy.refusals();
    assert_eq!(refusals.len(), 2);
    let (sandbox, name, qtype, why) = &refusals[0];
    assert_eq!((*sandbox, name.as_str(), qtype.as_str()), (SANDBOX, "secret.denied.test", "A"));
    assert_eq!(
        why.to_string(),
        "denied by policy rule deny-test: test zone is off limits",
        "the audit reason names the rule"
    );
    assert_eq!(refusals[1].2, "AAAA");
}

#[tokio::test]
async fn deny_rcode_can_be_refused() {
    let h = Harness::with_limits(Limits { deny_rcode: DenyRcode::Refused, ..Limits::default() }).await;
    let reply = udp_ask(h.addr(), &query("x.denied.test.", RecordType::A)).await;
    assert_eq!(reply.response_code(), ResponseCode::Refused);
    assert!(h.upstream.seen().is_empty());
}

#[tokio::test]
async fn tunnelling_shaped_names_are_refused_before_upstream() {
    let h = Harness::start().await;
    let long_label = format!("{}.example.test.", "a".repeat(41));
    let encoded = "mzxw6ytboi2gk3tfmzxw6ytboi.example.test.";
    let hex = "6aa30f8b08e16409b46e0173d6de2f56.example.test.";
    let long_name = format!("{}example.test.", "abcdefghijklmnopqrst.".repeat(9));
    for qname in [long_label.as_str(), encoded, hex, long_name.as_str()] {
        let reply = udp_ask(h.addr(), &query(qname, RecordType::A)).await;
        assert_eq!(reply.response_code(), ResponseCode::Refused, "{qname}");
    }
    // Over TCP too, with a binary label.
    let binary = Name::from_labels(vec![&b"\x00\xff"[..], b"example", b"test"]).expect("valid labels");
    let mut binary_query = query("example.test.", RecordType::A);
    binary_query.queries_mut()[0].set_name(binary);
    let mut tcp = TcpClient::connect(h.addr()).await;
    assert_eq!(tcp.ask(&binary_query).await.response_code(), ResponseCode::Refused);

    assert!(h.upstream.seen().is_empty(), "upstream saw {:?}", h.upstream.seen());
    let kinds: Vec<Refusal> = h.policy.refusals().into_iter().map(|(_, _, _, why)| why).collect();
    assert!(matches!(kinds[0], Refusal::LabelTooLong { len: 41, max: 40 }));
    assert!(matches!(&kinds[1], Refusal::EncodedLabel { label } if label == "mzxw6ytboi2gk3tfmzxw6ytboi"));
    assert!(matches!(kinds[2], Refusal::EncodedLabel { .. }));
    assert!(matches!(kinds[3], Refusal::NameTooLong { max: 180, .. }));
    assert_eq!(kinds[4], Refusal::NotAHostname);
    assert_eq!(h.policy.refusals()[4].1, "\\000\\255.example.test", "odd bytes reach the audit log escaped");

    // An ordinary long label still goes through.
    let reply = udp_ask(h.addr(), &query("storage-bucket-eu-west-1.example.test.", RecordType::A)).await;
    assert_eq!(reply.response_code(), ResponseCode::NXDomain, "forwarded; upstream does not know it");
    assert_eq!(h.upstream.seen().len(), 1);
}

#[tokio::test]
async fn data_split_into_short_labels_is_refused_and_ordinary_names_pass() {
    let h = Harness::start().await;
    // base32 of a secret, 5 characters a label: each label alone is short.
    let split = "mzxw6.ytboi.2gk3t.fmzxw.6ytbo.example.test.";
    let hex = "6aa30f8b.08e16409.b46e0173.d6de2f56.example.test.";
    for qname in [split, hex] {
        let reply = udp_ask(h.addr(), &query(qname, RecordType::A)).await;
        assert_eq!(reply.response_code(), ResponseCode::Refused, "{qname}");
    }
    assert!(h.upstream.seen().is_empty(), "upstream saw {:?}", h.upstream.seen());
    let refusals = h.policy.refusals();
    assert!(
        matches!(&refusals[0].3, Refusal::EncodedLabel { label } if label == "mzxw6.ytboi.2gk3t.fmzxw.6ytbo"),
        "{refusals:?}"
    );
    assert!(refusals[0].3.to_string().contains("tunnelling-shaped"), "the record says why");
    assert!(matches!(&refusals[1].3, Refusal::EncodedLabel { .. }), "{refusals:?}");

    // Names made of words, numbers and reverse lookups still go out.
    let ordinary = [
        "eu.west.storage.example.test.",
        "my-service.my-namespace.svc.example.test.",
        "ec2-203-0-113-25.compute-1.example.test.",
        "a.b.c.d.e.f.example.test.",
        "_http._tcp.www.example.test.",
        "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
    ];
    for qname in ordinary {
        let reply = udp_ask(h.addr(), &query(qname, RecordType::A)).await;
        assert_eq!(reply.response_code(), ResponseCode::NXDomain, "{qname} should be forwarded");
    }
    assert_eq!(h.upstream.seen().len(), ordinary.len());
}

#[tokio::test]
async fn bytes_of_names_per_minute_are_budgeted_and_the_record_says_so() {
    // www.example.test is 18 bytes on the wire: 11 queries fit in 200.
    let limits = Limits { name_bytes_per_minute: 200, ..Limits::default() };
    let h = Harness::with_limits(limits).await;
    let mut answered = 0;
    for _ in 0..15 {
        let reply = udp_ask(h.addr(), &query("www.example.test.", RecordType::A)).await;
        match reply.response_code() {
            ResponseCode::NoError => answered += 1,
            ResponseCode::Refused => {}
            other => panic!("unexpected rcode {other}"),
        }
    }
    // 200 per minute refills 3.3 bytes a second: no more than one more query.
    assert!((11..=12).contains(&answered), "answered {answered}");
    assert_eq!(h.upstream.seen_for("www.example.test").len(), answered, "refused queries never reached upstream");
    let refusals = h.policy.refusals();
    assert!(!refusals.is_empty());
    for (_, name, _, why) in &refusals {
        assert_eq!(name, "www.example.test");
        assert_eq!(*why, Refusal::RateLimited { budget: Budget::NameBytes { per_minute: 200 } });
        assert!(why.to_string().contains("200 bytes in a minute"), "{why}");
    }
    // Over TCP the same budget is spent.
    let mut tcp = TcpClient::connect(h.addr()).await;
    assert_eq!(tcp.ask(&query("www.example.test.", RecordType::A)).await.response_code(), ResponseCode::Refused);
}

#[test]
fn the_default_name_budget_leaves_room_for_real_work() {
    let limits = Limits::default();
    // A thousand distinct 40-byte names, A and AAAA each, fit in a minute.
    assert!(limits.name_bytes_per_minute >= 1000 * 2 * 32);
    // A tunnel at the full query rate with 180-byte names would send 2 MiB.
    let tunnel = u64::from(limits.all_queries.per_second) * 60 * 180;
    assert!(u64::from(limits.name_bytes_per_minute) * 20 < tunnel);
}

#[tokio::test]
async fn txt_flood_beyond_burst_is_refused() {
    let h = Harness::start().await;
    let mut answered = 0;
    let mut refused = 0;
    let started = Instant::now();
    for _ in 0..40 {
        let reply = udp_ask(h.addr(), &query("txt.example.test.", RecordType::TXT)).await;
        match reply.response_code() {
            ResponseCode::NoError => answered += 1,
            ResponseCode::Refused => refused += 1,
            other => panic!("unexpected rcode {other}"),
        }
    }
    // Burst 20, then 10/s: whatever refilled while the flood ran.
    let refilled = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!(answered >= 20, "answered {answered}");
    assert!(answered <= 20 + refilled, "answered {answered}, refill allowed {refilled}");
    assert!(refused >= 1, "no TXT refused; answered {answered}");
    assert_eq!(h.upstream.seen_for("txt.example.test").len(), answered, "refused TXT never reached upstream");
    assert!(h
        .policy
        .refusals()
        .iter()
        .all(|(_, _, qtype, why)| qtype == "TXT" && *why == Refusal::RateLimited { budget: Budget::Txt }));

    // The TXT budget is its own: ordinary lookups still pass.
    let reply = udp_ask(h.addr(), &query("www.example.test.", RecordType::A)).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
}

#[tokio::test]
async fn overall_budget_is_shared_by_udp_and_tcp() {
    let limits = Limits { all_queries: RateLimit { per_second: 1, burst: 4 }, ..Limits::default() };
    let h = Harness::with_limits(limits).await;
    let mut tcp = TcpClient::connect(h.addr()).await;
    let mut rcodes = Vec::new();
    let started = Instant::now();
    for i in 0..8 {
        let message = query("www.example.test.", RecordType::A);
        let reply = if i % 2 == 0 { udp_ask(h.addr(), &message).await } else { tcp.ask(&message).await };
        rcodes.push(reply.response_code());
    }
    // Burst 4, then 1/s.
    let refilled = started.elapsed().as_secs_f64().ceil() as usize;
    let answered = rcodes.iter().filter(|&&rcode| rcode == ResponseCode::NoError).count();
    assert!((4..=4 + refilled).contains(&answered), "rcodes {rcodes:?}");
    assert!(rcodes.contains(&ResponseCode::Refused), "rcodes {rcodes:?}");
    assert!(rcodes[..4].iter().all(|&rcode| rcode == ResponseCode::NoError), "the burst is served first: {rcodes:?}");
    assert_eq!(h.upstream.seen().len(), answered);
}

#[tokio::test]
async fn null_any_and_zone_transfers_are_refused() {
    let h = Harness::start().await;
    for qtype in [RecordType::NULL, RecordType::ANY, RecordType::AXFR] {
        let reply = udp_ask(h.addr(), &query("www.example.test.", qtype)).await;
        assert_eq!(reply.response_code(), ResponseCode::Refused, "{qtype}");
    }
    let mut tcp = TcpClient::connect(h.addr()).await;
    assert_eq!(tcp.ask(&query("www.example.test.", RecordType::AXFR)).await.response_code(), ResponseCode::Refused);
    assert!(h.upstream.seen().is_empty());
    let refusal = &h.policy.refusals()[0];
    assert_eq!(refusal.2, "NULL");
    assert_eq!(refusal.3.to_string(), "query type NULL refused");
}

#[tokio::test]
async fn malformed_messages_do_not_stop_the_listeners() {
    let h = Harness::start().await;
    let short = Duration::from_millis(300);

    // Garbage with a readable id: FORMERR for that id.
    let reply = udp_raw(h.addr(), b"\x12\x34 this is not DNS at all", WAIT).await.expect("FORMERR reply");
    let reply = Message::from_vec(&reply).expect("FORMERR parses");
    assert_eq!((reply.id(), reply.response_code()), (0x1234, ResponseCode::FormErr));

    // Too short for a header: FORMERR too; a single byte has no id: silence.
    let reply = udp_raw(h.addr(), b"\xab\xcd\x01", WAIT).await.expect("FORMERR reply");
    assert_eq!(Message::from_vec(&reply).expect("parses").response_code(), ResponseCode::FormErr);
    assert_eq!(udp_raw(h.addr(), b"\x01", short).await, None);

    // A header claiming 65535 questions.
    let reply = udp_raw(h.addr(), b"\x00\x07\x01\x00\xff\xff\x00\x00\x00\x00\x00\x00", WAIT).await;
    let reply = Message::from_vec(&reply.expect("FORMERR reply")).expect("parses");
    assert_eq!(reply.response_code(), ResponseCode::FormErr);

    // Two questions; and a question followed by smuggled bytes.
    let mut two = query("www.example.test.", RecordType::A);
    two.add_query(Query::query(name("www.example.test."), RecordType::AAAA));
    let reply = udp_raw(h.addr(), &encode(&two), WAIT).await.expect("reply");
    assert_eq!(Message::from_vec(&reply).expect("parses").response_code(), ResponseCode::FormErr);
    let mut smuggling = encode(&query("www.example.test.", RecordType::A));
    smuggling.extend_from_slice(b"payload");
    let reply = udp_raw(h.addr(), &smuggling, WAIT).await.expect("reply");
    assert_eq!(Message::from_vec(&reply).expect("parses").response_code(), ResponseCode::FormErr);

    // A query carrying an answer record.
    let mut carrying = query("www.example.test.", RecordType::A);
    carrying.add_answer(a("www.example.test.", WWW_V4));
    let reply = udp_raw(h.addr(), &encode(&carrying), WAIT).await.expect("reply");
    assert_eq!(Message::from_vec(&reply).expect("parses").response_code(), ResponseCode::FormErr);

    // A response sent to the resolver is never answered (no loops).
    let mut response = query("www.example.test.", RecordType::A);
    response.set_message_type(MessageType::Response);
    assert_eq!(udp_raw(h.addr(), &encode(&response), short).await, None);

    // An UPDATE: not implemented.
    let mut update = query("example.test.", RecordType::SOA);
    update.set_op_code(OpCode::Update);
    let reply = udp_raw(h.addr(), &encode(&update), WAIT).await.expect("reply");
    assert_eq!(Message::from_vec(&reply).expect("parses").response_code(), ResponseCode::NotImp);

    // Still serving, over UDP and over TCP after garbage on the same connection.
    let reply = udp_ask(h.addr(), &query("www.example.test.", RecordType::A)).await;
    assert_eq!(addresses(&reply), vec![IpAddr::V4(WWW_V4)]);
    let mut tcp = TcpClient::connect(h.addr()).await;
    wire::write_frame(&mut tcp.0, b"\x55\x66garbage").await.expect("write");
    let reply = wire::read_frame(&mut tcp.0, 65_535).await.expect("FORMERR over TCP");
    assert_eq!(Message::from_vec(&reply).expect("parses").response_code(), ResponseCode::FormErr);
    let reply = tcp.ask(&query("www.example.test.", RecordType::A)).await;
    assert_eq!(addresses(&reply), vec![IpAddr::V4(WWW_V4)]);

    assert!(h.upstream.seen().iter().all(|seen| seen.name == "www.example.test"));
    assert_eq!(h.upstream.seen().len(), 2, "only the two good queries went upstream");
    assert!(h.policy.refusals().iter().any(|(_, _, _, why)| matches!(why, Refusal::Malformed { .. })));
}

#[tokio::test]
async fn truncated_upstream_answer_is_retried_over_tcp() {
    let h = Harness::start().await;

    // A TCP client gets all 40 records: upstream was asked over UDP, said
    // TC, and was asked again over TCP.
    let mut tcp = TcpClient::connect(h.addr()).await;
    let reply = tcp.ask(&query("big.example.test.", RecordType::A)).await;
    assert_eq!(reply.answers().len(), 40);
    assert!(!reply.truncated());
    let vias: Vec<Via> = h.upstream.seen_for("big.example.test").iter().map(|seen| seen.via).collect();
    assert_eq!(vias, vec![Via::Udp, Via::Tcp]);
    assert_eq!(h.policy.answers_for("big.example.test")[0].len(), 40);

    // A UDP client with a big EDNS buffer gets them all over UDP.
    let reply = udp_ask(h.addr(), &with_edns(query("big.example.test.", RecordType::A), 4096)).await;
    assert_eq!(reply.answers().len(), 40);

    // A plain UDP client cannot take 600+ bytes: it gets TC and retries
    // over TCP, as it would with any server.
    let reply = udp_ask(h.addr(), &query("big.example.test.", RecordType::A)).await;
    assert!(reply.truncated());
    assert!(reply.answers().is_empty());
    let reply = tcp.ask(&query("big.example.test.", RecordType::A)).await;
    assert_eq!(reply.answers().len(), 40);
}

#[tokio::test]
async fn oversized_udp_queries_are_refused() {
    let h = Harness::start().await;

    // Without EDNS, more than 512 bytes.
    let mut plain = encode(&query("www.example.test.", RecordType::A));
    plain.resize(600, 0);
    let reply = udp_raw(h.addr(), &plain, WAIT).await.expect("reply");
    assert_eq!(Message::from_vec(&reply).expect("parses").response_code(), ResponseCode::Refused);

    // With EDNS: padding (RFC 7830) up to 900 bytes passes, past 1232 does not.
    let padded = |len: usize| {
        let mut message = with_edns(query("www.example.test.", RecordType::A), 1232);
        let base = encode(&message).len();
        let mut edns = message.extensions().clone().expect("has EDNS");
        edns.options_mut().insert(EdnsOption::Unknown(12, vec![0; len - base - 4]));
        message.set_edns(edns);
        let bytes = encode(&message);
        assert_eq!(bytes.len(), len);
        message
    };
    let reply = udp_ask(h.addr(), &padded(900)).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    let reply = udp_ask(h.addr(), &padded(1300)).await;
    assert_eq!(reply.response_code(), ResponseCode::Refused);

    assert_eq!(h.upstream.seen().len(), 1, "only the 900-byte query went upstream");
    let too_large: Vec<Refusal> = h.policy.refusals().into_iter().map(|(_, _, _, why)| why).collect();
    assert_eq!(
        too_large,
        vec![Refusal::QueryTooLarge { len: 600, max: 512 }, Refusal::QueryTooLarge { len: 1300, max: 1232 }]
    );
}

#[tokio::test]
async fn tcp_message_over_limit_closes_the_connection() {
    let h = Harness::start().await;
    let mut tcp = TcpClient::connect(h.addr()).await;
    let mut oversized = 5000_u16.to_be_bytes().to_vec();
    oversized.extend(std::iter::repeat_n(0_u8, 5000));
    // The server may close before taking it all; a failed write is fine.
    let _ = tcp.0.write_all(&oversized).await;
    assert!(tcp.closed_within(WAIT).await);
    assert!(h.upstream.seen().is_empty());
}

#[tokio::test]
async fn idle_tcp_connection_is_closed() {
    let limits = Limits { tcp_idle_timeout: Duration::from_millis(200), ..Limits::default() };
    let h = Harness::with_limits(limits).await;
    let mut tcp = TcpClient::connect(h.addr()).await;
    let reply = tcp.ask(&query("www.example.test.", RecordType::A)).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    let started = Instant::now();
    assert!(tcp.closed_within(WAIT).await);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn tcp_connections_per_sandbox_are_bounded() {
    let limits = Limits { max_tcp_connections: 2, ..Limits::default() };
    let h = Harness::with_limits(limits).await;
    let mut first = TcpClient::connect(h.addr()).await;
    let mut second = TcpClient::connect(h.addr()).await;
    // Answered queries prove both were accepted and are being served.
    first.ask(&query("www.example.test.", RecordType::A)).await;
    second.ask(&query("www.example.test.", RecordType::A)).await;

    let mut third = TcpClient::connect(h.addr()).await;
    assert!(third.closed_within(WAIT).await, "a third connection is closed at once");

    drop(first);
    // The freed slot is reusable (the server notices the close first).
    let mut reply = None;
    for _ in 0..50 {
        let mut fourth = TcpClient::connect(h.addr()).await;
        let message = query("www.example.test.", RecordType::A);
        if wire::write_frame(&mut fourth.0, &encode(&message)).await.is_ok() {
            if let Ok(Ok(bytes)) = timeout(Duration::from_millis(500), wire::read_frame(&mut fourth.0, 65_535)).await {
                reply = Some(bytes);
                break;
            }
        }
        sleep(Duration::from_millis(20)).await;
    }
    assert!(reply.is_some(), "a connection slot came free after a client left");
}

#[tokio::test]
async fn slow_upstream_does_not_block_other_udp_queries() {
    let h = Harness::start().await;
    let slow = tokio::spawn({
        let addr = h.addr();
        async move {
            let started = Instant::now();
            udp_ask(addr, &query("slow.example.test.", RecordType::A)).await;
            started.elapsed()
        }
    });
    // Let the slow query reach the resolver first.
    sleep(Duration::from_millis(100)).await;
    let reply = udp_ask(h.addr(), &query("www.example.test.", RecordType::A)).await;
    assert_eq!(addresses(&reply), vec![IpAddr::V4(WWW_V4)]);
    assert!(!slow.is_finished(), "the fast query waited for the slow one");
    let slow_took = slow.await.expect("slow query task");
    assert!(slow_took >= Duration::from_millis(900), "slow query took {slow_took:?}");
}

#[tokio::test]
async fn udp_queries_in_flight_are_bounded() {
    let h = Harness::with_limits(Limits { max_udp_in_flight: 1, ..Limits::default() }).await;
    let slow = tokio::spawn({
        let addr = h.addr();
        async move { udp_ask(addr, &query("slow.example.test.", RecordType::A)).await }
    });
    sleep(Duration::from_millis(100)).await;
    // The only slot is taken by the slow query: answered at once, SERVFAIL.
    let reply = udp_ask(h.addr(), &query("www.example.test.", RecordType::A)).await;
    assert_eq!(reply.response_code(), ResponseCode::ServFail);
    let slow = slow.await.expect("slow query task");
    assert_eq!(addresses(&slow), vec![IpAddr::V4(WWW_V4)]);
    // The slot is free again once the task has sent its reply and ended.
    sleep(Duration::from_millis(50)).await;
    let reply = udp_ask(h.addr(), &query("www.example.test.", RecordType::A)).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
}

/// A UDP "server" on loopback that answers every query with the wrong id,
/// then (optionally) the right answer: a stand-in for spoofed or stale replies.
async fn mismatching_server(also_answer: bool) -> (SocketAddr, JoinHandle<()>) {
    let socket = UdpSocket::bind(LOCALHOST).await.expect("binds on loopback");
    let addr = socket.local_addr().expect("has an address");
    let task = tokio::spawn(async move {
        let mut buf = vec![0_u8; 65_535];
        loop {
            let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(request) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let mut reply = Message::new();
            reply.set_header(Header::response_from_request(request.header()));
            reply.add_queries(request.queries().to_vec());
            reply.add_answer(a("www.example.test.", Ipv4Addr::new(192, 0, 2, 66)));
            reply.set_id(request.id().wrapping_add(1));
            let _ = socket.send_to(&reply.to_vec().expect("encodes"), peer).await;
            if also_answer {
                reply.set_id(request.id());
                reply.answers_mut()[0] = a("www.example.test.", WWW_V4);
                let _ = socket.send_to(&reply.to_vec().expect("encodes"), peer).await;
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn upstream_ignores_mismatched_replies_and_fails_over() {
    let message = encode(&query("www.example.test.", RecordType::A));

    // A wrong-id reply is skipped, the right one taken.
    let (addr, task) = mismatching_server(true).await;
    let upstream = Upstream::new(vec![addr], Duration::from_secs(2));
    let reply = Message::from_vec(&upstream.exchange(&message).await.expect("exchange")).expect("parses");
    assert_eq!(addresses(&reply), vec![IpAddr::V4(WWW_V4)]);
    task.abort();

    // Only wrong ids: times out, then the next server answers.
    let (liar, liar_task) = mismatching_server(false).await;
    let good = TestUpstream::start().await;
    let upstream = Upstream::new(vec![liar, good.addr], Duration::from_millis(300));
    let started = Instant::now();
    let reply = Message::from_vec(&upstream.exchange(&message).await.expect("exchange")).expect("parses");
    assert_eq!(addresses(&reply), vec![IpAddr::V4(WWW_V4)]);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Nobody answers properly: an error naming the last failure.
    let upstream = Upstream::new(vec![liar], Duration::from_millis(200));
    match upstream.exchange(&message).await {
        Err(DnsError::UpstreamsFailed { tried: 1, last }) => {
            assert!(matches!(*last, DnsError::UpstreamTimeout { server, .. } if server == liar));
        }
        other => panic!("expected failure, got {other:?}"),
    }
    assert!(matches!(
        Upstream::new(vec![], Duration::from_secs(1)).exchange(&message).await,
        Err(DnsError::NoUpstreams)
    ));
    assert!(matches!(upstream.exchange(b"nonsense").await, Err(DnsError::BadQuery { .. })));
    liar_task.abort();
}

#[tokio::test]
async fn upstream_failure_is_answered_servfail() {
    let (liar, task) = mismatching_server(false).await;
    let policy = Arc::new(RecordingPolicy::default());
    let resolver = SandboxResolver::start(
        LOCALHOST,
        SANDBOX,
        Arc::clone(&policy) as Arc<dyn DnsPolicy>,
        Arc::new(Upstream::new(vec![liar], Duration::from_millis(200))),
        Limits::default(),
    )
    .await
    .expect("resolver starts");
    let reply = udp_ask(resolver.local_addr(), &query("www.example.test.", RecordType::A)).await;
    assert_eq!(reply.response_code(), ResponseCode::ServFail);
    assert!(policy.answers_for("www.example.test").is_empty(), "nothing recorded from a liar");
    task.abort();
}

#[tokio::test]
async fn stop_closes_both_listeners() {
    let h = Harness::start().await;
    let addr = h.addr();
    udp_ask(addr, &query("www.example.test.", RecordType::A)).await;
    h.resolver.stop();

    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "TCP listener still accepting after stop");
    assert_eq!(
        udp_raw(addr, &encode(&query("www.example.test.", RecordType::A)), Duration::from_millis(300)).await,
        None
    );
}

#[tokio::test]
async fn explicit_port_binds_udp_and_tcp_together() {
    // Find a port free for both by letting the resolver pick one, then
    // release it and ask for it explicitly.
    let picked = {
        let (udp, _tcp) = bind_pair(LOCALHOST).await.expect("binds");
        udp.local_addr().expect("has an address")
    };
    let upstream = TestUpstream::start().await;
    let resolver = SandboxResolver::start(
        picked,
        SANDBOX,
        Arc::new(RecordingPolicy::default()),
        Arc::new(upstream.upstream()),
        Limits::default(),
    )
    .await
    .expect("resolver binds the requested port");
    assert_eq!(resolver.local_addr(), picked);
    assert_eq!(resolver.sandbox(), SANDBOX);

    // The port is now taken: a second resolver cannot have it.
    let taken = SandboxResolver::start(
        picked,
        SANDBOX + 1,
        Arc::new(RecordingPolicy::default()),
        Arc::new(upstream.upstream()),
        Limits::default(),
    )
    .await;
    assert!(matches!(taken, Err(DnsError::Bind { .. })));

    let mut tcp = TcpClient::connect(picked).await;
    assert_eq!(addresses(&tcp.ask(&query("www.example.test.", RecordType::A)).await), vec![IpAddr::V4(WWW_V4)]);
}

#[tokio::test]
async fn ipv6_loopback_listener_answers_aaaa() {
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
    if TcpListener::bind(v6).await.is_err() {
        eprintln!("skipping: ::1 is not configured on this machine");
        return;
    }
    let upstream = TestUpstream::start().await;
    let policy = Arc::new(RecordingPolicy::default());
    let resolver = SandboxResolver::start(
        v6,
        SANDBOX,
        Arc::clone(&policy) as Arc<dyn DnsPolicy>,
        Arc::new(upstream.upstream()),
        Limits::default(),
    )
    .await
    .expect("resolver binds ::1");
    let socket = UdpSocket::bind(v6).await.expect("client binds ::1");
    socket.connect(resolver.local_addr()).await.expect("connects");
    let message = query("www.example.test.", RecordType::AAAA);
    socket.send(&encode(&message)).await.expect("sends");
    let mut buf = vec![0_u8; 4096];
    let len = timeout(WAIT, socket.recv(&mut buf)).await.expect("in time").expect("receives");
    let reply = Message::from_vec(&buf[..len]).expect("parses");
    assert_eq!(addresses(&reply), vec![IpAddr::V6(WWW_V6)]);
}

#[test]
fn resolv_conf_nameservers_and_timeout() {
    let dir = std::env::temp_dir().join(format!("sluice-dns-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("resolv.conf");
    std::fs::write(
        &path,
        "# generated\n\
         search example.test\n\
         nameserver 127.0.0.53 # local stub\n\
         nameserver ::1\n\
         nameserver fe80::1%eth0\n\
         nameserver not-an-address\n\
         ; nameserver 127.0.0.9\n\
         options edns0 timeout:3 attempts:2\n",
    )
    .expect("write resolv.conf");
    let upstream = Upstream::from_resolv_conf(&path).expect("parses");
    assert_eq!(
        upstream.servers(),
        &[
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)), 53),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 53),
        ]
    );
    assert_eq!(upstream.timeout(), Duration::from_secs(3));

    std::fs::write(&path, "search example.test\n").expect("write resolv.conf");
    assert!(matches!(Upstream::from_resolv_conf(&path), Err(DnsError::NoNameservers { .. })));
    std::fs::remove_dir_all(&dir).expect("clean up");
    assert!(matches!(Upstream::from_resolv_conf(&path), Err(DnsError::ResolvConf { .. })));
}

#[test]
fn refusal_reasons_read_well() {
    let cases = [
        (
            Refusal::Malformed { detail: "expected exactly one question" },
            "malformed query: expected exactly one question",
        ),
        (Refusal::QueryTooLarge { len: 600, max: 512 }, "query too large: 600 bytes, limit 512"),
        (
            Refusal::LabelTooLong { len: 41, max: 40 },
            "name too long (tunnelling-shaped): a label of 41 bytes, limit 40",
        ),
        (Refusal::RateLimited { budget: Budget::Txt }, "rate limited: too many TXT queries"),
        (Refusal::OpcodeRefused { opcode: "UPDATE".into() }, "opcode UPDATE not supported"),
    ];
    for (refusal, text) in cases {
        assert_eq!(refusal.to_string(), text);
    }
}

/// The DNS fuzz target's committed corpus: never a panic, and the tricky
/// names come out as the resolver should judge them.
#[test]
fn the_dns_fuzz_corpus_replays() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/dns_query");
    let mut judged = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("fuzz/corpus/dns_query") {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        judged.insert(name, super::fuzzing::judge_query(&bytes));
    }
    assert!(judged.len() >= 10, "{judged:?}");
    assert_eq!(judged["a-www"], Some(Ok("www.example.test".to_owned())));
    assert!(matches!(judged["short-label-tunnel"], Some(Err(Refusal::EncodedLabel { .. }))), "{judged:?}");
    assert!(matches!(judged["long-encoded-label"], Some(Err(Refusal::EncodedLabel { .. }))), "{judged:?}");
    assert!(matches!(judged["binary-label"], Some(Err(Refusal::NotAHostname))), "{judged:?}");
    assert!(matches!(judged["ptr-ip6"], Some(Ok(_))), "{judged:?}");
    assert_eq!(judged["compression-loop"], None);
    assert_eq!(judged["counts-lie"], None);
    assert_eq!(judged["short"], None);
}
