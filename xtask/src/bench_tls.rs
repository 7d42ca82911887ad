//! HTTPS rows of the bench: an upstream served from the bench process and a
//! client that measures one protocol (h1 or h2) against it, directly, under
//! `sluice run`, or through an explicit proxy (mitmproxy).
//!
//! The upstream presents a leaf for `bench.test` from a bench CA; the client
//! trusts only the PEM file named by `SSL_CERT_FILE`, so the same client code
//! trusts the bench CA (direct), the sandbox bundle that `sluice run` sets, or
//! mitmproxy's CA.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The name the upstream's certificate is for, and the client's SNI.
pub const SERVER_NAME: &str = "bench.test";
/// Size of `/small`'s body.
const SMALL: u64 = 64;
/// Connections the requests/s measure keeps busy at once.
pub const RPS_CONNECTIONS: usize = 32;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The upstream: where it listens (HTTPS, and plain HTTP) and the CA file
/// that verifies it.
pub struct Upstream {
    pub addr: SocketAddr,
    pub plain_addr: SocketAddr,
    pub ca_pem: PathBuf,
}

/// Makes a bench CA and a `bench.test` leaf, writes the CA to `dir`, and
/// serves `/small` (64 bytes) and `/big` (`big_bytes`, streamed) over h1 and
/// h2 with TLS, and over plain HTTP/1.1, on `ip` from one thread, which
/// inherits the caller's CPU affinity.
pub fn start_upstream(dir: &Path, ip: std::net::IpAddr, big_bytes: u64) -> anyhow::Result<Upstream> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "sluice bench CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    leaf_params.distinguished_name.push(DnType::CommonName, SERVER_NAME);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
    let ca_pem = dir.join("bench-ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem())?;

    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca_cert.der().clone()],
            PrivateKeyDer::try_from(leaf_key.serialize_der()).map_err(anyhow::Error::msg)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let listener = std::net::TcpListener::bind((ip, 0))?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let plain = std::net::TcpListener::bind((ip, 0))?;
    let plain_addr = plain.local_addr()?;
    plain.set_nonblocking(true)?;
    std::thread::Builder::new().name("bench-https".into()).spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        runtime.block_on(async move {
            let plain = tokio::net::TcpListener::from_std(plain).expect("listener");
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = plain.accept().await else {
                        // Out of descriptors, say: wait instead of spinning.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let service = hyper::service::service_fn(move |request| async move {
                        Ok::<_, Infallible>(respond(&request, big_bytes))
                    });
                    let connection =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::spawn(connection);
                }
            });
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let builder = if h2 { builder.http2_only() } else { builder.http1_only() };
                    let service = hyper::service::service_fn(move |request| async move {
                        Ok::<_, Infallible>(respond(&request, big_bytes))
                    });
                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
    })?;
    Ok(Upstream { addr, plain_addr, ca_pem })
}

fn respond(request: &hyper::Request<hyper::body::Incoming>, big_bytes: u64) -> hyper::Response<Generated> {
    let (status, len) = match request.uri().path() {
        "/small" => (200, SMALL),
        "/big" => (200, big_bytes),
        _ => (404, 0),
    };
    let mut response = hyper::Response::new(Generated::new(len));
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("valid status");
    response
}

/// What bodies are made of.
static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// A body of `left` bytes produced in 64 KiB chunks of one static buffer.
struct Generated {
    left: u64,
}

impl Generated {
    fn new(left: u64) -> Self {
        Self { left }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n as usize])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// What one client run measures and how much.
struct Plan {
    kinds: Vec<String>,
    proto: Proto,
    upstream: SocketAddr,
    proxy: Option<SocketAddr>,
    kept: usize,
    new: usize,
    rps_for: Duration,
    /// Connection counts the requests/s measure runs at, one after the other.
    conns: Vec<usize>,
    /// The most time the kept and new measures may take each (a proxy that
    /// stalls must not stretch the run): they stop early, and say how many.
    cap: Duration,
    /// The proxy's processes, for CPU time and memory (none when direct).
    proxy_pids: Vec<u32>,
    /// Idle connections to open (`idle`).
    idle: usize,
}

impl Plan {
    fn to(&self) -> To {
        To { proto: self.proto, upstream: self.upstream, proxy: self.proxy }
    }
}

/// Where and how connections go.
#[derive(Clone, Copy)]
struct To {
    proto: Proto,
    upstream: SocketAddr,
    proxy: Option<SocketAddr>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    /// Plain HTTP/1.1.
    Http,
    H1,
    H2,
}

/// `bench-client tls KIND[,KIND...] http|h1|h2 ADDR [PROXY] [kept=N] [new=N] [secs=S] [cap=S] [conns=N,N]
/// [pids=P,P] [idle=N]`, KIND one of kept, new, rps, bulk, idle. Prints `name value` lines; `idle` opens
/// the connections, prints `idle_open N`, and holds them until standard input closes.
pub fn client(args: &[String]) -> anyhow::Result<()> {
    const USAGE: &str = "usage: bench-client tls kept|new|rps|bulk|idle[,...] http|h1|h2 ADDR [PROXY] [kept=N] \
                         [new=N] [secs=S] [cap=S] [conns=N,N] [pids=P,P] [idle=N]";
    let [kinds, proto, upstream, rest @ ..] = args else { bail!(USAGE) };
    let mut plan = Plan {
        kinds: kinds.split(',').map(str::to_owned).collect(),
        proto: match proto.as_str() {
            "http" => Proto::Http,
            "h1" => Proto::H1,
            "h2" => Proto::H2,
            _ => bail!(USAGE),
        },
        upstream: upstream.parse().context(USAGE)?,
        proxy: None,
        kept: 5000,
        new: 500,
        rps_for: Duration::from_secs(3),
        conns: vec![RPS_CONNECTIONS],
        cap: Duration::from_secs(10),
        proxy_pids: Vec::new(),
        idle: 1000,
    };
    for arg in rest {
        match arg.split_once('=') {
            Some(("kept", n)) => plan.kept = n.parse()?,
            Some(("new", n)) => plan.new = n.parse()?,
            Some(("secs", s)) => plan.rps_for = Duration::from_secs_f64(s.parse()?),
            Some(("cap", s)) => plan.cap = Duration::from_secs_f64(s.parse()?),
            Some(("conns", list)) => plan.conns = list.split(',').map(str::parse).collect::<Result<_, _>>()?,
            Some(("pids", list)) => plan.proxy_pids = list.split(',').map(str::parse).collect::<Result<_, _>>()?,
            Some(("idle", n)) => plan.idle = n.parse()?,
            None => plan.proxy = Some(arg.parse().context(USAGE)?),
            Some(_) => bail!(USAGE),
        }
    }
    if let Some(kind) = plan.kinds.iter().find(|k| !["kept", "new", "rps", "bulk", "idle"].contains(&k.as_str())) {
        bail!("unknown measure {kind:?}; {USAGE}");
    }
    super::pin_to_cpu(1)?;
    super::raise_open_files_limit();
    let connector = match plan.proto {
        Proto::Http => None,
        Proto::H1 | Proto::H2 => {
            let roots = std::env::var_os("SSL_CERT_FILE").context("SSL_CERT_FILE must name the CA bundle to trust")?;
            Some(connector(Path::new(&roots), plan.proto == Proto::H2)?)
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(measure(&plan, connector.as_ref()))
}

fn connector(roots_file: &Path, h2: bool) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(roots_file).with_context(|| format!("reading {}", roots_file.display()))?
    {
        // Bundles may hold certificates rustls rejects as anchors; skip those.
        let _ = roots.add(cert?);
    }
    if roots.is_empty() {
        bail!("no usable certificates in {}", roots_file.display());
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    // Every new connection is a full handshake, as for a first visit.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

async fn measure(plan: &Plan, connector: Option<&TlsConnector>) -> anyhow::Result<()> {
    for kind in &plan.kinds {
        match kind.as_str() {
            "kept" => {
                let mut conn = Conn::open(plan.to(), connector).await?;
                // Warm up: the first requests pay for connection set-up and caches.
                for _ in 0..50 {
                    conn.get("/small").await?;
                }
                let mut times = Vec::with_capacity(plan.kept);
                let began = Instant::now();
                while times.len() < plan.kept && began.elapsed() < plan.cap {
                    let start = Instant::now();
                    conn.get("/small").await?;
                    times.push(start.elapsed());
                }
                println!("kept_count {}", times.len());
                super::report("kept", &mut times);
            }
            "new" => {
                // One untimed connection first so lazily built state exists.
                Conn::open(plan.to(), connector).await?.get("/small").await?;
                let mut times = Vec::with_capacity(plan.new);
                let began = Instant::now();
                while times.len() < plan.new && began.elapsed() < plan.cap {
                    let start = Instant::now();
                    let mut conn = Conn::open(plan.to(), connector).await?;
                    conn.get("/small").await?;
                    times.push(start.elapsed());
                }
                println!("new_count {}", times.len());
                super::report("new", &mut times);
            }
            "rps" => {
                for &conns in &plan.conns {
                    let load = requests_per_second(plan, connector, conns).await?;
                    println!("rps_{conns} {:.0}", load.requests as f64 / load.seconds);
                    if let Some(cpu) = load.cpu_seconds {
                        println!("cpu_us_per_req_{conns} {:.2}", cpu * 1e6 / load.requests as f64);
                    }
                    if let Some(rss) = load.rss_kb {
                        println!("rss_load_kb_{conns} {rss}");
                    }
                }
            }
            "bulk" => {
                let mut conn = Conn::open(plan.to(), connector).await?;
                conn.get("/small").await?;
                let start = Instant::now();
                let bytes = conn.get("/big").await?;
                println!("bulk_mb_s {:.1}", bytes as f64 / 1e6 / start.elapsed().as_secs_f64());
            }
            "idle" => hold_idle(plan, connector).await?,
            _ => unreachable!("checked above"),
        }
    }
    Ok(())
}

/// Opens up to `plan.idle` connections (64 at a time, within `plan.cap`),
/// one request on each, says how many, and keeps them until standard input
/// closes.
async fn hold_idle(plan: &Plan, connector: Option<&TlsConnector>) -> anyhow::Result<()> {
    let began = Instant::now();
    let mut held = Vec::with_capacity(plan.idle);
    while held.len() < plan.idle && began.elapsed() < plan.cap {
        let batch = (plan.idle - held.len()).min(64);
        for conn in open_many(plan, connector, batch).await {
            match conn {
                Ok(conn) => held.push(conn),
                Err(error) => {
                    eprintln!("opening idle connection {} failed: {error:#}", held.len() + 1);
                    break;
                }
            }
        }
    }
    println!("idle_open {}", held.len());
    std::io::Write::flush(&mut std::io::stdout())?;
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await??;
    drop(held);
    Ok(())
}

/// Opens `n` connections at once, one request on each.
async fn open_many(plan: &Plan, connector: Option<&TlsConnector>, n: usize) -> Vec<anyhow::Result<Conn>> {
    let to = plan.to();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let connector = connector.cloned();
            tokio::spawn(async move {
                let mut conn = Conn::open(to, connector.as_ref()).await?;
                conn.get("/small").await?;
                anyhow::Ok(conn)
            })
        })
        .collect();
    let mut opened = Vec::with_capacity(n);
    for task in tasks {
        opened.push(task.await.map_err(anyhow::Error::from).and_then(|r| r));
    }
    opened
}

/// What one requests/s run saw.
struct Load {
    requests: u64,
    seconds: f64,
    /// CPU time the proxy's processes spent meanwhile.
    cpu_seconds: Option<f64>,
    /// The proxy's resident memory at the end, connections still open.
    rss_kb: Option<u64>,
}

async fn requests_per_second(plan: &Plan, connector: Option<&TlsConnector>, n: usize) -> anyhow::Result<Load> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let batch = (n - conns.len()).min(32);
        for conn in open_many(plan, connector, batch).await {
            conns.push(conn?);
        }
    }
    let pids = super::proc::tree(&plan.proxy_pids);
    let cpu_before = (!pids.is_empty()).then(|| super::proc::cpu_seconds(&pids));
    let start = Instant::now();
    let deadline = start + plan.rps_for;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    conn.get("/small").await?;
                    done += 1;
                }
                anyhow::Ok((done, conn))
            })
        })
        .collect();
    let mut requests = 0;
    let mut still_open = Vec::with_capacity(n);
    for task in tasks {
        let (done, conn) = task.await??;
        requests += done;
        still_open.push(conn);
    }
    let seconds = start.elapsed().as_secs_f64();
    let pids = super::proc::tree(&plan.proxy_pids);
    let cpu_seconds = cpu_before.map(|before| super::proc::cpu_seconds(&pids) - before);
    let rss_kb = (!pids.is_empty()).then(|| super::proc::rss_kb(&pids));
    drop(still_open);
    Ok(Load { requests, seconds, cpu_seconds, rss_kb })
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One connection to the upstream (through the proxy if there is one).
struct Conn {
    sender: Sender,
    /// What requests name: a path, or for plain HTTP through an explicit
    /// proxy the absolute URI's prefix.
    prefix: String,
    authority: String,
}

impl Conn {
    async fn open(plan: To, connector: Option<&TlsConnector>) -> anyhow::Result<Self> {
        let mut tcp = TcpStream::connect(plan.proxy.unwrap_or(plan.upstream)).await?;
        tcp.set_nodelay(true)?;
        let Some(connector) = connector else {
            // Plain HTTP: through an explicit proxy, requests carry the absolute URI.
            let prefix = if plan.proxy.is_some() { format!("http://{}", plan.upstream) } else { String::new() };
            let sender = handshake(tcp, false).await?;
            return Ok(Self { sender, prefix, authority: plan.upstream.to_string() });
        };
        if plan.proxy.is_some() {
            // The address, not the name: the proxy has no resolver entry for
            // bench.test. It verifies the upstream against the SNI we send.
            let target = plan.upstream;
            tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await?;
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.ends_with(b"\r\n\r\n") {
                let n = tcp.read(&mut buf).await?;
                if n == 0 {
                    bail!("the proxy closed the connection after CONNECT");
                }
                // Nothing follows the proxy's answer until our ClientHello.
                head.extend_from_slice(&buf[..n]);
            }
            if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
                bail!("the proxy refused CONNECT: {}", String::from_utf8_lossy(&head));
            }
        }
        let tls = connector.connect(ServerName::try_from(SERVER_NAME)?, tcp).await.context("TLS handshake")?;
        let h2 = plan.proto == Proto::H2;
        let want: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        // No ALPN answer means HTTP/1.1 (Squid's bumped connections say nothing).
        let got = tls.get_ref().1.alpn_protocol().or(if h2 { None } else { Some(b"http/1.1") });
        if got != Some(want) {
            bail!("ALPN: asked for {}, got {:?}", String::from_utf8_lossy(want), tls.get_ref().1.alpn_protocol());
        }
        let sender = handshake(tls, h2).await?;
        let authority = format!("{SERVER_NAME}:{}", plan.upstream.port());
        let prefix = if h2 { format!("https://{authority}") } else { String::new() };
        Ok(Self { sender, prefix, authority })
    }

    /// GETs `path` and reads the whole body; returns its length.
    async fn get(&mut self, path: &str) -> anyhow::Result<u64> {
        let uri = format!("{}{path}", self.prefix);
        let response = match &mut self.sender {
            Sender::H1(sender) => {
                let request = hyper::Request::get(uri).header("host", &self.authority).body(Empty::new())?;
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Sender::H2(sender) => {
                let request = hyper::Request::get(uri).body(Empty::new())?;
                sender.ready().await?;
                sender.send_request(request).await?
            }
        };
        if response.status() != hyper::StatusCode::OK {
            bail!("GET {path}: {}", response.status());
        }
        let mut body = response.into_body();
        let mut len = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                len += data.len() as u64;
            }
        }
        Ok(len)
    }
}

async fn handshake<S>(io: S, h2: bool) -> anyhow::Result<Sender>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        // Chrome's receive windows: 6 MiB a stream, 15 MiB a connection.
        builder.initial_stream_window_size(6 << 20).initial_connection_window_size(15 << 20);
        let (sender, connection) = builder.handshake(io).await?;
        tokio::spawn(connection);
        Ok(Sender::H2(sender))
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(connection);
        Ok(Sender::H1(sender))
    }
}
