//! Matching what is meant, through a real sandbox: request paths are decided
//! as the upstream reads them (dot segments, escapes, duplicate slashes,
//! `;` parameters), also for credential path scopes. The upstream in its
//! own network namespace records every path it received; a request the
//! policy should deny must not arrive there. Needs root.

mod harness;

use std::{collections::HashMap, net::SocketAddr};

use harness::{
    dns::TestDns,
    privileged,
    web::{TestCa, WebServer},
    Daemon, Sandbox, TestNet,
};

/// An HTTPS upstream for `web.test` in a test namespace, and a DNS server
/// naming it.
struct Upstream {
    net: TestNet,
    ca: TestCa,
    web: WebServer,
    dns: TestDns,
}

impl Upstream {
    fn new() -> Self {
        let net = TestNet::new();
        let ca = TestCa::new();
        let web = WebServer::start(&net, SocketAddr::new(net.v4(2), 443), Some(ca.server_config(&["web.test"], false)));
        let zone = HashMap::from([("web.test".to_owned(), vec![net.v4(2)])]);
        let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
        Self { net, ca, web, dns }
    }

    fn daemon(&self, secrets: Option<&str>) -> Daemon {
        Daemon::start_full(Some(self.dns.addr), Some(&self.ca.cert_pem), secrets)
    }

    fn sandbox(&self, daemon: &Daemon, name: &str, profile: &str) -> Sandbox {
        daemon.sandbox(name, profile).with_nameserver(&daemon.dir, self.net.v4(99))
    }

    /// The raw paths the upstream received, in order.
    fn paths(&self) -> Vec<String> {
        self.web.seen().into_iter().map(|r| r.path).collect()
    }
}

/// Sends each raw request target over its own TLS connection to web.test
/// exactly as given (no client-side normalisation), with `headers`;
/// returns the status of each (0: the connection closed without one).
fn send_raw(sandbox: &Sandbox, targets: &[&str], headers: &str) -> Vec<u16> {
    let script = format!(
        r#"
import socket, ssl, sys
ctx = ssl.create_default_context()
for target in sys.argv[1:]:
    raw = socket.create_connection(("web.test", 443), timeout=15)
    s = ctx.wrap_socket(raw, server_hostname="web.test")
    s.sendall(("GET " + target + " HTTP/1.1\r\nHost: web.test\r\n{headers}Connection: close\r\n\r\n").encode("latin-1"))
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    line = data.split(b"\r\n", 1)[0].split()
    print(line[1].decode() if len(line) > 1 else "0", flush=True)
"#
    );
    let output = sandbox.command("python3").arg("-c").arg(&script).args(targets).output().expect("run python");
    assert!(output.status.success(), "client failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(|l| l.trim().parse().unwrap()).collect()
}

const ALLOW_ACME: &str = r#"
name = "acme-only"
[[rule]]
name = "acme"
action = "allow"
hosts = ["web.test"]
paths = ["/repos/acme/**"]
"#;

const DENY_ADMIN: &str = r#"
name = "no-admin"
[[rule]]
name = "no-admin"
action = "deny"
hosts = ["web.test"]
paths = ["/admin/**"]
[[rule]]
name = "rest"
action = "allow"
hosts = ["web.test"]
"#;

#[test]
fn paths_that_normalise_outside_a_rule_never_reach_the_upstream() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::new();
    let daemon = upstream.daemon(None);

    let acme = upstream.sandbox(&daemon, "acme", ALLOW_ACME);
    let escaping = [
        "/repos/acme/../other/x",
        "/repos/acme/%2e%2e/other/x",
        "/repos/acme/%2E%2E/other/x",
        "/repos/acme/.%2e/other/x",
        "/repos/acme%2F..%2Fother/x",
        "/repos/acme/..;/other/x",
        "/repos/acme/..%5Cother/x",
        "/repos/acme//../../other/x",
    ];
    let statuses = send_raw(&acme, &escaping, "");
    assert!(statuses.iter().all(|&s| s == 403), "escaping paths got {statuses:?}");
    assert_eq!(send_raw(&acme, &["/repos/acme/x", "/repos/acme/./y"], ""), [200, 200]);

    let admin = upstream.sandbox(&daemon, "admin", DENY_ADMIN);
    let disguised =
        ["/admin/x", "//admin/x", "/%61dmin/x", "/admin;x/y", "/./admin/x", "/x/../admin/x", "/admin%2Fx", "/admin\\x"];
    let statuses = send_raw(&admin, &disguised, "");
    assert!(statuses.iter().all(|&s| s == 403), "disguised admin paths got {statuses:?}");
    assert_eq!(send_raw(&admin, &["/public/ok"], ""), [200]);
    // A malformed escape is refused: no one can tell how it is read.
    assert_eq!(send_raw(&admin, &["/x%zz"], ""), [403]);

    // The judge: what the upstream received.
    let paths = upstream.paths();
    for target in escaping.iter().chain(&disguised).chain(&["/x%zz"]) {
        assert!(!paths.iter().any(|p| p == target), "{target} reached the upstream: {paths:?}");
    }
    assert!(paths.iter().all(|p| !p.contains("other") && !p.contains("admin") && !p.contains("dmin")), "{paths:?}");
    for allowed in ["/repos/acme/x", "/repos/acme/./y", "/public/ok"] {
        assert!(paths.iter().any(|p| p == allowed), "{allowed} did not arrive: {paths:?}");
    }
    let denied = daemon.wait_decisions("path denials recorded", |d| {
        d.iter().filter(|d| d.path.is_some() && d.verdict == sluice::audit::Verdict::Deny).count() >= 17
    });
    assert!(denied.iter().any(|d| d.rule == "invalid-path"), "no invalid-path record");
}

const SECRET: &str = "sk_live_PATHSCOPEsecret0123456789";

#[test]
fn a_credential_scoped_to_a_path_is_not_injected_into_a_path_that_escapes_it() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::new();
    let daemon = upstream.daemon(Some(&format!("acme = \"{SECRET}\"\n")));
    let profile = r#"
name = "scoped"
[[rule]]
name = "web"
action = "allow"
hosts = ["web.test"]
[[credential]]
secret = "acme"
hosts = ["web.test"]
paths = ["/repos/acme/**"]
inject = { header = "x-api-key" }
"#;
    let sandbox = upstream.sandbox(&daemon, "scoped", profile);
    let targets = ["/repos/acme/in", "/repos/acme/../other/a", "/repos/acme/%2e%2e/other/b", "/repos/acme/..;/other/c"];
    assert_eq!(send_raw(&sandbox, &targets, ""), [200, 200, 200, 200]);
    let seen = upstream.web.seen();
    let key = |path: &str| {
        let request = seen.iter().find(|r| r.path == path).unwrap_or_else(|| panic!("{path} did not arrive"));
        request.headers.iter().find(|(k, _)| k == "x-api-key").map(|(_, v)| v.clone())
    };
    assert_eq!(key("/repos/acme/in").as_deref(), Some(SECRET), "the secret is injected inside its scope");
    for outside in &targets[1..] {
        assert_eq!(key(outside), None, "the secret went into {outside}, outside its scope");
    }
}

#[test]
fn profile_files_others_can_write_are_refused_at_load_and_at_reload() {
    use std::os::unix::fs::PermissionsExt;
    if !privileged() {
        return;
    }
    let upstream = Upstream::new();
    let daemon = upstream.daemon(None);
    let dir = daemon.dir.join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o755)).unwrap();
    let profile = dir.join("agent.toml");
    let only = |path: &str| {
        format!("name = \"agent\"\n[[rule]]\nname = \"only\"\naction = \"allow\"\nhosts = [\"web.test\"]\npaths = [\"{path}\"]\n")
    };
    std::fs::write(&profile, only("/first")).unwrap();
    let chmod = |mode: u32| std::fs::set_permissions(&profile, PermissionsExt::from_mode(mode)).unwrap();

    // At load: a group-writable file is refused, naming the file and the fix.
    chmod(0o664);
    let request = sluice::control::RegisterRequest {
        name: "agent".to_owned(),
        cgroup: None,
        profile: sluice::sandbox::ProfileSource::File { path: profile.clone(), text: String::new() },
        placement: sluice::sandbox::Placement::Host,
    };
    let refused = harness::block_on(daemon.client().register(&request)).map(|_| ()).unwrap_err();
    let message = format!("{refused:#}");
    assert!(message.contains(&profile.display().to_string()), "{message}");
    assert!(message.contains(&format!("chmod go-w {}", profile.display())), "{message}");
    assert!(daemon.statuses().iter().all(|s| s.record.name != "agent"), "the sandbox was registered");

    // Fixed, it loads and is enforced.
    chmod(0o644);
    let sandbox = daemon.sandbox_from_file("agent", &profile).with_nameserver(&daemon.dir, upstream.net.v4(99));
    assert_eq!(send_raw(&sandbox, &["/first", "/second"], ""), [200, 403]);

    // At reload: the file turns writable by others and is rewritten to
    // allow more. The last good profile stays in force, with a record.
    chmod(0o666);
    std::fs::write(&profile, only("/second")).unwrap();
    let decisions = daemon.wait_decisions("reload refused", |d| d.iter().any(|d| d.rule == "profile-reload-failed"));
    let record = decisions.iter().find(|d| d.rule == "profile-reload-failed").unwrap();
    assert!(record.reason.contains("chmod go-w") && record.reason.contains("last good profile"), "{}", record.reason);
    assert_eq!(send_raw(&sandbox, &["/first", "/second"], ""), [200, 403]);
    let paths = upstream.paths();
    assert!(!paths.iter().any(|p| p == "/second"), "the untrusted profile was enforced: {paths:?}");
    assert!(!decisions.iter().any(|d| d.rule == "profile-reloaded"), "the untrusted file was taken");

    // Made safe again, its new text is taken.
    chmod(0o644);
    std::fs::write(&profile, only("/second")).unwrap();
    daemon.wait_decisions("reload taken", |d| d.iter().any(|d| d.rule == "profile-reloaded"));
    assert_eq!(send_raw(&sandbox, &["/first", "/second"], ""), [403, 200]);
}

/// A minimal TLS `ClientHello` naming `sni` (any bytes), as a client that
/// crafts its own would send it.
fn client_hello(sni: &[u8]) -> Vec<u8> {
    let mut ext = vec![0x00, 0x00];
    ext.extend_from_slice(&((sni.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((sni.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(sni);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[test]
fn escape_sequences_from_the_sandbox_reach_the_log_but_never_the_terminal() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::new();
    let plain = WebServer::start(&upstream.net, SocketAddr::new(upstream.net.v4(2), 80), None);
    let daemon = upstream.daemon(None);
    let sandbox = upstream.sandbox(&daemon, "agent", ALLOW_ACME);
    let hello = client_hello(b"pwned\x1b[31m\x1b]0;title\x07.test");
    let hex = hello.iter().fold(String::new(), |mut hex, b| {
        let _ = std::fmt::Write::write_fmt(&mut hex, format_args!("{b:02x}"));
        hex
    });
    let ip = upstream.net.v4(2);
    // Straight to the address (no name resolved): a TLS server name and a
    // plain HTTP Host carrying an ESC sequence and a C1 CSI (U+009B).
    let script = format!(
        r#"
import socket
for port, data in ((443, bytes.fromhex("{hex}")),
                   (80, b"GET /repos/acme/x HTTP/1.1\r\nHost: pwned\xc2\x9b31m.test\r\nConnection: close\r\n\r\n")):
    s = socket.create_connection(("{ip}", port), timeout=15)
    s.sendall(data)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    s.close()
print("sent")
"#
    );
    let output = sandbox.command("python3").arg("-c").arg(&script).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let decisions = daemon.wait_decisions("both connections recorded", |d| {
        d.iter().filter(|d| d.host.as_deref().is_some_and(|h| h.contains("pwned"))).count() >= 2
    });
    // The raw bytes are in the record (JSON escapes them) ...
    assert!(decisions.iter().any(|d| d.host.as_deref().is_some_and(|h| h.contains('\x1b'))));
    // (The plain HTTP Host names an address the sandbox never resolved, so
    // its record names the address, not the claimed name.)
    let raw_log = std::fs::read(daemon.decision_log()).unwrap();
    assert!(!raw_log.contains(&0x1b), "the JSON log holds a raw ESC");
    // ... and what a person reads has none of them.
    let log = daemon.cli(&["log"]);
    assert!(log.status.success(), "{}", String::from_utf8_lossy(&log.stderr));
    let text = String::from_utf8(log.stdout).unwrap();
    assert!(text.contains("pwned\\x1b[31m\\x1b]0;title\\x07.test"), "{text}");
    assert!(!text.contains('\x1b') && !text.contains('\u{9b}') && !text.contains('\x07'), "{text:?}");
    assert!(plain.seen().is_empty() && upstream.web.seen().is_empty(), "a refused connection reached the upstream");
}

#[test]
fn a_profile_that_names_no_hosts_resolves_no_names() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::new();
    let daemon = upstream.daemon(None);
    let profile = format!(
        "name = \"by-address\"\n[[rule]]\nname = \"test-net\"\naction = \"allow\"\nips = [\"{}/24\"]\nports = [443]\n",
        upstream.net.v4(0)
    );
    let sandbox = upstream.sandbox(&daemon, "by-address", &profile);
    let script = r#"
import socket
for name in ("web.test", "c2vjcmV0.exfil.test"):
    try:
        socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
        print(name, "resolved")
    except socket.gaierror:
        print(name, "refused")
"#;
    let output = sandbox.python(script);
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.lines().collect::<Vec<_>>(), ["web.test refused", "c2vjcmV0.exfil.test refused"], "{output:?}");
    assert!(upstream.dns.questions().is_empty(), "queries reached the name server: {:?}", upstream.dns.questions());
    let decisions = daemon.wait_decisions("refusals recorded", |d| {
        d.iter().filter(|d| d.kind == sluice::audit::Kind::Dns && d.rule == "no-hosts-named").count() >= 2
    });
    let record = decisions.iter().find(|d| d.rule == "no-hosts-named").unwrap();
    assert!(record.reason.contains("names no hosts"), "{}", record.reason);
    // Addresses still work: the profile is about them.
    assert_eq!(send_raw_to(&sandbox, upstream.net.v4(2), "/x"), 200);
}

/// One request to `ip` with the TLS name web.test but no name resolved.
fn send_raw_to(sandbox: &Sandbox, ip: std::net::IpAddr, target: &str) -> u16 {
    let script = format!(
        r#"
import socket, ssl
ctx = ssl.create_default_context()
s = ctx.wrap_socket(socket.create_connection(("{ip}", 443), timeout=15), server_hostname="web.test")
s.sendall(b"GET {target} HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.split(b"\r\n", 1)[0].split()[1].decode())
"#
    );
    let output = sandbox.python(&script);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().parse().unwrap()
}

#[test]
fn sluice_log_reads_rotated_files_oldest_first() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(None);
    let log = daemon.decision_log();
    let record = |rule: &str| {
        let decision =
            sluice::audit::Decision::new(sluice::audit::Kind::Connect, sluice::audit::Verdict::Deny, rule, "old");
        format!("{}\n", serde_json::to_string(&decision).unwrap())
    };
    // What rotation leaves behind: FILE.2 is older than FILE.1.
    harness::write_file(&std::path::PathBuf::from(format!("{}.2", log.display())), &record("oldest-rotated"));
    harness::write_file(&std::path::PathBuf::from(format!("{}.1", log.display())), &record("newer-rotated"));
    let _sandbox = daemon.sandbox("agent", ALLOW_ACME);
    daemon.wait_decisions("the current file has a record", |d| d.iter().any(|d| d.rule == "registered"));
    let output = daemon.cli(&["log"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("{needle} missing in:\n{text}"));
    assert!(at("oldest-rotated") < at("newer-rotated") && at("newer-rotated") < at("rule=registered"), "{text}");
}

/// The classifier fuzz target's committed corpus (TLS `ClientHello`s and HTTP
/// heads that lie about lengths, carry escapes or repeat Host): never a
/// panic, at any prefix. Needs no root.
#[test]
fn the_classify_fuzz_corpus_replays() {
    use sluice::proxy::classify::{classify, Classified};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/classify");
    let mut seen = HashMap::new();
    for entry in std::fs::read_dir(dir).expect("fuzz/corpus/classify") {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        for cut in 0..bytes.len() {
            let _ = classify(&bytes[..cut]);
        }
        seen.insert(path.file_name().unwrap().to_string_lossy().into_owned(), classify(&bytes));
    }
    assert!(seen.len() >= 10, "{seen:?}");
    assert!(matches!(&seen["tls-sni"], Classified::Tls { sni: Some(s), .. } if s == "files.demo.test"));
    assert!(matches!(&seen["tls-no-sni"], Classified::Tls { sni: None, .. }));
    assert!(matches!(&seen["http-get"], Classified::Http { host: Some(h) } if h == "web.test"));
    assert!(matches!(seen["http-duplicate-host"], Classified::Malformed(_)));
}
