//! The audit trail end to end: a real daemon writes it while a sandbox's
//! requests to a test host are allowed and denied; `sluice audit verify`
//! checks it with only the public key from `sluice audit pubkey`, and
//! names each kind of tampering where it is; a restart (after a crash that
//! left a partial line) continues the chain; rotation keeps it across
//! files. Needs root (daemon, cgroups, network namespace).

mod harness;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
};

use harness::{dns::TestDns, privileged, run_sluice, web::WebServer, Daemon, Sandbox, TestNet};
use sluice::audit::{
    chain::{line_hash, ChainHead},
    AuditKey, Decision, Kind, Verdict,
};

const PROFILE: &str = r#"
name = "audited"
[[rule]]
name = "no-admin"
action = "deny"
hosts = ["web.test"]
paths = ["/admin/**"]
reason = "the admin area is off limits"
[[rule]]
name = "web"
action = "allow"
hosts = ["web.test"]
ports = [80]
"#;

struct World {
    net: TestNet,
    web: WebServer,
    _dns: TestDns,
    daemon: Daemon,
    sandbox: Sandbox,
}

impl World {
    fn new() -> Self {
        let net = TestNet::new();
        let web = WebServer::start(&net, SocketAddr::new(net.v4(2), 80), None);
        let zone = HashMap::from([("web.test".to_owned(), vec![net.v4(2)])]);
        let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
        let daemon = Daemon::start_configured(
            Some(dns.addr),
            None,
            None,
            ["--audit-checkpoint-records", "7", "--audit-checkpoint-secs", "1"].map(String::from).to_vec(),
        );
        let sandbox = daemon.sandbox("audited", PROFILE).with_nameserver(&daemon.dir, net.v4(99));
        Self { net, web, _dns: dns, daemon, sandbox }
    }

    /// Some allowed and some denied requests; asserts what the test host got.
    fn traffic(&self, round: usize) {
        for i in 0..3 {
            let ok = self.curl(&format!("http://web.test/ok/{round}/{i}"));
            assert!(ok.status.success(), "{ok:?}");
            let denied = self.curl(&format!("http://web.test/admin/{round}/{i}"));
            assert!(String::from_utf8_lossy(&denied.stdout).contains("no-admin"), "{denied:?}");
        }
        let seen: Vec<String> = self.web.seen().into_iter().map(|r| r.path).collect();
        for i in 0..3 {
            assert!(seen.contains(&format!("/ok/{round}/{i}")), "{seen:?}");
        }
        assert!(!seen.iter().any(|p| p.starts_with("/admin")), "a denied request reached the host: {seen:?}");
        let marker = format!("/admin/{round}/2");
        self.daemon.wait_decisions("the last denial", |d| d.iter().any(|d| d.path.as_deref() == Some(&*marker)));
    }

    fn curl(&self, url: &str) -> Output {
        self.sandbox.command("curl").args(["-sS", "--max-time", "20", url]).output().unwrap()
    }

    /// The daemon's public key, from `sluice audit pubkey`, in a file.
    fn pubkey(&self) -> PathBuf {
        let output = self.daemon.cli(&["audit", "pubkey"]);
        assert!(output.status.success(), "{output:?}");
        let path = self.daemon.dir.join("audit.pub");
        std::fs::write(&path, &output.stdout).unwrap();
        path
    }
}

fn verify(key: &Path, files: &[PathBuf]) -> (bool, String) {
    let mut args = vec!["audit".to_owned(), "verify".to_owned(), "--key".to_owned(), key.display().to_string()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let output = run_sluice(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.code().is_some_and(|c| c <= 1), "verify crashed: {text}");
    (output.status.success(), text)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

fn seq(line: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"].as_u64().unwrap()
}

/// The first problem `verify` names.
fn first_problem(text: &str) -> &str {
    text.lines().find_map(|l| l.strip_prefix("FIRST PROBLEM: ")).unwrap_or_else(|| panic!("no problem named:\n{text}"))
}

fn tampered(dir: &Path, name: &str, lines: &[String], cut_tail: Option<usize>) -> PathBuf {
    let path = dir.join(name);
    let mut text = lines.join("\n") + "\n";
    if let Some(cut) = cut_tail {
        text.truncate(text.len() - cut);
    }
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_trail_written_under_traffic_verifies_and_every_tampering_is_located() {
    if !privileged() {
        return;
    }
    let mut world = World::new();
    world.traffic(0);
    let key = world.pubkey();
    world.daemon.stop();
    let log = world.daemon.decision_log();
    let (ok, text) = verify(&key, std::slice::from_ref(&log));
    assert!(ok, "{text}");
    assert!(text.contains("ends: with the final checkpoint of a clean stop"), "{text}");
    assert!(text.contains("starts: at the beginning of the chain"), "{text}");
    let original = lines(&log);
    let records: Vec<Decision> = original.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    for rule in ["chain-started", "daemon-start", "registered", "audit-checkpoint"] {
        assert!(records.iter().any(|d| d.rule == rule), "no {rule} record:\n{}", original.join("\n"));
    }
    assert!(records.iter().filter(|d| d.rule == "audit-checkpoint").count() >= 2, "{}", original.join("\n"));
    assert_eq!(records.iter().filter(|d| d.kind == Kind::Request && d.verdict == Verdict::Deny).count(), 3);
    assert!(text.contains(&format!("lines: {} in 1 files", original.len())), "{text}");

    let dir = world.daemon.dir.clone();
    let name = |path: &Path| path.display().to_string();
    // A denied request in the middle of the trail, covered by a later checkpoint.
    let at = original.iter().position(|l| l.contains("/admin/0/1")).unwrap();
    let s = seq(&original[at]);

    let mut edited = original.clone();
    edited[at] = edited[at].replace("/admin/0/1", "/admin/0/7");
    let file = tampered(&dir, "edited.jsonl", &edited, None);
    let (ok, text) = verify(&key, std::slice::from_ref(&file));
    assert!(!ok);
    assert!(first_problem(&text).starts_with(&format!("{}:{}: seq {s}: edited", name(&file), at + 1)), "{text}");

    let mut dropped = original.clone();
    dropped.remove(at);
    let file = tampered(&dir, "dropped.jsonl", &dropped, None);
    let (ok, text) = verify(&key, std::slice::from_ref(&file));
    assert!(!ok);
    assert!(first_problem(&text).starts_with(&format!("{}:{}: seq {s}: dropped", name(&file), at + 1)), "{text}");

    let mut swapped = original.clone();
    swapped.swap(at, at + 1);
    let file = tampered(&dir, "swapped.jsonl", &swapped, None);
    let (ok, text) = verify(&key, std::slice::from_ref(&file));
    assert!(!ok);
    let problem = format!("{}:{}: seq {}: reordered", name(&file), at + 1, s + 1);
    assert!(first_problem(&text).starts_with(&problem), "{text}");

    // A forged record, chained properly to the one before it.
    let mut forged_line = Vec::new();
    let mut head = ChainHead { seq: s - 1, hash: line_hash(original[at - 1].as_bytes()), ..ChainHead::default() };
    let mut forged = Decision::new(Kind::Request, Verdict::Allow, "web", "allowed");
    forged.path = Some("/admin/0/1".into());
    head.seal(&serde_json::to_vec(&forged).unwrap(), &mut forged_line);
    let mut inserted = original.clone();
    inserted.insert(at, String::from_utf8(forged_line).unwrap().trim_end().to_owned());
    let file = tampered(&dir, "inserted.jsonl", &inserted, None);
    let (ok, text) = verify(&key, std::slice::from_ref(&file));
    assert!(!ok);
    assert!(first_problem(&text).starts_with(&format!("{}:{}: seq {s}: inserted", name(&file), at + 1)), "{text}");

    let file = tampered(&dir, "truncated.jsonl", &original, Some(original.last().unwrap().len() / 2));
    let (ok, text) = verify(&key, std::slice::from_ref(&file));
    assert!(!ok);
    assert!(first_problem(&text).starts_with(&format!("{}:{}: truncated", name(&file), original.len())), "{text}");
    assert!(text.contains("ends: with a truncated partial line"), "{text}");

    // The final checkpoint replaced by one signed with another key, once
    // under that key's own id and once under the daemon's.
    let last = original.len() - 1;
    let other = AuditKey::generate().unwrap();
    let mut head = ChainHead {
        seq: seq(&original[last]) - 1,
        hash: line_hash(original[last - 1].as_bytes()),
        ..ChainHead::default()
    };
    let mut checkpoint = Vec::new();
    let record = Decision::new(Kind::Lifecycle, Verdict::Info, "audit-checkpoint", "forged");
    head.seal_checkpoint(&other, &record.time, true, &serde_json::to_vec(&record).unwrap(), &mut checkpoint);
    let forged = String::from_utf8(checkpoint).unwrap().trim_end().to_owned();
    let mut resigned = original.clone();
    resigned[last].clone_from(&forged);
    let file = tampered(&dir, "other-key.jsonl", &resigned, None);
    let (ok, text) = verify(&key, std::slice::from_ref(&file));
    assert!(!ok);
    let problem = format!("{}:{}: seq {}: unknown key", name(&file), last + 1, seq(&forged));
    assert!(first_problem(&text).starts_with(&problem), "{text}");
    let daemon_key = std::fs::read_to_string(&key).unwrap();
    let daemon_id = daemon_key.split_whitespace().nth(5).unwrap().to_owned();
    resigned[last] = forged.replace(other.id(), &daemon_id);
    let file = tampered(&dir, "bad-signature.jsonl", &resigned, None);
    let (ok, text) = verify(&key, std::slice::from_ref(&file));
    assert!(!ok);
    let problem = format!("{}:{}: seq {}: bad signature", name(&file), last + 1, seq(&forged));
    assert!(first_problem(&text).starts_with(&problem), "{text}");
    drop(world.net);
}

#[test]
fn a_restart_after_a_crash_continues_the_chain_and_the_whole_trail_verifies() {
    if !privileged() {
        return;
    }
    let mut world = World::new();
    world.traffic(0);
    let key = world.pubkey();
    let public_before = std::fs::read_to_string(&key).unwrap();
    let log = world.daemon.decision_log();
    // A crash mid-write: killed, and a partial line at the end of the file.
    world.daemon.kill();
    let before = lines(&log);
    let last_seq = seq(before.last().unwrap());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"seq\":99999,\"prev\":\"ab"))
        .unwrap();
    world.daemon.restart();
    world.sandbox = world.daemon.sandbox("audited-2", PROFILE).with_nameserver(&world.daemon.dir, world.net.v4(99));
    world.traffic(1);
    assert_eq!(std::fs::read_to_string(world.pubkey()).unwrap(), public_before, "the key survives the restart");
    world.daemon.stop();

    let after = lines(&log);
    let resumed = &after[before.len() + 1];
    let record: Decision = serde_json::from_str(resumed).unwrap();
    assert_eq!(record.rule, "chain-resumed", "{resumed}");
    assert!(record.reason.contains(&format!("goes on from seq {last_seq}")), "{}", record.reason);
    assert!(record.reason.contains("partial line"), "{}", record.reason);
    assert_eq!(seq(resumed), last_seq + 1);
    let (ok, text) = verify(&key, std::slice::from_ref(&log));
    assert!(ok, "{text}");
    assert!(text.contains(&format!("{}:{}: a partial line of 23 bytes", log.display(), before.len() + 1)), "{text}");
    assert!(text.contains("ends: with the final checkpoint of a clean stop"), "{text}");
    let starts = after.iter().filter(|l| l.contains("\"rule\":\"daemon-start\"")).count();
    assert_eq!(starts, 2, "{}", after.join("\n"));
}

#[test]
fn rotation_keeps_the_chain_across_files_and_a_missing_file_is_named() {
    // The writer thread and the verifier for real; rotation at a small
    // size limit (the daemon's is 64 MiB).
    let dir = std::env::temp_dir().join(format!("sluice-audit-rotation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("decisions.jsonl");
    let key = std::sync::Arc::new(AuditKey::generate().unwrap());
    let public = dir.join("audit.pub");
    std::fs::write(&public, key.public().hex() + "\n").unwrap();
    let limits = sluice::audit::LogLimits { max_bytes: 4000, keep: 20, first: u32::MAX, ..Default::default() };
    let audit = sluice::audit::Audit { key: Some(key), checkpoint_records: 5, ..Default::default() };
    let log = sluice::audit::DecisionLog::open_audited(Some(&path), limits, audit).unwrap();
    for port in 1..=60u16 {
        let mut d = Decision::new(Kind::Connect, Verdict::Deny, "default-deny", "no rule allows it");
        d.destination = Some(SocketAddr::from(([10, 231, 0, 9], port)));
        log.record(d);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    log.close();
    drop(log);
    let mut files = sluice::audit::log_files(&path);
    assert!(files.len() >= 4, "not rotated: {files:?}");
    // Newest first, as a shell glob lists them: the verifier orders them.
    files.reverse();
    let (ok, text) = verify(&public, &files);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("in {} files", files.len())), "{text}");
    assert!(text.contains("ends: with the final checkpoint of a clean stop"), "{text}");
    // Each rotated file's first line chains to the last line of the one before.
    let oldest_first = sluice::audit::log_files(&path);
    for pair in oldest_first.windows(2) {
        let (older, newer) = (lines(&pair[0]), lines(&pair[1]));
        let first: serde_json::Value = serde_json::from_str(&newer[0]).unwrap();
        let hash = line_hash(older.last().unwrap().as_bytes());
        assert_eq!(first["prev"].as_str().unwrap(), hex::encode(hash), "{}", pair[1].display());
    }
    // A whole file taken out of the middle is a gap.
    let missing = oldest_first[1].clone();
    let rest: Vec<PathBuf> = oldest_first.iter().filter(|f| **f != missing).cloned().collect();
    let (ok, text) = verify(&public, &rest);
    assert!(!ok);
    let seq_missing = seq(&lines(&missing)[0]);
    let problem = format!("{}:1: seq {seq_missing}: dropped", oldest_first[2].display());
    assert!(first_problem(&text).starts_with(&problem), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}
