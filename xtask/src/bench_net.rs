//! The bench's own network and sluice daemon.
//!
//! - A network namespace with a veth to the host: the host side,
//!   10.231.N.1, is where every bench server listens (from the host it is a
//!   local address, reached over loopback like 127.0.0.1); the namespace
//!   side, 10.231.N.2, is where the client of the iptables configuration
//!   runs. An iptables REDIRECT rule on the host side of the veth sends the
//!   namespace's TCP to the sluice daemon's redirect listener: the classic
//!   transparent-proxy set-up, next to sluice's eBPF redirection.
//! - One `sluice daemon` (instance `sluice-bench`) serves both, so its CPU
//!   time and memory can be read from /proc by its PID.
//! - A small DNS server on 10.231.N.1:53 answers every `*.bench.test`
//!   name with 10.231.N.1; sluice's resolvers forward to it.
//!
//! Everything is removed when the guards drop, whatever happened.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::step;

/// The subnet chosen for this run (10.231.N.0/24, the first free N of a few).
static SUBNET: std::sync::OnceLock<u8> = std::sync::OnceLock::new();

/// Where the bench's servers listen (host side of the veth).
pub fn host_ip() -> Ipv4Addr {
    Ipv4Addr::new(10, 231, *SUBNET.get().expect("bench network set up"), 1)
}
/// The daemon instance the bench runs.
pub const INSTANCE: &str = "sluice-bench";
/// The sandbox redirected connections belong to.
pub const REDIRECT_SANDBOX: &str = "bench-redirect";

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    if !output.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// The namespace, its veth and the REDIRECT rule (once the port is known).
pub struct Net {
    pub netns: String,
    host_if: String,
    rule: Option<Vec<String>>,
}

impl Net {
    pub fn new() -> anyhow::Result<Self> {
        remove_stale();
        let id = std::process::id() % 100_000;
        let net = Self { netns: format!("sluice-bench-{id}"), host_if: format!("sbh{id}"), rule: None };
        let ns_if = format!("sbn{id}");
        // A subnet nobody else on this host uses (tests take 10.231.10-249.0/24).
        let free = |n: u8| std::net::TcpListener::bind((Ipv4Addr::new(10, 231, n, 1), 0)).is_err();
        let n = [252, 253, 254, 250, 251].into_iter().find(|n| free(*n)).context("no free 10.231.N.0/24 subnet")?;
        let n = *SUBNET.get_or_init(|| n);
        let (gateway, client) = (Ipv4Addr::new(10, 231, n, 1), Ipv4Addr::new(10, 231, n, 2));
        sh(&["ip", "netns", "add", &net.netns])?;
        sh(&["ip", "link", "add", &net.host_if, "type", "veth", "peer", "name", &ns_if])?;
        sh(&["ip", "link", "set", &ns_if, "netns", &net.netns])?;
        sh(&["ip", "addr", "add", &format!("{gateway}/24"), "dev", &net.host_if])?;
        sh(&["ip", "link", "set", &net.host_if, "up"])?;
        let ns = ["ip", "netns", "exec", net.netns.as_str()];
        sh(&[&ns[..], &["ip", "addr", "add", &format!("{client}/24"), "dev", &ns_if]].concat())?;
        sh(&[&ns[..], &["ip", "link", "set", &ns_if, "up"]].concat())?;
        sh(&[&ns[..], &["ip", "link", "set", "lo", "up"]].concat())?;
        Ok(net)
    }

    /// Sends the namespace's TCP to `port` on the host side (iptables nat
    /// PREROUTING REDIRECT on the veth).
    pub fn redirect_tcp_to(&mut self, port: u16) -> anyhow::Result<()> {
        let spec: Vec<String> = ["PREROUTING", "-i", &self.host_if, "-p", "tcp", "-j", "REDIRECT", "--to-ports"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([port.to_string()])
            .collect();
        let mut args = vec!["iptables", "-w", "-t", "nat", "-A"];
        args.extend(spec.iter().map(String::as_str));
        sh(&args)?;
        self.rule = Some(spec);
        Ok(())
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]).arg(program);
        command
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(spec) = &self.rule {
            let _ = Command::new("iptables").args(["-w", "-t", "nat", "-D"]).args(spec).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).stderr(Stdio::null()).status();
    }
}

/// Removes what an interrupted bench left behind: its namespace, veth and
/// REDIRECT rule, found by name (`sluice-bench-<pid>`, `sbh<pid>`) when that
/// process no longer runs.
fn remove_stale() {
    let Ok(list) = Command::new("ip").args(["netns", "list"]).output() else { return };
    let rules = Command::new("iptables").args(["-w", "-t", "nat", "-S", "PREROUTING"]).output();
    let rules = rules.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(id) = name.strip_prefix("sluice-bench-").and_then(|id| id.parse::<u32>().ok()) else { continue };
        if Path::new(&format!("/proc/{id}")).exists() {
            continue;
        }
        let host_if = format!("sbh{id}");
        eprintln!("removing {name} and {host_if}, left by an interrupted bench");
        for rule in rules.lines().filter(|rule| rule.split_whitespace().any(|word| word == host_if)) {
            if let Some(spec) = rule.strip_prefix("-A ") {
                let _ = Command::new("iptables").args(["-w", "-t", "nat", "-D"]).args(spec.split_whitespace()).status();
            }
        }
        let _ = Command::new("ip").args(["link", "del", &host_if]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
    }
}

/// Installs iptables (Debian) if it is missing.
pub fn install_iptables() -> anyhow::Result<()> {
    if Command::new("iptables").arg("-V").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    step("installing iptables (Debian) for the REDIRECT configuration");
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "iptables"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The bench's sluice daemon; dropped, it is stopped by its PID and its
/// instance torn down (cgroups, pins, runtime files).
pub struct Daemon {
    child: Child,
    sluice: PathBuf,
    socket: PathBuf,
    pub redirect_port: u16,
}

impl Daemon {
    pub fn start(sluice: &Path, dir: &Path, upstream_ca: &Path) -> anyhow::Result<Self> {
        // Left over from an interrupted run: a daemon of this instance would
        // otherwise adopt its pins.
        let _ = Command::new(sluice).args(["teardown", "--instance", INSTANCE]).output();
        let redirect_port = std::net::TcpListener::bind((host_ip(), 0))?.local_addr()?.port();
        let log = dir.join("daemon.log");
        let child = Command::new(sluice)
            .args(["daemon", "--instance", INSTANCE, "--proxy-port", "0", "--dns-port", "0"])
            .arg("--decision-log")
            .arg(dir.join("decisions.jsonl"))
            .arg("--upstream-ca")
            .arg(upstream_ca)
            .args(["--upstream-dns", &format!("{}:53", host_ip())])
            .args(["--redirect-listener", &format!("{}:{redirect_port}={REDIRECT_SANDBOX}", host_ip())])
            .env("SLUICE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting sluice daemon")?;
        let socket = Path::new("/run").join(INSTANCE).join("control.sock");
        let daemon = Self { child, sluice: sluice.to_owned(), socket, redirect_port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while request(&daemon.socket, "GET", "/v1/health", None).is_err() {
            if Instant::now() > deadline {
                bail!("sluice daemon did not come up: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Registers a sandbox with `profile` (TOML); returns its trust bundle.
    pub fn register(&self, name: &str, profile: &str) -> anyhow::Result<PathBuf> {
        let body = serde_json::json!({
            "name": name,
            "profile": { "kind": "inline", "origin": "bench.toml", "text": profile },
        });
        let status = request(&self.socket, "POST", "/v1/sandboxes", Some(&body.to_string()))?;
        let bundle = status["ca_bundle"].as_str().context("no ca_bundle in the registration answer")?;
        Ok(PathBuf::from(bundle))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new(&self.sluice).args(["teardown", "--instance", INSTANCE]).output();
    }
}

/// One request to the daemon's control API; returns the JSON answer.
fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: sluice\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 2") {
        bail!("{method} {path}: {answer}");
    }
    // The body is one JSON value (chunk sizes, if any, sit outside it).
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let (start, end) = (body.find(['{', '[']).unwrap_or(0), body.rfind(['}', ']']).map_or(0, |e| e + 1));
    Ok(serde_json::from_str(&body[start..end.max(start)]).unwrap_or(serde_json::Value::Null))
}

/// Answers A queries for any name under `bench.test` with [`host_ip`]
/// (NXDOMAIN otherwise), on [`host_ip`]:53, from a thread, forever.
pub fn start_dns() -> anyhow::Result<SocketAddr> {
    let socket = UdpSocket::bind((host_ip(), 53)).context("binding the bench DNS server")?;
    let addr = socket.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if let Some(answer) = dns_answer(&buf[..n]) {
                let _ = socket.send_to(&answer, from);
            }
        }
    });
    Ok(addr)
}

fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    while at < query.len() && query[at] != 0 {
        let len = usize::from(query[at]);
        labels.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).to_ascii_lowercase());
        at += 1 + len;
    }
    let question_end = at + 5;
    let question = query.get(12..question_end)?;
    let qtype = u16::from_be_bytes([query[at + 1], query[at + 2]]);
    let ours = labels.len() >= 2 && labels[labels.len() - 2..] == ["bench", "test"];
    let mut answer = query[..2].to_vec();
    answer.extend_from_slice(&[0x81, if ours { 0x80 } else { 0x83 }, 0, 1]);
    answer.extend_from_slice(&[0, u8::from(ours && qtype == 1), 0, 0, 0, 0]);
    answer.extend_from_slice(question);
    if ours && qtype == 1 {
        answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        answer.extend_from_slice(&host_ip().octets());
    }
    Some(answer)
}

/// `bench-client dns SERVER N`: N queries for distinct `*.bench.test` names
/// (so no cache answers them), one at a time; prints their latency.
pub fn dns_client(args: &[String]) -> anyhow::Result<()> {
    let [server, count] = args else { bail!("usage: bench-client dns SERVER N") };
    let server: SocketAddr = server.parse()?;
    super::pin_to_cpu(1)?;
    let socket = UdpSocket::bind((IpAddr::from(Ipv4Addr::UNSPECIFIED), 0))?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut times = Vec::new();
    let mut buf = [0u8; 512];
    let run = std::process::id();
    for i in 0..count.parse::<usize>()? {
        let name = format!("q{i}-{run}.bench.test");
        let id = (i as u16).wrapping_add(1);
        let mut query = id.to_be_bytes().to_vec();
        query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        let start = Instant::now();
        socket.send(&query)?;
        loop {
            let n = socket.recv(&mut buf).with_context(|| format!("no answer for {name}"))?;
            if n >= 12 && buf[..2] == id.to_be_bytes() {
                if u16::from_be_bytes([buf[6], buf[7]]) == 0 {
                    bail!("{name}: no address in the answer (rcode {})", buf[3] & 0xf);
                }
                break;
            }
        }
        times.push(start.elapsed());
    }
    super::report("dns", &mut times);
    Ok(())
}
