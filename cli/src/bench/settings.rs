//! How much each phase measures: the defaults, the `--quick` smoke-test sizes, and the flags that
//! override either. Every loop is bounded twice, by a count and by a hard time cap.

use std::time::Duration;

use serde::Serialize;

use crate::error::Error;

/// The sizes of one run, resolved from the flags.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Tiny counts for smoke tests (`--quick`).
    pub quick: bool,
    /// Sequential calls recorded per target, after the warm-up.
    pub calls: u64,
    /// Sequential calls made (and not recorded) before them.
    pub warmup_calls: u64,
    /// How long the throughput measurement lasts, in milliseconds.
    pub throughput_ms: u64,
    /// How long calls run before throughput is counted, in milliseconds.
    pub throughput_warmup_ms: u64,
    /// Calls in flight during the throughput measurement.
    pub concurrency: usize,
    /// Sessions held open at once for the memory measurement.
    pub sessions: usize,
    /// Create + close pairs recorded for session latency, after the warm-up.
    pub session_iterations: u64,
    /// Create + close pairs made (and not recorded) before them.
    pub session_warmup: u64,
    /// Hard cap on any one measuring loop, in milliseconds (it stops early and says so).
    pub loop_cap_ms: u64,
    /// Deadline of every call, in milliseconds.
    pub call_timeout_ms: u64,
}

/// The flags that size a run; `None` keeps the default (or the `--quick` size).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--quick`.
    pub quick: bool,
    /// `--calls`.
    pub calls: Option<u64>,
    /// `--warmup`.
    pub warmup: Option<u64>,
    /// `--duration-s`.
    pub duration_s: Option<u64>,
    /// `--concurrency`.
    pub concurrency: Option<usize>,
    /// `--sessions`.
    pub sessions: Option<usize>,
    /// `--session-iterations`.
    pub session_iterations: Option<u64>,
}

/// Most calls in flight `--concurrency` accepts.
const MAX_CONCURRENCY: usize = 4096;
/// Most sessions `--sessions` accepts.
const MAX_SESSIONS: usize = 100_000;

impl Settings {
    /// The full-size run `make bench` does.
    pub fn standard() -> Self {
        Self {
            quick: false,
            calls: 5000,
            warmup_calls: 500,
            throughput_ms: 5000,
            throughput_warmup_ms: 1000,
            concurrency: 64,
            sessions: 1000,
            session_iterations: 300,
            session_warmup: 30,
            loop_cap_ms: 120_000,
            call_timeout_ms: 10_000,
        }
    }

    /// A run small enough for a test (a few seconds on a laptop).
    pub fn quick() -> Self {
        Self {
            quick: true,
            calls: 200,
            warmup_calls: 20,
            throughput_ms: 1000,
            throughput_warmup_ms: 200,
            concurrency: 64,
            sessions: 20,
            session_iterations: 20,
            session_warmup: 3,
            loop_cap_ms: 30_000,
            call_timeout_ms: 10_000,
        }
    }

    /// The defaults (or quick sizes) with the flags applied, checked.
    pub fn resolve(o: &Overrides) -> Result<Self, Error> {
        let mut s = if o.quick {
            Self::quick()
        } else {
            Self::standard()
        };
        if let Some(calls) = o.calls {
            s.calls = calls;
        }
        if let Some(warmup) = o.warmup {
            s.warmup_calls = warmup;
        }
        if let Some(secs) = o.duration_s {
            s.throughput_ms = secs.saturating_mul(1000);
        }
        if let Some(concurrency) = o.concurrency {
            s.concurrency = concurrency;
        }
        if let Some(sessions) = o.sessions {
            s.sessions = sessions;
        }
        if let Some(iterations) = o.session_iterations {
            s.session_iterations = iterations;
        }
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), Error> {
        let usage = |msg: &str| Err(Error::Usage(msg.to_owned()));
        if self.calls == 0 {
            return usage("--calls must be at least 1");
        }
        if self.throughput_ms == 0 || self.throughput_ms > 3_600_000 {
            return usage("--duration-s must be between 1 and 3600");
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return usage("--concurrency must be between 1 and 4096");
        }
        if self.sessions == 0 || self.sessions > MAX_SESSIONS {
            return usage("--sessions must be between 1 and 100000");
        }
        if self.session_iterations == 0 {
            return usage("--session-iterations must be at least 1");
        }
        Ok(())
    }

    /// Throughput measurement window.
    pub fn throughput(&self) -> Duration {
        Duration::from_millis(self.throughput_ms)
    }

    /// Throughput warm-up.
    pub fn throughput_warmup(&self) -> Duration {
        Duration::from_millis(self.throughput_warmup_ms)
    }

    /// Hard cap of one measuring loop.
    pub fn loop_cap(&self) -> Duration {
        Duration::from_millis(self.loop_cap_ms)
    }

    /// Deadline of one call.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// MAX_SESSIONS for the workers: the sessions held open plus room for the other phases.
    pub fn worker_max_sessions(&self) -> u32 {
        u32::try_from(self.sessions.saturating_add(16)).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_default_or_quick_sizes() {
        let s = Settings::resolve(&Overrides::default()).expect("defaults");
        assert_eq!(s, Settings::standard());
        assert_eq!((s.calls, s.concurrency, s.sessions), (5000, 64, 1000));

        let q = Settings::resolve(&Overrides {
            quick: true,
            calls: Some(7),
            duration_s: Some(2),
            ..Overrides::default()
        })
        .expect("quick");
        assert!(q.quick);
        assert_eq!(q.calls, 7);
        assert_eq!(q.throughput(), Duration::from_secs(2));
        assert_eq!(q.sessions, Settings::quick().sessions);
        assert_eq!(q.worker_max_sessions(), 36);
    }

    #[test]
    fn nonsense_sizes_are_usage_errors() {
        for o in [
            Overrides {
                calls: Some(0),
                ..Overrides::default()
            },
            Overrides {
                concurrency: Some(0),
                ..Overrides::default()
            },
            Overrides {
                duration_s: Some(0),
                ..Overrides::default()
            },
            Overrides {
                sessions: Some(0),
                ..Overrides::default()
            },
        ] {
            let err = Settings::resolve(&o).expect_err("refused");
            assert!(matches!(err, Error::Usage(_)), "{err:?}");
        }
    }
}
