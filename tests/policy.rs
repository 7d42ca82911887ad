//! The policy engine against a running daemon: requests held for an
//! operator (approved, denied, timed out, remembered), a capability bundle
//! revoked from every sandbox at once, profile files reloaded on change with
//! a broken file keeping the last good profile, header and body-size
//! conditions enforced by the proxy, and `sluice policy explain|test|replay`.
//!
//! Upstreams live in a test network namespace; sandboxes reach them only
//! through sluice. What the upstream received is the ground truth.

mod harness;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use harness::{block_on, privileged, web::TestCa, web::WebServer, Daemon, Sandbox, TestNet};
use sluice::audit::{Kind, Verdict};

use crate::harness::dns::TestDns;

/// A test network with an HTTPS upstream answering for `web.test` and
/// `pypi.mirror.test`, and a DNS server that names them.
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
        let names = ["web.test", "pypi.mirror.test"];
        let web = WebServer::start(&net, SocketAddr::new(net.v4(2), 443), Some(ca.server_config(&names, false)));
        let zone = names.iter().map(|n| ((*n).to_owned(), vec![net.v4(2)])).collect::<HashMap<_, _>>();
        let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
        Self { net, ca, web, dns }
    }

    fn daemon(&self, extra_args: &[&str]) -> Daemon {
        let extra_args = extra_args.iter().map(|a| (*a).to_owned()).collect();
        Daemon::start_configured(Some(self.dns.addr), Some(&self.ca.cert_pem), None, extra_args)
    }

    fn sandbox(&self, daemon: &Daemon, name: &str, profile: &str) -> Sandbox {
        daemon.sandbox(name, profile).with_nameserver(&daemon.dir, self.net.v4(99))
    }

    /// Requests the upstream received for `path`.
    fn seen(&self, path: &str) -> usize {
        self.web.seen().iter().filter(|r| r.path == path).count()
    }
}

/// `curl` status code and body for one request from the sandbox.
fn curl(sandbox: &Sandbox, args: &[&str]) -> (String, String) {
    let output = sandbox
        .command("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_owned(), body.to_owned())
}

/// A Python client in the sandbox that keeps one TLS connection to
/// web.test and sends one request per line read from stdin (`METHOD PATH`),
/// printing `PATH STATUS` for each.
struct KeptClient {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl KeptClient {
    fn start(sandbox: &Sandbox, host: &str) -> Self {
        let script = format!(
            r#"
import http.client, ssl, sys
conn = http.client.HTTPSConnection("{host}", timeout=30, context=ssl.create_default_context())
for line in sys.stdin:
    method, path = line.split()
    body = b"x" * 10 if method == "POST" else None
    conn.request(method, path, body=body)
    r = conn.getresponse(); text = r.read().decode(errors="replace")
    rule = r.getheader("x-sluice-rule") or "-"
    print(path, r.status, rule, flush=True)
"#
        );
        let mut child = sandbox
            .command("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python");
        let out = BufReader::new(child.stdout.take().unwrap());
        Self { child, out }
    }

    fn send(&mut self, method: &str, path: &str) {
        writeln!(self.child.stdin.as_mut().unwrap(), "{method} {path}").unwrap();
    }

    /// `(status, rule)` of the next answer.
    fn answer(&mut self) -> (u16, String) {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parts.len(), 3, "client said {line:?}");
        (parts[1].parse().unwrap(), parts[2].to_owned())
    }

    fn request(&mut self, method: &str, path: &str) -> (u16, String) {
        self.send(method, path);
        self.answer()
    }
}

impl Drop for KeptClient {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Waits until the daemon holds a request for `path`; returns its id.
fn pending_for(daemon: &Daemon, path: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pending = block_on(daemon.client().approvals()).expect("list approvals");
        if let Some(p) = pending.iter().find(|p| p.path.as_deref() == Some(path)) {
            return p.id;
        }
        assert!(Instant::now() < deadline, "no request for {path} was held: {pending:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const ASK: &str = r#"
name = "ask"
[[rule]]
name = "read"
action = "allow"
hosts = ["web.test"]
methods = ["GET"]
[[rule]]
name = "writes"
action = "ask"
hosts = ["web.test"]
methods = ["POST"]
reason = "writes need a person"
"#;

#[test]
fn ask_rules_hold_requests_until_an_operator_answers_or_the_timeout() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::new();
    let daemon = upstream.daemon(&["--approval-timeout", "2s"]);
    let sandbox = upstream.sandbox(&daemon, "asker", ASK);
    let mut client = KeptClient::start(&sandbox, "web.test");
    assert_eq!(client.request("GET", "/read").0, 200, "GET is allowed outright");

    // Approved, and remembered for this sandbox.
    client.send("POST", "/a");
    let id = pending_for(&daemon, "/a");
    let listed = daemon.cli(&["approvals"]);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(table.contains("asker") && table.contains("POST web.test/a") && table.contains("writes"), "{table}");
    assert_eq!(upstream.seen("/a"), 0, "a held request must not reach the upstream");
    let approved = daemon.cli(&["approve", &id.to_string(), "--always"]);
    assert!(approved.status.success(), "{approved:?}");
    assert_eq!(client.answer(), (200, "-".to_owned()));

    // Denied.
    client.send("POST", "/b");
    let id_b = pending_for(&daemon, "/b");
    assert!(daemon.cli(&["deny", &id_b.to_string()]).status.success());
    assert_eq!(client.answer(), (403, "writes".to_owned()));
    let again = daemon.cli(&["deny", &id_b.to_string()]);
    assert!(!again.status.success(), "an answered request cannot be answered twice");
    assert!(String::from_utf8_lossy(&again.stderr).contains(&format!("nothing is waiting for approval {id_b}")));

    // Nobody answers.
    let started = Instant::now();
    assert_eq!(client.request("POST", "/c"), (403, "writes".to_owned()));
    assert!(started.elapsed() >= Duration::from_secs(2), "denied before the timeout");

    // "Always": the same request goes through without asking.
    assert_eq!(client.request("POST", "/a"), (200, "-".to_owned()));
    assert!(block_on(daemon.client().approvals()).unwrap().is_empty());
    assert_eq!((upstream.seen("/a"), upstream.seen("/b"), upstream.seen("/c")), (2, 0, 0));

    let decisions = daemon.decisions();
    let requests: Vec<_> =
        decisions.iter().filter(|d| d.kind == Kind::Request && d.method.as_deref() == Some("POST")).collect();
    let held: Vec<_> = requests.iter().filter(|d| d.verdict == Verdict::Ask).collect();
    assert_eq!(held.len(), 3, "one hold per asked request: {requests:#?}");
    assert!(held.iter().all(|d| d.rule == "writes" && d.approval.is_some() && d.reason.contains("sluice approve")));
    let outcome = |path: &str| {
        requests
            .iter()
            .find(|d| d.path.as_deref() == Some(path) && d.verdict != Verdict::Ask)
            .unwrap_or_else(|| panic!("no outcome for {path}"))
    };
    assert!(outcome("/a").verdict == Verdict::Allow && outcome("/a").reason.contains(&format!("approval {id}")));
    assert!(outcome("/b").verdict == Verdict::Deny && outcome("/b").reason.contains("denied by an operator"));
    assert!(outcome("/c").verdict == Verdict::Deny && outcome("/c").reason.contains("no operator answered within 2 s"));
    let remembered = requests.iter().filter(|d| d.rule == format!("approved-{id}")).count();
    assert_eq!(remembered, 1, "the second POST /a was decided by the remembered rule");
}

const PYPI: &str = r#"
name = "builder"
bundles = ["pkg.pypi"]
[aliases]
pypi = ["pypi.mirror.test"]
"#;

const OWN_RULE: &str = r#"
name = "own"
[[rule]]
name = "mirror"
action = "allow"
hosts = ["pypi.mirror.test"]
methods = ["GET"]
"#;

#[test]
fn revoking_a_bundle_cuts_every_sandbox_that_had_it_and_survives_a_restart() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::new();
    let mut daemon = upstream.daemon(&[]);
    let a = upstream.sandbox(&daemon, "builder-a", PYPI);
    let b = upstream.sandbox(&daemon, "builder-b", PYPI);
    let own = upstream.sandbox(&daemon, "own", OWN_RULE);
    let url = "https://pypi.mirror.test/simple/sluice/";
    for sandbox in [&a, &b, &own] {
        assert_eq!(curl(sandbox, &[url]).0, "200", "{} before the revocation", sandbox.name);
    }
    let by_bundle = daemon.wait_decisions("decisions naming the bundle", |ds| {
        ds.iter().filter(|d| d.kind == Kind::Request && d.bundle.as_deref() == Some("pkg.pypi")).count() == 2
    });
    assert!(by_bundle.iter().any(|d| d.rule == "pkg.pypi/download" && d.sandbox.as_deref() == Some("builder-a")));

    // What a CI job or an operator would ask first.
    let explained = daemon.cli(&["policy", "explain", "--sandbox", "builder-a", "-X", "POST", url]);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(text.contains("POST https://pypi.mirror.test/simple/sluice/ -> DENY"), "{text}{explained:?}");
    assert!(text.contains("rule:    default-deny"), "{text}");
    let explained = daemon.cli(&["policy", "explain", "--sandbox", "builder-a", url]);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(text.contains("-> ALLOW") && text.contains("pkg.pypi/download (bundle pkg.pypi)"), "{text}");
    assert!(text.contains(&format!("address: {}:443", upstream.net.v4(2))), "the address the sandbox resolved: {text}");

    let revoked = daemon.cli(&["policy", "revoke", "pkg.pypi"]);
    let said = String::from_utf8_lossy(&revoked.stdout);
    assert!(revoked.status.success() && said.contains("builder-a, builder-b"), "{said}{revoked:?}");
    let seen_before = upstream.seen("/simple/sluice/");
    // No rule allows the name any more, so sluice's resolver refuses it; a
    // client that kept the address is refused by the proxy.
    assert_eq!(curl(&a, &[url]).0, "000", "the name no longer resolves");
    let pinned = format!("pypi.mirror.test:443:{}", upstream.net.v4(2));
    for sandbox in [&a, &b] {
        let (code, body) = curl(sandbox, &["--resolve", &pinned, url]);
        assert_eq!(code, "403", "{} after the revocation: {body}", sandbox.name);
        assert!(body.contains("rule: default-deny"), "{body}");
    }
    assert_eq!(curl(&own, &[url]).0, "200", "a sandbox allowed by its own rule keeps access");
    assert_eq!(upstream.seen("/simple/sluice/"), seen_before + 1);

    daemon.restart();
    assert_eq!(curl(&a, &["--resolve", &pinned, url]).0, "403", "the revocation outlives the daemon");
    let restored = daemon.cli(&["policy", "restore", "pkg.pypi"]);
    assert!(restored.status.success(), "{restored:?}");
    assert_eq!(curl(&b, &[url]).0, "200");
    let lifecycle: Vec<_> =
        daemon.decisions().into_iter().filter(|d| d.kind == Kind::Lifecycle).map(|d| d.rule).collect();
    assert_eq!(lifecycle.iter().filter(|r| *r == "bundle-revoked").count(), 2, "{lifecycle:?}");
    assert!(lifecycle.iter().any(|r| r == "bundle-restored"), "{lifecycle:?}");
    let unknown = daemon.cli(&["policy", "revoke", "pkg.cobol"]);
    assert!(
        !unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("no such capability bundle")
    );

    // Replay what was recorded against a profile without the bundle.
    let stricter = daemon.dir.join("stricter.toml");
    std::fs::write(&stricter, "name = \"stricter\"\n").unwrap();
    let replayed = harness::run_sluice(&[
        "policy",
        "replay",
        stricter.to_str().unwrap(),
        "--log",
        daemon.decision_log().to_str().unwrap(),
        "--since",
        "1h",
    ]);
    let report = String::from_utf8_lossy(&replayed.stdout);
    assert!(replayed.status.success(), "{replayed:?}");
    assert!(report.contains("ALLOW -> DENY  own  GET https://pypi.mirror.test:443/simple/sluice/"), "{report}");
    assert!(report.contains("(was rule mirror, now rule default-deny)"), "{report}");
    assert!(!report.contains("DENY -> DENY") && report.contains("would change"), "{report}");
}

#[test]
fn profile_files_are_reloaded_on_change_and_a_broken_one_keeps_the_last_good() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::new();
    let daemon = upstream.daemon(&[]);
    let file = daemon.dir.join("agent.toml");
    let version = |paths: &str| {
        format!("name = \"agent\"\n[[rule]]\nname = \"pages\"\naction = \"allow\"\nhosts = [\"web.test\"]\npaths = [{paths}]\n")
    };
    std::fs::write(&file, version("\"/one\", \"/two\"")).unwrap();
    let sandbox = daemon.sandbox_from_file("agent", &file).with_nameserver(&daemon.dir, upstream.net.v4(99));
    let mut client = KeptClient::start(&sandbox, "web.test");
    assert_eq!(client.request("GET", "/two").0, 200);

    let reloads =
        |rule: &str| daemon.decisions().iter().filter(|d| d.kind == Kind::Lifecycle && d.rule == rule).count();
    std::fs::write(&file, version("\"/one\"")).unwrap();
    daemon.wait_decisions("the edited file in force", |ds| ds.iter().any(|d| d.rule == "profile-reloaded"));
    assert_eq!(client.request("GET", "/two"), (403, "default-deny".to_owned()), "same kept connection, new profile");
    assert_eq!(client.request("GET", "/one").0, 200);

    std::fs::write(&file, "name = \"agent\"\n[[rule]]\nname = \"pages\"\naction = \"allow-ish\"\n").unwrap();
    let decisions =
        daemon.wait_decisions("the broken file refused", |ds| ds.iter().any(|d| d.rule == "profile-reload-failed"));
    let failed = decisions.iter().find(|d| d.rule == "profile-reload-failed").unwrap();
    assert!(
        failed.reason.contains("agent.toml:4:10") && failed.reason.contains("last good profile stays"),
        "{failed:?}"
    );
    assert_eq!(client.request("GET", "/one").0, 200, "the last good profile is still in force");
    assert_eq!(client.request("GET", "/two").0, 403);
    let reload = daemon.cli(&["policy", "reload"]);
    assert_eq!(reload.status.code(), Some(1), "{reload:?}");
    assert!(String::from_utf8_lossy(&reload.stdout).contains("agent: refused, the last good profile stays"));

    std::fs::write(&file, version("\"/two\"")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads("profile-reloaded") < 2 {
        assert!(Instant::now() < deadline, "the fixed file was not picked up");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(client.request("GET", "/two").0, 200);
    assert_eq!(client.request("GET", "/one").0, 403);
    assert_eq!(upstream.seen("/two"), 2);
}

#[test]
fn header_and_body_size_conditions_are_enforced_on_requests() {
    if !privileged() {
        return;
    }
    let upstream = Upstream::new();
    let daemon = upstream.daemon(&[]);
    let profile = r#"
name = "uploads"
[[rule]]
name = "small-tagged-uploads"
action = "allow"
hosts = ["web.test"]
methods = ["POST"]
paths = ["/upload"]
schemes = ["https"]
headers = { "x-agent" = "sluice-*" }
max_body = "1KiB"
"#;
    let sandbox = upstream.sandbox(&daemon, "uploader", profile);
    let script = r#"
import http.client, ssl
def post(size, agent=None, chunked=False):
    conn = http.client.HTTPSConnection("web.test", timeout=20, context=ssl.create_default_context())
    headers = {"x-agent": agent} if agent else {}
    body = b"x" * size
    if chunked:
        body = iter([b"x" * 512] * (size // 512))
    conn.request("POST", "/upload", body=body, headers=headers, encode_chunked=chunked)
    r = conn.getresponse(); r.read()
    return "%d/%s" % (r.status, r.getheader("x-sluice-rule") or "-")
print("small=" + post(600, "sluice-test"))
print("untagged=" + post(600))
print("wrongtag=" + post(600, "other"))
print("announced=" + post(2000, "sluice-test"))
print("chunked_small=" + post(1024, "sluice-test", chunked=True))
print("chunked_big=" + post(8192, "sluice-test", chunked=True))
"#;
    let output = sandbox.python(script);
    let fields = harness::fields(&output);
    assert_eq!(fields.get("small").map(String::as_str), Some("200/-"), "{output:?}");
    assert_eq!(fields["untagged"], "403/default-deny");
    assert_eq!(fields["wrongtag"], "403/default-deny");
    assert_eq!(fields["announced"], "403/default-deny", "a body announced larger than max_body does not match");
    assert_eq!(fields["chunked_small"], "200/-");
    assert_eq!(fields["chunked_big"], "413/small-tagged-uploads", "a streamed body past max_body is cut off");
    let complete: Vec<usize> = upstream.web.seen().iter().filter(|r| r.path == "/upload").map(|r| r.body_len).collect();
    assert!(complete.contains(&600) && complete.contains(&1024), "{complete:?}");
    assert!(!complete.contains(&2000) && !complete.iter().any(|&n| n > 1024), "{complete:?}");
    let cut = daemon.wait_decisions("the cut-off upload", |ds| ds.iter().any(|d| d.reason.contains("max_body")));
    assert!(cut.iter().any(|d| d.verdict == Verdict::Deny && d.reason.contains("grew past 1024 bytes")));
}

#[test]
fn policy_test_runs_cases_a_user_can_put_in_ci() {
    let dir = std::env::temp_dir().join(format!("sluice-policy-cases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join("agent.toml");
    std::fs::write(
        &profile,
        "name = \"agent\"\nbundles = [\"vcs.github.readonly\"]\n[[rule]]\nname = \"ask-posts\"\naction = \"ask\"\nhosts = [\"api.test\"]\nmethods = [\"POST\"]\n\
         [[rule]]\nname = \"ml-models\"\naction = \"allow\"\nhosts = [\"models.test\"]\nlabels = { team = \"ml*\" }\n",
    )
    .unwrap();
    let cases = dir.join("cases.toml");
    let passing = r#"
[[case]]
name = "clone"
method = "POST"
url = "https://github.com/sluice/sluice.git/git-upload-pack"
expect = "allow"
rule = "vcs.github.readonly/fetch"
[[case]]
name = "push"
method = "POST"
url = "https://github.com/sluice/sluice.git/git-receive-pack"
expect = "deny"
[[case]]
method = "POST"
url = "https://api.test/things"
expect = "ask"
[[case]]
name = "ml-container"
url = "https://models.test/weights"
labels = { team = "ml-research" }
expect = "allow"
rule = "ml-models"
[[case]]
name = "web-container"
url = "https://models.test/weights"
labels = { team = "web" }
expect = "deny"
"#;
    std::fs::write(&cases, passing).unwrap();
    let run = || harness::run_sluice(&["policy", "test", profile.to_str().unwrap(), cases.to_str().unwrap()]);
    let output = run();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{output:?}");
    assert!(text.contains("ok   clone") && text.contains("5 cases, 5 passed, 0 failed"), "{text}");

    std::fs::write(&cases, passing.replace("expect = \"deny\"", "expect = \"allow\"")).unwrap();
    let output = run();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL push: POST https://github.com/sluice/sluice.git/git-receive-pack -> deny by default-deny"),
        "{text}"
    );

    std::fs::write(&cases, "[[case]]\nurl = \"https://a.test/\"\nexpect = \"maybe\"\n").unwrap();
    let output = run();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("expect must be allow, ask or deny"), "{output:?}");
    std::fs::write(&cases, "[[case]]\nurl = \"https://a.test/\"\nexpekt = \"allow\"\n").unwrap();
    let output = run();
    assert!(String::from_utf8_lossy(&output.stderr).contains("cases.toml:3:1"), "{output:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
