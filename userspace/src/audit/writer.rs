//! Keeping the decision log from filling the disk or slowing the daemon.
//!
//! This module owns three things between [`super::DecisionLog::record`] and
//! the file:
//!
//! - **aggregation** ([`Aggregator`]): a sandbox can make refusals as fast
//!   as it can open sockets. Per interval, the first `first` identical
//!   refusals (same sandbox, kind, rule, host and destination) are written;
//!   the rest are counted, and one summary record per key says how many
//!   there were when the interval ends.
//! - **rotation** ([`LogFile`]): the file is rotated when it passes a size
//!   or an age; `decisions.jsonl.1` is the newest old file, and no more
//!   than `keep` old files are kept.
//! - **write errors**: the writer runs on its own thread behind a bounded
//!   queue, so a slow or full disk never blocks the proxy. A record that
//!   cannot be queued or written is counted as dropped; when writing works
//!   again, a `decision-log-dropped` record says how many were lost.

use std::{
    collections::HashMap,
    fs::File,
    io::Write,
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use super::{
    chain::{ChainHead, CHECKPOINT_RULE},
    Audit, Decision, Kind, Verdict,
};

/// How the decision log bounds itself. Defaults: rotate at 64 MiB or daily,
/// keep 5 old files (at most about 384 MiB in all), write the first 10
/// identical refusals of a minute and count the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLimits {
    /// Rotate when the file would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotate when the file has been written to for this long.
    pub max_age: Duration,
    /// Old files kept (`FILE.1` .. `FILE.keep`); 0 keeps none.
    pub keep: usize,
    /// Identical refusals written per interval before they are counted.
    pub first: u32,
    /// The aggregation interval.
    pub interval: Duration,
    /// Records queued for the writer at most; more are dropped (counted).
    pub queue: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_age: Duration::from_hours(24),
            keep: 5,
            first: 10,
            interval: Duration::from_mins(1),
            queue: 16 * 1024,
        }
    }
}

/// Counters the daemon can report.
#[derive(Debug, Default)]
pub struct LogCounters {
    /// Records lost: the queue was full or the file could not be written.
    pub dropped: AtomicU64,
    /// Refusals counted into a summary instead of written one by one.
    pub aggregated: AtomicU64,
}

/// What makes two refusals "the same" for aggregation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    sandbox: Option<String>,
    kind: Kind,
    rule: String,
    host: Option<String>,
    destination: Option<SocketAddr>,
}

#[derive(Debug)]
struct Tally {
    count: u64,
    /// The first refusal of the interval, the summary's model.
    sample: Decision,
}

/// Counts refusals per key and interval.
#[derive(Debug)]
pub(super) struct Aggregator {
    first: u64,
    interval: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    tallies: HashMap<Key, Tally>,
}

/// Keys tallied per interval at most; beyond this, refusals of new keys
/// are counted under one overflow key, so memory stays bounded too.
const MAX_KEYS: usize = 4096;

impl Aggregator {
    pub(super) fn new(limits: &LogLimits) -> Self {
        Self {
            first: u64::from(limits.first),
            interval: limits.interval,
            state: Mutex::new(Window { started: Instant::now(), tallies: HashMap::new() }),
        }
    }

    /// Whether `decision` is written (true) or only counted (false).
    pub(super) fn admit(&self, decision: &Decision) -> bool {
        if decision.verdict != Verdict::Deny {
            return true;
        }
        let mut window = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut key = Key {
            sandbox: decision.sandbox.clone(),
            kind: decision.kind,
            rule: decision.rule.clone(),
            host: decision.host.clone(),
            destination: decision.destination,
        };
        if window.tallies.len() >= MAX_KEYS && !window.tallies.contains_key(&key) {
            key = Key {
                sandbox: decision.sandbox.clone(),
                kind: decision.kind,
                rule: String::new(),
                host: None,
                destination: None,
            };
        }
        let tally = window.tallies.entry(key).or_insert_with(|| Tally { count: 0, sample: decision.clone() });
        tally.count += 1;
        tally.count <= self.first
    }

    /// When the interval has passed: one summary per key that had more
    /// refusals than were written, and a fresh interval.
    pub(super) fn roll(&self, now: Instant) -> Vec<Decision> {
        let mut window = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(window.started) < self.interval {
            return Vec::new();
        }
        let elapsed = now.saturating_duration_since(window.started);
        window.started = now;
        let tallies = std::mem::take(&mut window.tallies);
        drop(window);
        tallies
            .into_values()
            .filter(|tally| tally.count > self.first)
            .map(|tally| summary(tally.sample, tally.count - self.first, elapsed))
            .collect()
    }
}

fn summary(sample: Decision, counted: u64, over: Duration) -> Decision {
    let reason = format!(
        "{counted} more refusals like this in the last {} s were counted, not written one by one; the first: {}",
        over.as_secs().max(1),
        sample.reason
    );
    let mut record = Decision::new(sample.kind, Verdict::Deny, sample.rule, reason);
    record.sandbox = sample.sandbox;
    record.container = sample.container;
    record.host = sample.host;
    record.destination = sample.destination;
    record.protocol = sample.protocol;
    record.repeated = counted;
    record
}

/// A failed append: how many bytes of the batch got in, and why not more.
pub(super) struct Torn {
    written: usize,
    error: std::io::Error,
}

/// The log file, rotated by size and age.
pub(super) struct LogFile {
    path: PathBuf,
    limits: LogLimits,
    file: Option<File>,
    size: u64,
    opened: Instant,
    /// The last write failed part way: start the next one on a new line.
    torn: bool,
}

impl LogFile {
    pub(super) fn open(path: &Path, limits: LogLimits) -> std::io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        // A crash mid-line left a partial line: the next starts on its own.
        let torn = size > 0 && last_byte(path)? != b'\n';
        Ok(Self { path: path.to_owned(), limits, file: Some(file), size, opened: Instant::now(), torn })
    }

    /// Appends `batch` (whole lines), rotating first when it would pass a
    /// limit; with `sync`, waits until the data is on disk (after a
    /// checkpoint). On an error nothing is retried: the caller counts the
    /// lines that did not get in.
    pub(super) fn append(&mut self, batch: &[u8], sync: bool) -> Result<(), Torn> {
        let too_big = self.size > 0 && self.size + batch.len() as u64 > self.limits.max_bytes;
        if too_big || self.opened.elapsed() >= self.limits.max_age {
            self.rotate()?;
        }
        if self.file.is_none() {
            self.file = Some(open_append(&self.path).map_err(|error| Torn { written: 0, error })?);
            self.opened = Instant::now();
            self.size = 0;
        }
        let file = self.file.as_mut().expect("opened above");
        if self.torn {
            file.write_all(b"\n").map_err(|error| Torn { written: 0, error })?;
            self.size += 1;
            self.torn = false;
        }
        let mut written = 0;
        while written < batch.len() {
            match file.write(&batch[written..]) {
                Ok(0) => return Err(Torn { written, error: std::io::ErrorKind::WriteZero.into() }),
                Ok(n) => {
                    written += n;
                    self.size += n as u64;
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // Part of the batch is in the file, maybe ending mid-line.
                    self.torn = written > 0 && batch[written - 1] != b'\n';
                    return Err(Torn { written, error });
                }
            }
        }
        if sync {
            // Written already; a failed sync loses nothing that can be retried.
            let _ = file.sync_data();
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), Torn> {
        self.rotate_files().map_err(|error| Torn { written: 0, error })
    }

    fn rotate_files(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.limits.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(&self.path, self.limits.keep));
            for n in (1..self.limits.keep).rev() {
                let from = numbered(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, numbered(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(&self.path, 1))?;
        }
        self.file = Some(open_append(&self.path)?);
        self.size = 0;
        self.opened = Instant::now();
        self.torn = false;
        Ok(())
    }
}

fn last_byte(path: &Path) -> std::io::Result<u8> {
    use std::io::{Read, Seek};
    let mut file = File::open(path)?;
    file.seek(std::io::SeekFrom::End(-1))?;
    let mut byte = [0u8];
    file.read_exact(&mut byte)?;
    Ok(byte[0])
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

/// `FILE.n`.
fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The log's files, oldest first: `FILE.N` .. `FILE.1`, then `FILE`; only
/// those that exist. This is the order `sluice log` reads them in.
pub fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(usize, PathBuf)> = Vec::new();
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let file_name = entry.file_name();
            let Some(n) = file_name
                .to_str()
                .and_then(|f| f.strip_prefix(name))
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            rotated.push((n, entry.path()));
        }
    }
    rotated.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        files.push(path.to_owned());
    }
    files
}

/// What the writer thread receives.
pub(super) enum Message {
    Record(Arc<Decision>),
    /// Write what is queued and a final checkpoint, then say so and stop.
    Close(std::sync::mpsc::SyncSender<()>),
}

/// The chain the writer extends, and when it signs a checkpoint.
pub(super) struct Signer {
    pub(super) head: ChainHead,
    pub(super) audit: Audit,
    pub(super) last_checkpoint: Instant,
}

impl Signer {
    fn due(&self) -> bool {
        self.audit.key.is_some()
            && self.head.since_checkpoint > 0
            && (self.head.since_checkpoint >= self.audit.checkpoint_records
                || self.last_checkpoint.elapsed() >= self.audit.checkpoint_interval)
    }
}

/// One line of a batch: a record, or a checkpoint the writer adds.
enum Entry {
    Record(Arc<Decision>),
    Checkpoint { is_final: bool },
}

/// The writer thread: drains the queue in batches, rolls the aggregation
/// window, chains and signs, writes, and accounts for what could not be
/// written.
#[allow(clippy::needless_pass_by_value)] // The thread owns them for its life.
pub(super) fn run(
    mut file: LogFile,
    mut signer: Signer,
    first: Decision,
    queue: std::sync::mpsc::Receiver<Message>,
    aggregator: Arc<Aggregator>,
    counters: Arc<LogCounters>,
    live: tokio::sync::broadcast::Sender<Arc<Decision>>,
) {
    let tick = aggregator.interval.min(signer.audit.checkpoint_interval).min(Duration::from_secs(1));
    // Dropped records already reported in the log.
    let mut reported = 0;
    let mut pending = vec![Arc::new(first)];
    loop {
        let mut batch = std::mem::take(&mut pending);
        let mut closing = None;
        match queue.recv_timeout(tick) {
            Ok(message) => {
                for message in std::iter::once(message).chain(queue.try_iter().take(4096)) {
                    match message {
                        Message::Record(decision) => batch.push(decision),
                        Message::Close(done) => {
                            closing = Some(Some(done));
                            break;
                        }
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => closing = Some(None),
        }
        if let Some(done) = closing {
            batch.extend(aggregator.roll(Instant::now() + aggregator.interval).into_iter().map(Arc::new));
            let mut entries = with_checkpoints(batch, &signer);
            if signer.audit.key.is_some() {
                entries.push(Entry::Checkpoint { is_final: true });
            }
            write_batch(&mut file, &mut signer, &entries, &counters);
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        }
        for summary in aggregator.roll(Instant::now()) {
            let summary = Arc::new(summary);
            let _ = live.send(summary.clone());
            batch.push(summary);
        }
        let dropped = counters.dropped.load(Ordering::Relaxed);
        if dropped > reported {
            // Say in the log itself what it is missing.
            let mut notice = Decision::new(
                Kind::Lifecycle,
                Verdict::Info,
                "decision-log-dropped",
                format!(
                    "{} decision records were lost (the queue was full or the file could not be written)",
                    dropped - reported
                ),
            );
            notice.repeated = dropped - reported;
            batch.insert(0, Arc::new(notice));
        }
        if batch.is_empty() && !signer.due() {
            continue;
        }
        let mut entries = with_checkpoints(batch, &signer);
        if signer.due() && !matches!(entries.last(), Some(Entry::Checkpoint { .. })) {
            entries.push(Entry::Checkpoint { is_final: false });
        }
        if write_batch(&mut file, &mut signer, &entries, &counters) {
            reported = dropped;
        }
    }
}

/// The batch as lines, with a checkpoint wherever `checkpoint_records`
/// lines have passed since the last one.
fn with_checkpoints(batch: Vec<Arc<Decision>>, signer: &Signer) -> Vec<Entry> {
    let mut entries = Vec::with_capacity(batch.len() + 1);
    for decision in batch {
        entries.push(Entry::Record(decision));
        // Lines since the last checkpoint: in this batch, or before it too.
        let since = if entries.iter().any(|e| matches!(e, Entry::Checkpoint { .. })) {
            count_records(&entries)
        } else {
            signer.head.since_checkpoint + count_records(&entries)
        };
        if signer.audit.key.is_some() && since >= signer.audit.checkpoint_records {
            entries.push(Entry::Checkpoint { is_final: false });
        }
    }
    entries
}

/// Records in `entries` after their last checkpoint.
fn count_records(entries: &[Entry]) -> u64 {
    entries.iter().rev().take_while(|e| matches!(e, Entry::Record(_))).count() as u64
}

/// The record a checkpoint line carries besides its signature.
fn checkpoint_record(head: &ChainHead, is_final: bool) -> Decision {
    let reason = if is_final {
        format!("final checkpoint: the log is closed cleanly; it signs every line up to seq {}", head.seq)
    } else {
        format!("signed checkpoint of every line up to seq {} ({} since the last one)", head.seq, head.since_checkpoint)
    };
    Decision::new(Kind::Lifecycle, Verdict::Info, CHECKPOINT_RULE, reason)
}

/// Chains and writes `entries`; on failure counts the records that did not
/// get in as dropped and rolls the chain back to the last line written.
/// Returns whether all of it was written.
fn write_batch(file: &mut LogFile, signer: &mut Signer, entries: &[Entry], counters: &LogCounters) -> bool {
    if entries.is_empty() {
        return true;
    }
    let before = signer.head.clone();
    let mut bytes = Vec::with_capacity(entries.len() * 320);
    // Per line: where it ends, the chain after it, and whether it is a
    // record that counts as lost if it does not get in.
    let mut lines: Vec<(usize, ChainHead, bool)> = Vec::with_capacity(entries.len());
    let mut body = Vec::with_capacity(320);
    let mut checkpoint = false;
    for entry in entries {
        body.clear();
        let counted = match entry {
            Entry::Record(decision) => {
                if serde_json::to_writer(&mut body, &**decision).is_err() {
                    continue;
                }
                signer.head.seal(&body, &mut bytes);
                decision.rule != "decision-log-dropped"
            }
            Entry::Checkpoint { is_final } => {
                let Some(key) = signer.audit.key.clone() else { continue };
                let record = checkpoint_record(&signer.head, *is_final);
                if serde_json::to_writer(&mut body, &record).is_err() {
                    continue;
                }
                signer.head.seal_checkpoint(&key, &record.time, *is_final, &body, &mut bytes);
                checkpoint = true;
                false
            }
        };
        lines.push((bytes.len(), signer.head.clone(), counted));
    }
    match file.append(&bytes, checkpoint) {
        Ok(()) => {
            if checkpoint {
                signer.last_checkpoint = Instant::now();
            }
            true
        }
        Err(Torn { written, error }) => {
            // The chain goes on from the last whole line in the file.
            let whole = lines.iter().rposition(|(end, _, _)| *end <= written);
            let (last_end, head) = whole.map_or((0, before), |i| (lines[i].0, lines[i].1.clone()));
            signer.head = head;
            if written > last_end {
                signer.head.torn = (written - last_end) as u64;
            }
            let lost = lines.iter().filter(|(end, _, counted)| *end > written && *counted).count() as u64;
            let total = counters.dropped.fetch_add(lost, Ordering::Relaxed) + lost;
            // Once per power of two, so a full disk does not flood the
            // daemon's own log either.
            if total.is_power_of_two() || lost >= total {
                tracing::warn!(%error, dropped = total, "the decision log cannot be written; records are counted and dropped");
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::DecisionLog;
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-log-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn refusal(port: u16) -> Decision {
        let mut d = Decision::new(Kind::Connect, Verdict::Deny, "default-deny", "no rule allows it");
        d.sandbox = Some("agent".into());
        d.destination = Some(SocketAddr::from(([10, 0, 0, 1], port)));
        d
    }

    fn lines(path: &Path) -> Vec<Decision> {
        log_files(path)
            .iter()
            .flat_map(|file| {
                std::fs::read_to_string(file).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>()
            })
            .filter_map(|line| serde_json::from_str::<Decision>(&line).ok())
            // The chain's own records are not what these tests count.
            .filter(|d| !["chain-started", "chain-resumed", "audit-checkpoint"].contains(&d.rule.as_str()))
            .collect()
    }

    /// Waits up to 5 s for `pred` on what the files hold.
    fn wait_for(path: &Path, what: &str, pred: impl Fn(&[Decision]) -> bool) -> Vec<Decision> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = lines(path);
            if pred(&found) {
                return found;
            }
            assert!(Instant::now() < deadline, "{what}: {found:#?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn repeated_refusals_are_written_first_then_summarised_per_interval() {
        let dir = temp_dir("aggregate");
        let path = dir.join("decisions.jsonl");
        let limits = LogLimits { first: 3, interval: Duration::from_millis(300), ..LogLimits::default() };
        let log = DecisionLog::open_with(Some(&path), limits).unwrap();
        for _ in 0..1000 {
            log.record(refusal(443));
        }
        log.record(refusal(22));
        let mut allowed = refusal(443);
        allowed.verdict = Verdict::Allow;
        for _ in 0..5 {
            log.record(allowed.clone());
        }
        let found = wait_for(&path, "a summary", |d| d.iter().any(|d| d.repeated > 0));
        let port = |d: &Decision| d.destination.map(|a| a.port());
        let single: Vec<&Decision> = found.iter().filter(|d| d.verdict == Verdict::Deny && d.repeated == 0).collect();
        assert_eq!(single.iter().filter(|d| port(d) == Some(443)).count(), 3, "the first three are written");
        assert_eq!(single.iter().filter(|d| port(d) == Some(22)).count(), 1, "another destination is its own");
        assert_eq!(found.iter().filter(|d| d.verdict == Verdict::Allow).count(), 5, "allows are never aggregated");
        let summary = found.iter().find(|d| d.repeated > 0).unwrap();
        assert_eq!((summary.repeated, port(summary), summary.rule.as_str()), (997, Some(443), "default-deny"));
        assert!(summary.reason.contains("997 more refusals like this"), "{}", summary.reason);
        assert_eq!(log.counters().aggregated.load(Ordering::Relaxed), 997);
        // A new interval writes the first ones again.
        std::thread::sleep(Duration::from_millis(350));
        log.record(refusal(443));
        wait_for(&path, "a new interval", |d| {
            d.iter().filter(|d| d.verdict == Verdict::Deny && d.repeated == 0 && port(d) == Some(443)).count() == 4
        });
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn the_file_rotates_by_size_and_age_keeping_k_files_read_oldest_first() {
        let dir = temp_dir("rotate");
        let path = dir.join("decisions.jsonl");
        let limits = LogLimits { max_bytes: 2000, keep: 2, first: u32::MAX, ..LogLimits::default() };
        let log = DecisionLog::open_with(Some(&path), limits).unwrap();
        for port in 1..=60 {
            log.record(refusal(port));
            // Batches stay small, so the sizes are checked often.
            std::thread::sleep(Duration::from_millis(2));
        }
        let found =
            wait_for(&path, "the last record", |d| d.iter().any(|d| d.destination.is_some_and(|a| a.port() == 60)));
        assert!(numbered(&path, 1).exists() && numbered(&path, 2).exists());
        assert!(!numbered(&path, 3).exists(), "more than two old files kept");
        for file in log_files(&path) {
            assert!(std::fs::metadata(&file).unwrap().len() <= 2000, "{} is too big", file.display());
        }
        // Oldest first: the ports read back in the order they were recorded.
        let ports: Vec<u16> = found.iter().filter_map(|d| d.destination).map(|a| a.port()).collect();
        assert!(ports.windows(2).all(|w| w[0] < w[1]), "{ports:?}");
        assert_eq!(ports.last(), Some(&60));
        assert!(ports[0] > 1, "the oldest records were rotated away");
        assert_eq!(log_files(&path), [numbered(&path, 2), numbered(&path, 1), path.clone()]);
        drop(log);

        let aged = LogLimits { max_age: Duration::from_millis(100), ..LogLimits::default() };
        let path = dir.join("aged.jsonl");
        let log = DecisionLog::open_with(Some(&path), aged).unwrap();
        log.record(refusal(1));
        wait_for(&path, "first", |d| d.len() == 1);
        std::thread::sleep(Duration::from_millis(150));
        log.record(refusal(2));
        wait_for(&path, "second", |d| d.len() == 2);
        assert!(numbered(&path, 1).exists(), "an old file is rotated by age");
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn the_chain_is_signed_every_n_lines_at_close_and_goes_on_after_a_reopen() {
        let dir = temp_dir("chain");
        let path = dir.join("decisions.jsonl");
        let key = Arc::new(super::super::AuditKey::generate().unwrap());
        let audit = Audit { key: Some(key.clone()), checkpoint_records: 3, ..Audit::default() };
        let limits = LogLimits { first: u32::MAX, ..LogLimits::default() };
        for round in 0..2 {
            let log = DecisionLog::open_audited(Some(&path), limits.clone(), audit.clone()).unwrap();
            for port in 0..7 {
                log.record(refusal(round * 100 + port));
            }
            log.close();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let rules: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Decision>(l).unwrap().rule)
            .filter(|r| r != "default-deny")
            .collect();
        // Per round: the start, a checkpoint after every 3 lines (the start
        // counts), and the final one.
        let round = |start: &str| [start, CHECKPOINT_RULE, CHECKPOINT_RULE, CHECKPOINT_RULE].map(str::to_owned);
        assert_eq!(rules, [round("chain-started"), round("chain-resumed")].concat(), "{text}");
        let report = super::super::verify::verify_files(&log_files(&path), &[key.public()]).unwrap();
        assert!(report.ok(), "{report}");
        assert_eq!((report.records, report.checkpoints_verified), (16, 6), "{report}");
        assert_eq!(report.ending, super::super::verify::Ending::CleanStop);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A tmpfs of 64 KiB mounted for one test, unmounted on drop.
    struct SmallDisk(PathBuf);

    impl SmallDisk {
        fn mount(dir: &Path) -> Option<Self> {
            let status =
                Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"]).arg(dir).status();
            status.is_ok_and(|s| s.success()).then(|| Self(dir.to_owned()))
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let unmounted = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
            if !unmounted {
                // Still busy (a failed test left a file open): detach it anyway.
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    #[tokio::test]
    async fn a_full_disk_drops_and_counts_records_without_slowing_record() {
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return;
        }
        let dir = temp_dir("full");
        let Some(disk) = SmallDisk::mount(&dir) else {
            eprintln!("SKIPPED: cannot mount a tmpfs here");
            return;
        };
        let path = dir.join("decisions.jsonl");
        let log = DecisionLog::open_with(Some(&path), LogLimits { first: u32::MAX, ..LogLimits::default() }).unwrap();
        log.record(refusal(1));
        wait_for(&path, "a first record", |d| d.len() == 1);
        // Fill the disk to the last byte.
        let filler = dir.join("filler");
        {
            let mut file = File::create(&filler).unwrap();
            while file.write_all(&[b'x'; 512]).is_ok() {}
            let _ = file.write_all(b"x");
        }
        let started = Instant::now();
        for port in 2..=20_000 {
            log.record(refusal(port));
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "recording took {took:?} on a full disk");
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.counters().dropped.load(Ordering::Relaxed) < 19_000 {
            assert!(Instant::now() < deadline, "only {} dropped", log.counters().dropped.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(20));
        }
        // Room again: the log says what it lost and goes on.
        std::fs::remove_file(&filler).unwrap();
        log.record(refusal(30_000));
        let found = wait_for(&path, "the loss reported", |d| {
            d.iter().any(|d| d.rule == "decision-log-dropped")
                && d.iter().any(|d| d.destination.is_some_and(|a| a.port() == 30_000))
        });
        let notice = found.iter().find(|d| d.rule == "decision-log-dropped").unwrap();
        let written = found.iter().filter(|d| d.verdict == Verdict::Deny).count() as u64;
        assert_eq!(notice.repeated + written, 20_001, "every record is either written or counted: {}", notice.reason);
        drop(log);
        // Lines cut by the full disk are declared; the chain holds.
        let report = super::super::verify::verify_files(&log_files(&path), &[]).unwrap();
        assert!(report.ok(), "{report}");
        drop(disk);
        assert!(!dir.exists(), "the tmpfs directory is left behind");
    }
}
