//! A free-space reserve in front of a store: mutations are refused *before* anything is applied
//! while the store's file system has less free space than the reserve, or while its last write
//! failed, and they resume by themselves once space is back and a probe write succeeds.
//!
//! [`Reserve::check`] is the hot-path test (one `statvfs`); [`Reserve::failed`] records a write
//! or flush that failed; [`Reserve::monitor`] is the background loop that notices space coming
//! back (and going away while idle) and probes the store before declaring it writable again.
//! [`Reserve::subscribe`] lets health reporting follow the state.

use std::{
    fmt,
    future::Future,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

/// Whether a store can take writes now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Writability {
    /// Writes go through.
    Writable,
    /// The file system has `free` bytes free, less than the reserve.
    LowSpace {
        /// Free bytes (available to unprivileged users) when last measured.
        free: u64,
    },
    /// A write, a flush, a probe or the free-space query failed (the cause).
    Failed(String),
}

/// Why a mutation was refused: the store, its path and what to do, for the error message.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// Which store ("the coordinator's state store").
    pub what: &'static str,
    /// Its directory.
    pub path: PathBuf,
    /// Free bytes when last measured.
    pub free_bytes: u64,
    /// The reserve, in bytes.
    pub min_free_bytes: u64,
    /// The state that refused it (never [`Writability::Writable`]).
    pub state: Writability,
    /// Bytes the refused write needed on top of the reserve (0: the reserve alone refused).
    pub needed: u64,
    /// The setting that sets the reserve.
    pub setting: &'static str,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.state {
            Writability::LowSpace { free } if self.needed > 0 => write!(
                f,
                "{} at {path} has {} free, not enough for {} more above the reserve of {} ({}); \
                 nothing was applied: free space on that file system and retry",
                self.what,
                human(*free),
                human(self.needed),
                human(self.min_free_bytes),
                self.setting,
            ),
            Writability::LowSpace { free } => write!(
                f,
                "{} at {path} is out of space: {} free, below the reserve of {} ({}); nothing \
                 was applied: free space on that file system and retry (writes resume by \
                 themselves)",
                self.what,
                human(*free),
                human(self.min_free_bytes),
                self.setting,
            ),
            Writability::Failed(why) => write!(
                f,
                "{} at {path} cannot be written ({why}); nothing was applied: free space on \
                 that file system (or repair it) and retry (writes resume once a test write \
                 succeeds)",
                self.what,
            ),
            Writability::Writable => write!(f, "{} at {path} is writable", self.what),
        }
    }
}

impl Refusal {
    /// RESOURCE_EXHAUSTED with the STORE_FULL reason: the same call succeeds once space is
    /// freed.
    pub fn status(&self) -> tonic::Status {
        let path = self.path.display().to_string();
        let (free, min) = (self.free_bytes.to_string(), self.min_free_bytes.to_string());
        crate::errors::status(
            tonic::Code::ResourceExhausted,
            self.to_string(),
            crate::errors::reason::STORE_FULL,
            &[
                ("store", self.what),
                ("path", &path),
                ("free_bytes", &free),
                ("min_free_bytes", &min),
            ],
        )
    }
}

/// `bytes` for people: `12.0 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Bytes an unprivileged process can still write on the file system holding `path`
/// (`statvfs`: available blocks times the fragment size).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let (blocks, size) = (u64::from(stat.blocks_available()), stat.fragment_size());
    Ok(blocks.saturating_mul(size))
}

/// The reserve of one store. Cloning is cheap and shares the state.
#[derive(Clone)]
pub struct Reserve {
    inner: Arc<Inner>,
}

struct Inner {
    what: &'static str,
    setting: &'static str,
    path: PathBuf,
    min_free: u64,
    free: AtomicU64,
    state: watch::Sender<Writability>,
}

impl Reserve {
    /// A reserve of `min_free` bytes for the store `what` at `path`; `setting` names the knob
    /// in messages. Starts writable; the first [`Reserve::check`] measures.
    pub fn new(what: &'static str, setting: &'static str, path: &Path, min_free: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                what,
                setting,
                path: path.to_path_buf(),
                min_free,
                free: AtomicU64::new(u64::MAX),
                state: watch::Sender::new(Writability::Writable),
            }),
        }
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The reserve, in bytes.
    pub fn min_free(&self) -> u64 {
        self.inner.min_free
    }

    /// Free bytes when last measured (`u64::MAX` before the first measurement).
    pub fn last_free(&self) -> u64 {
        self.inner.free.load(Ordering::Relaxed)
    }

    /// The state now.
    pub fn state(&self) -> Writability {
        self.inner.state.borrow().clone()
    }

    /// Whether writes go through now (as last established).
    pub fn is_writable(&self) -> bool {
        *self.inner.state.borrow() == Writability::Writable
    }

    /// Follows the state (for health reporting).
    pub fn subscribe(&self) -> watch::Receiver<Writability> {
        self.inner.state.subscribe()
    }

    /// Before a mutation: measures the free space now and refuses when it is below the
    /// reserve, or when the store is still marked failed (until [`Reserve::monitor`]'s probe
    /// succeeds). Space that came back does not clear a refusal here: the monitor does that
    /// after a probe write, within one period.
    pub fn check(&self) -> Result<(), Refusal> {
        match free_bytes(&self.inner.path) {
            Ok(free) => {
                self.inner.free.store(free, Ordering::Relaxed);
                if free < self.inner.min_free {
                    self.set(Writability::LowSpace { free });
                }
            }
            Err(err) => self.set(Writability::Failed(format!(
                "cannot read the free space: {err}"
            ))),
        }
        self.refusal().map_or(Ok(()), Err)
    }

    /// The refusal for the current state, if it is not writable.
    pub fn refusal(&self) -> Option<Refusal> {
        let state = self.state();
        (state != Writability::Writable).then(|| Refusal {
            what: self.inner.what,
            path: self.inner.path.clone(),
            free_bytes: self.last_free(),
            min_free_bytes: self.inner.min_free,
            state,
            setting: self.inner.setting,
            needed: 0,
        })
    }

    /// Before writing `bytes` more (a blob): [`Reserve::check`], then refused when those bytes
    /// would eat into the reserve. The store's state is left as it is: one large write that
    /// does not fit does not make the store unwritable for small ones.
    pub fn check_room(&self, bytes: u64) -> Result<(), Refusal> {
        self.check()?;
        let free = self.last_free();
        if free >= self.inner.min_free.saturating_add(bytes) {
            return Ok(());
        }
        Err(Refusal {
            what: self.inner.what,
            path: self.inner.path.clone(),
            free_bytes: free,
            min_free_bytes: self.inner.min_free,
            state: Writability::LowSpace { free },
            setting: self.inner.setting,
            needed: bytes,
        })
    }

    /// Records that a write or flush of the store failed: mutations are refused until the
    /// monitor's probe succeeds.
    pub fn failed(&self, why: impl fmt::Display) {
        self.set(Writability::Failed(why.to_string()));
    }

    fn set(&self, next: Writability) {
        let changed = self.inner.state.send_if_modified(|state| {
            // A low-space reading does not hide a failure (the failure needs a probe).
            let keep_failure = matches!(state, Writability::Failed(_))
                && matches!(next, Writability::LowSpace { .. });
            if *state == next || keep_failure {
                return false;
            }
            let was_writable = *state == Writability::Writable;
            *state = next.clone();
            was_writable || next == Writability::Writable
        });
        if !changed {
            return;
        }
        let (what, path) = (self.inner.what, self.inner.path.display());
        match &next {
            Writability::Writable => info!(store = what, path = %path, "store writable again"),
            Writability::LowSpace { free } => warn!(
                store = what,
                path = %path,
                free_bytes = free,
                min_free_bytes = self.inner.min_free,
                "store below its free-space reserve: refusing mutations"
            ),
            Writability::Failed(why) => warn!(
                store = what,
                path = %path,
                error = %why,
                "store write failed: refusing mutations"
            ),
        }
    }

    /// One round of the monitor: measure; below the reserve, mark it; otherwise, when not
    /// writable, run `probe` (a real write and flush of the store) and mark it writable when
    /// that succeeds.
    pub async fn tick<F, Fut>(&self, probe: &mut F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        match free_bytes(&self.inner.path) {
            Ok(free) => {
                self.inner.free.store(free, Ordering::Relaxed);
                if free < self.inner.min_free {
                    self.set(Writability::LowSpace { free });
                    return;
                }
            }
            Err(err) => {
                self.set(Writability::Failed(format!(
                    "cannot read the free space: {err}"
                )));
                return;
            }
        }
        if self.is_writable() {
            return;
        }
        match probe().await {
            Ok(()) => {
                // Another write may have failed meanwhile; a success after it still shows the
                // store takes writes.
                self.inner.state.send_replace(Writability::Writable);
                info!(
                    store = self.inner.what,
                    path = %self.inner.path.display(),
                    "store writable again"
                );
            }
            Err(why) => self.set(Writability::Failed(format!("a test write failed: {why}"))),
        }
    }

    /// Runs [`Reserve::tick`] every `period` until `stop` resolves.
    pub async fn monitor<F, Fut>(
        &self,
        period: Duration,
        mut probe: F,
        stop: impl Future<Output = ()>,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            self.tick(&mut probe).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_measured_and_a_missing_path_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let free = free_bytes(dir.path()).expect("statvfs");
        assert!(free > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_reserve_larger_than_the_free_space_refuses_with_the_path_and_the_setting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reserve = Reserve::new(
            "the test store",
            "HEIST_TEST_MIN_FREE",
            dir.path(),
            u64::MAX,
        );
        let refusal = reserve.check().expect_err("refused");
        assert!(matches!(refusal.state, Writability::LowSpace { .. }));
        let message = refusal.to_string();
        assert!(message.contains("the test store"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("HEIST_TEST_MIN_FREE"), "{message}");
        assert!(message.contains("free space"), "{message}");
        assert!(!reserve.is_writable());

        let small = Reserve::new("the test store", "HEIST_TEST_MIN_FREE", dir.path(), 1);
        small.check().expect("writable");
        assert!(small.last_free() > 0 && small.last_free() < u64::MAX);
        small.check_room(1).expect("one byte fits");
        let refusal = small.check_room(u64::MAX - 1).expect_err("does not fit");
        assert!(refusal.to_string().contains("not enough"), "{refusal}");
        assert!(
            small.is_writable(),
            "one large write does not flip the store"
        );
    }

    #[tokio::test]
    async fn a_failed_write_refuses_until_a_probe_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reserve = Reserve::new("the test store", "HEIST_TEST_MIN_FREE", dir.path(), 1);
        let mut states = reserve.subscribe();
        reserve.failed("No space left on device");
        assert!(states.has_changed().expect("open"));
        assert!(states.borrow_and_update().clone() != Writability::Writable);
        let refusal = reserve
            .check()
            .expect_err("still failed: space alone does not clear it");
        assert!(refusal.to_string().contains("No space left on device"));

        let mut failing = || async { Err::<(), _>("still broken".to_owned()) };
        reserve.tick(&mut failing).await;
        assert!(!reserve.is_writable());

        let mut probes = 0;
        let mut working = || {
            probes += 1;
            async { Ok(()) }
        };
        reserve.tick(&mut working).await;
        assert!(reserve.is_writable());
        reserve.check().expect("writable again");
        assert_eq!(states.borrow_and_update().clone(), Writability::Writable);
        // While writable, ticks do not probe.
        reserve.tick(&mut working).await;
        assert_eq!(probes, 1);
    }

    #[tokio::test]
    async fn low_space_is_noticed_by_the_monitor_without_a_mutation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reserve = Reserve::new(
            "the test store",
            "HEIST_TEST_MIN_FREE",
            dir.path(),
            u64::MAX,
        );
        let mut probe = || async { Ok(()) };
        reserve.tick(&mut probe).await;
        assert!(matches!(reserve.state(), Writability::LowSpace { .. }));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(64 << 20), "64.0 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
