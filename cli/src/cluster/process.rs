//! One child process of a local cluster: spawned in its own process group with its output in a
//! log file, stopped with SIGTERM (then SIGKILL), and described by the tail of its log.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
};

use nix::{sys::signal, unistd::Pid};
use serde::Serialize;
use tokio::{process::Child, time::Instant};

use crate::error::Error;

/// Lines of a log shown when a process dies.
const LOG_TAIL_LINES: usize = 20;

/// Where a cluster process listens and logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    /// `coordinator` or the worker id (`worker-1`, ...).
    pub name: String,
    /// gRPC URL, e.g. `http://127.0.0.1:50051`.
    pub url: String,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
}

/// The sum of two adjacent clock-tick fields of a `/proc/.../stat` file, in seconds: the
/// `index`th and the next of the fields after the command name (which may hold spaces, inside
/// parentheses; the state is field 0).
pub(crate) fn stat_seconds(path: &str, index: usize) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(index);
    let ticks = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks as f64 / per_second as f64)
}

/// A running child.
#[derive(Debug)]
pub(crate) struct ChildProcess {
    pub(crate) info: ProcessInfo,
    child: Child,
}

impl ChildProcess {
    /// CPU time (user + system) the process has used so far, from `/proc/PID/stat`; `None`
    /// once it has exited or where that file cannot be read.
    pub(crate) fn cpu_seconds(&self) -> Option<f64> {
        // utime and stime: the 12th and 13th fields after the command name.
        stat_seconds(&format!("/proc/{}/stat", self.child.id()?), 11)
    }

    /// Starts `binary` with `env`, output appended to `info.log`. The child gets its own process
    /// group so a terminal Ctrl-C reaches only heistctl, which then stops children in order.
    pub(crate) fn spawn(
        info: ProcessInfo,
        binary: &Path,
        env: &[(String, String)],
    ) -> Result<Self, Error> {
        let log = File::create(&info.log)
            .map_err(|e| Error::io(format!("cannot create {}", info.log.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io(format!("cannot reopen {}", info.log.display()), e))?;
        let child = tokio::process::Command::new(binary)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io(format!("cannot start {}", binary.display()), e))?;
        tracing::debug!(name = %info.name, pid = child.id(), binary = %binary.display(), "started");
        Ok(Self { info, child })
    }

    /// The exit status if the process has exited.
    pub(crate) fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit.
    pub(crate) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// An error describing this process's early exit.
    pub(crate) fn exited_error(&self, status: ExitStatus) -> Error {
        Error::ChildExited {
            name: self.info.name.clone(),
            status,
            log: self.info.log.clone(),
            tail: log_tail(&self.info.log, LOG_TAIL_LINES),
        }
    }

    /// Sends SIGTERM (no-op if it already exited).
    pub(crate) fn terminate(&mut self) {
        if self.try_exited().is_some() {
            return;
        }
        let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) else {
            return;
        };
        if let Err(err) = signal::kill(Pid::from_raw(pid), signal::Signal::SIGTERM) {
            tracing::debug!(name = %self.info.name, %err, "SIGTERM failed");
        }
    }

    /// Waits until `deadline` for the process to exit; returns whether it did.
    pub(crate) async fn wait_until(&mut self, deadline: Instant) -> bool {
        matches!(
            tokio::time::timeout_at(deadline, self.child.wait()).await,
            Ok(Ok(_))
        )
    }

    /// SIGKILL and reap.
    pub(crate) async fn kill(&mut self) {
        if self.try_exited().is_some() {
            return;
        }
        tracing::warn!(name = %self.info.name, "did not stop in time; killing it");
        if let Err(err) = self.child.kill().await {
            tracing::debug!(name = %self.info.name, %err, "SIGKILL failed");
        }
    }
}

/// The last `lines` lines of a log file (or a note saying it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let tail = all[start..].join("\n");
            if tail.is_empty() {
                "  (the log is empty)".to_owned()
            } else {
                tail.lines()
                    .map(|l| format!("  | {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
        Err(e) => format!("  (cannot read the log: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("heistctl-tail-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let log = dir.join("x.log");
        std::fs::write(&log, "a\nb\nc\n").expect("write");
        assert_eq!(log_tail(&log, 2), "  | b\n  | c");
        std::fs::write(&log, "").expect("write");
        assert_eq!(log_tail(&log, 2), "  (the log is empty)");
        assert!(log_tail(&dir.join("missing"), 2).contains("cannot read"));
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[tokio::test]
    async fn an_early_exit_names_the_process_and_shows_its_log() {
        let dir = std::env::temp_dir().join(format!("heistctl-proc-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let info = ProcessInfo {
            name: "sleeper".into(),
            url: String::new(),
            log: dir.join("sleeper.log"),
        };
        let mut child =
            ChildProcess::spawn(info, Path::new("/bin/sleep"), &[]).expect("spawn sleep");
        // `sleep` with no argument exits at once with an error: wait for it, then check the
        // error names the process and carries its log tail.
        let status = child.wait().await.expect("wait");
        assert!(!status.success());
        let err = child.exited_error(status).to_string();
        assert!(err.contains("sleeper exited early"), "{err}");
        child.terminate(); // already exited: a no-op
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
