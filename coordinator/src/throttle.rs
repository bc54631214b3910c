//! Throttling of failed logins (AuthService.IssueToken), decided before any Argon2 work.
//!
//! - Per (client id, peer address): after HEIST_LOGIN_FREE_FAILURES failures in a row, each
//!   further failure doubles a back-off (HEIST_LOGIN_BACKOFF_BASE_MS up to
//!   HEIST_LOGIN_BACKOFF_MAX_S) during which that pair is refused at once. A success clears it.
//! - Per peer address (any client id, so spraying ids from one address is slowed too): the
//!   same, after four times as many failures.
//! - A global bucket of failures (HEIST_LOGIN_FAILURES_PER_S, burst ten times that): while it
//!   is empty, peers that have failed recently are refused; a peer with no failures on record
//!   is always heard.
//!
//! So a guessing loop from one address is slowed to a trickle and never starves the hashing
//! pool, and the real client, logging in from its own address, is never locked out by it.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::config::Config;

/// Entries kept per map before the stale ones are swept.
const MAX_ENTRIES: usize = 65_536;

#[derive(Clone, Copy)]
struct Record {
    failures: u32,
    blocked_until: Instant,
    last_failure: Instant,
}

struct State {
    pairs: HashMap<(String, IpAddr), Record>,
    peers: HashMap<IpAddr, Record>,
    bucket: f64,
    refilled: Instant,
}

/// The login throttle.
pub struct LoginThrottle {
    free_failures: u32,
    base: Duration,
    max: Duration,
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

impl LoginThrottle {
    /// A throttle with the limits in `config`.
    pub fn new(config: &Config) -> Self {
        let rate = f64::from(config.login_failures_per_s);
        Self {
            free_failures: config.login_free_failures,
            base: config.login_backoff_base,
            max: config.login_backoff_max,
            rate,
            burst: rate * 10.0,
            state: Mutex::new(State {
                pairs: HashMap::new(),
                peers: HashMap::new(),
                bucket: rate * 10.0,
                refilled: Instant::now(),
            }),
        }
    }

    /// Whether a login for `client` from `peer` may be checked now; else how long to wait.
    pub fn admit(&self, client: &str, peer: Option<IpAddr>) -> Result<(), Duration> {
        let Some(peer) = peer else { return Ok(()) };
        let now = Instant::now();
        let mut state = self.lock();
        self.refill(&mut state, now);
        let blocked = |r: Option<&Record>| {
            r.map(|r| r.blocked_until.saturating_duration_since(now))
                .filter(|d| !d.is_zero())
        };
        if let Some(wait) = blocked(state.pairs.get(&(client.to_owned(), peer)))
            .or_else(|| blocked(state.peers.get(&peer)))
        {
            return Err(wait);
        }
        let failed_recently = state
            .peers
            .get(&peer)
            .is_some_and(|r| now.saturating_duration_since(r.last_failure) < self.max);
        if failed_recently && state.bucket < 1.0 {
            return Err(Duration::from_secs(1));
        }
        Ok(())
    }

    /// Records a failed login.
    pub fn failed(&self, client: &str, peer: Option<IpAddr>) {
        let Some(peer) = peer else { return };
        let now = Instant::now();
        let mut state = self.lock();
        self.refill(&mut state, now);
        state.bucket = (state.bucket - 1.0).max(0.0);
        let pair_free = self.free_failures;
        let peer_free = self.free_failures.saturating_mul(4);
        let (base, max) = (self.base, self.max);
        bump(
            &mut state.pairs,
            (client.to_owned(), peer),
            pair_free,
            base,
            max,
            now,
        );
        bump(&mut state.peers, peer, peer_free, base, max, now);
    }

    /// Records a successful login: the pair's failures are forgotten.
    pub fn succeeded(&self, client: &str, peer: Option<IpAddr>) {
        if let Some(peer) = peer {
            self.lock().pairs.remove(&(client.to_owned(), peer));
        }
    }

    fn refill(&self, state: &mut State, now: Instant) {
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        state.bucket = (state.bucket + elapsed * self.rate).min(self.burst);
        state.refilled = now;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a failure for `key`, blocking it with a doubling back-off past `free` failures.
fn bump<K: Hash + Eq>(
    map: &mut HashMap<K, Record>,
    key: K,
    free: u32,
    base: Duration,
    max: Duration,
    now: Instant,
) {
    if map.len() >= MAX_ENTRIES {
        map.retain(|_, r| now.saturating_duration_since(r.last_failure) < max);
    }
    let record = map.entry(key).or_insert(Record {
        failures: 0,
        blocked_until: now,
        last_failure: now,
    });
    // A key quiet for a whole maximum back-off starts over.
    if now.saturating_duration_since(record.last_failure) >= max {
        record.failures = 0;
    }
    record.failures = record.failures.saturating_add(1);
    record.last_failure = now;
    if record.failures > free {
        let doublings = (record.failures - free - 1).min(30);
        let backoff = base.saturating_mul(1 << doublings).min(max);
        record.blocked_until = now + backoff;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> LoginThrottle {
        LoginThrottle::new(&Config {
            login_free_failures: 2,
            login_backoff_base: Duration::from_secs(10),
            ..Config::default()
        })
    }

    #[test]
    fn a_guessing_pair_backs_off_and_others_are_still_heard() {
        let t = throttle();
        let attacker: IpAddr = "10.0.0.66".parse().expect("ip");
        let real: IpAddr = "10.0.0.7".parse().expect("ip");
        for _ in 0..2 {
            assert!(t.admit("alice", Some(attacker)).is_ok());
            t.failed("alice", Some(attacker));
        }
        assert!(
            t.admit("alice", Some(attacker)).is_ok(),
            "two free failures"
        );
        t.failed("alice", Some(attacker));
        let wait = t.admit("alice", Some(attacker)).expect_err("backing off");
        assert!(wait <= Duration::from_secs(10) && !wait.is_zero());
        // The real client, from its own address, is not locked out.
        assert!(t.admit("alice", Some(real)).is_ok());
        t.succeeded("alice", Some(real));
        // Without a peer (not over TCP) nothing is throttled.
        assert!(t.admit("alice", None).is_ok());
    }

    #[test]
    fn an_empty_global_bucket_refuses_only_peers_that_failed() {
        let t = LoginThrottle::new(&Config {
            login_failures_per_s: 1,
            login_free_failures: 1000,
            ..Config::default()
        });
        let noisy: IpAddr = "10.0.0.1".parse().expect("ip");
        for i in 0..20 {
            t.failed(&format!("c{i}"), Some(noisy));
        }
        assert!(t.admit("c-new", Some(noisy)).is_err(), "bucket empty");
        assert!(
            t.admit("c-new", Some("10.0.0.2".parse().expect("ip")))
                .is_ok()
        );
    }
}
