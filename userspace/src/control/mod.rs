//! The control API: HTTP/JSON on a root-only unix socket.
//!
//! | method | path                     | does                                  |
//! |--------|--------------------------|---------------------------------------|
//! | GET    | /v1/health               | daemon identity and kernel features   |
//! | GET    | /v1/sandboxes            | sandboxes with their counters         |
//! | POST   | /v1/sandboxes            | register a sandbox ([`RegisterRequest`]) |
//! | DELETE | /v1/sandboxes/{name}     | remove a sandbox (kills what remains in a cgroup sluice made) |
//! | GET    | /v1/sandboxes/{name}/ca  | the sandbox's CA certificate (PEM)    |
//! | GET    | /v1/sandboxes/{name}/profile | the profile in force ([`ProfileView`]) |
//! | PUT    | /v1/sandboxes/{name}/profile | replace its profile ([`ProfileSource`]); next request uses it |
//! | POST   | /v1/sandboxes/{name}/rules | add a rule (JSON [`RuleSpec`](crate::policy::RuleSpec)) |
//! | DELETE | /v1/sandboxes/{name}/rules/{rule} | remove a rule by name          |
//! | POST   | /v1/sandboxes/{name}/explain | which rule decides a request ([`ExplainRequest`]) and why |
//! | POST   | /v1/profiles/reload      | read every profile file again (as SIGHUP does) |
//! | GET    | /v1/bundles              | the capability bundle library, with what is revoked |
//! | POST   | /v1/bundles/{name}/revoke | take a bundle from every sandbox, now and after restarts |
//! | DELETE | /v1/bundles/{name}/revoke | give it back                          |
//! | GET    | /v1/approvals            | requests held by `ask` rules          |
//! | POST   | /v1/approvals/{id}       | answer one ([`Answer`](crate::approvals::Answer)) |
//! | POST   | /v1/secrets/reload       | re-read secrets (rotation); next request uses them |
//! | GET    | /v1/secrets              | names, origins, revocations (never values) |
//! | PUT    | /v1/secrets/{name}       | set a value (`{"value": …}`); next request uses it |
//! | DELETE | /v1/secrets/{name}       | revoke now; requests needing it are refused |
//! | GET    | /v1/events[?sandbox=N]   | follow decisions as JSON lines        |
//!
//! The socket is mode 0600 and every connection's peer is checked: it must
//! be root and must not sit in an enforced cgroup, so a sandboxed process
//! (even one running as root) cannot change its own policy.

pub mod client;

use std::{convert::Infallible, path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::{
    daemon::Daemon,
    sandbox::{ProfileSource, SandboxRecord},
};

/// Body of `POST /v1/sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// Sandbox name; also the cgroup directory name when `cgroup` is absent.
    pub name: String,
    /// An existing cgroup (absolute, or relative to the cgroup v2 root) to
    /// enroll instead of making one. Must be under the enforced parent.
    #[serde(default)]
    pub cgroup: Option<std::path::PathBuf>,
    #[serde(default = "builtin")]
    pub profile: ProfileSource,
    /// `container` for a sandbox whose processes run in a network namespace
    /// of their own (made under the daemon's container parent).
    #[serde(default)]
    pub placement: crate::sandbox::Placement,
}

fn builtin() -> ProfileSource {
    ProfileSource::Builtin
}

/// The profile a sandbox enforces, as the text it was compiled from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileView {
    pub sandbox: String,
    pub profile_name: String,
    /// Where it came from: `builtin:default`, a file, or an API edit.
    pub origin: String,
    /// The file it is read from (and re-read when it changes), if any.
    pub file: Option<std::path::PathBuf>,
    /// TOML; for a file, its last good content.
    pub text: String,
}

/// A sandbox as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxStatus {
    #[serde(flatten)]
    pub record: SandboxRecord,
    pub profile_name: String,
    pub processes: usize,
    pub redirected: u64,
    pub dns: u64,
    pub refused: u64,
    pub dropped_packets: u64,
    /// Variables for the sandbox's commands: placeholders of its
    /// credentials (variable -> placeholder).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub instance: String,
    pub pid: u32,
    pub adopted: bool,
    pub lsm: bool,
    pub cgroup_parent: std::path::PathBuf,
    pub proxy_port: u16,
    pub decision_log: Option<std::path::PathBuf>,
    /// Where the daemon reads secrets from (paths only), so `sluice run`
    /// can hide them from its command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_dir: Option<std::path::PathBuf>,
    /// The audit signing key file (path only), to hide it from commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_key: Option<std::path::PathBuf>,
}

/// Error body of every failed call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

type Body = BoxBody<Bytes, Infallible>;

/// Binds the socket (root-only) and serves until the task is aborted.
pub async fn serve(path: &Path, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let listener = bind(path)?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "control accept failed");
                continue;
            }
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let refusal = check_peer(&stream, &daemon);
            let service = service_fn(move |request| {
                let daemon = daemon.clone();
                let refusal = refusal.clone();
                async move {
                    Ok::<_, Infallible>(match refusal {
                        Some(why) => error(StatusCode::FORBIDDEN, why),
                        None => route(&daemon, request).await,
                    })
                }
            });
            if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%error, "control connection ended");
            }
        });
    }
}

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        // Sandboxes read their CA bundles from beside the socket; the socket
        // itself is root-only and checks every caller.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    // A stale socket from a daemon that died; a live daemon was ruled out by
    // the caller, which tried to connect first.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Why this peer may not use the API, if it may not.
fn check_peer(stream: &UnixStream, daemon: &Daemon) -> Option<String> {
    let Ok(cred) = stream.peer_cred() else {
        return Some("cannot identify the caller".into());
    };
    if cred.uid() != 0 {
        return Some("the control API is for root only".into());
    }
    let Some(pid) = cred.pid() else {
        return Some("cannot identify the caller's process".into());
    };
    match crate::sandbox::cgroup::of_pid(pid as u32) {
        Ok(cgroup) if daemon.is_enforced_cgroup(&cgroup) => {
            Some(format!("process {pid} is inside a sandbox and may not use the control API"))
        }
        Ok(_) => None,
        Err(_) => Some(format!("cannot read the cgroup of process {pid}")),
    }
}

async fn route(daemon: &Arc<Daemon>, request: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let request = match route_policy(daemon, request, &segments).await {
        Ok(response) => return response,
        Err(request) => request,
    };
    match (request.method().clone(), segments.as_slice()) {
        (Method::GET, ["v1", "health"]) => json(StatusCode::OK, &daemon.health()),
        (Method::GET, ["v1", "sandboxes"]) => json(StatusCode::OK, &daemon.statuses()),
        (Method::POST, ["v1", "sandboxes"]) => {
            let register: RegisterRequest = match read_json(request).await {
                Ok(register) => register,
                Err(response) => return response,
            };
            match daemon.register(register).await {
                Ok(status) => json(StatusCode::CREATED, &status),
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            }
        }
        (Method::DELETE, ["v1", "sandboxes", name]) => match daemon.unregister(name).await {
            Ok(true) => Response::builder().status(StatusCode::NO_CONTENT).body(empty()).expect("valid response"),
            Ok(false) => error(StatusCode::NOT_FOUND, format!("no sandbox named {name:?}")),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        },
        (Method::GET, ["v1", "sandboxes", name, "profile"]) => match daemon.profile_view(name) {
            Some(view) => json(StatusCode::OK, &view),
            None => error(StatusCode::NOT_FOUND, format!("no sandbox named {name:?}")),
        },
        (Method::PUT, ["v1", "sandboxes", name, "profile"]) => {
            let source: ProfileSource = match read_json(request).await {
                Ok(source) => source,
                Err(response) => return response,
            };
            match daemon.set_profile(name, source).await {
                Ok(status) => json(StatusCode::OK, &status),
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            }
        }
        (Method::POST, ["v1", "sandboxes", name, "rules"]) => {
            let body = match read_body(request).await {
                Ok(body) => body,
                Err(why) => return error(StatusCode::BAD_REQUEST, why),
            };
            let rule: crate::policy::RuleSpec = match serde_json::from_slice(&body) {
                Ok(rule) => rule,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid rule: {e}")),
            };
            let edited = daemon
                .edit_profile(name, |profile| {
                    // Deny rules win wherever they are; allow rules go first so
                    // a rule added now names the decisions it makes.
                    match rule.action {
                        crate::policy::Action::Allow => profile.rules.insert(0, rule),
                        crate::policy::Action::Ask | crate::policy::Action::Deny => profile.rules.push(rule),
                    }
                    Ok(())
                })
                .await;
            match edited {
                Ok(status) => json(StatusCode::OK, &status),
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            }
        }
        (Method::DELETE, ["v1", "sandboxes", name, "rules", rule]) => {
            let rule = rule.replace("%2F", "/").replace("%20", " ").replace("%25", "%");
            let edited = daemon
                .edit_profile(name, |profile| {
                    let before = profile.rules.len();
                    profile.rules.retain(|r| r.name.as_deref() != Some(rule.as_str()));
                    anyhow::ensure!(profile.rules.len() < before, "the profile has no rule named {rule:?}");
                    Ok(())
                })
                .await;
            match edited {
                Ok(status) => json(StatusCode::OK, &status),
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            }
        }
        (Method::GET, ["v1", "sandboxes", name, "ca"]) => match daemon.registry().by_name(name) {
            Some(sandbox) => Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/x-pem-file")
                .body(Full::new(Bytes::from(sandbox.tls.ca.cert_pem().to_owned())).boxed())
                .expect("valid response"),
            None => error(StatusCode::NOT_FOUND, format!("no sandbox named {name:?}")),
        },
        (Method::POST, ["v1", "secrets", "reload"]) => match daemon.reload_secrets() {
            Ok(count) => json(StatusCode::OK, &serde_json::json!({ "secrets": count })),
            Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        },
        (method, ["v1", "secrets", ..]) => secrets(daemon, &method, &segments[2..], request).await,
        (Method::GET, ["v1", "events"]) => {
            let sandbox = query.split('&').find_map(|kv| kv.strip_prefix("sandbox=")).map(str::to_owned);
            events(daemon, sandbox)
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {} {path}", request.method())),
    }
}

/// Policy endpoints: explain, profile reload, bundles, approvals. Hands the
/// request back when it is for another endpoint.
async fn route_policy(
    daemon: &Arc<Daemon>,
    request: Request<hyper::body::Incoming>,
    segments: &[&str],
) -> Result<Response<Body>, Request<hyper::body::Incoming>> {
    Ok(match (request.method().clone(), segments) {
        (Method::POST, ["v1", "sandboxes", name, "explain"]) => {
            let request: ExplainRequest = match read_json(request).await {
                Ok(request) => request,
                Err(response) => return Ok(response),
            };
            match daemon.registry().by_name(name) {
                Some(sandbox) => match explain(&sandbox, &request) {
                    Ok(explanation) => json(StatusCode::OK, &explanation),
                    Err(why) => error(StatusCode::BAD_REQUEST, why),
                },
                None => error(StatusCode::NOT_FOUND, format!("no sandbox named {name:?}")),
            }
        }
        (Method::POST, ["v1", "profiles", "reload"]) => {
            let outcomes: Vec<serde_json::Value> = daemon
                .reload_profiles(true)
                .await
                .into_iter()
                .map(|(sandbox, outcome)| match outcome {
                    Ok(changed) => serde_json::json!({ "sandbox": sandbox, "changed": changed }),
                    Err(error) => serde_json::json!({ "sandbox": sandbox, "error": error }),
                })
                .collect();
            json(StatusCode::OK, &outcomes)
        }
        (Method::GET, ["v1", "bundles"]) => {
            let revoked = daemon.revoked();
            let bundles: Vec<serde_json::Value> = crate::policy::bundles::names()
                .filter_map(|name| crate::policy::bundles::get(name).ok())
                .map(|b| {
                    serde_json::json!({
                        "name": b.name,
                        "description": b.description,
                        "revoked": revoked.contains(&b.name),
                        "rules": b.rules,
                    })
                })
                .collect();
            json(StatusCode::OK, &bundles)
        }
        (method @ (Method::POST | Method::DELETE), ["v1", "bundles", name, "revoke"]) => {
            let revoke = method == Method::POST;
            match daemon.set_bundle_revoked(name, revoke).await {
                Ok(sandboxes) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "bundle": name, "revoked": revoke, "sandboxes": sandboxes }),
                ),
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            }
        }
        (Method::GET, ["v1", "approvals"]) => json(StatusCode::OK, &daemon.approvals().list()),
        (Method::POST, ["v1", "approvals", id]) => {
            let Ok(id) = id.parse::<u64>() else {
                return Ok(error(StatusCode::BAD_REQUEST, format!("{id:?} is not an approval id")));
            };
            let answer: crate::approvals::Answer = match read_json(request).await {
                Ok(answer) => answer,
                Err(response) => return Ok(response),
            };
            match daemon.answer_approval(id, answer).await {
                Ok(pending) => json(StatusCode::OK, &pending),
                Err(e) => error(StatusCode::NOT_FOUND, format!("{e:#}")),
            }
        }
        _ => return Err(request),
    })
}

/// Body of `POST /v1/sandboxes/{name}/explain`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ExplainRequest {
    #[serde(default = "get")]
    pub method: String,
    /// `https://host[:port]/path` (or `http://`).
    pub url: String,
    /// The destination address; default: an address the sandbox resolved
    /// for the host, else the IP in the URL, else 192.0.2.1 (documentation
    /// space, counted as public), which the answer says.
    #[serde(default)]
    pub ip: Option<std::net::IpAddr>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub body_size: Option<u64>,
}

fn get() -> String {
    "GET".into()
}

fn explain(sandbox: &crate::sandbox::Sandbox, request: &ExplainRequest) -> Result<crate::policy::Explanation, String> {
    let policy = sandbox.policy.load();
    let ip = request.ip.or_else(|| {
        let url: hyper::Uri = request.url.parse().ok()?;
        sandbox.names.address_of(url.host()?)
    });
    crate::policy::explain_url(&policy, &request.method, &request.url, ip, &request.headers, request.body_size)
}

async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<hyper::body::Incoming>,
) -> Result<T, Response<Body>> {
    let body = read_body(request).await.map_err(|why| error(StatusCode::BAD_REQUEST, why))?;
    serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")))
}

/// `/v1/secrets/...` (other than reload): list, set, revoke. Values come in
/// and never go out.
async fn secrets(
    daemon: &Daemon,
    method: &Method,
    rest: &[&str],
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    #[derive(Deserialize)]
    struct SetSecret {
        value: String,
    }
    match (method, rest) {
        (&Method::GET, []) => json(StatusCode::OK, &daemon.secrets()),
        (&Method::PUT, [name]) => {
            let mut body = match read_body(request).await {
                Ok(body) => body.to_vec(),
                Err(why) => return error(StatusCode::BAD_REQUEST, why),
            };
            // The parse error never quotes the body: it holds the value.
            let parsed = serde_json::from_slice::<SetSecret>(&body)
                .map_err(|_| "the body must be {\"value\": \"...\"}".to_owned());
            zeroize::Zeroize::zeroize(&mut body);
            let result = parsed
                .map_err(anyhow::Error::msg)
                .and_then(|set| daemon.set_secret(name, crate::credentials::Secret::new(set.value)));
            match result {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "secret": name, "set": true })),
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            }
        }
        (&Method::DELETE, [name]) => match daemon.revoke_secret(name) {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({ "secret": name, "revoked": true })),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        },
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {method} /v1/secrets/{}", rest.join("/"))),
    }
}

/// Request bodies are small JSON documents; anything larger is refused.
const MAX_BODY: usize = 1024 * 1024;

async fn read_body(request: Request<hyper::body::Incoming>) -> Result<Bytes, String> {
    let limited = http_body_util::Limited::new(request.into_body(), MAX_BODY);
    limited.collect().await.map(http_body_util::Collected::to_bytes).map_err(|e| format!("reading body: {e}"))
}

fn events(daemon: &Daemon, sandbox: Option<String>) -> Response<Body> {
    let receiver = daemon.log().subscribe();
    let stream = futures_util::stream::unfold((receiver, sandbox), |(mut receiver, sandbox)| async move {
        loop {
            match receiver.recv().await {
                Ok(decision) => {
                    if sandbox.as_ref().is_some_and(|name| decision.sandbox.as_ref() != Some(name)) {
                        continue;
                    }
                    let mut line = serde_json::to_vec(&*decision).unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), (receiver, sandbox)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("valid response")
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &ApiError { error: message.into() })
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}
