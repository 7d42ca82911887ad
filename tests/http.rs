//! TLS interception and the HTTP layer with real clients inside a sandbox
//! (curl, Python, Node, git) against upstreams in a test network namespace
//! that present certificates from a test CA. Needs root.

mod harness;

use std::{collections::HashMap, net::SocketAddr, process::Output};

use harness::{
    dns::TestDns,
    privileged,
    web::{TestCa, WebServer},
    Daemon, Sandbox, TestNet,
};
use sluice::audit::{Kind, Verdict};

const PROFILE: &str = r#"
name = "web"
[[rule]]
name = "no-admin"
action = "deny"
hosts = ["web.test"]
paths = ["/admin/**"]
reason = "the admin area is off limits"
[[rule]]
name = "web-api"
action = "allow"
hosts = ["web.test", "expired.test", "wrong.test", "git.test"]
methods = ["GET", "POST"]
ports = [443, 80]
"#;

/// A test network with a TLS upstream (`web.test`) and a DNS server that
/// knows it, and a daemon that trusts the upstream's test CA.
struct World {
    net: TestNet,
    ca: TestCa,
    web: WebServer,
    plain: WebServer,
    _dns: TestDns,
    daemon: Daemon,
    sandbox: Sandbox,
}

impl World {
    fn new() -> Self {
        let net = TestNet::new();
        let ca = TestCa::new();
        let web = WebServer::start(&net, SocketAddr::new(net.v4(2), 443), Some(ca.server_config(&["web.test"], false)));
        let plain = WebServer::start(&net, SocketAddr::new(net.v4(2), 80), None);
        let git_ip = net.add_host(5);
        let zone = HashMap::from([("web.test".to_owned(), vec![net.v4(2)]), ("git.test".to_owned(), vec![git_ip])]);
        let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
        let daemon = Daemon::start_with(Some(dns.addr), Some(&ca.cert_pem));
        let sandbox = daemon.sandbox("web", PROFILE).with_nameserver(&daemon.dir, net.v4(99));
        Self { net, ca, web, plain, _dns: dns, daemon, sandbox }
    }

    fn curl(&self, args: &[&str]) -> Output {
        let mut command = self.sandbox.command("curl");
        command.args(["-sS", "--max-time", "20"]).args(args);
        command.output().unwrap()
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn curl_over_http1_and_h2_is_intercepted_and_checked_per_request() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let h1 = world.curl(&["--http1.1", "https://web.test/echo"]);
    assert!(h1.status.success(), "{h1:?}");
    assert!(stdout(&h1).contains("version=HTTP/1.1 host=web.test"), "{}", stdout(&h1));
    let h2 = world.curl(&["--http2", "https://web.test/echo"]);
    assert!(stdout(&h2).contains("version=HTTP/2.0 host=web.test"), "{}", stdout(&h2));

    // Method and path rules, on the same kind of connection.
    let delete = world.curl(&["-X", "DELETE", "-w", "%{http_code}", "https://web.test/echo"]);
    assert!(stdout(&delete).ends_with("403"), "{}", stdout(&delete));
    assert!(stdout(&delete).contains("rule: default-deny"));
    let admin = world.curl(&["-w", "%{http_code}", "https://web.test/admin/users"]);
    assert!(stdout(&admin).contains("rule: no-admin") && stdout(&admin).ends_with("403"), "{}", stdout(&admin));

    // Large bodies stream both ways.
    let big = world.curl(&["-o", "/dev/null", "-w", "%{size_download}", "https://web.test/big?bytes=52428800"]);
    assert_eq!(stdout(&big), "52428800");
    let file = world.daemon.dir.join("upload.bin");
    std::fs::write(&file, vec![7u8; 20 * 1024 * 1024]).unwrap();
    let upload =
        world.curl(&["--http1.1", "--data-binary", &format!("@{}", file.display()), "https://web.test/upload"]);
    assert_eq!(stdout(&upload), format!("received={}\n", 20 * 1024 * 1024));

    // Plain HTTP gets the same request checks.
    let plain = world.curl(&["-w", " %{http_code}", "http://web.test/echo"]);
    assert!(stdout(&plain).contains("version=HTTP/1.1") && stdout(&plain).ends_with(" 200"), "{}", stdout(&plain));
    let plain_admin = world.curl(&["-w", " %{http_code}", "http://web.test/admin/x"]);
    assert!(stdout(&plain_admin).ends_with(" 403"), "{}", stdout(&plain_admin));

    // The upstreams never saw a denied request.
    let seen: Vec<String> =
        world.web.seen().iter().chain(world.plain.seen().iter()).map(|s| format!("{} {}", s.method, s.path)).collect();
    assert!(!seen.iter().any(|s| s.starts_with("DELETE") || s.contains("/admin")), "{seen:?}");
    let decisions =
        world.daemon.wait_decisions("request decisions", |d| d.iter().filter(|d| d.kind == Kind::Request).count() >= 8);
    let denied: Vec<_> = decisions.iter().filter(|d| d.kind == Kind::Request && d.verdict == Verdict::Deny).collect();
    assert!(denied.iter().any(|d| d.method.as_deref() == Some("DELETE") && d.rule == "default-deny"));
    assert!(denied.iter().any(|d| d.path.as_deref() == Some("/admin/users") && d.rule == "no-admin"));
}

#[test]
fn python_urllib_grpc_trailers_and_websockets_work_through_sluice() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let python = harness::run_python(
        world.sandbox.command("python3"),
        "import urllib.request\nr = urllib.request.urlopen('https://web.test/echo?from=python', timeout=20)\nprint('status=' + str(r.status))\nprint('body=' + r.read().decode().strip())",
    );
    let got = harness::fields(&python);
    assert_eq!(got["status"], "200");
    assert!(got["body"].contains("host=web.test"), "{got:?}");

    // gRPC shape: h2, te: trailers, a framed message; trailers come back.
    let message = world.daemon.dir.join("grpc.bin");
    std::fs::write(&message, b"\x00\x00\x00\x00\x05hello").unwrap();
    let trailers = world.daemon.dir.join("grpc-headers.txt");
    let grpc = world.curl(&[
        "--http2",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        &format!("@{}", message.display()),
        "-D",
        &trailers.display().to_string(),
        "-o",
        "/dev/null",
        "https://web.test/grpc",
    ]);
    assert!(grpc.status.success(), "{grpc:?}");
    let headers = std::fs::read_to_string(&trailers).unwrap();
    assert!(headers.contains("grpc-status: 0") && headers.contains("grpc-message: sluice-ok"), "{headers}");

    // WebSocket, secure and plain, with Node's client.
    let script = r"
const url = process.argv[1];
const ws = new WebSocket(url);
ws.onopen = () => ws.send('ping through sluice');
ws.onmessage = (event) => { console.log('echo=' + event.data); ws.close(); };
ws.onerror = (event) => { console.log('error=' + event.message); process.exit(1); };
setTimeout(() => { console.log('error=timeout'); process.exit(1); }, 15000);
";
    for url in ["wss://web.test/ws", "ws://web.test/ws"] {
        let mut node = world.sandbox.command("node");
        node.args(["--experimental-websocket", "-e", script, url]);
        let output = node.output().unwrap();
        assert!(stdout(&output).contains("echo=ping through sluice"), "{url}: {output:?}");
    }
    let decisions = world.daemon.decisions();
    assert!(decisions
        .iter()
        .any(|d| d.kind == Kind::Request && d.path.as_deref() == Some("/ws") && d.verdict == Verdict::Allow));
}

#[test]
fn bad_upstreams_and_bad_requests_get_clear_answers() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let expired = WebServer::start(
        &world.net,
        SocketAddr::new(world.net.v4(2), 8443),
        Some(world.ca.server_config(&["expired.test"], true)),
    );
    let wrong = WebServer::start(
        &world.net,
        SocketAddr::new(world.net.v4(2), 9443),
        Some(world.ca.server_config(&["elsewhere.test"], false)),
    );
    let profile_ports = PROFILE.replace("ports = [443, 80]", "ports = [443, 80, 8443, 9443]");
    let sandbox = world.daemon.sandbox("bad", &profile_ports);
    let curl = |args: &[&str]| {
        let mut command = sandbox.command("curl");
        command.args(["-sS", "--max-time", "20", "-w", " %{http_code}"]).args(args);
        command.output().unwrap()
    };
    let ip = world.net.v4(2).to_string();

    let out = curl(&["--resolve", &format!("expired.test:8443:{ip}"), "https://expired.test:8443/echo"]);
    assert!(stdout(&out).ends_with(" 502") && stdout(&out).contains("expired"), "{}", stdout(&out));
    let out = curl(&["--resolve", &format!("wrong.test:9443:{ip}"), "https://wrong.test:9443/echo"]);
    assert!(stdout(&out).ends_with(" 502") && stdout(&out).contains("wrong.test"), "{}", stdout(&out));
    assert!(
        expired.seen().is_empty() && wrong.seen().is_empty(),
        "a request reached a server whose certificate was refused"
    );

    // Domain fronting: TLS for web.test, request for another host.
    let out = curl(&["--resolve", &format!("web.test:443:{ip}"), "-H", "Host: wrong.test", "https://web.test/echo"]);
    assert!(stdout(&out).ends_with(" 421") && stdout(&out).contains("host-mismatch"), "{}", stdout(&out));
    // No SNI (an IP literal): no name to allow.
    let out = curl(&["-k", &format!("https://{ip}/echo")]);
    assert!(stdout(&out).ends_with(" 403"), "{}", stdout(&out));

    // Smuggling shapes and oversized heads, over TLS: refused by the parser,
    // never forwarded; the daemon keeps serving.
    let script = format!(
        r#"
import socket, ssl
ctx = ssl.create_default_context()
def send(label, raw):
    s = ctx.wrap_socket(socket.create_connection(("{ip}", 443), timeout=15), server_hostname="web.test")
    try:
        s.sendall(raw)
    except OSError:
        pass              # the server may answer and close before reading it all
    answer = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk: break
            answer += chunk
    except OSError:
        pass
    print(label + "=" + (answer.split(b"\r\n")[0].decode() or "closed"))
send("cl_te", b"POST /upload HTTP/1.1\r\nHost: web.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin/x HTTP/1.1\r\nHost: web.test\r\n\r\n")
send("dup_cl", b"POST /upload HTTP/1.1\r\nHost: web.test\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd")
send("obs_fold", b"GET /echo HTTP/1.1\r\nHost: web.test\r\nX-Folded: a\r\n b\r\n\r\n")
send("huge_head", b"GET /echo HTTP/1.1\r\nHost: web.test\r\nX-Big: " + b"a" * 100000 + b"\r\n\r\n")
send("good", b"GET /echo HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
"#
    );
    let got = harness::fields(&harness::run_python(sandbox.command("python3"), &script));
    for label in ["dup_cl", "obs_fold", "huge_head"] {
        assert!(got[label].starts_with("HTTP/1.1 4") || got[label] == "closed", "{label}: {got:?}");
    }
    assert_eq!(got["good"], "HTTP/1.1 200 OK");
    let smuggled: Vec<_> = world
        .web
        .seen()
        .into_iter()
        .filter(|s| s.path.starts_with("/admin") || s.headers.iter().any(|(k, _)| k == "x-folded"))
        .collect();
    assert!(smuggled.is_empty(), "smuggled requests reached the upstream: {smuggled:?}");
    assert!(harness::block_on(world.daemon.client().health()).is_ok());
}

#[test]
fn a_client_that_does_not_trust_the_sandbox_ca_fails_closed() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let mut command = harness::in_cgroup(&world.sandbox.cgroup, "curl");
    command.args([
        "-sS",
        "--max-time",
        "10",
        "--resolve",
        &format!("web.test:443:{}", world.net.v4(2)),
        "https://web.test/echo",
    ]);
    command.env("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt");
    let output = command.output().unwrap();
    assert!(!output.status.success(), "an untrusted interception was accepted: {output:?}");
    assert!(world.web.seen().is_empty());
    world.daemon.wait_decisions("client TLS failure", |d| d.iter().any(|d| d.rule == "client-tls"));
}

/// A git smart-HTTP server over TLS (git http-backend behind a small Python
/// CGI bridge), inside the test network.
const GIT_SERVER: &str = r#"
import http.server, os, ssl, subprocess, sys
addr, root, cert, key, backend = sys.argv[1:6]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self): self.cgi()
    def do_POST(self): self.cgi()
    def log_message(self, *args): pass
    def cgi(self):
        path, _, query = self.path.partition("?")
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1", PATH_INFO=path,
                   QUERY_STRING=query, REQUEST_METHOD=self.command, REMOTE_ADDR="10.0.0.1",
                   CONTENT_TYPE=self.headers.get("content-type", ""),
                   GIT_PROTOCOL=self.headers.get("git-protocol", ""),
                   HTTP_CONTENT_ENCODING=self.headers.get("content-encoding", ""))
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        out = subprocess.run([backend], input=body, env=env, capture_output=True).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.split(b"\r\n"):
            name, _, value = line.decode().partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
server = http.server.ThreadingHTTPServer((addr, 443), Handler)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"#;

#[test]
fn git_clones_over_https_through_sluice() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let dir = world.daemon.dir.join("git");
    let repo = dir.join("repo.git");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let git = |args: &[&str], cwd: &std::path::Path| {
        let status = std::process::Command::new("git")
            .args(["-c", "user.email=t@sluice.test", "-c", "user.name=sluice", "-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(cwd)
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    };
    git(&["init", "-q"], &work);
    std::fs::write(work.join("README"), "cloned through sluice\n").unwrap();
    git(&["add", "README"], &work);
    git(&["commit", "-q", "-m", "first"], &work);
    git(&["clone", "-q", "--bare", work.to_str().unwrap(), repo.to_str().unwrap()], &dir);

    let (cert, key) = world.ca.leaf_pem(&["git.test"]);
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    std::fs::write(dir.join("server.py"), GIT_SERVER).unwrap();
    let exec_path =
        String::from_utf8(std::process::Command::new("git").arg("--exec-path").output().unwrap().stdout).unwrap();
    let backend = std::path::Path::new(exec_path.trim()).join("git-http-backend");
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &world.net.name, "python3"])
        .arg(dir.join("server.py"))
        .arg(world.net.v4(5).to_string())
        .arg(&dir)
        .arg(dir.join("cert.pem"))
        .arg(dir.join("key.pem"))
        .arg(&backend)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");

    let clone = dir.join("clone");
    let mut command = world.sandbox.command("git");
    command.args(["clone", "-q", "https://git.test/repo.git"]).arg(&clone);
    let output = command.output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(output.status.success(), "git clone failed: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::read_to_string(clone.join("README")).unwrap(), "cloned through sluice\n");
    let decisions = world.daemon.decisions();
    assert!(decisions.iter().any(|d| d.kind == Kind::Request
        && d.host.as_deref() == Some("git.test")
        && d.path.as_deref() == Some("/repo.git/git-upload-pack")));
}

#[test]
fn sandbox_cas_are_unique_survive_a_restart_and_sluice_run_trusts_them() {
    if !privileged() {
        return;
    }
    let mut world = World::new();
    let other = world.daemon.sandbox("other", PROFILE);
    let ca_a = harness::block_on(world.daemon.client().ca("web")).unwrap();
    let ca_b = harness::block_on(world.daemon.client().ca("other")).unwrap();
    assert!(ca_a.contains("BEGIN CERTIFICATE") && ca_a != ca_b, "sandboxes must not share a CA");
    let export = std::process::Command::new(harness::SLUICE)
        .args(["ca", "export", "web", "--instance", &world.daemon.instance])
        .output()
        .unwrap();
    assert_eq!(stdout(&export), ca_a);
    assert!(!std::fs::read_to_string(&world.sandbox.ca_bundle).unwrap().contains("PRIVATE KEY"));

    // A client in one sandbox trusting another sandbox's CA is refused.
    let resolve = format!("web.test:443:{}", world.net.v4(2));
    let mut crossed = harness::in_cgroup(&other.cgroup, "curl");
    crossed.args(["-sS", "--max-time", "10", "--resolve", &resolve, "https://web.test/echo"]);
    crossed.env("CURL_CA_BUNDLE", &world.sandbox.ca_bundle);
    assert!(!crossed.output().unwrap().status.success(), "a sandbox accepted another sandbox's CA");

    // After a restart the same CA is presented: bundles handed out still work.
    world.daemon.restart();
    assert_eq!(harness::block_on(world.daemon.client().ca("web")).unwrap(), ca_a);
    let after = world.curl(&["--resolve", &resolve, "https://web.test/echo"]);
    assert!(stdout(&after).contains("host=web.test"), "{after:?}");

    // `sluice run` sets the trust variables for its command by itself,
    // overriding what it inherits.
    std::fs::write(world.daemon.dir.join("run-profile.toml"), PROFILE).unwrap();
    let output = std::process::Command::new(harness::SLUICE)
        .args(["run", "--instance", &world.daemon.instance, "-q", "--user", "nobody", "--profile"])
        .arg(world.daemon.dir.join("run-profile.toml"))
        .args(["--", "curl", "-sS", "--max-time", "10", "--resolve", &resolve, "https://web.test/echo"])
        .env("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
        .output()
        .unwrap();
    assert!(stdout(&output).contains("host=web.test"), "{output:?}");
}

#[test]
fn a_profile_changed_at_runtime_decides_the_next_request_on_a_kept_connection() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let stricter = world.daemon.dir.join("stricter.toml");
    std::fs::write(
        &stricter,
        PROFILE
            .replace("methods = [\"GET\", \"POST\"]", "methods = [\"POST\"]")
            .replace("name = \"web\"", "name = \"web-strict\""),
    )
    .unwrap();
    let broken = world.daemon.dir.join("broken.toml");
    std::fs::write(&broken, "name = \"x\"\n[[rule]]\naction = \"sometimes\"\n").unwrap();
    let set = |file: &std::path::Path| {
        std::process::Command::new(harness::SLUICE)
            .args(["policy", "set", "--sandbox", "web", "--instance", &world.daemon.instance])
            .arg(file)
            .output()
            .unwrap()
    };
    // One TLS connection, kept alive across the change. The script waits on
    // stdin between its two requests.
    let script = r#"
import http.client, ssl, sys
conn = http.client.HTTPSConnection("web.test", timeout=15, context=ssl.create_default_context())
conn.request("GET", "/echo"); r = conn.getresponse(); r.read(); print("first=" + str(r.status), flush=True)
sys.stdin.readline()
conn.request("GET", "/echo"); r = conn.getresponse(); body = r.read().decode(); print("second=" + str(r.status), flush=True)
print("rule=" + [l for l in body.splitlines() if l.startswith("rule: ")][0][6:], flush=True)
"#;
    let mut command = world.sandbox.command("python3");
    command.args(["-c", script]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "first=200");

    let refused = set(&broken);
    assert_eq!(refused.status.code(), Some(2), "a broken profile was accepted");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("broken.toml:3"), "{refused:?}");
    let applied = set(&stricter);
    assert!(applied.status.success(), "{applied:?}");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let _ = child.wait();
    assert!(rest.contains("second=403") && rest.contains("rule=default-deny"), "{rest}");
    let status = world.daemon.statuses().into_iter().find(|s| s.record.name == "web").unwrap();
    assert_eq!(status.profile_name, "web-strict");
    assert_eq!(world.web.seen().len(), 1, "the second request reached the upstream");
}

#[test]
fn a_profile_change_decides_the_next_stream_on_an_open_http2_connection() {
    if !privileged() {
        return;
    }
    let world = World::new();
    let write = |name: &str, text: &str| {
        let path = world.daemon.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let original = write("web.toml", PROFILE);
    let stricter = write(
        "stricter.toml",
        &PROFILE
            .replace("methods = [\"GET\", \"POST\"]", "methods = [\"POST\"]")
            .replace("name = \"web\"", "name = \"web-strict\""),
    );
    let set = |file: &std::path::Path| {
        let output = std::process::Command::new(harness::SLUICE)
            .args(["policy", "set", "--sandbox", "web", "--instance", &world.daemon.instance])
            .arg(file)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    };
    // One HTTP/2 session; each line on stdin sends the next GET as a new
    // stream on it. The session must stay the same one throughout.
    let script = r"
const http2 = require('http2');
const readline = require('readline');
const session = http2.connect('https://web.test');
session.on('close', () => { console.log('session-closed'); process.exit(0); });
session.on('error', (e) => { console.log('error=' + e.message); process.exit(1); });
let n = 0;
const get = () => {
  const stream = session.request({ ':method': 'GET', ':path': '/echo' });
  let status = 0, body = '';
  stream.on('response', (h) => { status = h[':status']; });
  stream.setEncoding('utf8');
  stream.on('data', (d) => { body += d; });
  stream.on('end', () => {
    n += 1;
    const rule = (body.split('\n').find((l) => l.startsWith('rule: ')) || 'rule: -').slice(6);
    console.log(`req${n}=${status} alpn=${session.alpnProtocol} rule=${rule}`);
  });
};
session.on('connect', get);
readline.createInterface({ input: process.stdin }).on('line', (l) => (l === 'end' ? session.close() : get()));
setTimeout(() => { console.log('error=timeout'); process.exit(1); }, 20000);
";
    let mut command = world.sandbox.command("node");
    command.args(["-e", script]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    let mut next_line = || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        line.trim().to_owned()
    };
    assert_eq!(next_line(), "req1=200 alpn=h2 rule=-");
    set(&stricter);
    std::io::Write::write_all(&mut stdin, b"next\n").unwrap();
    assert_eq!(next_line(), "req2=403 alpn=h2 rule=default-deny");
    set(&original);
    std::io::Write::write_all(&mut stdin, b"next\n").unwrap();
    assert_eq!(next_line(), "req3=200 alpn=h2 rule=-");
    std::io::Write::write_all(&mut stdin, b"end\n").unwrap();
    assert_eq!(next_line(), "session-closed", "the session ended before the client closed it");
    assert!(child.wait().unwrap().success());
    assert_eq!(world.web.seen().len(), 2, "the denied stream reached the upstream");
    // All three streams were decided on one client connection.
    let decisions = world.daemon.decisions();
    let connects = decisions.iter().filter(|d| d.kind == Kind::Connect && d.sandbox.as_deref() == Some("web")).count();
    let requests: Vec<_> = decisions.iter().filter(|d| d.kind == Kind::Request).map(|d| d.verdict).collect();
    assert_eq!(connects, 1, "{decisions:#?}");
    assert_eq!(requests, [Verdict::Allow, Verdict::Deny, Verdict::Allow]);
}
