//! `sluice run` confines its command: as the default user and with
//! `--as-root`, with a running daemon and with the embedded one, a command
//! that attacks sluice from inside (`bpf()`, pins, a fresh bpffs or cgroup2,
//! its cgroup namespace, ptrace of the daemon, the daemon's /proc files,
//! the CA keys, the secrets file, secret variables) gets nowhere: every
//! attempt is refused, the synthetic secret of the run appears in nothing
//! the sandbox or the logs produced, and afterwards a connect to a canary
//! in a test network namespace is still redirected and denied (the canary
//! receives nothing, the decision log shows the denial). Ordinary work (a
//! compiler, git, pip from a local directory) still runs as the user.
//!
//! Needs root (cgroups, eBPF, network namespaces, mounts); skips otherwise.

mod harness;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use harness::{privileged, Daemon, EchoServer, TestNet, SLUICE};
use sluice::audit::{Kind, Verdict};

/// A value no one could guess, new for every run.
fn synthetic_secret() -> String {
    let mut random = [0u8; 16];
    // SAFETY: getrandom fills the buffer.
    assert_eq!(unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) }, 16);
    random.iter().fold(String::from("synthetic-"), |mut text, b| {
        use std::fmt::Write as _;
        let _ = write!(text, "{b:02x}");
        text
    })
}

/// The attacks, in Python (ctypes for raw syscalls). Prints `label=result`
/// lines; a refused attempt prints `refused:<exception>:<errno>`.
const ATTACK: &str = r#"
import ctypes, os, socket, struct, sys
out = {}
# PPID in an argument: the embedded daemon, which names its runtime
# directory after its pid. The command has a pid namespace of its own, so
# that pid is found from the directory's name, never from getppid() (1 here).
import glob
args = sys.argv[1:9]
if "PPID" in args[0]:
    found = glob.glob(args[0].replace("PPID", "*"))
    assert len(found) == 1, found
    embedded = found[0].rsplit("-", 1)[1]
    args = [a.replace("PPID", embedded) for a in args]
runtime, pin_dir, secrets, log, daemon_pid, canary, cgroup2, name = args
daemon_pid = int(daemon_pid)
# Its own pid namespace: nothing of the host's processes to see.
out["pids"] = " ".join(sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int))
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def attempt(label, fn):
    try:
        out[label] = "OK:" + repr(fn())[:300]
    except BaseException as e:
        out[label] = "refused:%s:%s" % (type(e).__name__, getattr(e, "errno", ""))
def check(rc):
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc
def read(path):
    with open(path, "rb") as f:
        data = f.read(65536)
    if not data:
        raise EOFError("empty")
    return data.decode("latin1")
scratch = "/tmp/sluice-attack-%d" % os.getpid()
os.makedirs(scratch, exist_ok=True)

attempt("ca_key", lambda: read(os.path.join(runtime, "keys", name + ".key")))
attempt("keys_dir", lambda: os.listdir(os.path.join(runtime, "keys")))
attempt("runtime_state", lambda: read(os.path.join(runtime, "sandboxes.json")))
attempt("control_socket", lambda: socket.socket(socket.AF_UNIX).connect(os.path.join(runtime, "control.sock")))
attempt("ca_bundle", lambda: len(read(os.path.join(runtime, "ca", name + "-bundle.pem"))))
attempt("secrets", lambda: read(secrets))
attempt("decision_log", lambda: read(log))
attempt("environ", lambda: read("/proc/%d/environ" % daemon_pid))
def mem():
    with open("/proc/%d/mem" % daemon_pid, "rb") as f:
        maps = read("/proc/%d/maps" % daemon_pid)
        start = int(maps.split("-")[0], 16)
        f.seek(start)
        return f.read(64)
attempt("mem", mem)
attempt("env_secret", lambda: [k for k in os.environ if k.startswith("SLUICE_SECRET_")] or (_ for _ in ()).throw(LookupError("none")))
attempt("bpffs_mount", lambda: check(libc.mount(b"bpf", scratch.encode(), b"bpf", 0, None)))
attempt("pins", lambda: os.listdir(pin_dir))
attempt("bpffs_listing", lambda: os.listdir("/sys/fs/bpf") or (_ for _ in ()).throw(LookupError("empty")))
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    return check(libc.syscall(321, cmd, buf, 128))
path = ctypes.create_string_buffer(os.path.join(pin_dir, "links").encode())
attempt("bpf_obj_get", lambda: bpf(7, struct.pack("=QII", ctypes.addressof(path), 0, 0)))
attempt("bpf_link_get_next_id", lambda: bpf(31, struct.pack("=III", 0, 0, 0)))
attempt("cgroup_view", lambda: read("/proc/self/cgroup"))
def move_to_root():
    with open(os.path.join(cgroup2, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    return read("/proc/self/cgroup")
attempt("cgroup_root_procs", move_to_root)
attempt("cgroup2_mount", lambda: check(libc.mount(b"cgroup2", scratch.encode(), b"cgroup2", 0, None)))
attempt("unshare_cgroup", lambda: check(libc.unshare(0x02000000)))
def setns(path):
    fd = os.open(path, os.O_RDONLY)
    return check(libc.setns(fd, 0))
attempt("setns_host_cgroup", lambda: setns("/proc/1/ns/cgroup"))
attempt("setns_own_cgroup", lambda: setns("/proc/self/ns/cgroup"))
attempt("setns_host_mnt", lambda: setns("/proc/1/ns/mnt"))
attempt("ptrace", lambda: check(libc.ptrace(16, daemon_pid, None, None)))
def vm_readv():
    local = ctypes.create_string_buffer(64)
    iov_local = struct.pack("=QQ", ctypes.addressof(local), 64)
    iov_remote = struct.pack("=QQ", 0x400000, 64)
    a, b = ctypes.create_string_buffer(iov_local), ctypes.create_string_buffer(iov_remote)
    return check(libc.syscall(310, daemon_pid, a, 1, b, 1, 0))
attempt("process_vm_readv", vm_readv)
status = read("/proc/self/status")
caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
for key, value in caps.items():
    out[key] = value.strip()
out["uid"] = str(os.getuid())
out["home"] = os.environ.get("HOME", "")
def probe():
    s = socket.create_connection((canary, 8080), timeout=10)
    s.sendall(b"probe-after-attacks")
    data = s.recv(100)
    s.close()
    return "ECHOED" if data else "closed"
attempt("probe", probe)
for key, value in out.items():
    print("%s=%s" % (key, value))
"#;

/// What must be refused whoever runs the attack.
const REFUSED: &[&str] = &[
    "ca_key",
    "keys_dir",
    "runtime_state",
    "control_socket",
    "secrets",
    "decision_log",
    "environ",
    "mem",
    "env_secret",
    "bpffs_mount",
    "pins",
    "bpffs_listing",
    "bpf_obj_get",
    "bpf_link_get_next_id",
    "cgroup2_mount",
    "unshare_cgroup",
    "setns_host_cgroup",
    "setns_own_cgroup",
    "setns_host_mnt",
    "ptrace",
    "process_vm_readv",
];

/// Capabilities that must be gone from the bounding and effective sets.
const DROPPED: &[u32] = &[21, 39, 38, 12, 19, 16, 17, 22, 25, 33, 32, 34, 24, 2, 9, 40, 13, 27];

/// An attack run: sandbox name, `sluice run` flags, environment, whether
/// the command runs as root.
type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], bool);

struct Attack {
    /// Keeps the canary's network namespace alive.
    _net: TestNet,
    canary: EchoServer,
    canary_ip: IpAddr,
}

impl Attack {
    fn new() -> Self {
        let net = TestNet::new();
        let canary_ip = net.add_host(3);
        let canary = EchoServer::start(net.tcp_listener(SocketAddr::new(canary_ip, 8080)));
        Self { _net: net, canary, canary_ip }
    }

    /// `sluice run ARGS -- python3 ATTACK ...`, as whoever `args` says.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        run_args: &[&str],
        env: &[(&str, &str)],
        runtime: &Path,
        pin_dir: &Path,
        secrets: &Path,
        log: &Path,
        daemon_pid: &str,
        name: &str,
    ) -> Output {
        let cgroup2 = sluice::datapath::cgroup2_mount().unwrap();
        let mut command = Command::new(SLUICE);
        command
            .arg("run")
            .args(run_args)
            .args(["--name", name, "--", "/usr/bin/python3", "-c", ATTACK])
            .arg(runtime)
            .arg(pin_dir)
            .arg(secrets)
            .arg(log)
            .arg(daemon_pid)
            .arg(self.canary_ip.to_string())
            .arg(cgroup2)
            .arg(name)
            .env_remove("SUDO_UID")
            .env_remove("SUDO_GID")
            .current_dir("/tmp")
            .stdin(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        command.output().expect("run sluice")
    }
}

fn results(output: &Output) -> HashMap<String, String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

/// Checks one attack run: every attempt refused, the capabilities gone,
/// nothing secret in what came out, the canary untouched, the probe after
/// the attacks denied in the decision log.
fn judge(attack: &Attack, output: &Output, as_root: bool, secret: &str, logs: &[&Path], name: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let got = results(output);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(got.contains_key("probe"), "the attack script did not finish:\n{context}");
    for label in REFUSED {
        let result = got.get(*label).unwrap_or_else(|| panic!("no result for {label}:\n{context}"));
        assert!(result.starts_with("refused:"), "{label} was not refused: {result}\n{context}");
    }
    // The raw syscalls were refused by the filter, not by chance.
    for label in ["bpf_obj_get", "bpf_link_get_next_id", "ptrace", "process_vm_readv", "unshare_cgroup"] {
        assert!(got[label].ends_with(&format!(":{}", libc::EPERM)), "{label}: {}", got[label]);
    }
    // The sandbox's own pid namespace: the init, the command and what it
    // started, never the daemon or another process of the host.
    let pids: Vec<u32> = got["pids"].split(' ').map(|p| p.parse().unwrap()).collect();
    assert!(pids.first() == Some(&1) && pids.len() <= 6, "host processes are visible: {}", got["pids"]);
    assert!(got["ca_bundle"].starts_with("OK:"), "the sandbox must still read its CA bundle: {}", got["ca_bundle"]);
    // Its own cgroup namespace: the sandbox is the root of what it sees, and
    // writing to "the root" leaves it where it is.
    // (cgroup v2 is the last line, `0::PATH`; a v1 hierarchy is namespaced too.)
    let sees_itself_as_root =
        |result: &str| (result.starts_with("OK:") && result.ends_with("\\n0::/\\n'")) || result == "OK:'0::/\\n'";
    assert!(sees_itself_as_root(&got["cgroup_view"]), "{context}");
    if as_root {
        assert!(sees_itself_as_root(&got["cgroup_root_procs"]), "{context}");
        assert_eq!(got["uid"], "0");
    } else {
        assert!(got["cgroup_root_procs"].starts_with("refused:"), "{context}");
        assert_ne!(got["uid"], "0");
    }
    for set in ["CapBnd", "CapEff", "CapPrm", "CapInh"] {
        let mask = u64::from_str_radix(&got[set], 16).unwrap();
        for cap in DROPPED {
            assert_eq!(mask & (1 << cap), 0, "capability {cap} in {set} ({mask:#x})");
        }
    }
    assert_eq!(got["CapAmb"], "0000000000000000");
    if as_root {
        let effective = u64::from_str_radix(&got["CapEff"], 16).unwrap();
        for kept in [0, 1, 3, 6, 7] {
            assert_ne!(effective & (1 << kept), 0, "root lost capability {kept} it needs for ordinary work");
        }
    } else {
        assert_eq!(got["CapEff"], "0000000000000000");
    }
    // Enforcement intact after all that: the canary got nothing, the
    // connect went to sluice and was denied.
    assert!(!got["probe"].contains("ECHOED"), "the probe reached the canary: {context}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(attack.canary.accepted(), 0, "the canary received a connection");
    let decisions: Vec<sluice::audit::Decision> = logs
        .iter()
        .flat_map(|log| std::fs::read_to_string(log).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|line| serde_json::from_str(&line).ok())
        .collect();
    let canary = SocketAddr::new(attack.canary_ip, 8080);
    assert!(
        decisions.iter().any(|d| d.kind == Kind::Connect
            && d.verdict == Verdict::Deny
            && d.sandbox.as_deref() == Some(name)
            && d.destination == Some(canary)),
        "no denied connect to the canary from {name}:\n{}",
        decisions.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    );
    // The secret: nowhere in what the sandbox printed or the logs hold.
    assert!(!stdout.contains(secret) && !stderr.contains(secret), "the secret leaked into the output:\n{context}");
    assert!(!stdout.contains("PRIVATE KEY"), "a private key leaked:\n{context}");
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.contains(secret), "the secret is in {}", log.display());
    }
}

#[test]
fn with_a_running_daemon_neither_root_nor_the_default_user_reaches_what_sluice_guards() {
    if !privileged() {
        return;
    }
    let attack = Attack::new();
    let secret = synthetic_secret();
    let daemon = Daemon::start_full(None, None, Some(&format!("synthetic = \"{secret}\"\n")));
    let runtime = sluice::daemon::runtime_dir(&daemon.instance);
    let pin_dir = Path::new("/sys/fs/bpf").join(&daemon.instance);
    assert!(pin_dir.join("links").exists(), "the daemon pins its links (what the attack goes for)");
    let secrets = daemon.dir.join("secrets");
    let daemon_log = daemon.dir.join("daemon.log");
    let pid = daemon.pid().to_string();
    let cases: [Case; 3] = [
        ("atk-root", &["--as-root"], &[], true),
        ("atk-nobody", &["--user", "nobody"], &[], false),
        // What sudo sets for the user who ran it.
        ("atk-sudo", &[], &[("SUDO_UID", "65534"), ("SUDO_GID", "65534")], false),
    ];
    for (name, flags, env, as_root) in cases {
        let mut args = vec!["--instance", &daemon.instance];
        args.extend_from_slice(flags);
        let output = attack.run(&args, env, &runtime, &pin_dir, &secrets, &daemon.decision_log(), &pid, name);
        judge(&attack, &output, as_root, &secret, &[&daemon.decision_log(), &daemon_log], name);
        if !as_root {
            assert_eq!(results(&output)["uid"], "65534", "{name}");
        }
    }
    // The kernel objects are still the daemon's: pins in place.
    assert!(pin_dir.join("links").exists());
}

#[test]
fn with_the_embedded_daemon_secret_variables_stay_with_the_daemon() {
    if !privileged() {
        return;
    }
    let attack = Attack::new();
    let secret = synthetic_secret();
    let dir = std::env::temp_dir().join(format!("sluice-confine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let instance = format!("sluiceconf{}", std::process::id());
    let log = dir.join("decisions.jsonl");
    let log_arg = log.to_str().unwrap().to_owned();
    for (name, flags, as_root) in
        [("emb-root", vec!["--as-root"], true), ("emb-nobody", vec!["--user", "nobody:nogroup"], false)]
    {
        let mut args = vec!["--instance", &instance, "--decision-log", &log_arg];
        args.extend(flags);
        // The embedded daemon (the command's parent) names its runtime
        // directory and pins after its pid.
        let output = attack.run(
            &args,
            &[("SLUICE_SECRET_SYNTHETIC", &secret)],
            &Path::new("/run").join(format!("{instance}-run-PPID")),
            &Path::new("/sys/fs/bpf").join(format!("{instance}-run-PPID")),
            Path::new("/nonexistent"),
            &log,
            "PPID",
            name,
        );
        judge(&attack, &output, as_root, &secret, &[&log], name);
    }
    // `SLUICE_SECRET_X=... sluice run -- env`: the command's environment
    // has neither the variable nor the value; its parent is sluice's init
    // (which holds neither), and the daemon's environ is out of reach: its
    // pid does not exist in the command's pid namespace.
    let child = Command::new(SLUICE)
        .args(["run", "--instance", &instance, "-q", "--as-root", "--", "sh", "-c"])
        .arg(format!(
            "env; cat /proc/$PPID/cmdline; echo; cat /proc/$PPID/environ; echo; \
             D=$(ls -d /run/{instance}-run-* | sed 's/.*-//'); echo daemon=$D; \
             cat /proc/$D/environ && echo daemon-environ-$((40+2))"
        ))
        .env("SLUICE_SECRET_X", &secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let daemon = child.id();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.contains("SSL_CERT_FILE="), "env did not run: {stdout}\n{stderr}");
    assert!(stdout.contains("sluice-init\0--\0sh"), "the parent is not sluice's init: {stdout}");
    assert!(!stdout.contains("SLUICE_SECRET_") && !stdout.contains(&secret), "{stdout}");
    assert!(!stdout.contains("daemon-environ-42"), "the daemon's environ was readable: {stdout}");
    assert!(stdout.contains(&format!("daemon={daemon}\n")), "the daemon's pid was not found: {stdout}");
    assert!(!stderr.contains(&secret));
    let _ = std::fs::remove_dir_all(dir);
}

/// The command runs under sluice's init in a pid namespace of its own:
/// exit codes and signals come through as before, a missing command says
/// so, and nothing it left running outlives it.
#[test]
fn the_command_has_its_own_pid_namespace_and_ends_with_everything_it_started() {
    if !privileged() {
        return;
    }
    let instance = format!("sluiceconfpid{}", std::process::id());
    let run = |script: &str| {
        Command::new(SLUICE)
            .args(["run", "--instance", &instance, "-q", "--user", "nobody", "--", "sh", "-c", script])
            .current_dir("/tmp")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let output = run("echo pid=$$ ppid=$PPID; exit 7");
    assert_eq!(output.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "pid=2 ppid=1\n");

    let missing = Command::new(SLUICE)
        .args(["run", "--instance", &instance, "-q", "--as-root", "--", "/nonexistent/command"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot run /nonexistent/command"));

    // SIGTERM to `sluice run` reaches a command that is no pid 1 and has no
    // handler of its own: it ends as a SIGTERM would end it.
    let mut sleeper = Command::new(SLUICE)
        .args(["run", "--instance", &instance, "-q", "--as-root", "--", "sleep", "60"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    // SAFETY: plain syscall to our own child.
    unsafe { libc::kill(sleeper.id() as i32, libc::SIGTERM) };
    let started = std::time::Instant::now();
    let status = sleeper.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(started.elapsed() < std::time::Duration::from_secs(30));

    // A background process ends with the command that started it.
    let marker = format!("sluice-left-behind-{}", std::process::id());
    let output = run(&format!("(exec -a {marker} sleep 120) & echo started"));
    assert!(String::from_utf8_lossy(&output.stdout).contains("started"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|cmdline| cmdline.starts_with(marker.as_bytes()));
    assert!(!left, "a process of the sandbox outlived its command");
}

#[test]
fn root_with_nobody_named_is_refused_before_anything_is_set_up() {
    if !privileged() {
        return;
    }
    let instance = format!("sluiceconfnone{}", std::process::id());
    let marker = std::env::temp_dir().join(format!("sluice-confine-ran-{}", std::process::id()));
    let output = Command::new(SLUICE)
        .args(["run", "--instance", &instance, "--", "touch"])
        .arg(&marker)
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--user") && stderr.contains("--as-root"), "{stderr}");
    assert!(!marker.exists(), "the command ran");
    let prefix = format!("{instance}-run-");
    for dir in ["/run", "/sys/fs/bpf", "/sys/fs/cgroup/unified"] {
        let left: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .collect();
        assert!(left.is_empty(), "set up before refusing: {left:?}");
    }
    // Root running sudo is not a user to run as either.
    let output = Command::new(SLUICE)
        .args(["run", "--instance", &instance, "--", "true"])
        .env("SUDO_UID", "0")
        .env("SUDO_GID", "0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = Command::new(SLUICE)
        .args(["run", "--instance", &instance, "--user", "no-such-user-here", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no such user"), "{output:?}");
}

/// A user of the test's own, removed on drop.
struct TestUser {
    name: String,
    home: PathBuf,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create() -> Self {
        let name = format!("sluicet{}", std::process::id() % 100_000);
        let home = std::env::temp_dir().join(format!("{name}-home"));
        let _ = Command::new("userdel").arg(&name).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&home);
        let status = Command::new("useradd")
            .args(["--user-group", "--shell", "/bin/sh", "--create-home", "--home-dir"])
            .arg(&home)
            .arg(&name)
            .status()
            .expect("useradd");
        assert!(status.success(), "useradd failed");
        let id = |flag: &str| -> u32 {
            let output = Command::new("id").arg(flag).arg(&name).output().unwrap();
            String::from_utf8_lossy(&output.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        Self { name, home, uid, gid }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// A wheel of a one-module package, made by hand (no network, no build).
fn write_wheel(dir: &Path) {
    let script = r#"
import base64, hashlib, sys, zipfile
path = sys.argv[1] + "/sluicedemo-0.1-py3-none-any.whl"
files = {
    "sluicedemo/__init__.py": b"GREETING = 'hello from a local wheel'\n",
    "sluicedemo-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: sluicedemo\nVersion: 0.1\n",
    "sluicedemo-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(path, "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (name, digest, len(data)))
    record.append("sluicedemo-0.1.dist-info/RECORD,,")
    z.writestr("sluicedemo-0.1.dist-info/RECORD", "\n".join(record) + "\n")
"#;
    let status = Command::new("/usr/bin/python3").args(["-c", script]).arg(dir).status().unwrap();
    assert!(status.success());
}

fn have(tool: &str) -> bool {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED part: {tool} is not installed");
    }
    found
}

#[test]
fn a_compiler_git_and_pip_work_as_the_user_who_ran_sudo() {
    if !privileged() {
        return;
    }
    let user = TestUser::create();
    let work = user.home.join("work");
    std::fs::create_dir_all(work.join("wheels")).unwrap();
    write_wheel(&work.join("wheels"));
    std::fs::write(work.join("hello.c"), "#include <stdio.h>\nint main(void){puts(\"compiled-and-ran\");return 0;}\n")
        .unwrap();
    let chown = Command::new("chown").args(["-R", &format!("{}:{}", user.uid, user.gid)]).arg(&user.home).status();
    assert!(chown.unwrap().success());
    let mut script = String::from("set -e\ncd \"$HOME/work\"\necho \"id=$(id -u):$(id -g) home=$HOME user=$USER\"\n");
    if have("cc") {
        script.push_str("cc -o hello hello.c && ./hello\n");
    }
    if have("git") {
        script.push_str(
            "git init -q origin && cd origin && git config user.email t@example.invalid && git config user.name t \
             && echo one > file && git add file && git commit -qm one && cd .. \
             && git clone -q origin clone && cat clone/file | sed 's/^/cloned=/'\n",
        );
    }
    let pip =
        Command::new("/usr/bin/python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    if pip {
        script.push_str(
            "/usr/bin/python3 -m pip install -q --no-index --find-links wheels --target site sluicedemo \
             && PYTHONPATH=site /usr/bin/python3 -c 'import sluicedemo; print(\"pip=\" + sluicedemo.GREETING)'\n",
        );
    } else {
        eprintln!("SKIPPED part: pip for /usr/bin/python3 is not installed");
    }
    let instance = format!("sluiceconfwork{}", std::process::id());
    let output = Command::new(SLUICE)
        .args(["run", "--instance", &instance, "-q", "--", "sh", "-c", &script])
        .env("SUDO_UID", user.uid.to_string())
        .env("SUDO_GID", user.gid.to_string())
        .env("HOME", "/root")
        .current_dir("/tmp")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let context = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{context}");
    assert!(
        stdout.contains(&format!("id={}:{} home={} user={}", user.uid, user.gid, user.home.display(), user.name)),
        "{context}"
    );
    if have("cc") {
        assert!(stdout.contains("compiled-and-ran"), "{context}");
    }
    if have("git") {
        assert!(stdout.contains("cloned=one"), "{context}");
    }
    if pip {
        assert!(stdout.contains("pip=hello from a local wheel"), "{context}");
    }
}
