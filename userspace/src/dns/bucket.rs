//! Token buckets for the per-sandbox query budgets.

use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

use super::RateLimit;

/// A token bucket shared by a sandbox's UDP and TCP listeners.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens held.
    capacity: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    last_refill: Instant,
}

impl TokenBucket {
    /// A bucket that starts full, so a sandbox's first burst is not refused.
    pub(crate) fn new(limit: RateLimit, now: Instant) -> Self {
        Self::with(f64::from(limit.per_second), f64::from(limit.burst), now)
    }

    /// A budget of `amount` per minute, refilled continuously; it starts
    /// full, so a minute's worth may be spent at once and then no more
    /// than the refill.
    pub(crate) fn per_minute(amount: u32, now: Instant) -> Self {
        Self::with(f64::from(amount) / 60.0, f64::from(amount), now)
    }

    fn with(rate: f64, capacity: f64, now: Instant) -> Self {
        Self { rate, capacity, state: Mutex::new(BucketState { tokens: capacity, last_refill: now }) }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&self, now: Instant) -> bool {
        self.try_take_n(1, now)
    }

    /// Takes `n` tokens if there are that many; takes nothing otherwise.
    pub(crate) fn try_take_n(&self, n: usize, now: Instant) -> bool {
        // A panic elsewhere while holding the lock leaves plain numbers
        // behind, which are still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(state.last_refill);
        let refilled = state.tokens + elapsed.as_secs_f64() * self.rate;
        state.tokens = refilled.min(self.capacity);
        if now > state.last_refill {
            state.last_refill = now;
        }
        let wanted = n as f64;
        if state.tokens >= wanted {
            state.tokens -= wanted;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_refill_at_rate() {
        let start = Instant::now();
        let bucket = TokenBucket::new(RateLimit { per_second: 10, burst: 20 }, start);
        let taken = (0..25).filter(|_| bucket.try_take(start)).count();
        assert_eq!(taken, 20, "a full bucket gives exactly the burst");

        // 10/s refills one token every 100 ms.
        let later = start + Duration::from_millis(350);
        let taken = (0..10).filter(|_| bucket.try_take(later)).count();
        assert_eq!(taken, 3);
    }

    #[test]
    fn refill_never_exceeds_burst() {
        let start = Instant::now();
        let bucket = TokenBucket::new(RateLimit { per_second: 1000, burst: 5 }, start);
        let much_later = start + Duration::from_hours(1);
        let taken = (0..100).filter(|_| bucket.try_take(much_later)).count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn time_going_backwards_does_not_refill() {
        let start = Instant::now() + Duration::from_secs(10);
        let bucket = TokenBucket::new(RateLimit { per_second: 100, burst: 1 }, start);
        assert!(bucket.try_take(start));
        assert!(!bucket.try_take(start - Duration::from_secs(5)));
        assert!(!bucket.try_take(start));
    }

    #[test]
    fn a_per_minute_budget_is_spent_in_amounts_and_refills_over_the_minute() {
        let start = Instant::now();
        let bucket = TokenBucket::per_minute(600, start);
        assert!(bucket.try_take_n(500, start));
        assert!(!bucket.try_take_n(101, start), "only 100 are left");
        assert!(bucket.try_take_n(100, start));
        assert!(!bucket.try_take_n(1, start));
        // 600 per minute refills 10 per second.
        assert!(bucket.try_take_n(50, start + Duration::from_secs(5)));
        assert!(!bucket.try_take_n(1, start + Duration::from_secs(5)));
    }
}
