//! One sandbox cannot starve the others: a noisy sandbox that opens far
//! more connections than its limit, or opens them faster than its rate, is
//! refused beyond it with a few summed records, while a quiet neighbour's
//! requests at the same time are still served promptly; a client that
//! sends no request head is closed after the header timeout. The judge is
//! the test upstream in its own network namespace (how many connections
//! it accepted). Needs root.

mod harness;

use std::{
    net::{IpAddr, SocketAddr},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use harness::{
    privileged,
    web::{TestCa, WebServer},
    Daemon, EchoServer, Sandbox, TestNet,
};
use sluice::audit::{Decision, Verdict};

const ECHO_PORT: u16 = 7000;

fn profile(ip: IpAddr) -> String {
    format!(
        "name = \"limits\"\n[[rule]]\nname = \"test-host\"\naction = \"allow\"\nips = [\"{ip}/32\"]\nports = [{ECHO_PORT}, 80, 443]\n"
    )
}

fn limit_records<'a>(decisions: &'a [Decision], sandbox: &str, rule: &str) -> Vec<&'a Decision> {
    decisions.iter().filter(|d| d.sandbox.as_deref() == Some(sandbox) && d.rule == rule).collect()
}

/// The number in "N connections refused" of a summed record (1 for the
/// first record of a run).
fn refused_count(decision: &Decision) -> u64 {
    decision.reason.split("; ").nth(1).and_then(|tail| tail.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(1)
}

/// Opens `count` connections to the echo server at once, each saying
/// "ping"; prints how many were echoed and how many closed, writes `ready`
/// and holds them open for `hold` seconds.
fn spawn_noisy(sandbox: &Sandbox, ip: IpAddr, count: usize, ready: &std::path::Path, hold: u64) -> Child {
    let script = format!(
        r#"
import socket, time
socks = []
for i in range({count}):
    s = socket.create_connection(("{ip}", {ECHO_PORT}), timeout=10)
    try:
        s.sendall(b"ping")
    except OSError:
        pass
    socks.append(s)
echoed = closed = 0
for s in socks:
    try:
        echoed += 1 if s.recv(16) else 0
    except OSError:
        pass
closed = len(socks) - echoed
print("echoed=%d" % echoed, flush=True)
print("closed=%d" % closed, flush=True)
open("{ready}", "w").write("ready")
time.sleep({hold})
"#,
        ready = ready.display()
    );
    sandbox
        .command("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the noisy client")
}

/// `count` request-response exchanges over fresh connections; prints
/// how many succeeded and the slowest one in milliseconds.
fn quiet_exchanges(sandbox: &Sandbox, ip: IpAddr, count: usize) -> std::collections::HashMap<String, String> {
    let script = format!(
        r#"
import socket, time
ok = 0
slowest = 0.0
for i in range({count}):
    start = time.monotonic()
    try:
        s = socket.create_connection(("{ip}", {ECHO_PORT}), timeout=10)
        s.sendall(b"quiet")
        got = b""
        while len(got) < 5:
            chunk = s.recv(16)
            if not chunk:
                break
            got += chunk
        s.close()
        if got == b"quiet":
            ok += 1
    except OSError:
        pass
    slowest = max(slowest, time.monotonic() - start)
    time.sleep(0.02)
print("ok=%d" % ok)
print("slowest_ms=%d" % (slowest * 1000))
"#
    );
    harness::fields(&harness::run_python(sandbox.command("python3"), &script))
}

fn finish(child: Child) -> std::collections::HashMap<String, String> {
    let output = child.wait_with_output().expect("noisy client");
    harness::fields(&output)
}

fn wait_for(path: &std::path::Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the noisy client exited early with {status}");
        }
        assert!(Instant::now() < deadline, "the noisy client never got its connections");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_sandbox_over_its_open_connections_limit_is_refused_and_its_neighbour_is_served() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let net = TestNet::new();
    let ip = net.v4(2);
    let echo = EchoServer::start(net.tcp_listener(SocketAddr::new(ip, ECHO_PORT)));
    let daemon = Daemon::start_with_args(
        &["--max-connections-per-sandbox", "64", "--limit-record-interval", "2s"].map(str::to_owned),
    );
    let noisy = daemon.sandbox("noisy", &profile(ip));
    let quiet = daemon.sandbox("quiet", &profile(ip));

    let ready = daemon.dir.join("noisy-ready");
    let mut child = spawn_noisy(&noisy, ip, 300, &ready, 6);
    wait_for(&ready, &mut child);
    // The upstream saw no more than the limit from the noisy sandbox.
    let from_noisy = echo.accepted();
    assert!(from_noisy <= 64, "the upstream accepted {from_noisy} connections from a sandbox limited to 64");

    // Meanwhile, the quiet sandbox is served, and promptly.
    let got = quiet_exchanges(&quiet, ip, 20);
    assert_eq!(got["ok"], "20", "every quiet exchange succeeds while the neighbour floods: {got:?}");
    let slowest: u64 = got["slowest_ms"].parse().unwrap();
    assert!(slowest < 1000, "a quiet exchange took {slowest} ms");

    let noisy_got = finish(child);
    assert_eq!(noisy_got["echoed"], "64", "exactly the limit is served: {noisy_got:?}");
    assert_eq!(noisy_got["closed"], "236", "the rest is refused: {noisy_got:?}");
    assert_eq!(echo.accepted(), 64 + 20, "the upstream received the allowed connections only");

    // A handful of summed records, not one per refused connection.
    let decisions = daemon.wait_decisions("the refusals summed up", |decisions| {
        limit_records(decisions, "noisy", "limit-connections").iter().map(|d| refused_count(d)).sum::<u64>() == 236
    });
    let records = limit_records(&decisions, "noisy", "limit-connections");
    assert!(records.len() <= 4, "{} records for one flood", records.len());
    assert!(records.iter().all(|d| d.verdict == Verdict::Deny));
    assert!(records[0].reason.contains("limit of 64 open connections"), "{}", records[0].reason);
    assert!(limit_records(&decisions, "quiet", "limit-connections").is_empty(), "the neighbour was never refused");

    // Once its connections are closed the noisy sandbox is served again.
    let again = quiet_exchanges(&noisy, ip, 3);
    assert_eq!(again["ok"], "3", "{again:?}");
}

#[test]
fn a_sandbox_opening_connections_faster_than_its_rate_is_refused_beyond_it() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let net = TestNet::new();
    let ip = net.v4(2);
    let echo = EchoServer::start(net.tcp_listener(SocketAddr::new(ip, ECHO_PORT)));
    let daemon = Daemon::start_with_args(
        &["--connections-per-second", "5", "--connection-burst", "10", "--limit-record-interval", "2s"]
            .map(str::to_owned),
    );
    let noisy = daemon.sandbox("flood", &profile(ip));
    let quiet = daemon.sandbox("calm", &profile(ip));

    let started = Instant::now();
    let got = quiet_exchanges(&noisy, ip, 60);
    let elapsed = started.elapsed().as_secs_f64();
    let served: u64 = got["ok"].parse().unwrap();
    // The burst, plus the rate over the time taken, plus a little slack for
    // rounding at the edges.
    let allowed = 10.0 + 5.0 * elapsed + 2.0;
    assert!(served >= 10, "the burst is served: {got:?}");
    assert!((served as f64) <= allowed, "{served} served in {elapsed:.1} s at 5/s with a burst of 10");
    assert_eq!(echo.accepted() as u64, served, "the upstream received the admitted connections only");

    let calm = quiet_exchanges(&quiet, ip, 5);
    assert_eq!(calm["ok"], "5", "the neighbour has its own rate: {calm:?}");

    let refused = 60 - served;
    let decisions = daemon.wait_decisions("the rate refusals summed up", |decisions| {
        limit_records(decisions, "flood", "limit-connection-rate").iter().map(|d| refused_count(d)).sum::<u64>()
            == refused
    });
    let records = limit_records(&decisions, "flood", "limit-connection-rate");
    let bound = 2 + (elapsed / 2.0).ceil() as usize;
    assert!(records.len() <= bound, "{} records for {refused} refusals in {elapsed:.1} s", records.len());
}

#[test]
fn a_client_that_sends_no_request_head_is_closed_after_the_header_timeout() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let net = TestNet::new();
    let ip = net.v4(2);
    let ca = TestCa::new();
    let names = [ip.to_string()];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let _tls = WebServer::start(&net, SocketAddr::new(ip, 443), Some(ca.server_config(&names, false)));
    let plain = WebServer::start(&net, SocketAddr::new(ip, 80), None);
    let mut args = vec!["--header-read-timeout".to_owned(), "2s".to_owned()];
    let ca_path = std::env::temp_dir().join(format!("sluice-limits-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    args.extend(["--upstream-ca".to_owned(), ca_path.display().to_string()]);
    let daemon = Daemon::start_with_args(&args);
    let _ = std::fs::remove_file(&ca_path);
    let sandbox = daemon.sandbox("silent", &profile(ip));

    let got = harness::fields(&harness::run_python(
        sandbox.command("python3"),
        &format!(
            r#"
import socket, ssl, time
def closed_after(sock):
    start = time.monotonic()
    try:
        data = sock.recv(1)
        how = "eof" if not data else "data"
    except socket.timeout:
        how = "open"
    except (OSError, ssl.SSLError):
        how = "reset"
    return how, time.monotonic() - start
# TLS: the handshake completes, then no request follows.
raw = socket.create_connection(("{ip}", 443), timeout=15)
tls = ssl._create_unverified_context().wrap_socket(raw, server_hostname=None)
how, after = closed_after(tls)
print("tls=%s" % how)
print("tls_after_ms=%d" % (after * 1000))
# Plain HTTP: one request answered, then the kept-alive connection idles.
s = socket.create_connection(("{ip}", 80), timeout=15)
s.sendall(b"GET /first HTTP/1.1\r\nHost: {ip}\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
print("first=%s" % head.split(b" ")[1].decode())
how, after = closed_after(s)
print("plain=%s" % how)
print("plain_after_ms=%d" % (after * 1000))
"#
        ),
    ));
    for (what, after) in [("tls", "tls_after_ms"), ("plain", "plain_after_ms")] {
        assert_ne!(got[what], "open", "{what}: the silent client was not closed: {got:?}");
        assert_ne!(got[what], "data", "{what}: {got:?}");
        let after: u64 = got[after].parse().unwrap();
        assert!((1500..10_000).contains(&after), "{what}: closed after {after} ms, the timeout is 2 s: {got:?}");
    }
    assert_eq!(got["first"], "200", "{got:?}");
    assert_eq!(plain.seen().len(), 1, "the upstream saw the one request");
}
