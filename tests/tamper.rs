//! A sandboxed process that attacks sluice itself, with every capability a
//! root process has (written into its sandbox's cgroup by hand, with no
//! seccomp filter or dropped capability to help): it must neither switch
//! enforcement off nor reach what sluice guards. Judged by a canary host in
//! its own network namespace, which must receive nothing, and by a second
//! connect from the sandbox, which must still be redirected. The attacker is
//! tests/fixtures/attack.c, built static. Needs root, gcc and the BPF LSM.

mod harness;

use std::{
    net::SocketAddr,
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, Output, Stdio},
};

use harness::{attacker, Daemon, EchoServer, Sandbox, TestNet};
use sluice::audit::{Decision, Verdict};

/// Allows a host nobody serves: every connect these tests make is denied.
const CLOSED_PROFILE: &str = r#"
name = "closed"
[[rule]]
name = "elsewhere"
action = "allow"
hosts = ["elsewhere.test"]
ports = [443]
"#;

/// Root, BPF, and gcc for the attacker.
fn ready() -> bool {
    if !harness::privileged() {
        return false;
    }
    if Command::new("gcc").arg("--version").output().is_err() {
        eprintln!("SKIPPED: needs gcc to build the attacker (`cargo xtask setup` installs it)");
        return false;
    }
    true
}

/// A test network with a canary, a daemon, and one closed sandbox.
struct World {
    _net: TestNet,
    canary: EchoServer,
    canary_addr: SocketAddr,
    daemon: Daemon,
    sandbox: Sandbox,
}

impl World {
    fn new() -> Self {
        let net = TestNet::new();
        let canary_addr = SocketAddr::new(net.add_host(3), 443);
        let canary = EchoServer::start(net.tcp_listener(canary_addr));
        let daemon = Daemon::start(None);
        let sandbox = daemon.sandbox("attacker", CLOSED_PROFILE);
        Self { _net: net, canary, canary_addr, daemon, sandbox }
    }

    fn config(&self) -> sluice::daemon::DaemonConfig {
        sluice::daemon::DaemonConfig::new(&self.daemon.instance).unwrap()
    }

    /// Runs one attack step inside the sandbox, as root or as `uid`
    /// (dropped by setpriv, inside the sandbox's cgroup).
    fn attack(&self, uid: Option<u32>, args: &[&str]) -> Attack {
        let attacker = attacker().to_str().unwrap();
        let mut command = match uid {
            None => self.sandbox.command(attacker),
            Some(uid) => {
                let mut command = self.sandbox.command("setpriv");
                let id = uid.to_string();
                command.args(["--reuid", &id, "--regid", &id, "--clear-groups", attacker]);
                command
            }
        };
        command.args(args).stdin(Stdio::null());
        Attack(command.output().unwrap())
    }

    /// The sandbox is still enforced: a fresh process's connect to the
    /// canary is redirected (and denied by the proxy), and the canary has
    /// received nothing at all.
    fn assert_still_enforced(&self) {
        let before = self.denied_connects();
        let probe = self.attack(None, &["connect", &self.canary_addr.ip().to_string(), "443"]);
        let destination = self.canary_addr;
        self.daemon.wait_decisions("the probe's connect denied by the proxy", |decisions| {
            decisions.iter().filter(|d| is_denied_connect(d, destination)).count() > before
        });
        assert_eq!(self.canary.accepted(), 0, "the canary was reached; probe said:\n{}", probe.text());
    }

    fn denied_connects(&self) -> usize {
        self.daemon.decisions().iter().filter(|d| is_denied_connect(d, self.canary_addr)).count()
    }

    /// A record of `rule` that belongs to no sandbox.
    fn wait_tamper_record_unattributed(&self, rule: &str) -> Decision {
        let decisions = self.daemon.wait_decisions(rule, |decisions| decisions.iter().any(|d| d.rule == rule));
        decisions.into_iter().find(|d| d.rule == rule).unwrap()
    }

    fn wait_tamper_record(&self, rule: &str) -> Decision {
        let decisions = self.daemon.wait_decisions(rule, |decisions| decisions.iter().any(|d| d.rule == rule));
        let record = decisions.into_iter().find(|d| d.rule == rule).unwrap();
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.sandbox.as_deref(), Some("attacker"), "{record}");
        record
    }
}

fn is_denied_connect(decision: &Decision, destination: SocketAddr) -> bool {
    decision.verdict == Verdict::Deny
        && decision.destination == Some(destination)
        && !decision.rule.starts_with("tamper")
}

/// What one attack step printed.
struct Attack(Output);

impl Attack {
    fn text(&self) -> String {
        format!(
            "status {:?}\n{}{}",
            self.0.status,
            String::from_utf8_lossy(&self.0.stdout),
            String::from_utf8_lossy(&self.0.stderr)
        )
    }

    /// Lines of `step`.
    fn steps(&self, step: &str) -> Vec<String> {
        let prefix = format!("{step}: ");
        String::from_utf8_lossy(&self.0.stdout).lines().filter(|l| l.starts_with(&prefix)).map(str::to_owned).collect()
    }

    /// The guard killed it (SIGKILL) before `step` got anywhere: no line
    /// of that step says ok.
    fn assert_killed_before(&self, step: &str) {
        assert_eq!(self.0.status.signal(), Some(libc::SIGKILL), "not killed:\n{}", self.text());
        let lines = self.steps(step);
        assert!(lines.iter().all(|l| l.contains("refused")), "{step} got through:\n{}", self.text());
    }

    fn assert_ok(&self, step: &str) {
        let lines = self.steps(step);
        assert!(!lines.is_empty() && lines.iter().all(|l| l.ends_with(": ok")), "{step} failed:\n{}", self.text());
    }
}

fn cgroup_id(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

#[test]
fn a_sandboxed_process_cannot_detach_or_rewrite_sluices_kernel_objects() {
    if !ready() {
        return;
    }
    let world = World::new();
    let config = world.config();
    let links = config.pin_dir().join("links");
    let exempt_map = config.pin_dir().join("maps/EXEMPT");
    let parent_id = cgroup_id(&config.cgroup_parent()).to_string();
    let sandbox_id = cgroup_id(&world.sandbox.cgroup).to_string();
    let bpffs = std::env::temp_dir().join(format!("sluice-attack-bpffs-{}", std::process::id()));
    std::fs::create_dir_all(&bpffs).unwrap();
    let pinned_links = std::fs::read_dir(&links).unwrap().count();

    // As root with every capability, then as an ordinary user.
    for uid in [None, Some(65534)] {
        world.attack(uid, &["detach-pinned", links.to_str().unwrap()]).assert_killed_before("link-detach");
        world.attack(uid, &["detach-by-id", &parent_id]).assert_killed_before("link-detach");
        world
            .attack(uid, &["map-update", exempt_map.to_str().unwrap(), &sandbox_id])
            .assert_killed_before("map-update");
        world.attack(uid, &["map-by-id"]).assert_killed_before("map-next-id");
        world.attack(uid, &["compat"]).assert_killed_before("bpf-32");
        world.attack(uid, &["mount-bpf", bpffs.to_str().unwrap()]).assert_killed_before("mount-bpf");
        // What would let a helper keep a killed attacker's descriptors, or
        // make sockets unseen by system call hooks.
        world.attack(uid, &["clone-files"]).assert_killed_before("clone-files");
        world.attack(uid, &["io-uring"]).assert_killed_before("io-uring");
        world.assert_still_enforced();
    }
    let record = world.wait_tamper_record("tamper-bpf");
    assert!(record.reason.contains("bpf()"), "{record}");
    world.wait_tamper_record("tamper-clone");
    world.wait_tamper_record("tamper-io-uring");
    world.wait_tamper_record("tamper-mount");
    let _ = std::fs::remove_dir(&bpffs);
    // Every link is still pinned, and nothing was exempted.
    assert_eq!(std::fs::read_dir(&links).unwrap().count(), pinned_links);
    assert!(config.pin_dir().join("maps/EXEMPT").exists());
}

#[test]
fn a_process_that_leaves_its_sandbox_cgroup_is_killed() {
    if !ready() {
        return;
    }
    let world = World::new();
    let root = sluice::datapath::cgroup2_mount().unwrap();
    let (ip, port) = (world.canary_addr.ip().to_string(), "443");

    // Writing itself into the root cgroup kills it before it returns.
    let moved = world.attack(None, &["move-self", root.to_str().unwrap(), &ip, port]);
    moved.assert_killed_before("connect");
    assert!(moved.steps("connect").is_empty(), "{}", moved.text());
    world.wait_tamper_record("tamper-cgroup-escape");

    // Moved by a helper, it stays bound to its sandbox: its next socket()
    // kills it.
    let helped = world.attack(None, &["move-parent", root.to_str().unwrap(), &ip, port]);
    helped.assert_ok("cgroup-move-parent");
    helped.assert_killed_before("connect");

    assert_eq!(world.canary.accepted(), 0);
    world.assert_still_enforced();
}

#[test]
fn a_sandboxed_process_can_trace_only_its_own_sandbox() {
    if !ready() {
        return;
    }
    let world = World::new();
    let daemon_pid = world.daemon.pid().to_string();
    // A host process that is none of the sandbox's business.
    let outsider =
        Outsider(Command::new("sleep").arg("30").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let outsider_pid = outsider.0.id().to_string();

    for uid in [None, Some(65534)] {
        world.attack(uid, &["ptrace-attach", &outsider_pid]).assert_killed_before("ptrace-attach");
        world.attack(uid, &["ptrace-seize", &daemon_pid]).assert_killed_before("ptrace-seize");
        for target in [&daemon_pid, &outsider_pid] {
            world.attack(uid, &["vm-read", target]).assert_killed_before("vm-read");
        }
        world.attack(uid, &["perf"]).assert_killed_before("perf-open");
    }
    let record = world.wait_tamper_record("tamper-ptrace");
    assert!(record.reason.contains("outside"), "{record}");
    world.wait_tamper_record("tamper-perf");

    // Its own children remain traceable: debuggers keep working.
    let own = world.attack(None, &["ptrace-child"]);
    own.assert_ok("ptrace-attach");
    own.assert_ok("vm-read");

    drop(outsider);
    world.assert_still_enforced();
}

/// A host process the test started, killed however the test ends (a
/// tracer killed by the guard may leave it stopped).
struct Outsider(std::process::Child);

impl Drop for Outsider {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn links_detached_from_outside_are_attached_again_and_the_sandbox_stays_closed() {
    if !ready() {
        return;
    }
    let world = World::new();
    let config = world.config();
    let parent_id = cgroup_id(&config.cgroup_parent()).to_string();
    // A host root process (not sandboxed: the guard does not stop it)
    // detaches every cgroup link of the daemon.
    let out = Command::new(attacker()).args(["detach-by-id", &parent_id]).output().unwrap();
    let detached = Attack(out);
    assert!(detached.steps("link-detach").len() >= 10, "{}", detached.text());
    detached.assert_ok("link-detach");
    let started = std::time::Instant::now();
    let record = world.wait_tamper_record_unattributed("kernel-links-healed");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "healed only after {:?}", started.elapsed());
    assert!(record.reason.contains("sluice_connect4"), "{record}");
    world.assert_still_enforced();
}

/// Raw `bpf()` for the test's own attack from the host.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: a zeroed bpf_attr-sized buffer the command reads and writes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The id of the link pinned at `pin`.
fn pinned_link_id(pin: &Path) -> u32 {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr).unwrap_or_else(|e| panic!("BPF_OBJ_GET {}: {e}", pin.display()));
    let mut info = [0u32; 64];
    let mut attr = [0u64; 16];
    attr[0] = fd as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).unwrap();
    // SAFETY: our descriptor.
    unsafe { libc::close(fd as i32) };
    // struct bpf_link_info { __u32 type; __u32 id; ... }
    info[1]
}

#[test]
fn guard_links_destroyed_from_outside_are_restored_and_the_guard_holds() {
    if !ready() {
        return;
    }
    let world = World::new();
    let links = world.config().pin_dir().join("links");
    let guard = ["sluice_sys_enter", "sluice_guard_fork", "sluice_guard_exit", "sluice_guard_cgroup_attach"];
    // A host root process (which the guard does not stop) goes for the
    // guard's links by id: the kernel has no detach for tracing links...
    for name in guard {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(pinned_link_id(&links.join(name)));
        let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut attr).unwrap();
        let mut attr = [0u64; 16];
        attr[0] = fd as u64;
        let detached = bpf(BPF_LINK_DETACH, &mut attr);
        // SAFETY: our descriptor.
        unsafe { libc::close(fd as i32) };
        assert_eq!(
            detached.as_ref().map_err(std::io::Error::raw_os_error),
            Err(Some(libc::EOPNOTSUPP)),
            "{name}: this kernel detaches tracing links now; the watchdog must notice that too"
        );
    }
    // ... so it removes their pins, which held the only reference.
    for name in guard {
        std::fs::remove_file(links.join(name)).unwrap();
    }
    let started = std::time::Instant::now();
    let record = world.wait_tamper_record_unattributed("kernel-links-healed");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "healed only after {:?}", started.elapsed());
    for name in guard {
        assert!(record.reason.contains(name), "{name} not healed: {record}");
        assert!(links.join(name).exists(), "{name} is not pinned again");
    }
    // The guard still works: a sandboxed bpf() is killed, and a process
    // that leaves its cgroup too (fork and cgroup-move programs).
    world.attack(None, &["map-by-id"]).assert_killed_before("map-next-id");
    let root = sluice::datapath::cgroup2_mount().unwrap();
    let ip = world.canary_addr.ip().to_string();
    world.attack(None, &["move-self", root.to_str().unwrap(), &ip, "443"]).assert_killed_before("connect");
    world.assert_still_enforced();
}

#[test]
fn cgroup_link_pins_removed_from_outside_are_restored_and_the_sandbox_stays_closed() {
    if !ready() {
        return;
    }
    let world = World::new();
    let links = world.config().pin_dir().join("links");
    // A host root process removes the pins of the connect programs, which
    // held their links' only references.
    for name in ["sluice_connect4", "sluice_connect6"] {
        std::fs::remove_file(links.join(name)).unwrap();
    }
    let record = world.wait_tamper_record_unattributed("kernel-links-healed");
    for name in ["sluice_connect4", "sluice_connect6"] {
        assert!(record.reason.contains(name), "{name} not healed: {record}");
        assert!(links.join(name).exists(), "{name} is not pinned again");
    }
    world.assert_still_enforced();
}
