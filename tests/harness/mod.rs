//! Test harness for sluice's kernel-level tests: network namespaces with
//! test hosts, a real `sluice daemon` per test, sandboxed clients, and
//! guards that clean everything up even when a test fails.
//!
//! Network rules: traffic only goes to loopback or to addresses configured
//! here on veth pairs inside namespaces these tests create (10.231.N.0/24,
//! `fd00:231:N::/64`).
#![allow(dead_code)]

pub mod cni;
pub mod dns;
pub mod docker;
pub mod web;

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{fs::OpenOptionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use sluice::{
    audit::Decision,
    control::{client::ControlClient, RegisterRequest, SandboxStatus},
    sandbox::ProfileSource,
};

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// Whether this run can do kernel-level tests; reports why not ([`skip`]).
pub fn privileged() -> bool {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        skip(Skip::NeedsRoot, "needs root (eBPF, cgroups, network namespaces)");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        skip(Skip::NeedsRoot, "needs iproute2 (`cargo xtask setup` installs it)");
        return false;
    }
    true
}

/// Why a test did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Root (and the kernel-level tools): CI runs as root, so there this
    /// is a failure, not a skip.
    NeedsRoot,
    /// A tool the test drives is missing.
    NeedsTool,
}

/// The file skips are appended to, one `<kind>\t<test>\t<reason>` line
/// each, so that `cargo xtask test` can count them (libtest shows a skipped
/// test as passed and swallows its output).
pub const SKIP_REPORT_ENV: &str = "SLUICE_SKIP_REPORT";

/// Reports that the calling test does not run: a uniform
/// `SKIPPED: <test>: <reason>` line on stderr, and a line in the skip
/// report when `cargo xtask test` asked for one. The caller returns.
pub fn skip(kind: Skip, reason: &str) {
    let current = thread::current();
    let test = current.name().unwrap_or("unnamed test");
    eprintln!("SKIPPED: {test}: {reason}");
    if let Some(path) = std::env::var_os(SKIP_REPORT_ENV) {
        let kind = match kind {
            Skip::NeedsRoot => "needs-root",
            Skip::NeedsTool => "needs-tool",
        };
        let line = format!("{kind}\t{test}\t{}\n", reason.replace(['\t', '\n'], " "));
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| std::io::Write::write_all(&mut file, line.as_bytes()));
        if let Err(error) = appended {
            eprintln!("could not add to the skip report {}: {error}", std::path::Path::new(&path).display());
        }
    }
}

/// A subnet octet no other test in this run uses: twenty per process,
/// spread by pid so two test binaries never collide.
fn next_subnet() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 20, "more than twenty test networks in one test binary");
    (std::process::id() % 12) * 20 + n + 10
}

/// A daemon instance name unique on this machine.
fn next_instance() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("sluice-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn sh(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).stderr(Stdio::inherit()).status().expect("run command");
    assert!(status.success(), "{args:?} failed");
}

/// A network namespace with one veth to the host: the host side is
/// 10.231.N.1 / `fd00:231:N::1`, the namespace side 10.231.N.2 /
/// `fd00:231:N::2` (and more addresses on request).
pub struct TestNet {
    pub name: String,
    host_if: String,
    pub n: u32,
}

impl TestNet {
    pub fn new() -> Self {
        let n = next_subnet();
        let name = format!("sluice-t{n}-{}", std::process::id());
        let host_if = format!("slh{n}");
        let ns_if = format!("sln{n}");
        let _ = Command::new("ip").args(["link", "del", &host_if]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        sh(&["ip", "netns", "add", &name]);
        let net = Self { name: name.clone(), host_if: host_if.clone(), n };
        sh(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        sh(&["ip", "link", "set", &ns_if, "netns", &name]);
        sh(&["ip", "addr", "add", &format!("10.231.{n}.1/24"), "dev", &host_if]);
        sh(&["ip", "-6", "addr", "add", &format!("fd00:231:{n}::1/64"), "dev", &host_if, "nodad"]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &name];
            full.extend_from_slice(args);
            sh(&full);
        };
        in_ns(&["ip", "addr", "add", &format!("10.231.{n}.2/24"), "dev", &ns_if]);
        in_ns(&["ip", "-6", "addr", "add", &format!("fd00:231:{n}::2/64"), "dev", &ns_if, "nodad"]);
        in_ns(&["ip", "link", "set", &ns_if, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        net
    }

    /// Adds another address inside the namespace (e.g. a canary host).
    pub fn add_host(&self, last_octet: u8) -> IpAddr {
        let ip = format!("10.231.{}.{last_octet}", self.n);
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "ip",
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &format!("sln{}", self.n),
        ]);
        ip.parse().unwrap()
    }

    /// Adds another IPv6 address inside the namespace.
    pub fn add_host6(&self, last: u16) -> IpAddr {
        let ip = self.v6(last);
        let (address, device) = (format!("{ip}/64"), format!("sln{}", self.n));
        sh(&["ip", "netns", "exec", &self.name, "ip", "-6", "addr", "add", &address, "dev", &device, "nodad"]);
        ip
    }

    pub fn v4(&self, last_octet: u8) -> IpAddr {
        format!("10.231.{}.{last_octet}", self.n).parse().unwrap()
    }

    pub fn v6(&self, last: u16) -> IpAddr {
        format!("fd00:231:{}::{last:x}", self.n).parse().unwrap()
    }

    /// Runs `f` on a thread inside the namespace (sockets made there stay
    /// in it).
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Binds a TCP listener inside the namespace.
    pub fn tcp_listener(&self, addr: SocketAddr) -> TcpListener {
        self.spawn(move || socket2_listener(addr)).join().unwrap()
    }

    pub fn udp_socket(&self, addr: SocketAddr) -> UdpSocket {
        self.spawn(move || UdpSocket::bind(addr).expect("bind udp")).join().unwrap()
    }
}

fn socket2_listener(addr: SocketAddr) -> TcpListener {
    TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// What a test server saw on one connection.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: SocketAddr,
    pub received: Vec<u8>,
}

/// A TCP server that echoes every byte back and records what it received.
/// As a canary it is the host that must receive nothing.
pub struct EchoServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        listener.set_nonblocking(true).unwrap();
        {
            let (seen, accepted, stop) = (seen.clone(), accepted.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let seen = seen.clone();
                            thread::spawn(move || echo(stream, peer, &seen));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
        }
        Self { addr, seen, accepted, stop }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Total bytes received over all connections.
    pub fn bytes(&self) -> usize {
        self.seen().iter().map(|s| s.received.len()).sum()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn echo(mut stream: TcpStream, peer: SocketAddr, seen: &Mutex<Vec<Seen>>) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut received = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                received.extend_from_slice(&buf[..n]);
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    seen.lock().unwrap().push(Seen { peer, received });
}

/// A UDP canary: counts datagrams.
pub struct UdpCanary {
    pub addr: SocketAddr,
    received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl UdpCanary {
    pub fn start(socket: UdpSocket) -> Self {
        let addr = socket.local_addr().unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (received, stop) = (received.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if socket.recv_from(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        Self { addr, received, stop }
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpCanary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A `sluice daemon` of its own instance; stopped and torn down on drop.
pub struct Daemon {
    pub instance: String,
    pub dir: PathBuf,
    child: Option<Child>,
    upstream_dns: Option<SocketAddr>,
    upstream_ca: Option<PathBuf>,
    secrets: Option<PathBuf>,
    /// More `sluice daemon` arguments (e.g. container options).
    pub extra_args: Vec<String>,
}

impl Daemon {
    pub fn start(upstream_dns: Option<SocketAddr>) -> Self {
        Self::start_with(upstream_dns, None)
    }

    /// A daemon that also trusts `upstream_ca` (PEM text) for upstreams.
    pub fn start_with(upstream_dns: Option<SocketAddr>, upstream_ca: Option<&str>) -> Self {
        Self::start_full(upstream_dns, upstream_ca, None)
    }

    /// ... and holds the secrets in `secrets` (`name = "value"` lines).
    pub fn start_full(upstream_dns: Option<SocketAddr>, upstream_ca: Option<&str>, secrets: Option<&str>) -> Self {
        Self::start_configured(upstream_dns, upstream_ca, secrets, Vec::new())
    }

    /// A daemon started with more `sluice daemon` arguments.
    pub fn start_with_args(extra_args: &[String]) -> Self {
        Self::start_configured(None, None, None, extra_args.to_vec())
    }

    /// ... with all of the above and more `sluice daemon` arguments.
    pub fn start_configured(
        upstream_dns: Option<SocketAddr>,
        upstream_ca: Option<&str>,
        secrets: Option<&str>,
        extra_args: Vec<String>,
    ) -> Self {
        let instance = next_instance();
        let dir = std::env::temp_dir().join(&instance);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let upstream_ca = upstream_ca.map(|pem| {
            let path = dir.join("upstream-ca.pem");
            std::fs::write(&path, pem).unwrap();
            path
        });
        let secrets = secrets.map(|text| {
            let path = dir.join("secrets");
            let mut file =
                std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&path).unwrap();
            file.write_all(text.as_bytes()).unwrap();
            path
        });
        let mut daemon = Self { instance, dir, child: None, upstream_dns, upstream_ca, secrets, extra_args };
        daemon.spawn();
        daemon
    }

    pub fn decision_log(&self) -> PathBuf {
        self.dir.join("decisions.jsonl")
    }

    /// The audit signing key, in the test's own directory.
    pub fn audit_key(&self) -> PathBuf {
        self.dir.join("audit.key")
    }

    fn spawn(&mut self) {
        let mut command = Command::new(SLUICE);
        command
            .args(["daemon", "--instance", &self.instance, "--proxy-port", "0", "--dns-port", "0"])
            .arg("--decision-log")
            .arg(self.decision_log())
            .arg("--audit-key")
            .arg(self.audit_key())
            .env("SLUICE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).unwrap());
        if let Some(dns) = self.upstream_dns {
            command.arg("--upstream-dns").arg(dns.to_string());
        }
        if let Some(ca) = &self.upstream_ca {
            command.arg("--upstream-ca").arg(ca);
        }
        if let Some(secrets) = &self.secrets {
            command.arg("--secrets").arg(secrets);
        }
        command.args(&self.extra_args);
        self.child = Some(command.spawn().expect("spawn sluice daemon"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if block_on(ControlClient::connect(&self.socket())).is_some() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {status}:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon did not come up:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn socket(&self) -> PathBuf {
        sluice::daemon::control_socket(&self.instance)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, and waits: a clean stop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn client(&self) -> ControlClient {
        ControlClient::new(&self.socket())
    }

    /// Registers a sandbox with a profile (TOML text) and returns its cgroup.
    pub fn sandbox(&self, name: &str, profile: &str) -> Sandbox {
        self.register(name, ProfileSource::Inline { origin: format!("{name}.toml"), text: profile.to_owned() })
    }

    /// Registers a sandbox whose profile is a file the daemon reads (and
    /// reads again when it changes), as `sluice run --profile FILE` does.
    pub fn sandbox_from_file(&self, name: &str, profile: &Path) -> Sandbox {
        self.register(name, ProfileSource::File { path: profile.to_owned(), text: String::new() })
    }

    fn register(&self, name: &str, profile: ProfileSource) -> Sandbox {
        let request = RegisterRequest {
            name: name.to_owned(),
            cgroup: None,
            profile,
            placement: sluice::sandbox::Placement::Host,
        };
        let status = block_on(self.client().register(&request)).unwrap_or_else(|e| panic!("register {name}: {e:#}"));
        Sandbox {
            name: name.to_owned(),
            cgroup: status.record.cgroup,
            ca_bundle: status.record.ca_bundle,
            resolv: None,
            env: status.env.into_iter().collect(),
        }
    }

    /// Runs `sluice ARGS --instance <this daemon's>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(SLUICE).args(args).args(["--instance", &self.instance]).output().expect("run sluice")
    }

    pub fn statuses(&self) -> Vec<SandboxStatus> {
        block_on(self.client().sandboxes()).expect("list sandboxes")
    }

    /// Decisions logged so far.
    pub fn decisions(&self) -> Vec<Decision> {
        std::fs::read_to_string(self.decision_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Waits until `pred` holds for the decisions, up to 10 s.
    pub fn wait_decisions(&self, what: &str, pred: impl Fn(&[Decision]) -> bool) -> Vec<Decision> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let decisions = self.decisions();
            if pred(&decisions) {
                return decisions;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for decisions: {what}\n{}",
                decisions.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let output = Command::new(SLUICE).args(["teardown", "--instance", &self.instance]).output();
        if let Ok(output) = output {
            if !output.status.success() {
                eprintln!("teardown of {}: {}", self.instance, String::from_utf8_lossy(&output.stderr));
            }
        }
        if std::env::var_os("SLUICE_KEEP_TEST_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A registered sandbox's cgroup.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub name: String,
    pub cgroup: PathBuf,
    /// The sandbox's trust bundle (system roots + its CA).
    pub ca_bundle: PathBuf,
    /// A resolv.conf its commands see instead of the host's.
    pub resolv: Option<PathBuf>,
    /// Credential placeholders, as `sluice run` hands them over.
    pub env: Vec<(String, String)>,
}

impl Sandbox {
    /// A command that starts inside the sandbox's cgroup, trusting the
    /// sandbox's CA the way `sluice run` sets it up.
    pub fn command(&self, program: &str) -> Command {
        let mut command = match &self.resolv {
            None => in_cgroup(&self.cgroup, program),
            Some(resolv) => {
                // A private mount namespace with its own resolv.conf; the
                // program's arguments follow as "$0" "$@".
                let mut command = in_cgroup(&self.cgroup, "unshare");
                command.args([
                    "-m",
                    "sh",
                    "-c",
                    &format!("mount --bind {} /etc/resolv.conf && exec {program} \"$@\"", resolv.display()),
                    program,
                ]);
                command
            }
        };
        for variable in
            ["SSL_CERT_FILE", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO"]
        {
            command.env(variable, &self.ca_bundle);
        }
        command.env_remove("SSL_CERT_DIR");
        for (variable, value) in &self.env {
            command.env(variable, value);
        }
        command
    }

    /// The same sandbox, with its commands resolving through `nameserver`
    /// (an address in a test network: sluice redirects the queries anyway).
    pub fn with_nameserver(&self, dir: &Path, nameserver: IpAddr) -> Self {
        let resolv = dir.join(format!("{}-resolv.conf", self.name));
        write_file(&resolv, &format!("nameserver {nameserver}\noptions timeout:2 attempts:1\n"));
        Self { resolv: Some(resolv), ..self.clone() }
    }

    /// Runs a Python script inside the sandbox; returns its output.
    pub fn python(&self, script: &str) -> Output {
        run_python(self.command("python3"), script)
    }
}

pub fn in_cgroup(cgroup: &Path, program: &str) -> Command {
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap();
    let mut command = Command::new(program);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    command
}

pub fn run_python(mut command: Command, script: &str) -> Output {
    let mut child = command
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "python client timed out:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Stdout of a successful run, as lines; panics with stderr otherwise.
pub fn lines(output: &Output) -> Vec<String> {
    assert!(
        output.status.success(),
        "client failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
}

/// `key=value` lines of a client's output.
/// Runs `sluice ARGS` (no daemon needed).
pub fn run_sluice(args: &[&str]) -> Output {
    Command::new(SLUICE).args(args).output().expect("run sluice")
}

pub fn fields(output: &Output) -> HashMap<String, String> {
    lines(output).iter().filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect()
}

pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// A file only root can read, e.g. a resolv.conf for a sandbox's mount
/// namespace.
pub fn write_file(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o644).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// tests/fixtures/attack.c built static (so it runs in any container
/// image), once per test binary: what a hostile sandboxed process tries
/// against sluice itself.
pub fn attacker() -> &'static Path {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sluice-attack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("attack");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/attack.c");
        let out = Command::new("gcc").args(["-static", "-O1", "-o"]).arg(&binary).arg(&source).output().unwrap();
        assert!(out.status.success(), "building the attacker: {}", String::from_utf8_lossy(&out.stderr));
        binary
    })
}
