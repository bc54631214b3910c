//! Phase 3, shared by every backend: follow a running command to its end. Output is kept up to
//! the output quota per stream (the rest is read and dropped, so the command never blocks on a
//! full pipe) and forwarded live; the wall-clock timeout sends SIGTERM, then SIGKILL after the
//! grace; the workspace is measured every poll interval (with the files the command's processes
//! hold open after unlinking them) and once more at the end, and a command that takes it over a
//! disk quota is killed and reported as RESOURCE_EXHAUSTED. Under the file-system quota
//! (`diskfs`) a command that fills its workspace's file system (its writes got ENOSPC) is
//! reported the same way.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::time::{Instant as TokioInstant, MissedTickBehavior, sleep_until};
use tracing::{debug, warn};

use super::{
    Chunk, Event, Execution, ExitInfo, Job, MemoryLimit, OutputSink, Stream,
    admit::{Held, quota_error},
};
use crate::{
    Error, diskfs,
    quota::{self, Quotas, Usage, UsageCache},
};

/// SIGXCPU: a process used up RLIMIT_CPU.
const SIGXCPU: i32 = 24;
/// SIGXFSZ: a process wrote past RLIMIT_FSIZE.
const SIGXFSZ: i32 = 25;
/// SIGKILL.
const SIGKILL: i32 = 9;

/// What collect needs besides the job.
pub struct Watch<'a> {
    /// Live output goes here (streaming calls).
    pub sink: Option<OutputSink>,
    /// Time between SIGTERM and SIGKILL after a timeout.
    pub kill_grace: Duration,
    /// Disk quota polling period.
    pub poll_interval: Duration,
    /// The session quotas.
    pub quotas: &'a Quotas,
    /// Workspace usage before the command.
    pub before: Usage,
    /// The workspace's usage cache (refreshed at the end).
    pub usage: &'a UsageCache,
}

/// One output stream, as kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// The bytes kept (at most the output quota).
    pub data: Vec<u8>,
    /// Whether more was written than kept.
    pub truncated: bool,
    /// Everything the command wrote to the stream.
    pub total: u64,
}

impl Captured {
    /// Keeps what fits under `cap` and returns that part.
    fn push<'d>(&mut self, data: &'d [u8], cap: u64) -> &'d [u8] {
        self.total = self.total.saturating_add(data.len() as u64);
        let room = usize::try_from(cap.saturating_sub(self.data.len() as u64)).unwrap_or(0);
        let kept = &data[..data.len().min(room)];
        if kept.len() < data.len() {
            self.truncated = true;
        }
        self.data.extend_from_slice(kept);
        kept
    }
}

/// How a command ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Finished {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// Whether the wall-clock timeout stopped it.
    pub timed_out: bool,
    /// Wall-clock time from start to end.
    pub duration: Duration,
    /// CPU time, in ms.
    pub cpu_ms: u64,
    /// Standard output.
    pub stdout: Captured,
    /// Standard error.
    pub stderr: Captured,
}

impl Finished {
    /// Whether the command failed: a non-zero exit, a signal, or the timeout.
    pub fn failed(&self) -> bool {
        self.timed_out || self.signal.is_some() || self.exit_code != Some(0)
    }
}

/// Where the stop sequence is.
enum Stopping {
    /// Running normally.
    No,
    /// SIGTERM sent; SIGKILL at this instant.
    Term(TokioInstant),
    /// SIGKILL sent.
    Killed,
}

/// Runs `execution` to its end (see the module docs).
pub async fn collect(
    job: &Job,
    mut execution: Box<dyn Execution>,
    watch: Watch<'_>,
) -> Result<Finished, Error> {
    let started = Instant::now();
    let deadline = TokioInstant::now() + job.timeout;
    let cap = watch.quotas.output_bytes;
    let mut sink = watch.sink;
    let mut stdout = Captured::default();
    let mut stderr = Captured::default();
    let mut timed_out = false;
    let mut over: Option<(&'static str, u64, u64)> = None;
    // Under the file-system quota the kernel refuses writes past it (ENOSPC): a command that
    // filled the file system (which was not full before it) is answered as over its quota.
    // There the kernel bounds the command, so polling only looks for a full file system: the
    // command sees ENOSPC as on any full disk (and may handle it) rather than being killed.
    let own_fs = diskfs::is_mountpoint(&job.root).unwrap_or(false);
    let full_before = own_fs && full(&job.root).await.is_some();
    let mut filled: Option<&'static str> = None;
    let mut stopping = Stopping::No;
    let mut poll = tokio::time::interval_at(
        TokioInstant::now() + watch.poll_interval,
        watch.poll_interval,
    );
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let exit: ExitInfo = loop {
        let kill_at = match stopping {
            Stopping::Term(at) => Some(at),
            _ => None,
        };
        tokio::select! {
            event = execution.next() => match event? {
                Event::Exited(exit) => break exit,
                Event::Output(chunk) => {
                    let captured = match chunk.stream {
                        Stream::Stdout => &mut stdout,
                        Stream::Stderr => &mut stderr,
                    };
                    let kept = captured.push(&chunk.data, cap);
                    if !kept.is_empty() && let Some(out) = &sink {
                        let live = Chunk { stream: chunk.stream, data: kept.to_vec() };
                        // A consumer that stops reading must not hold the command past its
                        // deadline: give up on live output then.
                        let limit = deadline + watch.kill_grace;
                        match tokio::time::timeout_at(limit, out.send(live)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) | Err(_) => sink = None,
                        }
                    }
                }
            },
            () = sleep_until(deadline), if matches!(stopping, Stopping::No) => {
                debug!(session_id = %job.session, "timeout: stopping the command");
                timed_out = true;
                execution.terminate().await;
                stopping = Stopping::Term(TokioInstant::now() + watch.kill_grace);
            }
            () = sleep_until(kill_at.unwrap_or(deadline)), if kill_at.is_some() => {
                execution.kill().await;
                stopping = Stopping::Killed;
            }
            _ = poll.tick(), if over.is_none() && filled.is_none() && !full_before => {
                if own_fs {
                    filled = full(&job.root).await;
                    continue;
                }
                let now = measure(&job.root, watch.quotas, execution.processes()).await?;
                if let Some(hit) = grown_over(now, watch.before, watch.quotas) {
                    debug!(session_id = %job.session, quota = hit.0, "quota exceeded: killing the command");
                    over = Some(hit);
                    execution.kill().await;
                    stopping = Stopping::Killed;
                }
            }
        }
    };
    let duration = started.elapsed();

    // The final measurement: it also refreshes the cache the next command and fs.write use.
    let after = measure(&job.root, watch.quotas, None).await?;
    watch.usage.set(after);
    if own_fs && !full_before {
        if filled.is_none() {
            filled = full(&job.root).await;
        }
        if let Some(quota) = filled {
            return Err(filled_error(quota, watch.quotas));
        }
    }
    let held = if over.is_some() {
        Held::Stopped
    } else if own_fs {
        Held::FileSystem
    } else {
        Held::Measured
    };
    if over.is_none() {
        over = grown_over(after, watch.before, watch.quotas);
    }
    if over.is_none() && exit.signal == Some(SIGXFSZ) {
        over = Some((
            "disk_bytes",
            after.bytes.max(watch.quotas.disk_bytes + 1),
            watch.quotas.disk_bytes,
        ));
    }
    if let Some((quota, used, limit)) = over {
        return Err(quota_error(quota, used, limit, held));
    }
    if let Some(memory) = exit.out_of_memory {
        return Err(out_of_memory(memory));
    }
    // PID 1 of a pid namespace ignores SIGXCPU, so the hard limit's SIGKILL is what ends it.
    let cpu_limit_ms = watch.quotas.cpu_seconds.saturating_mul(1000);
    let out_of_cpu = exit.signal == Some(SIGXCPU)
        || (exit.signal == Some(SIGKILL) && !timed_out && exit.cpu_ms >= cpu_limit_ms);
    if out_of_cpu {
        return Err(Error::LimitExceeded {
            limit: "cpu_seconds",
            message: format!(
                "the command used up its {} CPU seconds (HEIST_QUOTA_CPU_SECONDS) and was stopped",
                watch.quotas.cpu_seconds
            ),
        });
    }
    Ok(Finished {
        exit_code: exit.code,
        signal: exit.signal,
        timed_out,
        duration,
        cpu_ms: exit.cpu_ms,
        stdout,
        stderr,
    })
}

/// RESOURCE_EXHAUSTED for a command that filled its workspace's own file system.
fn filled_error(quota: &'static str, quotas: &Quotas) -> Error {
    let what = match quota {
        "disk_bytes" => format!(
            "its disk quota of {} bytes (HEIST_QUOTA_DISK_BYTES)",
            quotas.disk_bytes
        ),
        _ => format!("its quota of {} files (HEIST_QUOTA_FILES)", quotas.files),
    };
    Error::LimitExceeded {
        limit: quota,
        message: format!(
            "the command filled the session's workspace: {what} is enforced by the file system, \
             and writes past it failed with ENOSPC (No space left on device); what it wrote is \
             still there: delete files to make room"
        ),
    }
}

/// RESOURCE_EXHAUSTED for a command whose processes the kernel killed at a memory limit.
fn out_of_memory(memory: MemoryLimit) -> Error {
    let (whose, setting) = match memory.quota {
        "session_memory_bytes" => (
            "the session's commands together reached",
            "HEIST_QUOTA_SESSION_MEMORY_BYTES",
        ),
        _ => ("the command reached", "HEIST_QUOTA_COMMAND_MEMORY_BYTES"),
    };
    Error::LimitExceeded {
        limit: memory.quota,
        message: format!(
            "out of memory: {whose} the {}-byte memory limit ({setting}) and the kernel killed \
             a process of the command; use less memory (fewer or smaller processes) or ask the \
             operator for a larger limit",
            memory.bytes
        ),
    }
}

/// The quota `now` is over that the command is to blame for: only growth counts, so a command
/// may run (and delete files) in a workspace that was already over a quota.
fn grown_over(now: Usage, before: Usage, quotas: &Quotas) -> Option<(&'static str, u64, u64)> {
    if now.bytes > quotas.disk_bytes && now.bytes > before.bytes {
        Some(("disk_bytes", now.bytes, quotas.disk_bytes))
    } else if now.files > quotas.files && now.files > before.files {
        Some(("files", now.files, quotas.files))
    } else {
        None
    }
}

/// `diskfs::full` off the async threads (it may write the file system out to see what is left).
async fn full(root: &Path) -> Option<&'static str> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || diskfs::full(&root))
        .await
        .unwrap_or(None)
}

/// Measures the workspace (stopping once it is clearly over the file quota).
/// With `processes` (the command's `cgroup.procs`), the files its processes hold open after
/// unlinking them count too: they take disk space no directory walk can see.
async fn measure(root: &Path, quotas: &Quotas, processes: Option<PathBuf>) -> Result<Usage, Error> {
    let root: Arc<Path> = Arc::from(root);
    let stop = quotas.files.saturating_add(1);
    tokio::task::spawn_blocking(move || {
        let mut usage = quota::measure(&root, stop)?;
        if let Some(procs) = processes {
            usage.bytes = usage
                .bytes
                .saturating_add(quota::unlinked_open_bytes(&procs, &root));
        }
        Ok(usage)
    })
    .await
    .map_err(|e| Error::Internal(format!("usage task failed: {e}")))?
    .map_err(|e| {
        warn!(error = %e, "cannot measure the workspace");
        Error::io("cannot measure the workspace", e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_growth_past_a_quota_is_the_commands_fault() {
        let quotas = Quotas {
            disk_bytes: 100,
            files: 10,
            ..Quotas::default()
        };
        let usage = |bytes, files| Usage { bytes, files };
        assert_eq!(grown_over(usage(50, 5), usage(0, 0), &quotas), None);
        assert_eq!(
            grown_over(usage(101, 5), usage(0, 0), &quotas),
            Some(("disk_bytes", 101, 100))
        );
        assert_eq!(
            grown_over(usage(150, 11), usage(200, 5), &quotas),
            Some(("files", 11, 10)),
            "shrinking bytes but adding entries"
        );
        assert_eq!(grown_over(usage(150, 5), usage(200, 5), &quotas), None);
    }

    #[test]
    fn capture_keeps_up_to_the_cap_and_counts_the_rest() {
        let mut c = Captured::default();
        assert_eq!(c.push(b"hello", 8), b"hello");
        assert_eq!(c.push(b"world", 8), b"wor");
        assert_eq!(c.push(b"more", 8), b"");
        assert_eq!(c.data, b"hellowor");
        assert!(c.truncated);
        assert_eq!(c.total, 14);
        let mut c = Captured::default();
        assert_eq!(c.push(b"abc", 3), b"abc");
        assert!(!c.truncated);
    }

    #[test]
    fn failure_covers_exit_codes_signals_and_timeouts() {
        let ok = Finished {
            exit_code: Some(0),
            ..Finished::default()
        };
        assert!(!ok.failed());
        assert!(
            Finished {
                exit_code: Some(1),
                ..Finished::default()
            }
            .failed()
        );
        assert!(
            Finished {
                signal: Some(9),
                ..Finished::default()
            }
            .failed()
        );
        assert!(
            Finished {
                exit_code: Some(0),
                timed_out: true,
                ..Finished::default()
            }
            .failed()
        );
    }
}
