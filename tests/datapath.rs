//! The kernel datapath against the real kernel: real cgroups, real eBPF,
//! real network namespaces, a real `sluice daemon`. Each test shows what a
//! test host actually received. Needs root; skips with a message otherwise.

mod harness;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use harness::{dns::TestDns, fields, privileged, Daemon, EchoServer, TestNet, UdpCanary};
use sluice::audit::{Decision, HostSource, Kind, Verdict};

fn allow_net_profile(net: &TestNet, port: u16) -> String {
    format!(
        r#"name = "test-net"
[[rule]]
name = "test-host"
action = "allow"
ips = ["{}/32", "{}/128"]
ports = [{port}]
"#,
        net.v4(2),
        net.v6(2)
    )
}

/// A test network with an echo server at .2:8080 and a canary at .3:8080
/// that must receive nothing.
fn host_and_canary() -> (TestNet, EchoServer, std::net::IpAddr, EchoServer) {
    let net = TestNet::new();
    let server = EchoServer::start(net.tcp_listener(SocketAddr::new(net.v4(2), 8080)));
    let canary_ip = net.add_host(3);
    let canary = EchoServer::start(net.tcp_listener(SocketAddr::new(canary_ip, 8080)));
    (net, server, canary_ip, canary)
}

#[test]
fn sandboxed_connects_reach_their_original_destination_v4_v6_and_mapped() {
    if !privileged() {
        return;
    }
    let net = TestNet::new();
    let server = EchoServer::start(net.tcp_listener("[::]:8080".parse().unwrap()));
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("dest", &allow_net_profile(&net, 8080));
    let output = sandbox.python(&format!(
        r#"
import os, socket
for label, family, addr in [("v4", socket.AF_INET, ("{v4}", 8080)),
                            ("v6", socket.AF_INET6, ("{v6}", 8080)),
                            ("v6only", socket.AF_INET6, ("{v6}", 8080)),
                            ("mapped", socket.AF_INET6, ("::ffff:{v4}", 8080))]:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    if label == "v6only":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.connect(addr)
    peer = s.getpeername()
    s.sendall(("hello-" + label).encode())
    data = s.recv(100)
    s.close()
    print(label + "_peer=" + peer[0] + ":" + str(peer[1]))
    print(label + "_echo=" + data.decode())
print("pid=" + str(os.getpid()))
"#,
        v4 = net.v4(2),
        v6 = net.v6(2)
    ));
    let got = fields(&output);
    for label in ["v4", "v6", "v6only", "mapped"] {
        assert_eq!(got[&format!("{label}_echo")], format!("hello-{label}"), "{label} bytes did not round-trip");
    }
    // getpeername shows the address the sandbox asked for, not sluice's.
    assert_eq!(got["v4_peer"], format!("{}:8080", net.v4(2)));
    assert_eq!(got["v6_peer"], format!("{}:8080", net.v6(2)));
    assert_eq!(got["mapped_peer"], format!("::ffff:{}:8080", net.v4(2)));

    // The test host received exactly these four connections.
    let mut payloads: Vec<String> =
        server.seen().iter().map(|s| String::from_utf8_lossy(&s.received).into_owned()).collect();
    payloads.sort();
    assert_eq!(payloads, ["hello-mapped", "hello-v4", "hello-v6", "hello-v6only"]);

    // The proxy recovered destination, sandbox and pid for each.
    let pid: u32 = got["pid"].parse().unwrap();
    let decisions = daemon.wait_decisions("four allowed connects", |d| {
        d.iter().filter(|d| d.kind == Kind::Connect && d.verdict == Verdict::Allow).count() == 4
    });
    let mut destinations: Vec<SocketAddr> = decisions
        .iter()
        .filter(|d| d.kind == Kind::Connect)
        .map(|d| {
            assert_eq!(d.sandbox.as_deref(), Some("dest"));
            assert_eq!(d.pid, Some(pid));
            assert_eq!(d.rule, "test-host");
            d.destination.unwrap()
        })
        .collect();
    destinations.sort();
    let v4: SocketAddr = SocketAddr::new(net.v4(2), 8080);
    let v6: SocketAddr = SocketAddr::new(net.v6(2), 8080);
    let mut expected = vec![v4, v4, v6, v6];
    expected.sort();
    assert_eq!(destinations, expected);
}

#[test]
fn five_hundred_concurrent_connects_from_two_sandboxes_are_attributed_correctly() {
    if !privileged() {
        return;
    }
    let net = TestNet::new();
    let server = EchoServer::start(net.tcp_listener(SocketAddr::new(net.v4(2), 8080)));
    let daemon = Daemon::start(None);
    let allowed = daemon.sandbox("crowd-a", &allow_net_profile(&net, 8080));
    // Same destination, but this sandbox may only use another port.
    let denied = daemon.sandbox("crowd-b", &allow_net_profile(&net, 9999));
    let script = |tag: &str| {
        format!(
            r#"
import os, socket, threading
barrier = threading.Barrier(250)
results = []
def one(i):
    s = socket.socket()
    s.settimeout(20)
    barrier.wait()
    try:
        s.connect(("{ip}", 8080))
        msg = ("{tag}-%d" % i).encode()
        s.sendall(msg)
        data = s.recv(100)
        results.append("ok" if data == msg else "closed")
    except OSError:
        results.append("closed")
    finally:
        s.close()
threads = [threading.Thread(target=one, args=(i,)) for i in range(250)]
for t in threads: t.start()
for t in threads: t.join()
print("pid=" + str(os.getpid()))
print("ok=" + str(results.count("ok")))
print("closed=" + str(results.count("closed")))
"#,
            ip = net.v4(2)
        )
    };
    let (script_a, script_b) = (script("A"), script("B"));
    let (a, b) = (allowed.clone(), denied.clone());
    let run_a = std::thread::spawn(move || a.python(&script_a));
    let run_b = std::thread::spawn(move || b.python(&script_b));
    let (out_a, out_b) = (fields(&run_a.join().unwrap()), fields(&run_b.join().unwrap()));
    assert_eq!(out_a["ok"], "250", "sandbox A: {out_a:?}");
    assert_eq!(out_b["ok"], "0", "sandbox B: {out_b:?}");
    assert_eq!(out_b["closed"], "250");

    // The host got A's 250 connections and not one of B's.
    std::thread::sleep(Duration::from_millis(200));
    let seen = server.seen();
    assert_eq!(server.accepted(), 250);
    assert!(seen.iter().all(|s| s.received.starts_with(b"A-")), "a B connection reached the host");

    let (pid_a, pid_b): (u32, u32) = (out_a["pid"].parse().unwrap(), out_b["pid"].parse().unwrap());
    // Every allowed connect is a record; identical refusals beyond the
    // first few of an interval are counted into one summary, not written.
    let allowed = |d: &Decision| d.kind == Kind::Connect && d.verdict == Verdict::Allow;
    let denied = |d: &Decision| d.kind == Kind::Connect && d.verdict == Verdict::Deny;
    let decisions = daemon.wait_decisions("250 allowed and the denied connects", |d| {
        d.iter().filter(|d| allowed(d)).count() >= 250 && d.iter().any(denied)
    });
    let connects: Vec<_> = decisions.iter().filter(|d| d.kind == Kind::Connect).collect();
    assert_eq!(connects.iter().filter(|d| allowed(d)).count(), 250);
    for d in connects {
        match d.sandbox.as_deref() {
            Some("crowd-a") => assert_eq!((d.pid, d.verdict), (Some(pid_a), Verdict::Allow), "{d}"),
            Some("crowd-b") => assert_eq!((d.pid, d.verdict), (Some(pid_b), Verdict::Deny), "{d}"),
            other => panic!("decision attributed to {other:?}: {d}"),
        }
    }
}

#[test]
fn a_child_cgroup_made_inside_the_sandbox_stays_enforced() {
    if !privileged() {
        return;
    }
    let (net, server, canary_ip, canary) = host_and_canary();
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("nested", &allow_net_profile(&net, 8080));
    let output = sandbox.python(&format!(
        r#"
import os, socket
cg = "{cgroup}/inner/deeper"
os.makedirs(cg)
with open(cg + "/cgroup.procs", "w") as f: f.write("0")
print("cgroup=" + open("/proc/self/cgroup").read().strip().split("::")[-1])
s = socket.create_connection(("{ip}", 8080), timeout=10)
s.sendall(b"from-inner"); print("echo=" + s.recv(100).decode()); s.close()
s = socket.create_connection(("{canary}", 8080), timeout=10)
s.sendall(b"escape")
print("canary=" + repr(s.recv(100)))
"#,
        cgroup = sandbox.cgroup.display(),
        ip = net.v4(2),
        canary = canary_ip
    ));
    let got = fields(&output);
    assert!(got["cgroup"].ends_with("/nested/inner/deeper"), "{got:?}");
    assert_eq!(got["echo"], "from-inner");
    assert_eq!(got["canary"], "b''", "the canary connection was not closed");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(canary.accepted(), 0, "the canary was reached from a child cgroup");
    assert_eq!(server.accepted(), 1);
    let decisions = daemon.wait_decisions("allow and deny from the child cgroup", |d| {
        d.iter().filter(|d| d.kind == Kind::Connect).count() >= 2
    });
    for d in decisions.iter().filter(|d| d.kind == Kind::Connect) {
        assert_eq!(d.sandbox.as_deref(), Some("nested"), "{d}");
    }
}

#[test]
fn udp_raw_and_packet_sockets_are_refused_in_the_kernel() {
    if !privileged() {
        return;
    }
    let net = TestNet::new();
    let canary4 = UdpCanary::start(net.udp_socket(SocketAddr::new(net.v4(2), 9999)));
    let canary6 = UdpCanary::start(net.udp_socket(SocketAddr::new(net.v6(2), 9999)));
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("sockets", &allow_net_profile(&net, 9999));
    let output = sandbox.python(&format!(
        r#"
import socket
def attempt(label, f):
    try:
        f(); print(label + "=allowed")
    except PermissionError:
        print(label + "=EPERM")
    except OSError as e:
        print(label + "=" + type(e).__name__ + ":" + str(e.errno))
def udp_send4():
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("{v4}", 9999))
def udp_send6():
    socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b"x", ("{v6}", 9999))
def udp_connect():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("{v4}", 9999)); s.send(b"x")
attempt("udp_send4", udp_send4)
attempt("udp_send6", udp_send6)
attempt("udp_connect", udp_connect)
attempt("raw4", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("raw6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
attempt("ping", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))
attempt("mptcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262))
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
"#,
        v4 = net.v4(2),
        v6 = net.v6(2)
    ));
    let got = fields(&output);
    for label in ["udp_send4", "udp_send6", "udp_connect", "raw4", "raw6", "ping", "mptcp"] {
        assert_eq!(got[label], "EPERM", "{label} was not refused: {got:?}");
    }
    assert_eq!(got["unix"], "allowed", "Unix sockets must keep working");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(canary4.received() + canary6.received(), 0, "a datagram reached the canary");

    // A packet socket from a process that entered the cgroup directly: the
    // kernel backstop kills it before socket() returns.
    let killed =
        sandbox.python("import socket\ns = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)\nprint('created')");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&killed.status), Some(9), "{killed:?}");
    assert!(killed.stdout.is_empty(), "the packet socket was created: {killed:?}");
    // The same through `sluice run` (which talks to this daemon): a clean EPERM.
    let mut run = std::process::Command::new(harness::SLUICE);
    run.args(["run", "--instance", &daemon.instance, "--quiet", "--as-root", "--name", "packet-run", "--", "python3"]);
    let output = harness::run_python(run, "import socket\ntry:\n socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0); print('packet=created')\nexcept PermissionError: print('packet=EPERM')");
    assert_eq!(fields(&output)["packet"], "EPERM");
    assert!(!daemon.statuses().iter().any(|s| s.record.name == "packet-run"), "sluice run left its sandbox behind");

    let decisions =
        daemon.wait_decisions("kernel refusals", |d| d.iter().filter(|d| d.kind == Kind::Kernel).count() >= 7);
    assert!(decisions.iter().filter(|d| d.kind == Kind::Kernel).all(|d| d.sandbox.as_deref() == Some("sockets")));
    let status = daemon.statuses().into_iter().find(|s| s.record.name == "sockets").unwrap();
    assert!(status.refused >= 7, "kernel counters: {status:?}");
}

#[test]
fn processes_outside_any_sandbox_are_untouched() {
    if !privileged() {
        return;
    }
    let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local = EchoServer::start(local);
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("contrast", "name = \"nothing\"\n");
    let script = format!(
        r#"
import socket
try:
    s = socket.create_connection(("127.0.0.1", {port}), timeout=10)
    s.sendall(b"hi"); data = s.recv(10); s.close()
    print("result=" + ("echo" if data == b"hi" else "closed"))
except OSError as e:
    print("result=" + type(e).__name__)
"#,
        port = local.addr.port()
    );
    // Outside: a plain process, no cgroup change.
    let outside = fields(&harness::run_python(std::process::Command::new("python3"), &script));
    assert_eq!(outside["result"], "echo");
    // Inside: the same connect is redirected and denied (no rule allows it).
    let inside = fields(&sandbox.python(&script));
    assert_eq!(inside["result"], "closed");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(local.accepted(), 1, "only the outside process may reach the listener");
    let decisions = daemon.wait_decisions("one deny", |d| d.iter().any(|d| d.kind == Kind::Connect));
    let connects: Vec<_> = decisions.iter().filter(|d| d.kind == Kind::Connect).collect();
    assert_eq!(connects.len(), 1, "the outside connect must not reach the proxy");
    assert_eq!(connects[0].sandbox.as_deref(), Some("contrast"));
    assert_eq!(connects[0].rule, "default-deny");
}

#[test]
fn a_killed_daemon_fails_closed_and_a_restarted_one_resumes() {
    if !privileged() {
        return;
    }
    let (net, server, canary_ip, canary) = host_and_canary();
    let udp_canary = UdpCanary::start(net.udp_socket(SocketAddr::new(canary_ip, 53)));
    let mut daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("survivor", &allow_net_profile(&net, 8080));
    let script = format!(
        r#"
import socket
for label, ip in [("allowed", "{ip}"), ("canary", "{canary}")]:
    try:
        s = socket.create_connection((ip, 8080), timeout=15)
        s.sendall(b"ping"); data = s.recv(10); s.close()
        print(label + "=" + ("echo" if data == b"ping" else "closed"))
    except OSError as e:
        print(label + "=" + type(e).__name__)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
try:
    u.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01", ("{canary}", 53))
    u.recvfrom(512); print("dns=answered")
except OSError as e:
    print("dns=" + type(e).__name__)
"#,
        ip = net.v4(2),
        canary = canary_ip
    );

    daemon.kill();
    let down = fields(&sandbox.python(&script));
    assert_eq!(down["allowed"], "ConnectionRefusedError", "{down:?}");
    assert_eq!(down["canary"], "ConnectionRefusedError", "{down:?}");
    assert_ne!(down["dns"], "answered");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.accepted() + canary.accepted() + udp_canary.received(), 0, "traffic left while sluice was down");

    daemon.restart();
    let health = harness::block_on(daemon.client().health()).unwrap();
    assert!(health.adopted, "the restarted daemon should re-adopt the pinned programs");
    assert!(daemon.statuses().iter().any(|s| s.record.name == "survivor"), "sandbox not re-adopted");
    let up = fields(&sandbox.python(&script));
    assert_eq!(up["allowed"], "echo", "{up:?}");
    assert_eq!(up["canary"], "closed", "{up:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.accepted(), 1);
    assert_eq!(canary.accepted() + udp_canary.received(), 0, "the canary was reached");
}

#[test]
fn denied_hosts_get_nothing_and_allowed_bytes_arrive_intact_both_ways() {
    if !privileged() {
        return;
    }
    let (net, server, canary_ip, canary) = host_and_canary();
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("bulk", &allow_net_profile(&net, 8080));
    let output = sandbox.python(&format!(
        r#"
import hashlib, os, socket, threading
payload = os.urandom(4 * 1024 * 1024)
s = socket.create_connection(("{ip}", 8080), timeout=20)
received = bytearray()
def reader():
    while len(received) < len(payload):
        chunk = s.recv(65536)
        if not chunk: break
        received.extend(chunk)
t = threading.Thread(target=reader); t.start()
s.sendall(payload); t.join(); s.close()
print("sent=" + hashlib.sha256(payload).hexdigest())
print("back=" + hashlib.sha256(bytes(received)).hexdigest())
c = socket.create_connection(("{canary}", 8080), timeout=10)
c.sendall(b"GET /secret HTTP/1.1\r\nHost: {canary}\r\n\r\n")
answer = b""
while True:
    chunk = c.recv(4096)
    if not chunk: break
    answer += chunk
print("denied_status=" + answer.split(b"\r\n")[0].decode())
print("denied_rule=" + [l for l in answer.decode().splitlines() if l.startswith("rule: ")][0])
"#,
        ip = net.v4(2),
        canary = canary_ip
    ));
    let got = fields(&output);
    assert_eq!(got["sent"], got["back"], "bytes changed on the way back");
    std::thread::sleep(Duration::from_millis(300));
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].received.len(), 4 * 1024 * 1024);
    assert_eq!(sha256_hex(&seen[0].received), got["sent"], "bytes changed on the way there");
    assert_eq!(got["denied_status"], "HTTP/1.1 403 Forbidden");
    assert_eq!(got["denied_rule"], "rule: default-deny");
    assert_eq!(canary.accepted(), 0, "the denied host was reached");
}

fn sha256_hex(bytes: &[u8]) -> String {
    let output = std::process::Command::new("python3")
        .args(["-c", "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(bytes)?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn dns_allowed_names_resolve_denied_names_do_not_and_the_policy_sees_the_name() {
    if !privileged() {
        return;
    }
    let net = TestNet::new();
    let server4 = EchoServer::start(net.tcp_listener(SocketAddr::new(net.v4(2), 8080)));
    let server6 = EchoServer::start(net.tcp_listener(SocketAddr::new(net.v6(2), 8080)));
    let canary_ip = net.add_host(3);
    let canary = EchoServer::start(net.tcp_listener(SocketAddr::new(canary_ip, 8080)));
    let zone = HashMap::from([
        ("allowed.test".to_owned(), vec![net.v4(2), net.v6(2)]),
        ("denied.test".to_owned(), vec![canary_ip]),
    ]);
    let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
    let daemon = Daemon::start(Some(dns.addr));
    let sandbox = daemon.sandbox(
        "names",
        "name = \"by-name\"\n[[rule]]\nname = \"allowed-name\"\naction = \"allow\"\nhosts = [\"allowed.test\"]\nports = [8080]\n",
    );
    // The sandbox's resolv.conf names a test-net address with no server on
    // it: queries only get answers because sluice redirects them.
    let resolv = daemon.dir.join("resolv.conf");
    harness::write_file(&resolv, &format!("nameserver {}\noptions timeout:2 attempts:1\n", net.v4(99)));
    let script = format!(
        r#"
import socket
found = sorted({{a[4][0] for a in socket.getaddrinfo("allowed.test", 8080, type=socket.SOCK_STREAM)}})
print("allowed=" + ",".join(found))
try:
    socket.getaddrinfo("denied.test", 8080, type=socket.SOCK_STREAM); print("denied=resolved")
except socket.gaierror as e:
    print("denied=gaierror")
for family, ip in [("v4", "{v4}"), ("v6", "{v6}")]:
    s = socket.create_connection((ip, 8080), timeout=10)
    s.sendall(b"by-name-" + family.encode()); print(family + "=" + s.recv(100).decode()); s.close()
s = socket.create_connection(("{canary}", 8080), timeout=10)
s.sendall(b"x"); print("canary=" + repr(s.recv(10)))
# Unconnected UDP to IPv4 and IPv6 nameservers: answered, and the reply
# appears to come from the server that was asked.
q = b"\x43\x21\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07allowed\x04test\x00\x00\x01\x00\x01"
for family, server in [("udp4", ("{v4_99}", 53)), ("udp6", ("{v6_99}", 53))]:
    u = socket.socket(socket.AF_INET if family == "udp4" else socket.AF_INET6, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(q, server)
    reply, source = u.recvfrom(512)
    print(family + "_from=" + source[0] + ":" + str(source[1]))
    print(family + "_answers=" + str(int.from_bytes(reply[6:8], "big")))
"#,
        v4 = net.v4(2),
        v6 = net.v6(2),
        v4_99 = net.v4(99),
        v6_99 = net.v6(0x99),
        canary = canary_ip
    );
    let mut command = sandbox.command("unshare");
    command.args([
        "-m",
        "sh",
        "-c",
        &format!("mount --bind {} /etc/resolv.conf && exec python3 \"$0\" \"$@\"", resolv.display()),
    ]);
    // run_python appends `-c SCRIPT`, which become "$0" "$@" above.
    let output = harness::run_python(command, &script);
    let got = fields(&output);
    assert_eq!(got["allowed"], format!("{},{}", net.v4(2), net.v6(2)));
    assert_eq!(got["denied"], "gaierror");
    assert_eq!(got["v4"], "by-name-v4");
    assert_eq!(got["v6"], "by-name-v6");
    assert_eq!(got["canary"], "b''");
    assert_eq!(got["udp4_from"], format!("{}:53", net.v4(99)));
    assert_eq!(got["udp6_from"], format!("{}:53", net.v6(0x99)));
    assert_eq!((got["udp4_answers"].as_str(), got["udp6_answers"].as_str()), ("1", "1"));
    assert!(dns.questions().iter().any(|q| q == "allowed.test"));
    assert!(!dns.questions().iter().any(|q| q == "denied.test"), "a denied name was forwarded upstream");
    assert_eq!(canary.accepted(), 0);
    assert_eq!((server4.accepted(), server6.accepted()), (1, 1));

    let decisions = daemon.wait_decisions("named connects", |d| {
        d.iter().filter(|d| d.kind == Kind::Connect && d.verdict == Verdict::Allow).count() == 2
    });
    for d in decisions.iter().filter(|d| d.kind == Kind::Connect && d.verdict == Verdict::Allow) {
        assert_eq!(d.host.as_deref(), Some("allowed.test"), "{d}");
        assert_eq!(d.host_source, Some(HostSource::Dns), "{d}");
        assert_eq!(d.rule, "allowed-name");
    }
    assert!(decisions
        .iter()
        .any(|d| d.kind == Kind::Dns && d.verdict == Verdict::Deny && d.host.as_deref() == Some("denied.test")));
    let canary_decision = decisions.iter().find(|d| d.destination == Some(SocketAddr::new(canary_ip, 8080))).unwrap();
    assert_eq!((canary_decision.verdict, canary_decision.host_source), (Verdict::Deny, Some(HostSource::Ip)));
}

#[test]
fn an_unregistered_cgroup_under_the_enforced_parent_is_redirected_and_denied() {
    if !privileged() {
        return;
    }
    let net = TestNet::new();
    let server = EchoServer::start(net.tcp_listener(SocketAddr::new(net.v4(2), 8080)));
    let daemon = Daemon::start(None);
    // Registered sandboxes live beside it; this one never registers.
    let known = daemon.sandbox("known", &allow_net_profile(&net, 8080));
    let rogue = known.cgroup.parent().unwrap().join("rogue");
    std::fs::create_dir(&rogue).unwrap();
    let script = format!(
        r#"
import socket
try:
    s = socket.create_connection(("{ip}", 8080), timeout=10); s.sendall(b"x"); print("tcp=" + repr(s.recv(10)))
except OSError as e:
    print("tcp=" + type(e).__name__)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
u.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01", ("{ip}", 53))
reply = u.recvfrom(512)[0]
print("dns_rcode=" + str(reply[3] & 0xf))
"#,
        ip = net.v4(2)
    );
    let got = fields(&harness::run_python(harness::in_cgroup(&rogue, "python3"), &script));
    // Closed before the proxy read anything: an orderly close or a reset.
    assert!(got["tcp"] == "b''" || got["tcp"] == "ConnectionResetError", "{got:?}");
    assert!(got["dns_rcode"] == "3" || got["dns_rcode"] == "5", "DNS was answered: {got:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.accepted(), 0, "an unregistered cgroup reached the host");
    let decisions = daemon.wait_decisions("unknown sandbox", |d| d.iter().any(|d| d.rule == "unknown-sandbox"));
    let denial = decisions.iter().find(|d| d.kind == Kind::Connect).unwrap();
    assert_eq!((denial.verdict, denial.sandbox.as_deref()), (Verdict::Deny, None));
    assert!(denial.reason.contains("not a registered sandbox"), "{denial}");
    let _ = std::fs::remove_dir(&rogue);
}

#[test]
fn malformed_first_bytes_are_refused_and_the_daemon_keeps_serving() {
    if !privileged() {
        return;
    }
    let net = TestNet::new();
    let server = EchoServer::start(net.tcp_listener(SocketAddr::new(net.v4(2), 8080)));
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("fuzzy", &allow_net_profile(&net, 8080));
    let output = sandbox.python(&format!(
        r#"
import socket
def send(label, data):
    s = socket.create_connection(("{ip}", 8080), timeout=15)
    s.sendall(data)
    try:
        answer = s.recv(100)
    except OSError as e:
        answer = type(e).__name__.encode()
    s.close()
    print(label + "=" + repr(answer))
send("garbage_tls", b"\x16\x03\x01\x00\x05garbage-not-a-hello")
send("huge_header", b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
send("two_hosts", b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n")
send("truncated_tls", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")
send("good", b"still-serving")
"#,
        ip = net.v4(2)
    ));
    let got = fields(&output);
    for label in ["garbage_tls", "huge_header", "two_hosts", "truncated_tls"] {
        assert_eq!(got[label], "b''", "{label} was not refused: {got:?}");
    }
    assert_eq!(got["good"], "b'still-serving'");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.accepted(), 1, "only the good connection may reach the host");
    let decisions =
        daemon.wait_decisions("four malformed", |d| d.iter().filter(|d| d.rule == "malformed-request").count() >= 4);
    let reasons: Vec<&str> =
        decisions.iter().filter(|d| d.rule == "malformed-request").map(|d| d.reason.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("16 KiB")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("more than one Host")), "{reasons:?}");
    assert!(harness::block_on(daemon.client().health()).is_ok(), "daemon stopped serving");
}

#[test]
fn packets_that_pass_no_socket_hook_are_dropped_on_egress() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("listener", "name = \"closed\"\n");
    // A server inside the sandbox: its SYN-ACKs come from a socket no
    // connect hook saw, and are not addressed to sluice.
    let mut server = sandbox.command("python3");
    server
        .args(["-c", "import socket,time\ns=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\nprint(s.getsockname()[1], flush=True)\ntime.sleep(30)"])
        .stdout(std::process::Stdio::piped());
    let mut server = server.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let attempt =
        std::net::TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2));
    let _ = server.kill();
    let _ = server.wait();
    assert!(attempt.is_err(), "a handshake completed with a server inside the sandbox");
    let decisions = daemon.wait_decisions("an egress drop", |d| d.iter().any(|d| d.rule == "kernel-egress"));
    let drop = decisions.iter().find(|d| d.rule == "kernel-egress").unwrap();
    assert_eq!(drop.sandbox.as_deref(), Some("listener"));
    let status = daemon.statuses().into_iter().find(|s| s.record.name == "listener").unwrap();
    assert!(status.dropped_packets >= 1, "{status:?}");
}

#[test]
fn the_tls_server_name_decides_and_a_name_contradicting_dns_is_refused() {
    if !privileged() {
        return;
    }
    let net = TestNet::new();
    let server = EchoServer::start(net.tcp_listener(SocketAddr::new(net.v4(2), 8443)));
    let zone = HashMap::from([("tls.test".to_owned(), vec![net.v4(2)])]);
    let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
    let daemon = Daemon::start(Some(dns.addr));
    let sandbox = daemon.sandbox(
        "sni",
        "name = \"sni\"\n[[rule]]\nname = \"tls-host\"\naction = \"allow\"\nhosts = [\"tls.test\", \"other.test\"]\nports = [8443]\ntls = \"passthrough\"\n",
    );
    let script = format!(
        r#"
import socket, ssl, struct
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
def hello(name):
    raw = socket.create_connection(("{ip}", 8443), timeout=10)
    try:
        s = ctx.wrap_socket(raw, server_hostname=name)
    except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
        return "closed"
    except ssl.SSLError:
        return "relayed"      # passthrough: the echo server sent our ClientHello back
    except OSError as e:
        return type(e).__name__
    # Refused at connect level: sluice completed the handshake itself and
    # answers every request with the reason.
    s.sendall(("GET / HTTP/1.1\r\nHost: " + name + "\r\nConnection: close\r\n\r\n").encode())
    answer = b""
    while True:
        chunk = s.recv(4096)
        if not chunk: break
        answer += chunk
    rule = [l for l in answer.decode().splitlines() if l.startswith("rule: ")]
    return answer.split(b"\r\n")[0].decode() + " " + (rule[0] if rule else "")
print("denied=" + hello("evil.test"))
# Resolve tls.test through sluice over TCP: a spliced connection's server
# name is believed only for an address the sandbox resolved it to. Then
# claim another allowed name for the same address.
q = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03tls\x04test\x00\x00\x01\x00\x01"
t = socket.create_connection(("{ip}", 53), timeout=10)
t.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", t.recv(2))[0]; reply = b""
while len(reply) < n: reply += t.recv(n - len(reply))
print("tcp_dns_answers=" + str(struct.unpack(">H", reply[6:8])[0]))
print("allowed=" + hello("tls.test"))
print("fronted=" + hello("other.test"))
"#,
        ip = net.v4(2)
    );
    let got = fields(&sandbox.python(&script));
    assert_eq!(got["allowed"], "relayed", "{got:?}");
    assert_eq!(got["denied"], "HTTP/1.1 403 Forbidden rule: default-deny");
    assert_eq!(got["tcp_dns_answers"], "1");
    assert_eq!(got["fronted"], "HTTP/1.1 403 Forbidden rule: host-mismatch", "a name contradicting DNS was relayed");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.accepted(), 1, "only the allowed server name may reach the host");
    assert_eq!(server.seen()[0].received.first(), Some(&0x16), "the host did not get the ClientHello");
    let decisions = daemon.wait_decisions("three TLS decisions", |d| {
        d.iter().filter(|d| d.kind == Kind::Connect && d.protocol.as_deref() == Some("tls")).count() >= 3
    });
    let tls: Vec<_> =
        decisions.iter().filter(|d| d.kind == Kind::Connect && d.protocol.as_deref() == Some("tls")).collect();
    assert_eq!((tls[0].verdict, tls[0].rule.as_str()), (Verdict::Deny, "default-deny"));
    assert_eq!(
        (tls[1].verdict, tls[1].host.as_deref(), tls[1].host_source),
        (Verdict::Allow, Some("tls.test"), Some(HostSource::Sni))
    );
    assert_eq!((tls[2].verdict, tls[2].rule.as_str()), (Verdict::Deny, "host-mismatch"));
}
