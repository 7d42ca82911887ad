//! The classic way to reach sluice's proxy: a network namespace whose TCP
//! traffic an iptables REDIRECT rule on the host side of its veth sends to a
//! `--redirect-listener`. The original destination comes from conntrack
//! (IPv4 and IPv6), the sandbox named for the listener decides, and test
//! hosts in another namespace show what actually arrived.

mod harness;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use harness::{privileged, Daemon, EchoServer, TestNet};
use sluice::audit::{Kind, Verdict};

/// An iptables (or ip6tables) nat rule, deleted on drop.
struct NatRule {
    program: &'static str,
    spec: Vec<String>,
}

impl NatRule {
    fn add(program: &'static str, spec: &[&str]) -> Self {
        let spec: Vec<String> = spec.iter().map(|s| (*s).to_owned()).collect();
        let status = Command::new(program).args(["-w", "-t", "nat", "-A"]).args(&spec).status().expect("run iptables");
        assert!(status.success(), "{program} -t nat -A {spec:?} failed");
        Self { program, spec }
    }
}

impl Drop for NatRule {
    fn drop(&mut self) {
        let _ = Command::new(self.program).args(["-w", "-t", "nat", "-D"]).args(&self.spec).status();
    }
}

fn iptables_available() -> bool {
    if Command::new("iptables").arg("-V").output().is_err() {
        eprintln!("SKIPPED: needs iptables (`cargo xtask setup` installs it)");
        return false;
    }
    true
}

fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// Sends `message` from inside `net` and returns what came back before the
/// connection closed (or 2 s passed).
fn exchange(net: &TestNet, to: SocketAddr, message: &'static [u8]) -> Vec<u8> {
    net.spawn(move || {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        stream.write_all(message).unwrap();
        let mut back = vec![0u8; message.len()];
        let mut got = 0;
        while got < back.len() {
            match stream.read(&mut back[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        back.truncate(got);
        back
    })
    .join()
    .unwrap()
}

#[test]
fn redirected_connections_reach_their_original_destination_under_the_named_sandbox_v4_and_v6() {
    if !privileged() || !iptables_available() {
        return;
    }
    // `clients`: the namespace whose traffic is redirected; `hosts`: the
    // servers it tries to reach, an allowed one and a canary.
    let clients = TestNet::new();
    let hosts = TestNet::new();
    let server = EchoServer::start(hosts.tcp_listener(SocketAddr::new(hosts.v4(2), 8080)));
    let server6 = EchoServer::start(hosts.tcp_listener(SocketAddr::new(hosts.v6(2), 8080)));
    let canary_ip = hosts.add_host(3);
    let canary = EchoServer::start(hosts.tcp_listener(SocketAddr::new(canary_ip, 8080)));
    for (family, gateway) in [("-4", clients.v4(1)), ("-6", clients.v6(1))] {
        let gateway = gateway.to_string();
        let status = Command::new("ip")
            .args(["netns", "exec", &clients.name, "ip", family, "route", "add", "default", "via", &gateway])
            .status()
            .unwrap();
        assert!(status.success());
    }

    let (listen4, listen6) = (clients.v4(1), clients.v6(1));
    let (port4, port6) = (free_port(listen4), free_port(listen6));
    let daemon = Daemon::start_with_args(&[
        "--redirect-listener".into(),
        format!("{}={}", SocketAddr::new(listen4, port4), "gateway"),
        "--redirect-listener".into(),
        format!("{}={}", SocketAddr::new(listen6, port6), "gateway"),
    ]);
    let host_if = format!("slh{}", clients.n);
    let _rule4 = NatRule::add(
        "iptables",
        &["PREROUTING", "-i", &host_if, "-p", "tcp", "-j", "REDIRECT", "--to-ports", &port4.to_string()],
    );
    let _rule6 = NatRule::add(
        "ip6tables",
        &["PREROUTING", "-i", &host_if, "-p", "tcp", "-j", "REDIRECT", "--to-ports", &port6.to_string()],
    );

    // Before the sandbox exists, redirected connections are refused.
    let allowed = SocketAddr::new(hosts.v4(2), 8080);
    assert_eq!(exchange(&clients, allowed, b"too early"), b"", "no sandbox yet, yet bytes came back");
    daemon.wait_decisions("unknown-sandbox", |d| d.iter().any(|d| d.rule == "unknown-sandbox"));
    assert_eq!(server.accepted(), 0, "reached the host with no sandbox registered");

    daemon.sandbox(
        "gateway",
        &format!(
            "name = \"gateway\"\n[[rule]]\nname = \"test-host\"\naction = \"allow\"\nips = [\"{}/32\", \"{}/128\"]\nports = [8080]\n",
            hosts.v4(2),
            hosts.v6(2)
        ),
    );
    assert_eq!(exchange(&clients, allowed, b"hello over v4"), b"hello over v4");
    let allowed6 = SocketAddr::new(hosts.v6(2), 8080);
    assert_eq!(exchange(&clients, allowed6, b"hello over v6"), b"hello over v6");
    assert_eq!(exchange(&clients, SocketAddr::new(canary_ip, 8080), b"let me in"), b"");

    // Not redirected: straight to the listener from the host. Its original
    // destination is the listener itself, which is refused.
    let mut direct = TcpStream::connect((listen4, port4)).unwrap();
    direct.write_all(b"hello").unwrap();
    direct.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(direct.read(&mut [0u8; 16]).unwrap_or(0), 0);

    let decisions = daemon.wait_decisions("allow v4, allow v6, deny canary, no original destination", |d| {
        let connects = |verdict: Verdict| d.iter().filter(move |d| d.kind == Kind::Connect && d.verdict == verdict);
        connects(Verdict::Allow).count() >= 2
            && connects(Verdict::Deny).any(|d| d.destination == Some(SocketAddr::new(canary_ip, 8080)))
            && d.iter().any(|d| d.rule == "sluice-itself")
    });
    for destination in [allowed, allowed6] {
        let decision = decisions
            .iter()
            .find(|d| d.verdict == Verdict::Allow && d.destination == Some(destination))
            .unwrap_or_else(|| panic!("no allow decision for {destination}"));
        assert_eq!(decision.sandbox.as_deref(), Some("gateway"));
        assert_eq!(decision.rule, "test-host");
        assert_eq!(decision.pid, None, "a redirected connection's process is not known");
    }
    let denied = decisions.iter().find(|d| d.destination == Some(SocketAddr::new(canary_ip, 8080))).unwrap();
    assert_eq!((denied.verdict, denied.sandbox.as_deref()), (Verdict::Deny, Some("gateway")));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.seen().iter().map(|s| s.received.clone()).collect::<Vec<_>>(), [b"hello over v4".to_vec()]);
    assert_eq!(server6.seen().iter().map(|s| s.received.clone()).collect::<Vec<_>>(), [b"hello over v6".to_vec()]);
    assert_eq!(canary.accepted(), 0, "the denied host was reached");
}
