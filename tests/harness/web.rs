//! Upstream web servers for tests: HTTP/1.1 and h2 (TLS with a test CA, or
//! plain), run inside a test network namespace. They record every request
//! they receive, so tests can show what reached the "internet".
//!
//! Endpoints: `/echo` (describes the request), `/big?bytes=N` (streams N
//! bytes), `/upload` (counts and hashes the body), `/grpc` (echoes the body
//! with gRPC trailers), `/ws` (WebSocket echo; a text frame `authorization?`
//! is answered with the upgrade request's Authorization header, as a
//! server that reflects what it got would).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{body::Frame, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::TestNet;

/// A CA for test upstreams (never a sandbox's CA).
pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "sluice test upstream CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, &self.cert_pem).unwrap();
    }

    /// A leaf for `names` as PEM (certificate, key), for servers outside Rust.
    pub fn leaf_pem(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A server config for `names`; `expired` makes a certificate that ended
    /// yesterday.
    pub fn server_config(&self, names: &[&str], expired: bool) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        if expired {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(10);
            params.not_after = now - time::Duration::days(1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(sluice::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// The query string as received (empty when none).
    pub query: String,
    pub version: String,
    pub host: String,
    pub body_len: usize,
    /// The body as received (empty when the request was cut).
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

pub struct WebServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    /// Payloads of the WebSocket frames clients sent, unmasked.
    frames: Frames,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl WebServer {
    /// Serves on `addr` inside `net`, with TLS when `tls` is given.
    pub fn start(net: &TestNet, addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let frames = Frames::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let recorder = seen.clone();
        let frame_recorder = frames.clone();
        net.spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                let serve = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else { continue };
                        let (tls, recorder, frames) = (tls.clone(), recorder.clone(), frame_recorder.clone());
                        tokio::spawn(async move {
                            match tls {
                                Some(config) => {
                                    if let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
                                        serve_http(stream, recorder, frames).await;
                                    }
                                }
                                None => serve_http(stream, recorder, frames).await,
                            }
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            });
        });
        let addr = ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Self { addr, seen, frames, stop: Some(stop) }
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// The WebSocket frame payloads received so far (unmasked).
    pub fn ws_frames(&self) -> Vec<Vec<u8>> {
        self.frames.lock().unwrap().clone()
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type Frames = Arc<Mutex<Vec<Vec<u8>>>>;

async fn serve_http<S>(stream: S, seen: Arc<Mutex<Vec<SeenRequest>>>, frames: Frames)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let (seen, frames) = (seen.clone(), frames.clone());
        async move { Ok::<_, Infallible>(respond(request, &seen, frames).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).boxed()
}

async fn respond(
    mut request: Request<hyper::body::Incoming>,
    seen: &Mutex<Vec<SeenRequest>>,
    frames: Frames,
) -> Response<Body> {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let version = format!("{:?}", request.version());
    let host = request
        .uri()
        .authority()
        .map(ToString::to_string)
        .or_else(|| request.headers().get("host").and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_default();
    let headers: Vec<(String, String)> =
        request.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect();
    let record = |body: &[u8]| {
        seen.lock().unwrap().push(SeenRequest {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            version: version.clone(),
            host: host.clone(),
            body_len: body.len(),
            body: body.to_vec(),
            headers: headers.clone(),
        });
    };
    if path == "/ws" {
        record(&[]);
        return websocket(&mut request, frames);
    }
    let body = request.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    record(&body);
    match path.as_str() {
        "/big" => {
            let total: usize = query.strip_prefix("bytes=").and_then(|n| n.parse().ok()).unwrap_or(1 << 20);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = (0..total.div_ceil(chunk.len())).map(move |i| {
                let len = chunk.len().min(total - i * chunk.len());
                Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
            });
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        }
        "/upload" => Response::new(full(format!("received={}\n", body.len()))),
        // Echoes the request head back, the way debug endpoints do.
        "/reflect" => {
            let mut text = format!("query={query}\n");
            for (name, value) in &headers {
                use std::fmt::Write as _;
                let _ = writeln!(text, "{name}: {value}");
            }
            Response::new(full(text))
        }
        "/grpc" => {
            let trailers = {
                let mut map = hyper::HeaderMap::new();
                map.insert("grpc-status", "0".parse().unwrap());
                map.insert("grpc-message", "sluice-ok".parse().unwrap());
                map
            };
            let frames = vec![Ok::<_, Infallible>(Frame::data(body)), Ok(Frame::trailers(trailers))];
            Response::builder()
                .header("content-type", "application/grpc")
                .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
                .unwrap()
        }
        _ => Response::new(full(format!(
            "method={method} path={path} version={version} host={host} body={}\n",
            body.len()
        ))),
    }
}

/// Answers a WebSocket handshake and echoes text frames back, recording
/// each payload; `authorization?` gets the handshake's Authorization.
fn websocket(request: &mut Request<hyper::body::Incoming>, frames: Frames) -> Response<Body> {
    use base64::Engine as _;
    use sha1::Digest as _;
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return Response::builder().status(StatusCode::BAD_REQUEST).body(full("not a websocket request")).unwrap();
    };
    let mut hasher = sha1::Sha1::new();
    hasher.update(key.as_bytes());
    hasher.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(hasher.finalize());
    let authorization = request.headers().get("authorization").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut io = TokioIo::new(upgraded);
        loop {
            let mut head = [0u8; 2];
            if io.read_exact(&mut head).await.is_err() {
                return;
            }
            let opcode = head[0] & 0x0f;
            let mut len = u64::from(head[1] & 0x7f);
            if len == 126 {
                let mut ext = [0u8; 2];
                let _ = io.read_exact(&mut ext).await;
                len = u64::from(u16::from_be_bytes(ext));
            } else if len == 127 {
                let mut ext = [0u8; 8];
                let _ = io.read_exact(&mut ext).await;
                len = u64::from_be_bytes(ext);
            }
            let mut mask = [0u8; 4];
            if head[1] & 0x80 != 0 && io.read_exact(&mut mask).await.is_err() {
                return;
            }
            let mut payload = vec![0u8; len as usize];
            if io.read_exact(&mut payload).await.is_err() {
                return;
            }
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
            frames.lock().unwrap().push(payload.clone());
            if payload == b"authorization?" {
                payload.clone_from(&authorization);
            }
            if opcode == 8 {
                let _ = io.write_all(&[0x88, 0]).await;
                return;
            }
            let mut frame = vec![0x80 | opcode];
            if payload.len() < 126 {
                frame.push(payload.len() as u8);
            } else {
                frame.push(126);
                frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            frame.extend_from_slice(&payload);
            if io.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept)
        .body(full(""))
        .unwrap()
}
