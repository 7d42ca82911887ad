//! The decision log: every verdict sluice reaches (connect, DNS, kernel
//! refusal) as one JSON line, appended to a file and broadcast to live
//! followers (`sluice run`, the control API's event stream).
//!
//! The file is an audit trail: its lines are hash-chained and signed at
//! checkpoints (`chain`, `key`), and `verify` checks a trail offline.
//!
//! Records carry destinations, names, rules and reasons; never payloads.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::sandbox::ContainerInfo;

pub mod chain;
pub mod escape;
pub mod key;
pub mod verify;
mod writer;

pub use escape::terminal_safe;
pub use key::{AuditKey, KeyError, PublicKey};
pub use writer::{log_files, LogCounters, LogLimits};

/// How the trail is signed: the key (none: chained, never signed) and how
/// often a checkpoint is written.
#[derive(Debug, Clone)]
pub struct Audit {
    pub key: Option<Arc<AuditKey>>,
    /// A checkpoint after this many lines...
    pub checkpoint_records: u64,
    /// ... or this long after the last one, whichever comes first (only
    /// when lines were written since).
    pub checkpoint_interval: std::time::Duration,
}

impl Default for Audit {
    fn default() -> Self {
        Self { key: None, checkpoint_records: 1000, checkpoint_interval: std::time::Duration::from_secs(10) }
    }
}

/// The daemon's audit settings: where its signing key lives and the
/// checkpoint schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The signing key file, made on first start.
    pub key_file: PathBuf,
    pub checkpoint_records: u64,
    pub checkpoint_interval: std::time::Duration,
}

impl AuditConfig {
    /// `/var/lib/<instance>/audit.key`: persistent state, so the key
    /// outlives restarts and reboots (the CA keys in `/run` do not).
    pub fn for_instance(instance: &str) -> Self {
        let defaults = Audit::default();
        Self {
            key_file: default_key_file(instance),
            checkpoint_records: defaults.checkpoint_records,
            checkpoint_interval: defaults.checkpoint_interval,
        }
    }

    /// Reads (or makes) the key.
    pub fn open(&self) -> Result<Audit, KeyError> {
        let (key, made) = AuditKey::load_or_create(&self.key_file)?;
        if made {
            tracing::info!(key_id = key.id(), file = %self.key_file.display(), "made a new audit signing key");
        }
        Ok(Audit {
            key: Some(Arc::new(key)),
            checkpoint_records: self.checkpoint_records.max(1),
            checkpoint_interval: self.checkpoint_interval,
        })
    }
}

pub fn default_key_file(instance: &str) -> PathBuf {
    Path::new("/var/lib").join(instance).join("audit.key")
}

/// What was decided about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A TCP connection reaching the proxy.
    Connect,
    /// One HTTP request on an inspected connection.
    Request,
    /// A DNS query reaching a sandbox's resolver.
    Dns,
    /// Something the kernel programs refused on their own.
    Kernel,
    /// Sandbox registered or removed.
    Lifecycle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Held for an operator (an `ask` rule); a later record of the same
    /// approval says how it ended.
    Ask,
    /// Lifecycle records.
    Info,
}

/// Where the host name of a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostSource {
    /// TLS `ClientHello` server name.
    Sni,
    /// HTTP/1 Host header.
    Http,
    /// A name the sandbox resolved through sluice to this address.
    Dns,
    /// No name known: the address itself.
    Ip,
}

/// One line of the decision log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    /// RFC 3339 UTC time.
    pub time: String,
    pub kind: Kind,
    /// Sandbox name; absent when the flow came from no registered sandbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// The container the sandbox stands for (runtime, id, name, image,
    /// labels), filled in by [`DecisionLog::record`] from the sandbox name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_source: Option<HostSource>,
    /// Protocol seen on the connection: tls, http, https, opaque, udp ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// HTTP method and path (no query string) of a request decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Allowed only because the profile is a dry run: enforcing, this would
    /// have been a denial by `rule`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub would_deny: bool,
    /// Names (never values) of the secrets injected into the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<String>,
    /// The capability bundle whose rule decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// The approval a held request or connection waited on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<u64>,
    /// A summary record: this many more refusals like it were counted, not
    /// written one by one (or, for `decision-log-dropped`, were lost).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeated: u64,
    pub verdict: Verdict,
    /// The rule that decided, or a built-in reason name.
    pub rule: String,
    pub reason: String,
}

impl Decision {
    pub fn new(kind: Kind, verdict: Verdict, rule: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            kind,
            sandbox: None,
            container: None,
            pid: None,
            destination: None,
            host: None,
            host_source: None,
            protocol: None,
            method: None,
            path: None,
            credentials: Vec::new(),
            bundle: None,
            approval: None,
            repeated: 0,
            would_deny: false,
            verdict,
            rule: rule.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Decision {
    /// The one-line form `sluice run` prints. Names, paths and reasons come
    /// from the sandbox, so the line is made terminal-safe as a whole.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = String::with_capacity(128);
        fmt::Write::write_fmt(&mut line, format_args!("{}", Line(self)))?;
        f.write_str(&escape::terminal_safe(&line))
    }
}

/// A decision's line before escaping.
struct Line<'a>(&'a Decision);

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let this = self.0;
        let verdict = match this.verdict {
            Verdict::Allow if this.would_deny => "DRYRUN",
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY ",
            Verdict::Ask => "ASK  ",
            Verdict::Info => "INFO ",
        };
        let kind = match this.kind {
            Kind::Connect => "connect",
            Kind::Request => "request",
            Kind::Dns => "dns    ",
            Kind::Kernel => "kernel ",
            Kind::Lifecycle => "sandbox",
        };
        write!(f, "{verdict} {kind}")?;
        if let Some(pid) = this.pid {
            write!(f, " pid={pid}")?;
        }
        if let (Some(method), Some(path)) = (&this.method, &this.path) {
            write!(f, " {method} {path}")?;
            if let Some(host) = &this.host {
                write!(f, " on {host}")?;
            }
        } else {
            match (&this.host, this.destination) {
                (Some(host), Some(dst)) if host != &dst.ip().to_string() => write!(f, " {host} ({dst})")?,
                (Some(host), None) => write!(f, " {host}")?,
                (_, Some(dst)) => write!(f, " {dst}")?,
                (None, None) => {}
            }
        }
        if let Some(protocol) = &this.protocol {
            write!(f, " [{protocol}]")?;
        }
        if !this.credentials.is_empty() {
            write!(f, " [injected {}]", this.credentials.join(", "))?;
        }
        if this.would_deny {
            write!(f, " [dry run: would deny]")?;
        }
        if this.repeated > 0 {
            write!(f, " [x{} more]", this.repeated)?;
        }
        write!(f, " rule={}: {}", this.rule, this.reason)
    }
}

/// The container a sandbox (by name) stands for, as it may appear in a
/// record.
pub type ContainerOf = dyn Fn(&str) -> Option<ContainerInfo> + Send + Sync;

/// Appends decisions to a file off the hot path and broadcasts them.
/// Repeated refusals are aggregated and the file rotates ([`LogLimits`]);
/// a record that cannot be written is counted ([`LogCounters`]), never
/// waited for.
pub struct DecisionLog {
    file_tx: Option<std::sync::mpsc::SyncSender<writer::Message>>,
    live: broadcast::Sender<Arc<Decision>>,
    path: Option<PathBuf>,
    containers: OnceLock<Box<ContainerOf>>,
    aggregator: Arc<writer::Aggregator>,
    counters: Arc<LogCounters>,
    /// The writer thread, joined on drop so that what was queued is written
    /// and the file is closed.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DecisionLog {
    fn drop(&mut self) {
        self.file_tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference.
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl DecisionLog {
    /// A log that writes to `path` (created 0600, appended) if given, with
    /// the default [`LogLimits`].
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        Self::open_with(path, LogLimits::default())
    }

    /// A log with its own limits, chained but not signed.
    pub fn open_with(path: Option<&Path>, limits: LogLimits) -> std::io::Result<Self> {
        Self::open_audited(path, limits, Audit::default())
    }

    /// A log with its own limits whose trail `audit` signs. The chain goes
    /// on from the last line of the files there (a restart), and the first
    /// line written says whether it started or resumed.
    pub fn open_audited(path: Option<&Path>, limits: LogLimits, audit: Audit) -> std::io::Result<Self> {
        let (live, _) = broadcast::channel(4096);
        let aggregator = Arc::new(writer::Aggregator::new(&limits));
        let counters = Arc::new(LogCounters::default());
        let Some(path) = path else {
            return Ok(Self {
                file_tx: None,
                live,
                path: None,
                containers: OnceLock::new(),
                aggregator,
                counters,
                writer: None,
            });
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<writer::Message>(limits.queue.max(1));
        let resumed = chain::resume(path, &log_files(path))?;
        let first = chain_start_record(&resumed, &audit);
        let file = writer::LogFile::open(path, limits)?;
        let signer = writer::Signer { head: resumed.head, audit, last_checkpoint: std::time::Instant::now() };
        let (thread_aggregator, thread_counters, thread_live) = (aggregator.clone(), counters.clone(), live.clone());
        // A thread of its own: file writes must not stall the proxy's workers.
        let writer = std::thread::Builder::new().name("sluice-decision-log".into()).spawn(move || {
            writer::run(file, signer, first, rx, thread_aggregator, thread_counters, thread_live);
        })?;
        Ok(Self {
            file_tx: Some(tx),
            live,
            path: Some(path.to_owned()),
            containers: OnceLock::new(),
            aggregator,
            counters,
            writer: Some(writer),
        })
    }

    /// Records lost and refusals aggregated so far.
    pub fn counters(&self) -> &LogCounters {
        &self.counters
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Where records of container sandboxes get their container identity:
    /// set once, by the daemon that owns the registry.
    pub fn identify_containers_with(&self, containers: Box<ContainerOf>) {
        let _ = self.containers.set(containers);
    }

    pub fn record(&self, mut decision: Decision) {
        if decision.container.is_none() {
            if let (Some(sandbox), Some(containers)) = (&decision.sandbox, self.containers.get()) {
                decision.container = containers(sandbox);
            }
        }
        if self.file_tx.is_none() {
            // No writer thread to end the intervals: end them here.
            for summary in self.aggregator.roll(std::time::Instant::now()) {
                let _ = self.live.send(Arc::new(summary));
            }
        }
        if !self.aggregator.admit(&decision) {
            // Counted; the summary at the end of the interval stands for it.
            self.counters.aggregated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        if decision.verdict == Verdict::Deny {
            tracing::info!(target: "sluice::decision", "{decision}");
        } else {
            tracing::debug!(target: "sluice::decision", "{decision}");
        }
        let decision = Arc::new(decision);
        if let Some(tx) = &self.file_tx {
            // Never wait for the disk: a full queue loses the record, counted.
            if tx.try_send(writer::Message::Record(decision.clone())).is_err() {
                self.counters.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _ = self.live.send(decision);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Decision>> {
        self.live.subscribe()
    }

    /// Writes what is queued and the final checkpoint, and stops writing
    /// (waits up to 5 s). Records after this are counted as dropped.
    pub fn close(&self) {
        let Some(tx) = &self.file_tx else { return };
        let (done, closed) = std::sync::mpsc::sync_channel(1);
        if tx.send(writer::Message::Close(done)).is_ok() {
            let _ = closed.recv_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// The first line a writer puts in the file: where its chain starts and
/// who signs it.
fn chain_start_record(resumed: &chain::Resumed, audit: &Audit) -> Decision {
    let signer = match &audit.key {
        Some(key) => format!(
            "checkpoints every {} lines or {} s are signed by key {} (public key {})",
            audit.checkpoint_records,
            audit.checkpoint_interval.as_secs_f64(),
            key.id(),
            key.public().hex()
        ),
        None => "no signing key: the chain is not signed".to_owned(),
    };
    let torn = if resumed.head.torn > 0 {
        format!("; the last {} bytes of the file are a partial line left by a crash", resumed.head.torn)
    } else {
        String::new()
    };
    let (rule, reason) = match (&resumed.from, resumed.unchained) {
        (Some(file), false) => (
            chain::RESUMED_RULE,
            format!(
                "the chain goes on from seq {} in {} (the writer restarted){torn}; {signer}",
                resumed.head.seq,
                file.display()
            ),
        ),
        (Some(file), true) => (
            chain::STARTED_RULE,
            format!("a new chain: the last line of {} carries none{torn}; {signer}", file.display()),
        ),
        (None, _) => (chain::STARTED_RULE, format!("a new chain{torn}; {signer}")),
    };
    Decision::new(Kind::Lifecycle, Verdict::Info, rule, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_rule_and_reason() {
        let mut d = Decision::new(Kind::Connect, Verdict::Deny, "deny-internal-networks", "internal networks");
        d.pid = Some(42);
        d.destination = Some("10.0.0.1:80".parse().unwrap());
        d.host = Some("intranet.test".into());
        d.protocol = Some("http".into());
        assert_eq!(
            d.to_string(),
            "DENY  connect pid=42 intranet.test (10.0.0.1:80) [http] rule=deny-internal-networks: internal networks"
        );
    }

    #[test]
    fn display_escapes_what_the_sandbox_chose() {
        let mut d = Decision::new(Kind::Request, Verdict::Deny, "default-deny", "no rule allows GET /\x1b on evil");
        d.method = Some("GET".into());
        d.path = Some("/a\x1b]0;pwned\x07".into());
        d.host = Some("evil\x1b[2J.test".into());
        let line = d.to_string();
        assert!(!line.bytes().any(|b| b.is_ascii_control()), "{line:?}");
        assert!(line.contains("GET /a\\x1b]0;pwned\\x07 on evil\\x1b[2J.test"), "{line}");
    }

    #[tokio::test]
    async fn records_of_container_sandboxes_carry_the_container() {
        let log = DecisionLog::open(None).unwrap();
        log.identify_containers_with(Box::new(|sandbox| {
            (sandbox == "agent").then(|| ContainerInfo {
                runtime: "docker".into(),
                id: "3f2a".into(),
                name: "agent".into(),
                image: "img:1".into(),
                labels: [("team".to_owned(), "research".to_owned())].into(),
                namespace: String::new(),
            })
        }));
        let mut live = log.subscribe();
        let mut d = Decision::new(Kind::Connect, Verdict::Deny, "r", "why");
        d.sandbox = Some("agent".into());
        log.record(d.clone());
        d.sandbox = Some("host-process".into());
        log.record(d);
        let first = live.recv().await.unwrap();
        let json: serde_json::Value = serde_json::to_value(&*first).unwrap();
        assert_eq!(json["container"]["labels"]["team"], "research");
        assert_eq!(json["container"]["image"], "img:1");
        assert!(live.recv().await.unwrap().container.is_none());
    }

    #[tokio::test]
    async fn writes_json_lines_and_broadcasts() {
        let dir = std::env::temp_dir().join(format!("sluice-audit-test-{}", std::process::id()));
        let path = dir.join("decisions.jsonl");
        let log = DecisionLog::open(Some(&path)).unwrap();
        let mut live = log.subscribe();
        let mut d = Decision::new(Kind::Dns, Verdict::Allow, "web", "allowed");
        d.sandbox = Some("a".into());
        log.record(d);
        assert_eq!(live.recv().await.unwrap().rule, "web");
        drop(log);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // The first line is the chain's start; the record follows.
            if let Some(line) = text.lines().nth(1) {
                let parsed: Decision = serde_json::from_str(line).unwrap();
                assert_eq!(parsed.sandbox.as_deref(), Some("a"));
                assert_eq!(parsed.kind, Kind::Dns);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "decision never written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
