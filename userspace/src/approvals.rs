//! Requests held for an operator: what an `ask` rule decides.
//!
//! The proxy parks the request (or, for connections whose requests are not
//! seen, the connection) here and waits; `sluice approvals` lists what is
//! waiting, `sluice approve ID` / `sluice deny ID` answer through the control
//! API. No answer before the timeout is a denial. An answer "always" also
//! adds a rule to the sandbox's profile (the control API does that), so the
//! same request is not asked about again.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// What is waiting, as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    pub id: u64,
    pub sandbox: String,
    pub pid: u32,
    pub destination: SocketAddr,
    pub host: Option<String>,
    /// Absent for a connection whose requests are not seen.
    pub method: Option<String>,
    pub path: Option<String>,
    /// The ask rule that held it.
    pub rule: String,
    pub reason: String,
    /// RFC 3339 UTC.
    pub since: String,
    /// Seconds left before it is denied by the timeout.
    pub expires_in: u64,
}

/// An operator's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub allow: bool,
    /// Also remember it for this sandbox (a rule is added to its profile).
    #[serde(default)]
    pub always: bool,
}

/// How a held request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Approved {
        id: u64,
    },
    Denied {
        id: u64,
    },
    TimedOut {
        id: u64,
        after: Duration,
    },
    /// Not held: the sandbox already has `held` requests waiting, its limit.
    Refused {
        held: usize,
    },
}

/// Requests one sandbox may have waiting by default.
pub const DEFAULT_MAX_PER_SANDBOX: usize = 64;

struct Waiting {
    pending: Pending,
    deadline: tokio::time::Instant,
    answer: oneshot::Sender<Answer>,
}

pub struct Approvals {
    timeout: Duration,
    /// Requests one sandbox may have waiting at once: each holds a
    /// connection and its memory, and a flood of them would bury the
    /// operator's list.
    max_per_sandbox: usize,
    next_id: AtomicU64,
    waiting: Mutex<BTreeMap<u64, Waiting>>,
}

impl Approvals {
    /// At most [`DEFAULT_MAX_PER_SANDBOX`] requests held per sandbox.
    pub fn new(timeout: Duration) -> Self {
        Self::with_limit(timeout, DEFAULT_MAX_PER_SANDBOX)
    }

    pub fn with_limit(timeout: Duration, max_per_sandbox: usize) -> Self {
        Self { timeout, max_per_sandbox, next_id: AtomicU64::new(1), waiting: Mutex::new(BTreeMap::new()) }
    }

    pub fn max_per_sandbox(&self) -> usize {
        self.max_per_sandbox
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Holds `pending` (its `id`, `since` and `expires_in` are filled in
    /// here) until an answer or the timeout; `on_hold` is called with the id
    /// once it is listed, so the caller can log that it is waiting. A
    /// sandbox at its limit of waiting requests gets [`Outcome::Refused`]
    /// at once, and `on_hold` is not called.
    pub async fn ask(&self, mut pending: Pending, on_hold: impl FnOnce(&Pending)) -> Outcome {
        let (sender, receiver) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + self.timeout;
        {
            // Counted and inserted under one lock, so concurrent requests
            // cannot all slip in under the limit.
            let mut waiting = self.waiting.lock().expect("lock poisoned");
            let held = waiting.values().filter(|w| w.pending.sandbox == pending.sandbox).count();
            if held >= self.max_per_sandbox {
                return Outcome::Refused { held };
            }
            pending.id = self.next_id.fetch_add(1, Ordering::Relaxed);
            pending.since = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            pending.expires_in = self.timeout.as_secs();
            on_hold(&pending);
            waiting.insert(pending.id, Waiting { pending: pending.clone(), deadline, answer: sender });
        }
        let id = pending.id;
        // Removes the entry however this future ends (answer, timeout, or
        // the client going away and the future being dropped).
        let _cleanup = Cleanup { approvals: self, id };
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(answer)) if answer.allow => Outcome::Approved { id },
            Ok(_) => Outcome::Denied { id },
            Err(_) => Outcome::TimedOut { id, after: self.timeout },
        }
    }

    /// Everything waiting, oldest first.
    pub fn list(&self) -> Vec<Pending> {
        let now = tokio::time::Instant::now();
        self.waiting
            .lock()
            .expect("lock poisoned")
            .values()
            .map(|w| Pending { expires_in: w.deadline.saturating_duration_since(now).as_secs(), ..w.pending.clone() })
            .collect()
    }

    /// Answers request `id`; returns what it was, or `None` when nothing
    /// with that id is waiting (answered already, timed out, or never was).
    pub fn answer(&self, id: u64, answer: Answer) -> Option<Pending> {
        let waiting = self.waiting.lock().expect("lock poisoned").remove(&id)?;
        // The requester may have gone away in the meantime; the answer
        // still counts for `always`.
        let _ = waiting.answer.send(answer);
        Some(waiting.pending)
    }
}

struct Cleanup<'a> {
    approvals: &'a Approvals,
    id: u64,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.approvals.waiting.lock().expect("lock poisoned").remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn pending() -> Pending {
        Pending {
            id: 0,
            sandbox: "s".into(),
            pid: 1,
            destination: "198.18.0.1:443".parse().unwrap(),
            host: Some("a.test".into()),
            method: Some("POST".into()),
            path: Some("/x".into()),
            rule: "ask-posts".into(),
            reason: "r".into(),
            since: String::new(),
            expires_in: 0,
        }
    }

    #[tokio::test]
    async fn answered_denied_and_timed_out() {
        let approvals = Arc::new(Approvals::new(Duration::from_secs(5)));
        let waiter = {
            let approvals = approvals.clone();
            tokio::spawn(async move { approvals.ask(pending(), |_| {}).await })
        };
        while approvals.list().is_empty() {
            tokio::task::yield_now().await;
        }
        let listed = approvals.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].rule, "ask-posts");
        let id = listed[0].id;
        assert_eq!(approvals.answer(id, Answer { allow: true, always: false }).unwrap().id, id);
        assert_eq!(waiter.await.unwrap(), Outcome::Approved { id });
        assert!(approvals.list().is_empty());
        assert!(approvals.answer(id, Answer { allow: true, always: false }).is_none(), "answered once only");

        let waiter = {
            let approvals = approvals.clone();
            tokio::spawn(async move { approvals.ask(pending(), |_| {}).await })
        };
        while approvals.list().is_empty() {
            tokio::task::yield_now().await;
        }
        let id = approvals.list()[0].id;
        approvals.answer(id, Answer { allow: false, always: true });
        assert_eq!(waiter.await.unwrap(), Outcome::Denied { id });

        let short = Approvals::new(Duration::from_millis(50));
        let outcome = short.ask(pending(), |_| {}).await;
        assert!(matches!(outcome, Outcome::TimedOut { .. }), "{outcome:?}");
        assert!(short.list().is_empty(), "a timed-out request is no longer listed");
    }

    #[tokio::test]
    async fn a_sandbox_at_its_limit_of_held_requests_is_refused_and_others_are_not() {
        let approvals = Arc::new(Approvals::with_limit(Duration::from_secs(5), 2));
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut asked = Box::pin(approvals.ask(pending(), |_| {}));
            assert!(futures_util::poll!(asked.as_mut()).is_pending());
            held.push(asked);
        }
        let mut called = false;
        let outcome = approvals.ask(pending(), |_| called = true).await;
        assert_eq!(outcome, Outcome::Refused { held: 2 });
        assert!(!called, "a refused request is not announced as held");
        assert_eq!(approvals.list().len(), 2);

        let other = Pending { sandbox: "other".into(), ..pending() };
        let mut asked = Box::pin(approvals.ask(other, |_| {}));
        assert!(futures_util::poll!(asked.as_mut()).is_pending(), "another sandbox is held");
        assert_eq!(approvals.list().len(), 3);

        // A place freed is a place again.
        held.pop();
        let mut again = Box::pin(approvals.ask(pending(), |_| {}));
        assert!(futures_util::poll!(again.as_mut()).is_pending());
    }

    #[tokio::test]
    async fn a_request_whose_client_left_is_no_longer_listed() {
        let approvals = Approvals::new(Duration::from_secs(5));
        let asked = approvals.ask(pending(), |_| {});
        // Poll once so it is listed, then drop it as a closed client would.
        let mut asked = Box::pin(asked);
        assert!(futures_util::poll!(asked.as_mut()).is_pending());
        assert_eq!(approvals.list().len(), 1);
        drop(asked);
        assert!(approvals.list().is_empty());
    }
}
