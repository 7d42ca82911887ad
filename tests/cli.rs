//! `sluice run` and the CLI as a user meets them: exit codes, standard
//! streams, signals, clean-up, and errors that say what to do.

mod harness;

use std::{
    io::Write,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use harness::{privileged, Daemon, SLUICE};

fn sluice() -> Command {
    let mut command = Command::new(SLUICE);
    command.stdin(Stdio::null());
    command
}

/// An instance name per test, for the embedded daemons it causes.
fn instance(test: &str) -> String {
    format!("sluicecli{}{test}", std::process::id())
}

/// Nothing of an instance's embedded daemons may remain.
fn assert_no_leftovers(prefix: &str) {
    for dir in ["/sys/fs/bpf", "/run", "/sys/fs/cgroup/unified"] {
        let leftovers: Vec<_> = std::fs::read_dir(dir)
            .map(|entries| {
                entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).collect()
            })
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "left behind in {dir}: {leftovers:?}");
    }
}

#[test]
fn run_passes_streams_and_exit_codes_through_and_cleans_up() {
    if !privileged() {
        return;
    }
    let instance = instance("streams");
    let prefix = format!("{instance}-run-");
    let mut child = sluice()
        .args([
            "run",
            "--instance",
            &instance,
            "--quiet",
            "--user",
            "nobody",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; echo to-stderr >&2; exit 7",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello sandbox\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(7), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "HELLO SANDBOX\n");
    assert!(String::from_utf8_lossy(&output.stderr).contains("to-stderr"));
    assert_no_leftovers(&prefix);

    let killed = sluice()
        .args(["run", "--instance", &instance, "-q", "--as-root", "--", "sh", "-c", "kill -9 $$"])
        .output()
        .unwrap();
    assert_eq!(killed.status.code(), Some(137), "128 + SIGKILL");

    let missing =
        sluice().args(["run", "--instance", &instance, "-q", "--as-root", "--", "/nonexistent/tool"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot run /nonexistent/tool"));
    assert_no_leftovers(&prefix);
}

#[test]
fn run_forwards_signals_and_kills_what_the_command_left_behind() {
    if !privileged() {
        return;
    }
    let marker = std::env::temp_dir().join(format!("sluice-orphan-{}", std::process::id()));
    // A duration no other process sleeps, to find the sleeper among the
    // host's processes: `$!` is a pid in the sandbox's own pid namespace.
    let nap = format!("300.{}", std::process::id());
    let script = format!(
        "trap 'exit 42' TERM; (sleep {nap}; touch {marker}) & echo $!; while true; do sleep 0.1; done",
        marker = marker.display()
    );
    let mut child = sluice()
        .args(["run", "--instance", &instance("signals"), "-q", "--as-root", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let _in_sandbox: u32 = line.trim().parse().unwrap();
    let wanted = format!("sleep\0{nap}\0");
    let mut orphan = None;
    for _ in 0..100 {
        orphan = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (cmdline == wanted.as_bytes()).then(|| e.file_name().to_string_lossy().into_owned())
        });
        if orphan.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let orphan = orphan.expect("the background sleeper is running");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "sluice run did not end after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(42), "the command's own exit code after SIGTERM");
    // The background sleeper was killed with the sandbox, not left running.
    // (A zombie waiting to be reaped by init is dead too.)
    let state = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
    let alive = state.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'));
    assert!(!alive, "orphan {orphan} survived: {state}");
    assert!(!marker.exists());
}

#[test]
fn a_broken_profile_is_refused_with_line_and_column_before_anything_runs() {
    if !privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sluice-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join("broken.toml");
    std::fs::write(&profile, "name = \"x\"\n[[rule]]\naction = \"allow\"\nports = [0]\n").unwrap();
    let marker = dir.join("ran");
    let output = sluice()
        .args(["run", "--instance", &instance("broken"), "--as-root", "--profile"])
        .arg(&profile)
        .args(["--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.contains("broken.toml:4:"), "no line/column in: {stderr}");
    assert!(stderr.contains("port 0"), "{stderr}");
    assert!(!marker.exists(), "the command ran despite the broken profile");

    let check = sluice().args(["policy", "check"]).arg(&profile).output().unwrap();
    assert_eq!(check.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn errors_say_what_to_do() {
    if !privileged() {
        return;
    }
    let mut as_nobody = sluice();
    as_nobody.args(["run", "--", "true"]).uid(65534).gid(65534);
    let output = as_nobody.output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("must run as root"), "{output:?}");

    let output = sluice().args(["sandbox", "ls", "--instance", "sluice-nobody-here"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no sluice daemon is listening") && stderr.contains("sluice daemon --instance"),
        "{stderr}"
    );
}

#[test]
fn sandbox_ls_shows_sandboxes_and_their_kernel_counters() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("listed", "name = \"closed\"\n");
    let output = sandbox.python(
        "import socket\nfor _ in range(3):\n    s = socket.socket(); s.settimeout(5)\n    try:\n        s.connect(('127.0.0.1', 9)); s.recv(1)\n    except OSError: pass\n    s.close()\ntry: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))\nexcept OSError: pass\n",
    );
    assert!(output.status.success(), "{output:?}");
    let ls = sluice().args(["sandbox", "ls", "--instance", &daemon.instance]).output().unwrap();
    assert!(ls.status.success(), "{ls:?}");
    let text = String::from_utf8_lossy(&ls.stdout);
    let row =
        text.lines().find(|l| l.starts_with("listed ")).unwrap_or_else(|| panic!("no row for the sandbox:\n{text}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    // NAME PROFILE PIDS REDIRECTED DNS REFUSED DROPPED CGROUP
    assert_eq!(columns[1], "closed");
    assert_eq!(columns[3], "3", "redirected connects: {row}");
    assert_eq!(columns[5], "1", "refused datagrams: {row}");
    assert!(columns[7].ends_with("/listed"));
}

#[test]
fn teardown_removes_every_pin_and_the_cgroups_sluice_made() {
    if !privileged() {
        return;
    }
    let mut daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("doomed", "name = \"closed\"\n");
    let pins = std::path::Path::new("/sys/fs/bpf").join(&daemon.instance);
    assert!(pins.join("links").read_dir().unwrap().count() >= 12, "programs are not pinned");
    let refused = sluice().args(["teardown", "--instance", &daemon.instance]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2), "teardown must refuse while the daemon runs");
    daemon.kill();
    // Still enforced while no daemon runs: pins outlive the process.
    assert!(pins.exists());
    let output = sluice().args(["teardown", "--instance", &daemon.instance]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("pins of instance"));
    assert!(!pins.exists(), "pins remain");
    assert!(!sandbox.cgroup.exists() && !sandbox.cgroup.parent().unwrap().exists(), "cgroups remain");
}

#[test]
fn sluice_log_shows_decisions_filtered_by_sandbox_and_verdict() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(None);
    let open = daemon.sandbox(
        "logged",
        "name = \"open\"\n[[rule]]\nname = \"loopback\"\naction = \"allow\"\nips = [\"127.0.0.1/32\"]\n",
    );
    let closed = daemon.sandbox("quiet", "name = \"closed\"\n");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=5)\ns.sendall(b'x')\ns.close()\n"
    );
    for sandbox in [&open, &closed] {
        let _ = sandbox.python(&script);
    }
    daemon.wait_decisions("two connects", |d| d.iter().filter(|d| d.kind == sluice::audit::Kind::Connect).count() >= 2);
    let log = |extra: &[&str]| {
        let output = sluice().args(["log", "--instance", &daemon.instance]).args(extra).output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let all = log(&[]);
    assert!(all.contains("[logged] ALLOW connect") && all.contains("[quiet] DENY  connect"), "{all}");
    let denials = log(&["--deny"]);
    assert!(!denials.contains("ALLOW") && denials.contains("rule=default-deny"), "{denials}");
    let json = log(&["--json", "--sandbox", "logged"]);
    assert!(json
        .lines()
        .all(|l| serde_json::from_str::<sluice::audit::Decision>(l)
            .is_ok_and(|d| d.sandbox.as_deref() == Some("logged"))));
    assert!(json.contains("\"rule\":\"loopback\""), "{json}");
}

#[test]
fn rules_added_and_removed_at_runtime_take_effect_at_once() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("edited", "name = \"closed\"\n");
    let listener = harness::EchoServer::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let script = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {}), timeout=5)\ns.sendall(b'hi')\nprint('result=' + repr(s.recv(10)))\n",
        listener.addr.port()
    );
    let attempt = || harness::fields(&sandbox.python(&script))["result"].clone();
    let policy = |args: &[&str]| {
        sluice()
            .args(["policy"])
            .args(args)
            .args(["--sandbox", "edited", "--instance", &daemon.instance])
            .output()
            .unwrap()
    };
    assert_eq!(attempt(), "b''");
    assert!(policy(&["allow", "127.0.0.1", "--port", &listener.addr.port().to_string()]).status.success());
    assert_eq!(attempt(), "b'hi'");
    assert!(policy(&["deny", "127.0.0.0/8"]).status.success());
    assert_eq!(attempt(), "b''", "forbid must win over the allow rule");
    assert!(policy(&["remove-rule", "deny-127.0.0.0-8"]).status.success());
    assert_eq!(attempt(), "b'hi'");
    let missing = policy(&["remove-rule", "no-such-rule"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no rule named"));
    let bad = policy(&["allow", "not a host"]);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(listener.accepted(), 2);
}

#[test]
fn a_dry_run_profile_lets_traffic_through_and_logs_what_it_would_deny() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("trial", "name = \"trial\"\nmode = \"dry-run\"\n");
    let listener = harness::EchoServer::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let script = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {}), timeout=5)\ns.sendall(b'hi')\nprint('result=' + repr(s.recv(10)))\n",
        listener.addr.port()
    );
    assert_eq!(harness::fields(&sandbox.python(&script))["result"], "b'hi'");
    let decisions = daemon.wait_decisions("a dry-run connect", |d| d.iter().any(|d| d.would_deny));
    let decision = decisions.iter().find(|d| d.would_deny).unwrap();
    assert_eq!((decision.verdict, decision.rule.as_str()), (sluice::audit::Verdict::Allow, "default-deny"));
    assert!(decision.to_string().starts_with("DRYRUN connect"), "{decision}");
    // Kernel refusals are not policy: a dry run does not open raw sockets.
    let raw = sandbox.python("import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, 1); print('raw=created')\nexcept PermissionError:\n    print('raw=EPERM')\n");
    assert_eq!(harness::fields(&raw)["raw"], "EPERM");
}

#[test]
fn a_sandboxed_root_process_cannot_use_the_control_api() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(None);
    let sandbox = daemon.sandbox("locked", "name = \"closed\"\n");
    let socket = format!("/run/{}/control.sock", daemon.instance);
    // Through the CLI, and with raw HTTP on the socket from a child cgroup
    // the sandbox made for itself: both are root, both are refused.
    let cli = sandbox
        .command(SLUICE)
        .args(["policy", "allow", "127.0.0.1", "--sandbox", "locked", "--instance", &daemon.instance])
        .output()
        .unwrap();
    assert_eq!(cli.status.code(), Some(2), "{cli:?}");
    assert!(String::from_utf8_lossy(&cli.stderr).contains("inside a sandbox"), "{cli:?}");
    let nested = format!(
        "mkdir -p {cg}/escape && echo $$ > {cg}/escape/cgroup.procs && \
         curl -sS --max-time 5 --unix-socket {socket} -X POST -H 'content-type: application/json' \
         -d '{{\"name\":\"escape\",\"action\":\"allow\",\"hosts\":[\"*\"]}}' http://sluice/v1/sandboxes/locked/rules",
        cg = sandbox.cgroup.display()
    );
    let raw = sandbox.command("sh").args(["-c", &nested]).output().unwrap();
    let answer = String::from_utf8_lossy(&raw.stdout);
    assert!(answer.contains("inside a sandbox") && !answer.contains("\"escape\""), "{raw:?}");
    let _ = std::fs::remove_dir(sandbox.cgroup.join("escape"));
    // The profile in force is the one it started with; root outside may
    // still change it.
    let rules = |expected: &str| {
        let shown = sluice().args(["policy", "show", "--sandbox", "locked", "--instance", &daemon.instance]).output();
        let shown = shown.unwrap();
        assert!(shown.status.success(), "{shown:?}");
        String::from_utf8_lossy(&shown.stdout).contains(expected)
    };
    assert!(!rules("escape") && !rules("127.0.0.1"));
    let outside = sluice()
        .args(["policy", "allow", "127.0.0.1", "--sandbox", "locked", "--instance", &daemon.instance])
        .output()
        .unwrap();
    assert!(outside.status.success(), "{outside:?}");
    assert!(rules("127.0.0.1"));
}
