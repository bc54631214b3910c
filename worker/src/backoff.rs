//! Capped exponential backoff with jitter for reconnecting to the coordinator.
//!
//! The base delay starts at `min` and doubles after every failed attempt up to `max`; each
//! delay is drawn uniformly from `[base / 2, base]` ("equal jitter"), so workers that lost the
//! coordinator at the same moment do not reconnect in lockstep, and no delay exceeds `max`.

use std::time::Duration;

/// Reconnect delays.
pub struct Backoff {
    min: Duration,
    max: Duration,
    base: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    /// Delays from `min` doubling to `max`, jittered with `rng`.
    pub fn new(min: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            base: min,
            rng,
        }
    }

    /// The delay before the next attempt; the one after it will be (about) twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = base.saturating_mul(2).min(self.max);
        self.jitter(base)
    }

    /// A delay at the cap, for failures that retrying soon will not fix (a rejected join token).
    pub fn at_max(&mut self) -> Duration {
        self.base = self.max;
        self.jitter(self.max)
    }

    /// Starts over from `min` (after a successful registration).
    pub fn reset(&mut self) {
        self.base = self.min;
    }

    fn jitter(&mut self, base: Duration) -> Duration {
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        Duration::from_nanos(half + self.rng.u64(0..=nanos - half))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_from_min_to_max_within_jitter_bounds() {
        let mut backoff = Backoff::new(ms(100), ms(5000), fastrand::Rng::with_seed(7));
        let bases = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for base in bases {
            let delay = backoff.next_delay();
            assert!(
                delay >= ms(base / 2) && delay <= ms(base),
                "{delay:?} for base {base}"
            );
        }
    }

    #[test]
    fn reset_and_at_max() {
        let mut backoff = Backoff::new(ms(100), ms(1000), fastrand::Rng::with_seed(1));
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= ms(100));
        let delay = backoff.at_max();
        assert!(delay >= ms(500) && delay <= ms(1000));
        assert!(
            backoff.next_delay() >= ms(500),
            "stays at the cap after at_max"
        );
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut a = Backoff::new(ms(1000), ms(1000), fastrand::Rng::with_seed(1));
        let delays: std::collections::HashSet<_> = (0..20).map(|_| a.next_delay()).collect();
        assert!(delays.len() > 10, "delays should vary: {delays:?}");
    }
}
