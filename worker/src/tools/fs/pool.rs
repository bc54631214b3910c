//! The bounded pool every fs tool's filesystem work runs on.
//!
//! Filesystem calls block a thread; a call that never returns (a hung mount, a FIFO opened by
//! mistake) must not take the worker with it. So the work runs on tokio's blocking threads, but
//! only while holding one of a fixed number of permits (HEIST_FS_POOL_THREADS), and each session
//! may hold only a few of them at once (HEIST_FS_POOL_PER_SESSION), so one session cannot take
//! the pool from the others. The caller waits at most until its deadline (the call is dropped
//! then) or HEIST_FS_OP_TIMEOUT_S, whichever comes first; an operation still stuck keeps its
//! permit until it returns, so stuck work is bounded by the pool size. A worker whose permits
//! are all taken says so in its heartbeat and the coordinator places no new sessions on it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::Semaphore;

use crate::Error;

/// Sizes and timeout of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// Filesystem operations running at once on the worker (HEIST_FS_POOL_THREADS).
    pub threads: usize,
    /// Of those, how many one session may run at once (HEIST_FS_POOL_PER_SESSION).
    pub per_session: usize,
    /// Longest wait for one operation when the call has no earlier deadline
    /// (HEIST_FS_OP_TIMEOUT_S).
    pub op_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            threads: 16,
            per_session: 4,
            op_timeout: Duration::from_secs(30),
        }
    }
}

impl PoolLimits {
    /// Checks the limits; the error names the setting to fix.
    pub fn validate(&self) -> Result<(), Error> {
        if self.threads == 0 || self.per_session == 0 || self.op_timeout.is_zero() {
            return Err(Error::Config(
                "HEIST_FS_POOL_THREADS, HEIST_FS_POOL_PER_SESSION and HEIST_FS_OP_TIMEOUT_S must \
                 be above 0"
                    .to_owned(),
            ));
        }
        if self.per_session > self.threads {
            return Err(Error::Config(
                "HEIST_FS_POOL_PER_SESSION must be at most HEIST_FS_POOL_THREADS".to_owned(),
            ));
        }
        Ok(())
    }
}

/// The worker's filesystem pool.
#[derive(Debug)]
pub struct FsPool {
    limits: PoolLimits,
    permits: Arc<Semaphore>,
    /// Operations each session has running (entries removed at zero).
    running: Mutex<HashMap<String, usize>>,
}

impl FsPool {
    /// A pool with `limits` (already validated).
    pub fn new(limits: PoolLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            permits: Arc::new(Semaphore::new(limits.threads)),
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Whether every permit is taken right now (reported in the heartbeat).
    pub fn saturated(&self) -> bool {
        self.permits.available_permits() == 0
    }

    /// Runs `work` for `session` on the pool; see the module docs for the bounds.
    pub async fn run<T, F>(self: &Arc<Self>, session: &str, work: F) -> Result<T, Error>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let share = self.take_share(session)?;
        let timeout = self.limits.op_timeout;
        let permit = tokio::time::timeout(timeout, Arc::clone(&self.permits).acquire_owned())
            .await
            .map_err(|_| busy(self.limits.threads))?
            .map_err(|_| Error::Stopped)?;
        let task = tokio::task::spawn_blocking(move || {
            // Both are released when the work returns, even after the caller gave up.
            let _permit = permit;
            let _share = share;
            work()
        });
        match tokio::time::timeout(timeout, task).await {
            Ok(done) => done.map_err(|e| Error::Internal(format!("filesystem task failed: {e}"))),
            Err(_) => Err(Error::LimitExceeded {
                limit: "fs_op_timeout_s",
                message: format!(
                    "the filesystem operation did not finish within {} s (HEIST_FS_OP_TIMEOUT_S); \
                     the workspace's file system may be hung",
                    timeout.as_secs()
                ),
            }),
        }
    }

    fn take_share(self: &Arc<Self>, session: &str) -> Result<Share, Error> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let n = running.entry(session.to_owned()).or_insert(0);
        if *n >= self.limits.per_session {
            return Err(Error::LimitExceeded {
                limit: "fs_pool_per_session",
                message: format!(
                    "the session already has {} filesystem operations running \
                     (HEIST_FS_POOL_PER_SESSION): wait for them to finish",
                    self.limits.per_session
                ),
            });
        }
        *n += 1;
        Ok(Share {
            pool: Arc::clone(self),
            session: session.to_owned(),
        })
    }
}

fn busy(threads: usize) -> Error {
    Error::LimitExceeded {
        limit: "fs_pool_threads",
        message: format!(
            "all {threads} filesystem threads of this worker are busy (HEIST_FS_POOL_THREADS): \
             try again shortly"
        ),
    }
}

/// One running operation of a session, released on drop.
struct Share {
    pool: Arc<FsPool>,
    session: String,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut running = self
            .pool
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = running.get_mut(&self.session) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn pool(threads: usize, per_session: usize) -> Arc<FsPool> {
        FsPool::new(PoolLimits {
            threads,
            per_session,
            op_timeout: Duration::from_secs(30),
        })
    }

    #[tokio::test]
    async fn a_session_gets_its_share_and_stuck_work_saturates_the_pool() {
        let pool = pool(2, 1);
        let (release_a, stuck_a) = mpsc::channel::<()>();
        let (release_b, stuck_b) = mpsc::channel::<()>();
        let a = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.run("a", move || stuck_a.recv().is_ok()).await }
        });
        // Wait (with a deadline) until a's work holds its permit.
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while pool.permits.available_permits() != 1 {
            assert!(tokio::time::Instant::now() < until, "a never started");
            tokio::task::yield_now().await;
        }
        let err = pool.run("a", || ()).await.expect_err("over a's share");
        assert!(
            err.to_string().contains("HEIST_FS_POOL_PER_SESSION"),
            "{err}"
        );
        assert!(!pool.saturated());
        let b = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.run("b", move || stuck_b.recv().is_ok()).await }
        });
        while !pool.saturated() {
            assert!(tokio::time::Instant::now() < until, "b never started");
            tokio::task::yield_now().await;
        }
        release_a.send(()).expect("release a");
        release_b.send(()).expect("release b");
        assert!(a.await.expect("a").expect("a ran"));
        assert!(b.await.expect("b").expect("b ran"));
        assert!(!pool.saturated());
        assert!(
            pool.running.lock().expect("lock").is_empty(),
            "shares released"
        );
    }

    #[test]
    fn limits_are_checked() {
        PoolLimits::default().validate().expect("defaults");
        let bad = PoolLimits {
            per_session: 20,
            ..PoolLimits::default()
        };
        let err = bad
            .validate()
            .expect_err("per session above threads")
            .to_string();
        assert!(err.contains("HEIST_FS_POOL_PER_SESSION"), "{err}");
    }
}
