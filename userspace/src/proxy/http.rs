//! The HTTP layer of an inspected connection: plain HTTP, or TLS terminated
//! with the sandbox's CA. Every request is checked against the sandbox's
//! policy as it is now (a profile changed at runtime applies to the next
//! request on a kept-alive connection), and allowed ones are forwarded on one
//! upstream connection that mirrors the client's protocol (HTTP/1.1 or h2).
//! Bodies stream both ways; trailers (gRPC) pass. Only WebSocket upgrades are
//! honoured, and their frames stay under the credential checks
//! ([`super::websocket`]).

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Request, Response, StatusCode, Uri, Version,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};

use super::{authority, refusal::header_safe, websocket, Flow, ProxyContext, Refusal};
use crate::{
    audit::{Decision, HostSource, Kind, Verdict},
    credentials::{
        body::{BoxError, Outcome, Swapper},
        sigv4, Applied, Leak, RequestCredentials, ScrubBody, SwapBody, Target,
    },
    policy::{ConnectQuery, RequestInfo, Scheme, Verdict as PolicyVerdict},
    rules,
};

pub type Body = BoxBody<Bytes, hyper::Error>;
/// What is sent upstream: the client's body, possibly cut off by a rule's
/// `max_body` or before a placeholder that may not go there (an error of
/// its own, so the upstream sees a failed request, never a short one).
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// Largest request head a client may send (HTTP/1 buffer, h2 header list).
const MAX_HEAD: usize = 64 * 1024;
/// Request bodies of a known length up to this, from a sandbox that holds
/// placeholders, are read whole before they go upstream, so a placeholder
/// in them that may not go there is refused before the upstream sees
/// anything. Other bodies stream (and are cut before a placeholder).
const READ_WHOLE_BODY: u64 = 64 * 1024;

/// How to open (or reopen) the upstream connection.
pub struct Upstream {
    pub destination: SocketAddr,
    /// TLS to the upstream: config (with the client's ALPN) and server name.
    pub tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
    /// h2 to the upstream (mirrors what the client negotiated).
    pub h2: bool,
}

/// Why the upstream could not be used; the text is the reason a record
/// and the sandbox's answer give.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connecting to {destination} failed: {source}")]
    Connect { destination: SocketAddr, source: std::io::Error },
    #[error("the upstream's TLS certificate was refused: {0}")]
    Certificate(String),
    #[error("TLS with the upstream failed: {0}")]
    Tls(std::io::Error),
    #[error("{version} handshake with the upstream failed: {source}")]
    Handshake { version: &'static str, source: hyper::Error },
    #[error("the upstream connection failed: {0}")]
    Connection(hyper::Error),
    #[error("the upstream failed the request: {0}")]
    Request(hyper::Error),
}

enum Sender {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

impl Upstream {
    /// Opens the connection: TCP, TLS if configured, then the HTTP handshake.
    pub async fn connect(&self, ctx: &ProxyContext) -> Result<(Box<dyn IoBox>, Option<Vec<u8>>), UpstreamError> {
        let destination = self.destination;
        let tcp = tokio::time::timeout(ctx.connect_timeout, TcpStream::connect(destination))
            .await
            .map_err(|_| UpstreamError::Timeout(destination))?
            .map_err(|source| UpstreamError::Connect { destination, source })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok((Box::new(tcp), None)),
            Some((config, name)) => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = connector.connect(name.clone(), tcp).await.map_err(upstream_tls_error)?;
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                Ok((Box::new(tls), alpn))
            }
        }
    }

    async fn handshake(&self, io: Box<dyn IoBox>) -> Result<Sender, UpstreamError> {
        let io = TokioIo::new(io);
        if self.h2 {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|source| UpstreamError::Handshake { version: "HTTP/2", source })?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(Sender::H2(sender))
        } else {
            let (sender, connection) = http1::handshake(io)
                .await
                .map_err(|source| UpstreamError::Handshake { version: "HTTP/1.1", source })?;
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
            });
            Ok(Sender::H1(sender))
        }
    }
}

/// Object-safe alias for the upstream stream.
pub trait IoBox: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoBox for T {}

fn upstream_tls_error(error: std::io::Error) -> UpstreamError {
    match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => UpstreamError::Certificate(crate::tls::describe_verify_error(tls)),
        None => UpstreamError::Tls(error),
    }
}

/// One inspected client connection.
pub struct Connection {
    ctx: Arc<ProxyContext>,
    flow: Arc<Flow>,
    upstream: Upstream,
    /// Why no request of this connection goes anywhere (denied at connect
    /// level, or the upstream could not be used): every request is
    /// answered with this instead.
    refusal: Option<Refusal>,
    sender: Mutex<Option<Sender>>,
    h2_sender: std::sync::OnceLock<http2::SendRequest<UpstreamBody>>,
}

/// One request as its phases learn it.
struct Exchange {
    /// The request's record, filled in phase by phase.
    decision: Decision,
    method: String,
    path: String,
}

/// What the request head phase decided.
struct Head {
    /// The authority the upstream receives: the one that was checked.
    authority: authority::Authority,
    /// The name credentials are bound by: the one tied to the address,
    /// else the address itself, never a claimed name.
    bound_host: String,
    ruling: crate::policy::Decision,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// What the response phases hand to the done phase.
struct Answer {
    response: Response<Body>,
    /// A WebSocket upgrade the upstream accepted.
    upgraded: Option<Upgraded>,
}

/// The two sides of an accepted WebSocket upgrade and what its frames are
/// checked against.
struct Upgraded {
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    checks: websocket::FrameChecks,
}

/// What the request body phase put in.
struct Injected {
    request: Request<UpstreamBody>,
    applied: Applied,
    /// The outcome of a body that streams (filled as it goes).
    streamed: Option<Arc<std::sync::Mutex<Outcome>>>,
}

impl Connection {
    /// `opened` is the upstream connection opened for the handshake, or the
    /// refusal that answers every request instead.
    pub async fn new(
        ctx: Arc<ProxyContext>,
        flow: Arc<Flow>,
        upstream: Upstream,
        opened: Result<Box<dyn IoBox>, Refusal>,
    ) -> Arc<Self> {
        let (sender, refusal) = match opened {
            Err(refusal) => (None, Some(refusal)),
            Ok(io) => match upstream.handshake(io).await {
                Ok(sender) => (Some(sender), None),
                Err(error) => (None, Some(Refusal::upstream(error.to_string()))),
            },
        };
        let h2_sender = std::sync::OnceLock::new();
        let sender = match sender {
            Some(Sender::H2(h2)) => {
                let _ = h2_sender.set(h2);
                None
            }
            other => other,
        };
        Arc::new(Self { ctx, flow, upstream, refusal, sender: Mutex::new(sender), h2_sender })
    }

    /// Serves the client's requests until it closes.
    pub async fn serve<S>(self: Arc<Self>, client: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (header_read_timeout, idle_timeout) = (self.ctx.header_read_timeout, self.ctx.idle_timeout);
        let service = hyper::service::service_fn(move |request| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.handle(request).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // With a timer hyper enforces the header timeout: a client that
        // sends no request head (first or next) is closed after it.
        builder
            .http1()
            .max_buf_size(MAX_HEAD)
            .title_case_headers(false)
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        builder.http2().max_header_list_size(MAX_HEAD as u32).timer(TokioTimer::new());
        // No HTTP/2 keep-alive pings: they would move bytes and keep an
        // idle connection open for ever; a dead or idle peer is closed by
        // the idle timeout instead.
        let client = super::idle::Idle::new(client, header_read_timeout.min(idle_timeout), idle_timeout);
        if let Err(error) = builder.serve_connection_with_upgrades(TokioIo::new(client), service).await {
            tracing::debug!(%error, "client connection ended");
        }
    }

    fn tls(&self) -> bool {
        self.upstream.tls.is_some()
    }

    /// One request through the request phases. A refusal of any phase is
    /// recorded (unless the phase did) and answered here, and only here.
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().as_str().to_owned();
        let path = request.uri().path().to_owned();
        let mut decision = self.flow.record(Kind::Request);
        decision.method = Some(method.clone());
        decision.path = Some(path.clone());
        decision.protocol = Some(if self.tls() { "https" } else { "http" }.to_owned());
        let mut exchange = Exchange { decision, method, path };
        match self.phases(&mut exchange, request).await {
            Ok(answer) => self.done(exchange.decision, answer),
            Err(refusal) => {
                if !refusal.is_recorded() {
                    let mut decision = exchange.decision;
                    decision.verdict = Verdict::Deny;
                    decision.rule.clone_from(&refusal.rule);
                    decision.reason.clone_from(&refusal.reason);
                    self.ctx.log.record(decision);
                }
                refusal.response()
            }
        }
    }

    /// The request phases in order.
    async fn phases(&self, exchange: &mut Exchange, mut request: Request<Incoming>) -> Result<Answer, Refusal> {
        if let Some(refusal) = &self.refusal {
            exchange.decision.host = self.flow.sni().map(str::to_owned);
            return Err(refusal.clone());
        }
        let head = self.request_head(&mut request, exchange).await?;
        let limit = head.ruling.max_body.filter(|_| info_len_unknown(&request)).map(BodyLimit::new);
        let upstream_request = self.upstream_request(request, &head.authority, head.upgrade.is_some(), limit.clone());
        let injected = self.request_body(upstream_request, &head.bound_host, exchange).await?;
        let (response, applied) = self.upstream_phase(injected, &head, limit.as_ref(), exchange).await?;
        self.response_head(response, head, applied, exchange)
    }

    /// The request head phase: the authority the request names (which is
    /// what the upstream will get), the name among it that is tied to the
    /// connection's address, the request policy, an operator's approval
    /// for an `ask`, and the upgrade asked for.
    async fn request_head(&self, request: &mut Request<Incoming>, exchange: &mut Exchange) -> Result<Head, Refusal> {
        let decision = &mut exchange.decision;
        let authority = authority::request_authority(request)?;
        let host = authority.host.clone();
        decision.host = Some(host.clone());
        decision.host_source = Some(if self.flow.sni().is_some() { HostSource::Sni } else { HostSource::Http });
        let ip = self.flow.destination.ip();
        let believed = authority::believe_request_host(&self.flow.sandbox.names, self.flow.sni(), &host, ip)?;
        if believed.is_none() {
            // Decided by the address alone: that is what the record (and an
            // operator's approval) names; the reason keeps the claim.
            decision.host = Some(ip.to_string());
            decision.host_source = Some(HostSource::Ip);
        }
        let scheme = if self.tls() { Scheme::Https } else { Scheme::Http };
        let body_len = hyper::body::Body::size_hint(request.body()).exact();
        let info = RequestInfo {
            method: &exchange.method,
            path: &exchange.path,
            scheme,
            headers: Some(request.headers()),
            body_len,
        };
        let policy = self.flow.sandbox.policy.load();
        let claimed = host.parse::<IpAddr>().is_err().then_some(host.as_str());
        let port = self.flow.destination.port();
        let ruling = authority::decide(claimed, believed.is_some(), ip, |name| {
            let query = ConnectQuery { host: name, ip, port };
            policy.evaluate_request(&query, &info)
        });
        decision.bundle = ruling.bundle.as_deref().map(str::to_owned);
        decision.rule = ruling.rule.to_string();
        decision.reason = ruling.reason.to_string();
        match ruling.verdict {
            PolicyVerdict::Allow => {}
            PolicyVerdict::Deny => return Err(Refusal::forbidden(&*ruling.rule, &*ruling.reason)),
            PolicyVerdict::Ask => super::hold(&self.ctx, decision).await?,
        }
        decision.would_deny = ruling.would_deny;

        let upgrade = match upgrade_of(request) {
            Upgrade::None => None,
            Upgrade::WebSocket => Some(hyper::upgrade::on(&mut *request)),
            Upgrade::Refused(reason) => return Err(Refusal::forbidden(rules::UPGRADE_REFUSED, reason)),
        };
        let bound_host = believed.unwrap_or_else(|| ip.to_string());
        Ok(Head { authority, bound_host, ruling, upgrade })
    }

    /// The request body phase, where credentials go in: placeholders in the
    /// head and body are swapped for the secrets bound to this request,
    /// `inject` bindings set their header or parameter, `SigV4` bindings
    /// sign.
    async fn request_body(
        &self,
        request: Request<UpstreamBody>,
        host: &str,
        exchange: &Exchange,
    ) -> Result<Injected, Refusal> {
        let refused = |leak: Leak| Refusal::forbidden(leak.rule(), leak.to_string());
        let (method, path) = (exchange.method.as_str(), exchange.path.as_str());
        let policy = self.flow.sandbox.policy.load();
        let placeholders = self.flow.sandbox.placeholders();
        let secrets = self.ctx.secrets.load();
        let credentials = RequestCredentials {
            specs: policy.credentials(),
            placeholders: &placeholders,
            secrets: &secrets,
            target: Target { host, method, path, tls: self.tls() },
        };
        let (mut parts, body) = request.into_parts();
        let mut applied = Applied::default();
        credentials.apply_to_head(&mut parts, &mut applied).map_err(refused)?;
        let signer = credentials.sigv4().map_err(refused)?;
        if !applied.is_empty() || signer.is_some() || credentials.body_rules().may_swap() {
            // A secret may go in: the answer must come back in a form the
            // scrub can read, so no compression is asked for (before any
            // signing, which covers the headers).
            parts.headers.remove(header::ACCEPT_ENCODING);
        }
        let declared = signer.as_ref().and_then(|_| sigv4::declared_payload(&Request::from_parts(parts.clone(), ())));
        let content_length =
            parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let read_whole = signer.is_some() && declared.is_none();
        let mut whole = None;
        let mut streamed = None;
        let body: UpstreamBody = if hyper::body::Body::is_end_stream(&body) {
            whole = Some(Bytes::new());
            body
        } else if read_whole || (!placeholders.is_empty() && content_length.is_some_and(|n| n <= READ_WHOLE_BODY)) {
            let limit = if read_whole { sigv4::MAX_SIGNED_BODY } else { READ_WHOLE_BODY as usize };
            let bytes = match read_body(body, limit).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    let name = signer.as_ref().map_or("", |(name, _, _)| name);
                    return Err(refused(Leak::Unusable {
                        secret: name.to_owned(),
                        why: format!(
                            "a body over {} MiB must declare its hash in x-amz-content-sha256 to be signed",
                            sigv4::MAX_SIGNED_BODY >> 20
                        ),
                    }));
                }
                Err(error) => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        rules::CLIENT_FAILED,
                        format!("reading the request body: {error}"),
                    ))
                }
            };
            let mut swapper = Swapper::new(credentials.body_rules());
            let bytes = swapper.feed(bytes, true).map_err(refused)?;
            applied.merge(swapper.applied);
            if content_length.is_some() || !self.upstream.h2 {
                parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            }
            whole = Some(bytes.clone());
            Full::new(bytes).map_err(|never| match never {}).boxed()
        } else {
            let rules = credentials.body_rules();
            // Swapping changes the length: send it chunked (h1) or unsized
            // (h2). Not when the client declared a payload hash for SigV4:
            // that hash (and S3's need for a length) stands.
            if rules.may_swap() && declared.is_none() {
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            let (body, outcome) = SwapBody::new(body, rules);
            let (log, mut record) = (self.ctx.log.clone(), exchange.decision.clone());
            let outcome_for_log = outcome.clone();
            streamed = Some(outcome);
            body.on_leak(move || {
                let leak = crate::sync::lock(&outcome_for_log).leak.clone();
                if let Some(leak) = leak {
                    record.verdict = Verdict::Deny;
                    leak.rule().clone_into(&mut record.rule);
                    record.reason = format!("request body cut: {leak}");
                    log.record(record);
                }
            })
            .boxed()
        };
        let mut request = Request::from_parts(parts, body);
        if let Some((name, spec, secret)) = signer {
            let authority = request
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or_else(|| request.uri().authority().map(ToString::to_string))
                .unwrap_or_else(|| host.to_owned());
            let payload = match (declared, &whole) {
                (Some(hash), _) => sigv4::Payload::Declared(hash),
                (None, Some(bytes)) => sigv4::Payload::Bytes(bytes),
                (None, None) => sigv4::Payload::Declared("UNSIGNED-PAYLOAD".to_owned()),
            };
            sigv4::sign_request(&mut request, &authority, spec, secret, payload)
                .map_err(|why| refused(Leak::Unusable { secret: name.to_owned(), why }))?;
            applied.add_values(name, &sigv4::secret_parts(secret), placeholders.get(name));
        }
        Ok(Injected { request, applied, streamed })
    }

    /// The upstream phase: the request goes out on the connection's one
    /// upstream connection. A streamed body cut on the way (a placeholder
    /// that may not go there, a rule's `max_body`) is refused here.
    async fn upstream_phase(
        &self,
        injected: Injected,
        head: &Head,
        limit: Option<&BodyLimit>,
        exchange: &mut Exchange,
    ) -> Result<(Response<Incoming>, Applied), Refusal> {
        let Injected { request, mut applied, streamed } = injected;
        let sent = self.send(request).await;
        // A streamed body cut for a placeholder that may not go there: the
        // body already recorded the refusal.
        let cut = streamed.as_ref().and_then(|outcome| {
            let mut outcome = crate::sync::lock(outcome);
            applied.merge(std::mem::take(&mut outcome.applied));
            outcome.leak.clone()
        });
        if let Some(leak) = cut {
            return Err(Refusal::forbidden(leak.rule(), leak.to_string()).recorded());
        }
        exchange.decision.credentials.clone_from(&applied.names);
        match sent {
            Ok(response) => Ok((response, applied)),
            Err(_) if limit.is_some_and(BodyLimit::exceeded) => {
                let reason = format!(
                    "the request body grew past {} bytes, the max_body of rule {}; the upstream got no complete request",
                    head.ruling.max_body.unwrap_or_default(),
                    head.ruling.rule
                );
                Err(Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, &*head.ruling.rule, reason))
            }
            Err(error) => Err(Refusal::upstream(error.to_string())),
        }
    }

    /// The response head phase: a response that cannot be scrubbed of the
    /// secrets its request carried is refused, an upgrade is handed on to
    /// the WebSocket relay, hop-by-hop headers go and secrets are scrubbed
    /// from the rest; then the response body phase.
    fn response_head(
        &self,
        response: Response<Incoming>,
        head: Head,
        applied: Applied,
        exchange: &Exchange,
    ) -> Result<Answer, Refusal> {
        if let Some(refusal) = unscrubbable(&response, &applied, head.upgrade.is_some()) {
            return Err(refusal);
        }
        let (mut parts, body) = response.into_parts();
        if let (Some(client), StatusCode::SWITCHING_PROTOCOLS) = (head.upgrade, parts.status) {
            let checks = self.frame_checks(&head.bound_host, &exchange.method, &exchange.path, &applied);
            let upstream = hyper::upgrade::on(Response::from_parts(parts.clone(), ()));
            let response = Response::from_parts(parts, Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
            return Ok(Answer { response, upgraded: Some(Upgraded { client, upstream, checks }) });
        }
        strip_hop_by_hop(&mut parts.headers, false);
        if applied.scrub.is_empty() {
            return Ok(Answer { response: Response::from_parts(parts, body.boxed()), upgraded: None });
        }
        // The upstream got real secrets: none may come back to the sandbox.
        let pairs = applied.scrub;
        for value in parts.headers.values_mut() {
            let scrubbed = crate::credentials::scrub::scrub(value.as_bytes(), &pairs);
            if scrubbed != value.as_bytes() {
                *value = HeaderValue::from_bytes(&scrubbed).unwrap_or(HeaderValue::from_static("<scrubbed>"));
            }
        }
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Answer { response: Response::from_parts(parts, Self::response_body(body, pairs)), upgraded: None })
    }

    /// The response body phase: what streams back to the sandbox, scrubbed
    /// of the secrets its request carried.
    fn response_body(body: Incoming, scrub: Vec<(Vec<u8>, Vec<u8>)>) -> Body {
        ScrubBody::new(body, scrub).boxed()
    }

    /// The done phase of a forwarded request: its one allow record, then
    /// the WebSocket relay of an upgrade (whose cut is recorded as a
    /// denial of the same request).
    fn done(&self, mut decision: Decision, answer: Answer) -> Response<Body> {
        let upgraded = answer.upgraded.map(|upgraded| (upgraded, decision.clone()));
        decision.verdict = Verdict::Allow;
        self.ctx.log.record(decision);
        if let Some((Upgraded { client, upstream, checks }, record)) = upgraded {
            tokio::spawn(relay_websocket(self.ctx.log.clone(), record, client, upstream, checks));
        }
        answer.response
    }

    /// What the frames of an upgraded connection are checked against: the
    /// placeholders this request's bindings allow (swapped) or refuse, and
    /// every secret that may go upstream, scrubbed on the way back.
    fn frame_checks(&self, host: &str, method: &str, path: &str, applied: &Applied) -> websocket::FrameChecks {
        let policy = self.flow.sandbox.policy.load();
        let placeholders = self.flow.sandbox.placeholders();
        let secrets = self.ctx.secrets.load();
        let credentials = RequestCredentials {
            specs: policy.credentials(),
            placeholders: &placeholders,
            secrets: &secrets,
            target: Target { host, method, path, tls: self.tls() },
        };
        let rules = credentials.body_rules();
        let mut scrub = applied.scrub.clone();
        scrub.extend(rules.swappable());
        websocket::FrameChecks { rules, scrub }
    }

    /// The request as the upstream gets it: hop-by-hop headers gone, and
    /// the authority that was checked as its Host (h1) or `:authority` (h2),
    /// whatever the client wrote there.
    fn upstream_request(
        &self,
        request: Request<Incoming>,
        authority: &authority::Authority,
        upgrade: bool,
        limit: Option<BodyLimit>,
    ) -> Request<UpstreamBody> {
        let (mut parts, body) = request.into_parts();
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_owned();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(header::EXPECT);
        if upgrade {
            // Extensions (permessage-deflate) would hide frame payloads from
            // the credential checks.
            parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
        }
        parts.headers.remove(header::HOST);
        if self.upstream.h2 {
            let scheme = if self.tls() { "https" } else { "http" };
            parts.uri = Uri::builder()
                .scheme(scheme)
                .authority(authority.value.as_str())
                .path_and_query(path_and_query)
                .build()
                .unwrap_or_default();
            parts.version = Version::HTTP_2;
        } else {
            if let Ok(value) = HeaderValue::from_str(&authority.value) {
                parts.headers.insert(header::HOST, value);
            }
            parts.uri = path_and_query.parse().unwrap_or_default();
            parts.version = Version::HTTP_11;
        }
        let body = match limit {
            Some(limit) => limit.wrap(body),
            None => body.map_err(BoxError::from).boxed(),
        };
        Request::from_parts(parts, body)
    }

    async fn send(&self, request: Request<UpstreamBody>) -> Result<Response<Incoming>, UpstreamError> {
        if let Some(h2) = self.h2_sender.get() {
            let mut h2 = h2.clone();
            return h2.send_request(request).await.map_err(UpstreamError::Request);
        }
        // HTTP/1.1: one request at a time on the connection; reopen it when
        // the upstream closed it between requests.
        let mut slot = self.sender.lock().await;
        let reusable = matches!(&*slot, Some(Sender::H1(sender)) if !sender.is_closed());
        if !reusable {
            let (io, _) = self.upstream.connect(&self.ctx).await?;
            *slot = Some(self.upstream.handshake(io).await?);
        }
        let Some(Sender::H1(sender)) = slot.as_mut() else {
            unreachable!("an HTTP/1.1 sender was just put in the slot");
        };
        sender.ready().await.map_err(UpstreamError::Connection)?;
        sender.send_request(request).await.map_err(UpstreamError::Request)
    }
}

/// WebSocket: relays the two upgraded streams frame by frame under
/// `checks`; a cut is recorded as a denial of the upgrade's request.
async fn relay_websocket(
    log: Arc<crate::audit::DecisionLog>,
    mut record: Decision,
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    checks: websocket::FrameChecks,
) {
    let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else { return };
    if let Some(cut) = websocket::relay(TokioIo::new(client), TokioIo::new(upstream), checks).await {
        record.verdict = Verdict::Deny;
        cut.rule().clone_into(&mut record.rule);
        record.reason = format!("WebSocket connection cut: {cut}");
        record.credentials.clear();
        log.record(record);
    }
}

fn info_len_unknown<B: hyper::body::Body>(request: &Request<B>) -> bool {
    request.body().size_hint().exact().is_none()
}

/// A rule's `max_body` on a body streamed without a length: counts what
/// passes and fails the body once it grows past the limit.
#[derive(Clone)]
struct BodyLimit {
    max: u64,
    exceeded: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
struct TooLarge(u64);

impl BodyLimit {
    fn new(max: u64) -> Self {
        Self { max, exceeded: Arc::default() }
    }

    fn exceeded(&self) -> bool {
        self.exceeded.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn wrap(self, body: Incoming) -> UpstreamBody {
        Limited { inner: Some(body), seen: 0, limit: self }.boxed()
    }
}

/// How long the rest of a cut-off body is read and thrown away, so the
/// client (still sending) gets the 413 instead of a reset connection.
const DRAIN_CUT_BODY: std::time::Duration = std::time::Duration::from_secs(10);

struct Limited {
    /// Taken when the limit trips: the rest is drained, never forwarded.
    inner: Option<Incoming>,
    seen: u64,
    limit: BodyLimit,
}

impl hyper::body::Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return std::task::Poll::Ready(Some(Err(Box::new(TooLarge(this.limit.max)))));
        };
        let frame = match std::task::ready!(std::pin::Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return std::task::Poll::Ready(Some(Err(error.into()))),
            None => return std::task::Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            this.seen += data.len() as u64;
            if this.seen > this.limit.max {
                this.limit.exceeded.store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(mut rest) = this.inner.take() {
                    tokio::spawn(async move {
                        let drain = async { while let Some(Ok(_)) = rest.frame().await {} };
                        let _ = tokio::time::timeout(DRAIN_CUT_BODY, drain).await;
                    });
                }
                return std::task::Poll::Ready(Some(Err(Box::new(TooLarge(this.limit.max)))));
            }
        }
        std::task::Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.as_ref().map(hyper::body::Body::size_hint).unwrap_or_default()
    }
}

/// The whole body, or `None` if it is longer than `limit`.
async fn read_body(mut body: UpstreamBody, limit: usize) -> Result<Option<Bytes>, BoxError> {
    let mut whole = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if whole.len() + data.len() > limit {
                return Ok(None);
            }
            whole.extend_from_slice(&data);
        }
    }
    Ok(Some(whole.freeze()))
}

/// What a request asks to upgrade to.
enum Upgrade {
    None,
    WebSocket,
    /// Any other protocol (h2c, raw tunnels): sluice could not inspect it.
    Refused(String),
}

/// Only WebSocket is honoured: its frames stay under the credential checks.
fn upgrade_of<B>(request: &Request<B>) -> Upgrade {
    let asks = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let tokens: Vec<String> = request
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_owned()).collect::<Vec<_>>())
        .filter(|t| !t.is_empty())
        .collect();
    if !asks || tokens.is_empty() {
        // Without `Connection: upgrade` an Upgrade header is dropped as hop-by-hop.
        return Upgrade::None;
    }
    if request.version() == Version::HTTP_11 && tokens.len() == 1 && tokens[0].eq_ignore_ascii_case("websocket") {
        return Upgrade::WebSocket;
    }
    let named = tokens.iter().map(|t| format!("{:?}", header_safe(t))).collect::<Vec<_>>().join(", ");
    Upgrade::Refused(format!(
        "an upgrade to {named} was asked for; sluice only relays WebSocket upgrades, whose frames it can inspect"
    ))
}

/// A response sluice cannot scrub although the request carried a secret:
/// compressed (an upstream that ignored the missing Accept-Encoding), or an
/// upgrade whose answer turned on a WebSocket extension.
fn unscrubbable<B>(response: &Response<B>, applied: &Applied, upgrade: bool) -> Option<Refusal> {
    let refusal = |reason: String| Refusal::new(StatusCode::BAD_GATEWAY, rules::UNSCRUBBABLE_RESPONSE, reason);
    if upgrade && response.headers().contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Some(refusal("the upstream turned on a WebSocket extension that sluice did not offer".into()));
    }
    if applied.scrub.is_empty() {
        return None;
    }
    let encoding = response.headers().get_all(header::CONTENT_ENCODING).iter().find_map(|v| {
        let v = v.to_str().unwrap_or("?").trim();
        (!v.is_empty() && !v.eq_ignore_ascii_case("identity")).then(|| header_safe(v))
    })?;
    Some(refusal(format!(
        "the upstream answered a request that carried a secret with a {encoding:?}-encoded body although sluice \
         asked for none; sluice passes on only what it can scrub"
    )))
}

/// Headers that belong to one hop, not the request (RFC 9110 7.6.1). An
/// upgrade keeps `Connection: upgrade` and `Upgrade` so the upstream sees it.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && *name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate"] {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    // `te: trailers` is how gRPC asks for trailers; any other TE is hop-by-hop.
    let keep_te = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !keep_te {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_upgrades_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));

        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(headers.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(headers.get(header::TE).unwrap(), "trailers");
    }

    #[test]
    fn only_websocket_upgrades_are_honoured() {
        let upgrade = |connection: &str, token: &str| {
            let request = Request::builder()
                .header(header::CONNECTION, connection)
                .header(header::UPGRADE, token)
                .body(())
                .unwrap();
            upgrade_of(&request)
        };
        assert!(matches!(upgrade("Upgrade", "WebSocket"), Upgrade::WebSocket));
        assert!(matches!(upgrade("keep-alive, upgrade", "websocket"), Upgrade::WebSocket));
        assert!(matches!(upgrade("Upgrade, HTTP2-Settings", "h2c"), Upgrade::Refused(r) if r.contains("h2c")));
        assert!(matches!(upgrade("upgrade", "websocket, x-tunnel"), Upgrade::Refused(_)));
        // Without `Connection: upgrade` the header is dropped, nothing upgrades.
        assert!(matches!(upgrade("keep-alive", "h2c"), Upgrade::None));
    }
}
