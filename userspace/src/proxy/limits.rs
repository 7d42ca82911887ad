//! Per-sandbox limits on the proxy's accept path, so one sandbox cannot
//! starve the others: how many connections a sandbox holds open, how fast
//! it opens new ones (a token bucket), and a reserve of the daemon's own
//! descriptors that sandbox connections may not eat into (the control API,
//! the kernel ring buffer and the resolver keep working).
//!
//! Refusals are not recorded one by one: a flood would fill the decision
//! log. [`Aggregator`] records the first refusal of a sandbox and rule at
//! once and sums the rest into one record per interval.
//!
//! Everything here is pure state over an `Instant` the caller passes in,
//! so it is tested without a clock or a socket.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::rules;

/// The limits, as the daemon's flags set them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitsConfig {
    /// Connections one sandbox may hold open through the proxy at once.
    pub max_connections: usize,
    /// New connections per second one sandbox may open, on average.
    pub connections_per_second: f64,
    /// How many new connections may come at once above that rate.
    pub connection_burst: f64,
    /// Descriptors kept free for the daemon itself: sandbox connections
    /// are refused while fewer than this many are left below the limit.
    pub descriptor_reserve: u64,
    /// At most one aggregated refusal record per sandbox and rule this often.
    pub record_interval: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 512,
            connections_per_second: 200.0,
            connection_burst: 400.0,
            descriptor_reserve: 256,
            record_interval: Duration::from_secs(10),
        }
    }
}

/// Why a sandbox's connection or request was refused by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// At its limit of open connections.
    Connections,
    /// Opening connections faster than its rate allows.
    ConnectionRate,
    /// The daemon is within its descriptor reserve.
    Descriptors,
    /// At its limit of requests held for an operator.
    Approvals,
}

impl Limit {
    /// The rule a decision record names.
    pub fn rule(self) -> &'static str {
        match self {
            Self::Connections => rules::LIMIT_CONNECTIONS,
            Self::ConnectionRate => rules::LIMIT_CONNECTION_RATE,
            Self::Descriptors => rules::LIMIT_DESCRIPTORS,
            Self::Approvals => rules::LIMIT_APPROVALS,
        }
    }

    /// Why, for one refusal or a sum of `count` of them.
    pub fn reason(self, config: &LimitsConfig, approvals: usize, count: u64) -> String {
        let what = match self {
            Self::Connections => {
                format!("the sandbox holds its limit of {} open connections", config.max_connections)
            }
            Self::ConnectionRate => format!(
                "the sandbox opens connections faster than {} per second (burst {})",
                config.connections_per_second, config.connection_burst
            ),
            Self::Descriptors => format!(
                "sluice is within {} descriptors of its open files limit; they are kept for the daemon itself",
                config.descriptor_reserve
            ),
            Self::Approvals => format!("the sandbox already has {approvals} requests waiting for an operator"),
        };
        let noun = if self == Self::Approvals { "request" } else { "connection" };
        if count == 1 {
            format!(
                "{what}; {noun} refused (further refusals are summed, one record per {} s)",
                config.record_interval.as_secs()
            )
        } else {
            format!("{what}; {count} {noun}s refused in the last {} s", config.record_interval.as_secs())
        }
    }
}

/// New connections at a steady rate with a burst on top.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        Self { tokens: burst, last: now, rate, burst }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Full again: as good as a new bucket.
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }
}

struct SandboxState {
    open: usize,
    bucket: TokenBucket,
}

/// Above this many sandboxes' states, idle ones (nothing open, bucket full)
/// are forgotten: they are the same as new ones.
const PRUNE_ABOVE: usize = 1024;

/// The open connections and rates of every sandbox.
pub struct Limits {
    config: LimitsConfig,
    sandboxes: Mutex<HashMap<String, SandboxState>>,
}

/// One open connection of a sandbox; dropping it frees the place.
#[must_use = "the connection counts as open while the slot lives"]
pub struct Slot {
    limits: Arc<Limits>,
    sandbox: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut sandboxes = self.limits.sandboxes.lock().expect("lock poisoned");
        if let Some(state) = sandboxes.get_mut(&self.sandbox) {
            state.open = state.open.saturating_sub(1);
        }
    }
}

impl Limits {
    pub fn new(config: LimitsConfig) -> Self {
        Self { config, sandboxes: Mutex::new(HashMap::new()) }
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// Admits a new connection of `sandbox`, or says which limit refuses it.
    /// A refused connection takes no token: a flood at the open limit does
    /// not also lock the sandbox out by rate once its connections close.
    pub fn admit(self: &Arc<Self>, sandbox: &str, now: Instant) -> Result<Slot, Limit> {
        let mut sandboxes = self.sandboxes.lock().expect("lock poisoned");
        if sandboxes.len() > PRUNE_ABOVE {
            sandboxes.retain(|_, state| state.open > 0 || !state.bucket.is_full(now));
        }
        let config = &self.config;
        let state = sandboxes.entry(sandbox.to_owned()).or_insert_with(|| SandboxState {
            open: 0,
            bucket: TokenBucket::new(config.connections_per_second, config.connection_burst, now),
        });
        if state.open >= config.max_connections {
            return Err(Limit::Connections);
        }
        if !state.bucket.take(now) {
            return Err(Limit::ConnectionRate);
        }
        state.open += 1;
        Ok(Slot { limits: self.clone(), sandbox: sandbox.to_owned() })
    }

    /// Connections `sandbox` holds open now.
    pub fn open(&self, sandbox: &str) -> usize {
        self.sandboxes.lock().expect("lock poisoned").get(sandbox).map_or(0, |state| state.open)
    }
}

/// Whether a process with `open` descriptors is within `reserve` of its
/// `limit` (`None`: no limit).
pub fn within_reserve(open: u64, limit: Option<u64>, reserve: u64) -> bool {
    limit.is_some_and(|limit| open.saturating_add(reserve) >= limit)
}

/// The process's soft limit on open files; `None` when unlimited.
pub fn open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a plain syscall on a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(limit.rlim_cur)
}

/// The daemon's open descriptors, counted in /proc/self/fd at most every
/// `RECOUNT` and estimated in between from the newest accepted descriptor
/// (the kernel hands out the lowest free number, so every one below it is
/// open).
pub struct DescriptorGauge {
    counted: Mutex<(u64, Option<Instant>)>,
}

const RECOUNT: Duration = Duration::from_millis(100);

impl DescriptorGauge {
    pub fn new() -> Self {
        Self { counted: Mutex::new((0, None)) }
    }

    /// Open descriptors, at least `accepted + 1`.
    pub fn open(&self, accepted: i32, now: Instant) -> u64 {
        let mut counted = self.counted.lock().expect("lock poisoned");
        if counted.1.is_none_or(|at| now.saturating_duration_since(at) >= RECOUNT) {
            if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
                counted.0 = entries.count() as u64;
            }
            counted.1 = Some(now);
        }
        counted.0.max(u64::try_from(accepted).unwrap_or(0).saturating_add(1))
    }
}

impl Default for DescriptorGauge {
    fn default() -> Self {
        Self::new()
    }
}

/// What to record for a refusal that was just noted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Noted {
    /// The first of a quiet sandbox and rule: record it now.
    RecordNow,
    /// Counted into the record at the end of the current interval.
    Counted,
}

/// One aggregated record that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub sandbox: String,
    pub refusal: Limit,
    pub count: u64,
}

struct Tally {
    window_start: Instant,
    count: u64,
}

/// Sums refusals per sandbox and rule: the first one opens an interval and
/// is recorded at once; those that follow within it are recorded as one
/// sum when it ends, which opens the next interval if there were any.
pub struct Aggregator {
    interval: Duration,
    tallies: HashMap<(String, Limit), Tally>,
}

impl Aggregator {
    pub fn new(interval: Duration) -> Self {
        Self { interval, tallies: HashMap::new() }
    }

    pub fn note(&mut self, sandbox: &str, refusal: Limit, now: Instant) -> Noted {
        match self.tallies.get_mut(&(sandbox.to_owned(), refusal)) {
            Some(tally) => {
                tally.count += 1;
                Noted::Counted
            }
            None => {
                self.tallies.insert((sandbox.to_owned(), refusal), Tally { window_start: now, count: 0 });
                Noted::RecordNow
            }
        }
    }

    /// The sums whose interval has ended; a sandbox and rule with nothing
    /// refused in its last interval is quiet again.
    pub fn due(&mut self, now: Instant) -> Vec<Summary> {
        let mut due = Vec::new();
        let interval = self.interval;
        self.tallies.retain(|(sandbox, refusal), tally| {
            if now.saturating_duration_since(tally.window_start) < interval {
                return true;
            }
            if tally.count == 0 {
                return false;
            }
            due.push(Summary { sandbox: sandbox.clone(), refusal: *refusal, count: tally.count });
            *tally = Tally { window_start: now, count: 0 };
            true
        });
        due.sort_by(|a, b| (&a.sandbox, a.refusal.rule()).cmp(&(&b.sandbox, b.refusal.rule())));
        due
    }

    pub fn is_empty(&self) -> bool {
        self.tallies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_connections: usize, rate: f64, burst: f64) -> LimitsConfig {
        LimitsConfig { max_connections, connections_per_second: rate, connection_burst: burst, ..Default::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn open_connections_are_bounded_per_sandbox_and_freed_on_drop() {
        let limits = Arc::new(Limits::new(config(3, 1000.0, 1000.0)));
        let now = Instant::now();
        let slots: Vec<Slot> = (0..3).map(|_| limits.admit("noisy", now).unwrap()).collect();
        assert_eq!(limits.admit("noisy", now).err(), Some(Limit::Connections));
        // Another sandbox has its own places.
        let quiet = limits.admit("quiet", now).expect("a neighbour is not refused");
        assert_eq!(limits.open("noisy"), 3);
        drop(slots);
        assert_eq!(limits.open("noisy"), 0);
        assert!(limits.admit("noisy", now).is_ok());
        drop(quiet);
        assert_eq!(limits.open("quiet"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_allows_a_burst_then_refills_at_the_rate() {
        let limits = Arc::new(Limits::new(config(10_000, 10.0, 20.0)));
        let start = Instant::now();
        let mut admitted = Vec::new();
        for _ in 0..20 {
            admitted.push(limits.admit("noisy", start).expect("within the burst"));
        }
        assert_eq!(limits.admit("noisy", start).err(), Some(Limit::ConnectionRate));
        assert!(limits.admit("quiet", start).is_ok(), "the neighbour's bucket is its own");
        tokio::time::advance(Duration::from_millis(500)).await;
        let later = Instant::now();
        let refilled = (0..10).filter(|_| limits.admit("noisy", later).is_ok()).count();
        assert_eq!(refilled, 5, "half a second at 10/s is five connections");
        // Closing connections gives no tokens back.
        drop(admitted);
        assert_eq!(limits.admit("noisy", later).err(), Some(Limit::ConnectionRate));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_at_the_open_limit_takes_no_token() {
        let limits = Arc::new(Limits::new(config(1, 1.0, 2.0)));
        let now = Instant::now();
        let held = limits.admit("s", now).unwrap();
        for _ in 0..100 {
            assert_eq!(limits.admit("s", now).err(), Some(Limit::Connections));
        }
        drop(held);
        assert!(limits.admit("s", now).is_ok(), "the burst's second token is still there");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_summed_into_one_record_per_interval() {
        let mut aggregator = Aggregator::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(aggregator.note("noisy", Limit::Connections, start), Noted::RecordNow);
        for _ in 0..999 {
            assert_eq!(aggregator.note("noisy", Limit::Connections, start), Noted::Counted);
        }
        assert_eq!(aggregator.note("noisy", Limit::ConnectionRate, start), Noted::RecordNow, "another rule");
        assert_eq!(aggregator.note("other", Limit::Connections, start), Noted::RecordNow, "another sandbox");
        assert!(aggregator.due(start + Duration::from_secs(9)).is_empty(), "not before the interval ends");

        let end = start + Duration::from_secs(10);
        let due = aggregator.due(end);
        assert_eq!(due, vec![Summary { sandbox: "noisy".into(), refusal: Limit::Connections, count: 999 }]);
        assert!(!aggregator.is_empty(), "the noisy sandbox's next interval is open");
        // Still refusing: counted into the next interval, not recorded now.
        assert_eq!(aggregator.note("noisy", Limit::Connections, end), Noted::Counted);
        assert_eq!(aggregator.due(end + Duration::from_secs(10)).len(), 1);
        // A quiet interval ends the run; the next refusal is recorded at once.
        assert!(aggregator.due(end + Duration::from_secs(20)).is_empty());
        assert!(aggregator.is_empty());
        assert_eq!(aggregator.note("noisy", Limit::Connections, end + Duration::from_secs(21)), Noted::RecordNow);
    }

    #[test]
    fn the_descriptor_reserve() {
        assert!(!within_reserve(100, Some(1024), 256));
        assert!(!within_reserve(767, Some(1024), 256));
        assert!(within_reserve(768, Some(1024), 256));
        assert!(within_reserve(2000, Some(1024), 256));
        assert!(!within_reserve(u64::MAX, None, 256), "no limit, no reserve");
    }

    #[tokio::test(start_paused = true)]
    async fn the_gauge_counts_this_process_descriptors() {
        let gauge = DescriptorGauge::new();
        let now = Instant::now();
        let counted = gauge.open(0, now);
        assert!(counted >= 3, "stdin, stdout and stderr at least: {counted}");
        assert_eq!(gauge.open(9999, now), 10_000, "an accepted descriptor's number is a lower bound");
    }

    #[test]
    fn reasons_say_the_limit_and_the_count() {
        let config = config(512, 200.0, 400.0);
        let one = Limit::Connections.reason(&config, 0, 1);
        assert!(one.contains("512 open connections"), "{one}");
        let many = Limit::ConnectionRate.reason(&config, 0, 37);
        assert!(many.contains("37 connections refused in the last 10 s"), "{many}");
        assert!(Limit::Approvals.reason(&config, 64, 1).contains("64 requests waiting"));
    }
}
