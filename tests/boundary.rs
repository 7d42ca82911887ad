//! The kernel side of the boundary between a sandbox and the host: what a
//! sandbox's loopback is, and what a sandbox may bind while sluice is down.
//! Judged by listeners the tests own (on the host's loopback and inside a
//! test network namespace) and by a restarted daemon that serves again.
//! Needs root.

mod harness;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    process::Output,
    time::Duration,
};

use harness::{docker, in_cgroup, run_python, Daemon, EchoServer, TestNet};
use sluice::{
    audit::Verdict,
    control::RegisterRequest,
    sandbox::{Placement, ProfileSource},
};

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Connects to each address, sends its own line and prints what came back.
const ECHO_CLIENT: &str = r#"
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect((host.strip("[]"), int(port)))
        line = ("hello " + target).encode()
        s.sendall(line)
        got = s.recv(100)
        s.close()
        print(target, "echo=" + got.decode(errors="replace"))
    except OSError as e:
        print(target, "error=" + str(e))
"#;

/// A profile that would let the proxy reach the host's loopback on `ports`:
/// if a container's loopback connects were sent to the proxy, nothing but
/// the kernel would keep them from the host's services.
fn loopback_profile(ports: &[u16]) -> String {
    format!(
        "name = \"loopback\"\n[[rule]]\nname = \"host-loopback\"\naction = \"allow\"\n\
         ips = [\"127.0.0.0/8\", \"::1/128\"]\nports = {ports:?}\n"
    )
}

fn host_listener(ip: IpAddr) -> TcpListener {
    TcpListener::bind(SocketAddr::new(ip, 0)).unwrap()
}

#[test]
fn a_containers_loopback_is_its_own_never_the_hosts() {
    if !harness::privileged() {
        return;
    }
    let net = TestNet::new();
    let daemon =
        Daemon::start_with_args(&["--container-address".to_owned(), docker::container_address(&net).to_string()]);
    // Host services on loopback, and, on the same ports, the container's
    // own services on its own loopback (in the test network namespace).
    let host4 = EchoServer::start(host_listener(Ipv4Addr::LOCALHOST.into()));
    let host6 = EchoServer::start(host_listener(Ipv6Addr::LOCALHOST.into()));
    let (port4, port6) = (host4.addr.port(), host6.addr.port());
    let own4 = EchoServer::start(net.tcp_listener(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port4)));
    let own6 = EchoServer::start(net.tcp_listener(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port6)));
    // Where Docker's embedded resolver sits, which forwards to the host's
    // resolvers: not the container's own, refused.
    let runtime_resolver: IpAddr = Ipv4Addr::new(127, 0, 0, 11).into();
    let resolver = EchoServer::start(net.tcp_listener(SocketAddr::new(runtime_resolver, port4)));

    let request = RegisterRequest {
        name: "ctr-loop".to_owned(),
        cgroup: None,
        profile: ProfileSource::Inline { origin: "loopback.toml".into(), text: loopback_profile(&[port4, port6]) },
        placement: Placement::Container,
    };
    let status = harness::block_on(daemon.client().register(&request)).expect("register");
    let mut command = in_cgroup(&status.record.cgroup, "ip");
    command.args(["netns", "exec", &net.name, "python3"]);
    let targets = [format!("127.0.0.1:{port4}"), format!("[::1]:{port6}")];
    let all = [targets[0].clone(), targets[1].clone(), format!("127.0.0.11:{port4}")];
    let script = format!("import sys; sys.argv[1:] = {all:?}\n{ECHO_CLIENT}");
    let output = run_python(command, &script);
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    // Give a connection the proxy might have opened time to arrive.
    std::thread::sleep(Duration::from_millis(300));

    assert_eq!(host4.accepted() + host6.accepted(), 0, "the host's loopback was reached:\n{}", text(&output));
    assert_eq!(resolver.accepted(), 0, "Docker's resolver address was reached:\n{}", text(&output));
    assert!(printed.contains(&format!("127.0.0.11:{port4} error=")), "{}", text(&output));
    for (target, own) in targets.iter().zip([&own4, &own6]) {
        assert!(printed.contains(&format!("{target} echo=hello {target}")), "{target}:\n{}", text(&output));
        let seen = own.seen();
        assert_eq!(own.accepted(), 1, "{target}: the container's own listener:\n{}", text(&output));
        assert!(seen.iter().any(|s| s.received == format!("hello {target}").as_bytes()), "{seen:?}");
    }
    daemon.wait_decisions("the runtime resolver refused in the kernel", |decisions| {
        decisions.iter().any(|d| d.rule == "kernel-runtime-resolver" && d.sandbox.as_deref() == Some("ctr-loop"))
    });
}

/// A sandbox in the host's own network namespace shares the host's
/// loopback: its connects there go to the proxy, and only what its
/// profile names gets through (the built-in profile names none).
#[test]
fn host_loopback_from_a_host_sandbox_is_only_what_the_profile_allows() {
    if !harness::privileged() {
        return;
    }
    let daemon = Daemon::start(None);
    let allowed = EchoServer::start(host_listener(Ipv4Addr::LOCALHOST.into()));
    let other = EchoServer::start(host_listener(Ipv4Addr::LOCALHOST.into()));
    let sandbox = daemon.sandbox("host-loop", &loopback_profile(&[allowed.addr.port()]));
    let targets = [allowed.addr.to_string(), other.addr.to_string()];
    let script = format!("import sys; sys.argv[1:] = {targets:?}\n{ECHO_CLIENT}");
    let output = sandbox.python(&script);
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(printed.contains(&format!("{} echo=hello", allowed.addr)), "{}", text(&output));
    assert_eq!(allowed.accepted(), 1, "{}", text(&output));
    assert_eq!(other.accepted(), 0, "a loopback port the profile does not name was reached:\n{}", text(&output));
    let destination = other.addr;
    daemon.wait_decisions("the unnamed loopback port denied", |decisions| {
        decisions.iter().any(|d| d.verdict == Verdict::Deny && d.destination == Some(destination))
    });
}

/// Tries to bind each of `SPECS` (`proto:ip:port`) and keeps what it got
/// for `HOLD` seconds, printing one line per attempt.
const BINDER: &str = r#"
import socket, sys, time
held = []
for spec in SPECS:
    proto, rest = spec.split(":", 1)
    host, port = rest.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family, kind)
    try:
        s.bind((host, int(port)))
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        held.append(s)
        print(spec, "bound", flush=True)
    except OSError as e:
        print(spec, "refused", e.errno, flush=True)
time.sleep(HOLD)
"#;

fn binder(hold_secs: u32, specs: &[String]) -> String {
    format!("HOLD = {hold_secs}\nSPECS = {specs:?}\n{BINDER}")
}

#[test]
fn a_sandbox_cannot_take_sluices_ports_while_it_is_down() {
    if !harness::privileged() {
        return;
    }
    let mut daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("squatter", &loopback_profile(&[9]));
    let health = harness::block_on(daemon.client().health()).expect("health");
    let proxy_port = health.proxy_port;
    let resolver_port = daemon.statuses().iter().find(|s| s.record.name == "squatter").expect("status").record.dns_port;
    let canary = EchoServer::start(host_listener(Ipv4Addr::LOCALHOST.into()));

    daemon.kill();
    let specs = [
        format!("tcp:127.0.0.1:{proxy_port}"),
        format!("tcp:0.0.0.0:{proxy_port}"),
        format!("tcp:[::]:{proxy_port}"),
        format!("udp:127.0.0.1:{resolver_port}"),
        format!("tcp:127.0.0.1:{resolver_port}"),
        format!("udp:0.0.0.0:{resolver_port}"),
    ];
    // The squatter holds whatever it bound while the daemon starts again.
    let mut command = sandbox.command("python3");
    command.arg("-c").arg(binder(20, &specs));
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut squatter = Squatter(command.spawn().unwrap());
    let lines = squatter.lines(specs.len());
    for (spec, line) in specs.iter().zip(&lines) {
        assert!(line.starts_with(&format!("{spec} refused {}", libc::EPERM)), "{spec}: {line}\nall: {lines:?}");
    }
    // Binding other ports still works: only sluice's are reserved.
    let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let other = sandbox.python(&binder(0, &[format!("tcp:127.0.0.1:{free}")]));
    assert!(String::from_utf8_lossy(&other.stdout).contains("bound"), "{}", text(&other));

    daemon.restart();
    // It serves: a sandboxed connect is redirected and decided again.
    let probe = sandbox.python(&format!("import sys; sys.argv[1:] = ['{}']\n{ECHO_CLIENT}", canary.addr));
    let destination = canary.addr;
    daemon.wait_decisions("a connect decided after the restart", |decisions| {
        decisions.iter().any(|d| d.destination == Some(destination) && d.verdict == Verdict::Deny)
    });
    assert_eq!(canary.accepted(), 0, "{}", text(&probe));
    let refusals = daemon.decisions().into_iter().filter(|d| d.rule == "kernel-bind-reserved").count();
    assert!(refusals >= specs.len(), "every refused bind is a record; {refusals} found");
    drop(squatter);
}

/// A sandboxed process the test started, killed however the test ends.
struct Squatter(std::process::Child);

impl Squatter {
    /// The first `n` lines it prints.
    fn lines(&mut self, n: usize) -> Vec<String> {
        use std::io::BufRead as _;
        let stdout = self.0.stdout.take().unwrap();
        let mut reader = std::io::BufReader::new(stdout);
        let mut lines = Vec::new();
        for _ in 0..n {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            lines.push(line.trim_end().to_owned());
        }
        assert_eq!(lines.len(), n, "the squatter stopped early: {lines:?}");
        lines
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
