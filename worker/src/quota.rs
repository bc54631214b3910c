//! Per-session quotas: the limits every session gets ([`Quotas`]) and what a workspace uses
//! right now ([`Usage`], measured by walking it and cached in [`UsageCache`]).
//!
//! Disk and file-count quotas are enforced in three places: `fs.write` checks before it writes;
//! a sandboxed command gets RLIMIT_FSIZE set to the bytes left (so no single file can overshoot)
//! and is polled while it runs (the walk plus, where the command has a cgroup, the files its
//! processes hold open after unlinking them: [`unlinked_open_bytes`]); and the workspace is
//! measured again when it ends. Polling is not a hard limit: parallel writers can overshoot by
//! what they write in one poll interval (HEIST_QUOTA_POLL_MS). A session that
//! ends up over its quota keeps its files (nothing is deleted behind the caller's back) but
//! cannot grow until files are deleted: writes are refused and commands get RLIMIT_FSIZE 0.

use std::{
    io,
    path::Path,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use crate::Error;

/// Limits every session (and every command in it) observes. Each has a flag and an
/// environment variable (see `main.rs`); the defaults are in [`Quotas::default`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Bytes of file content a workspace may hold (HEIST_QUOTA_DISK_BYTES). Default 1 GiB.
    pub disk_bytes: u64,
    /// Files, directories and symlinks a workspace may hold (HEIST_QUOTA_FILES). Default 100000.
    pub files: u64,
    /// Processes (and threads) one command may have at once, RLIMIT_NPROC in the command's own
    /// user namespace (HEIST_QUOTA_PROCESSES). Default 256.
    pub processes: u64,
    /// CPU seconds each process of a command may use, RLIMIT_CPU (HEIST_QUOTA_CPU_SECONDS).
    /// Default 60.
    pub cpu_seconds: u64,
    /// Address space of each process of a command, RLIMIT_AS (HEIST_QUOTA_MEMORY_BYTES).
    /// Default 4 GiB.
    pub memory_bytes: u64,
    /// Open files per process, RLIMIT_NOFILE (HEIST_QUOTA_OPEN_FILES). Default 1024.
    pub open_files: u64,
    /// Bytes of stdout and of stderr kept per command; the rest is dropped and the result says
    /// it was truncated (HEIST_QUOTA_OUTPUT_BYTES). Default 1 MiB each.
    pub output_bytes: u64,
    /// Bytes of argv plus environment a command may be given (HEIST_QUOTA_ARGV_BYTES).
    /// Default 256 KiB.
    pub argv_bytes: u64,
    /// Bytes of stdin a command may be given (HEIST_QUOTA_STDIN_BYTES). Default 1 MiB.
    pub stdin_bytes: u64,
    /// Wall-clock timeout of a command that does not ask for one (HEIST_EXEC_TIMEOUT_S).
    /// Default 30 s.
    pub default_timeout: Duration,
    /// Longest wall-clock timeout a command may ask for (HEIST_QUOTA_TIMEOUT_MAX_S).
    /// Default 300 s (the coordinator's default cap on forwarded deadlines).
    pub max_timeout: Duration,
    /// Commands one session may run at once (HEIST_QUOTA_CONCURRENT_COMMANDS). Default 4.
    pub concurrent_commands: u32,
    /// Memory (resident + page cache, no swap) all of a session's commands may use together,
    /// the hard limit of its cgroup (HEIST_QUOTA_SESSION_MEMORY_BYTES). Default 2 GiB.
    pub session_memory_bytes: u64,
    /// Memory one command (all its processes) may use, the hard limit of its cgroup
    /// (HEIST_QUOTA_COMMAND_MEMORY_BYTES). Default 1 GiB.
    pub command_memory_bytes: u64,
    /// Processes and threads all of a session's commands may have at once, `pids.max` of its
    /// cgroup (HEIST_QUOTA_SESSION_PROCESSES). Default 512. Each command's cgroup gets
    /// [`Quotas::processes`].
    pub session_processes: u64,
    /// CPU a session's commands may use together, in percent of one core, the CFS quota of its
    /// cgroup (HEIST_QUOTA_SESSION_CPU_PERCENT). Default 100 (one core).
    pub session_cpu_percent: u64,
    /// Relative CPU weight of each command's cgroup, 1-10000 (HEIST_QUOTA_CPU_WEIGHT).
    /// Default 100 (the kernel's default share).
    pub cpu_weight: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            disk_bytes: 1 << 30,
            files: 100_000,
            processes: 256,
            cpu_seconds: 60,
            memory_bytes: 4 << 30,
            open_files: 1024,
            output_bytes: 1 << 20,
            argv_bytes: 256 << 10,
            stdin_bytes: 1 << 20,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            concurrent_commands: 4,
            session_memory_bytes: 2 << 30,
            command_memory_bytes: 1 << 30,
            session_processes: 512,
            session_cpu_percent: 100,
            cpu_weight: 100,
        }
    }
}

impl Quotas {
    /// Checks the quotas; the error names the setting to fix.
    pub fn validate(&self, max_message_bytes: usize) -> Result<(), Error> {
        let zero = [
            ("HEIST_QUOTA_DISK_BYTES", self.disk_bytes),
            ("HEIST_QUOTA_FILES", self.files),
            ("HEIST_QUOTA_PROCESSES", self.processes),
            ("HEIST_QUOTA_CPU_SECONDS", self.cpu_seconds),
            ("HEIST_QUOTA_MEMORY_BYTES", self.memory_bytes),
            ("HEIST_QUOTA_OPEN_FILES", self.open_files),
            ("HEIST_QUOTA_OUTPUT_BYTES", self.output_bytes),
            ("HEIST_QUOTA_ARGV_BYTES", self.argv_bytes),
            (
                "HEIST_QUOTA_CONCURRENT_COMMANDS",
                u64::from(self.concurrent_commands),
            ),
            (
                "HEIST_QUOTA_SESSION_MEMORY_BYTES",
                self.session_memory_bytes,
            ),
            (
                "HEIST_QUOTA_COMMAND_MEMORY_BYTES",
                self.command_memory_bytes,
            ),
            ("HEIST_QUOTA_SESSION_PROCESSES", self.session_processes),
            ("HEIST_QUOTA_SESSION_CPU_PERCENT", self.session_cpu_percent),
            ("HEIST_QUOTA_CPU_WEIGHT", self.cpu_weight),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Config(format!("{name} must be above 0")));
        }
        if self.default_timeout.is_zero() || self.default_timeout > self.max_timeout {
            return Err(Error::Config(
                "HEIST_EXEC_TIMEOUT_S must be above 0 and at most HEIST_QUOTA_TIMEOUT_MAX_S"
                    .to_owned(),
            ));
        }
        if self.cpu_weight > 10_000 {
            return Err(Error::Config(
                "HEIST_QUOTA_CPU_WEIGHT must be between 1 and 10000".to_owned(),
            ));
        }
        // A cgroup below a few MiB cannot even start the sandbox helper.
        let min_memory = 8 << 20;
        if self.session_memory_bytes < min_memory || self.command_memory_bytes < min_memory {
            return Err(Error::Config(format!(
                "HEIST_QUOTA_SESSION_MEMORY_BYTES and HEIST_QUOTA_COMMAND_MEMORY_BYTES must be at \
                 least {min_memory} bytes (8 MiB)"
            )));
        }
        // stdout and stderr travel twice in a result (text blocks and structured content).
        let result_bytes = self.output_bytes.saturating_mul(4).saturating_add(64 << 10);
        if result_bytes > max_message_bytes as u64 {
            return Err(Error::Config(format!(
                "HEIST_QUOTA_OUTPUT_BYTES ({}) is too large for HEIST_MAX_MESSAGE_BYTES ({max_message_bytes}): \
                 a result carries stdout and stderr twice, so keep it under a quarter of the message size",
                self.output_bytes
            )));
        }
        Ok(())
    }
}

/// What a workspace holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of regular-file content (apparent size) and symlink targets.
    pub bytes: u64,
    /// Entries: files, directories, symlinks and anything else (the root itself not counted).
    pub files: u64,
}

/// Walks `root` (never following symlinks) and adds up what it holds. The walk stops early,
/// returning what it counted so far, once `stop_after_files` entries have been seen: that is
/// already over any quota that matters.
pub fn measure(root: &Path, stop_after_files: u64) -> io::Result<Usage> {
    let mut usage = Usage::default();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed while we walked (a command deleting files): nothing to count.
            Err(err) if err.kind() == io::ErrorKind::NotFound && dir != root => continue,
            Err(err) => return Err(err),
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            usage.files += 1;
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                usage.bytes = usage.bytes.saturating_add(meta.len());
            }
            if usage.files >= stop_after_files {
                return Ok(usage);
            }
        }
    }
    Ok(usage)
}

/// Bytes of the regular files that the processes listed in `procs` (a cgroup's `cgroup.procs`)
/// hold open after they were unlinked, on the file system of `root`: space a command uses that
/// no walk of the workspace sees. Each file counts once however many descriptors point at it.
/// Processes that exit meanwhile are skipped.
pub fn unlinked_open_bytes(procs: &Path, root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(device) = std::fs::metadata(root).map(|m| m.dev()) else {
        return 0;
    };
    let pids = std::fs::read_to_string(procs).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let mut bytes: u64 = 0;
    for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // stat through the magic link reaches the open file, even an unlinked one.
            let Ok(meta) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if meta.is_file()
                && meta.nlink() == 0
                && meta.dev() == device
                && seen.insert(meta.ino())
            {
                bytes = bytes.saturating_add(meta.len());
            }
        }
    }
    bytes
}

/// The last measured usage of one workspace, kept up to date by the writers that know their
/// delta (fs.write) and refreshed by a walk after every command. Anything that changes the
/// workspace in bulk (a checkpoint restore) calls [`UsageCache::invalidate`].
#[derive(Debug, Default)]
pub struct UsageCache {
    known: Mutex<Option<Usage>>,
}

impl UsageCache {
    /// Locks the cache; hold the guard across a check and the write it allows so two writers
    /// cannot both spend the same remaining bytes.
    pub fn lock(&self) -> UsageGuard<'_> {
        UsageGuard(self.known.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Forgets the cached usage: the next check walks the workspace.
    pub fn invalidate(&self) {
        *self.lock().0 = None;
    }

    /// Replaces the cached usage with a fresh measurement.
    pub fn set(&self, usage: Usage) {
        *self.lock().0 = Some(usage);
    }
}

/// A locked [`UsageCache`].
pub struct UsageGuard<'a>(MutexGuard<'a, Option<Usage>>);

impl UsageGuard<'_> {
    /// The usage of the workspace at `root`: cached, or measured now (blocking).
    pub fn current(&mut self, root: &Path, quotas: &Quotas) -> io::Result<Usage> {
        if let Some(usage) = *self.0 {
            return Ok(usage);
        }
        let usage = measure(root, quotas.files.saturating_add(1))?;
        *self.0 = Some(usage);
        Ok(usage)
    }

    /// Records a change whose size is known.
    pub fn adjust(&mut self, bytes: i64, files: i64) {
        if let Some(usage) = self.0.as_mut() {
            usage.bytes = usage.bytes.saturating_add_signed(bytes);
            usage.files = usage.files.saturating_add_signed(files);
        }
    }
}

/// RESOURCE_EXHAUSTED naming the quota, for a change that would take a workspace over it.
pub fn exceeded(quota: &'static str, used: u64, limit: u64, what: &str) -> Error {
    let (unit, setting) = match quota {
        "disk_bytes" => ("bytes", "HEIST_QUOTA_DISK_BYTES"),
        _ => ("entries", "HEIST_QUOTA_FILES"),
    };
    Error::LimitExceeded {
        limit: quota,
        message: format!(
            "{what} would take the session's workspace to {used} {unit}, over its quota of \
             {limit} {unit} ({setting}); delete files to make room"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_files_dirs_and_symlinks_without_following_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        std::fs::write(root.join("a"), vec![0u8; 1000]).expect("a");
        std::fs::create_dir_all(root.join("d/e")).expect("dirs");
        std::fs::write(root.join("d/e/b"), b"12345").expect("b");
        std::os::unix::fs::symlink("/usr", root.join("link")).expect("symlink");
        let usage = measure(root, u64::MAX).expect("measure");
        assert_eq!(usage.files, 5, "a, d, d/e, d/e/b, link");
        assert!(
            usage.bytes >= 1005 && usage.bytes < 1005 + 16,
            "{}",
            usage.bytes
        );
        let partial = measure(root, 2).expect("measure");
        assert_eq!(partial.files, 2);
    }

    #[test]
    fn cache_measures_once_then_follows_adjustments() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("a"), b"abc").expect("a");
        let cache = UsageCache::default();
        let quotas = Quotas::default();
        let first = cache.lock().current(tmp.path(), &quotas).expect("usage");
        assert_eq!(first, Usage { bytes: 3, files: 1 });
        std::fs::write(tmp.path().join("b"), b"xy").expect("b");
        assert_eq!(
            cache.lock().current(tmp.path(), &quotas).expect("usage"),
            first,
            "cached"
        );
        cache.lock().adjust(2, 1);
        assert_eq!(
            cache.lock().current(tmp.path(), &quotas).expect("usage"),
            Usage { bytes: 5, files: 2 }
        );
        cache.invalidate();
        std::fs::remove_file(tmp.path().join("a")).expect("rm");
        assert_eq!(
            cache.lock().current(tmp.path(), &quotas).expect("usage"),
            Usage { bytes: 2, files: 1 }
        );
    }

    #[test]
    fn unlinked_open_files_of_listed_processes_count() {
        use std::io::Write as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("ghost");
        let mut ghost = std::fs::File::create(&path).expect("create");
        ghost.write_all(&[7u8; 5000]).expect("write");
        std::fs::remove_file(&path).expect("unlink");
        let kept = tmp.path().join("kept");
        std::fs::write(&kept, b"visible").expect("kept");
        let _open = std::fs::File::open(&kept).expect("open kept");
        let procs = tmp.path().join("procs");
        std::fs::write(&procs, format!("{}\n", std::process::id())).expect("procs");
        assert_eq!(
            unlinked_open_bytes(&procs, tmp.path()),
            5000,
            "the unlinked file counts, the linked one is found by the walk instead"
        );
        drop(ghost);
        assert_eq!(unlinked_open_bytes(&procs, tmp.path()), 0);
    }

    #[test]
    fn validate_names_the_setting() {
        let q = Quotas {
            processes: 0,
            ..Quotas::default()
        };
        let err = q.validate(16 << 20).expect_err("zero").to_string();
        assert!(err.contains("HEIST_QUOTA_PROCESSES"), "{err}");
        let q = Quotas {
            output_bytes: 8 << 20,
            ..Quotas::default()
        };
        let err = q.validate(16 << 20).expect_err("too big").to_string();
        assert!(err.contains("HEIST_QUOTA_OUTPUT_BYTES"), "{err}");
        Quotas::default().validate(16 << 20).expect("defaults");
    }
}
