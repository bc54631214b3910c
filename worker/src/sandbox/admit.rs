//! Admission: a tool's [`Request`] checked against the session's quotas (argv, stdin,
//! timeout, concurrent commands) and turned into a [`Job`] with its limits (RLIMIT_FSIZE from
//! the disk quota left) and its environment.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use super::{Settings, env};
use crate::{
    Error,
    quota::{Quotas, Usage},
    sessions::Workspace,
};

/// A command, as a tool asks for it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory (absolute, inside the workspace; `None`: the workspace root).
    pub cwd: Option<PathBuf>,
    /// Extra environment entries (already validated with [`validate_env`]).
    pub env: Vec<(String, String)>,
    /// Standard input.
    pub stdin: Vec<u8>,
    /// Wall-clock timeout (`None`: the default).
    pub timeout: Option<Duration>,
    /// Extra paths the command may read (e.g. the file holding run.python's code).
    pub read_only: Vec<PathBuf>,
}

/// Limits computed for one command from the session's quotas and current usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandLimits {
    /// Largest file the command may write (the disk quota left, plus one byte so that
    /// reaching the quota shows as going over it).
    pub file_size: u64,
    /// Processes.
    pub processes: u64,
    /// CPU seconds per process.
    pub cpu_seconds: u64,
    /// Address space per process.
    pub memory_bytes: u64,
    /// Open files per process.
    pub open_files: u64,
    /// Niceness (0-19).
    pub nice: i32,
}

/// One command on its way through a backend.
#[derive(Clone, Debug)]
pub struct Job {
    /// Session id (for logs, and per-session backends).
    pub session: String,
    /// The workspace directory (absolute).
    pub root: PathBuf,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Absolute working directory.
    pub cwd: PathBuf,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Standard input.
    pub stdin: Vec<u8>,
    /// Wall-clock timeout.
    pub timeout: Duration,
    /// Extra read-only paths.
    pub read_only: Vec<PathBuf>,
    /// rlimits.
    pub limits: CommandLimits,
}

/// Validates a request against the quotas and turns it into a job (`usage`: the
/// workspace's now; `python_bin`: put first on PATH).
pub(super) fn admit(
    settings: &Settings,
    python_bin: Option<&Path>,
    workspace: &Workspace,
    request: Request,
    usage: Usage,
) -> Result<Job, Error> {
    let quotas = &settings.quotas;
    if request.argv.is_empty() {
        return Err(Error::InvalidArgument {
            field: "argv".to_owned(),
            message: "argv must name a program, e.g. [\"ls\", \"-la\"]".to_owned(),
        });
    }
    if let Some(arg) = request.argv.iter().find(|a| a.contains('\0')) {
        return Err(Error::InvalidArgument {
            field: "argv".to_owned(),
            message: format!(
                "argument {:?} contains a NUL byte, which a command line cannot carry",
                arg.escape_debug().to_string()
            ),
        });
    }
    let argv_bytes: u64 = request
        .argv
        .iter()
        .map(|a| a.len() as u64 + 1)
        .chain(
            request
                .env
                .iter()
                .map(|(k, v)| (k.len() + v.len()) as u64 + 2),
        )
        .sum();
    if argv_bytes > quotas.argv_bytes {
        return Err(Error::LimitExceeded {
            limit: "argv_bytes",
            message: format!(
                "the command line and environment take {argv_bytes} bytes, over the {}-byte \
                 quota (HEIST_QUOTA_ARGV_BYTES): pass large data through stdin or a file",
                quotas.argv_bytes
            ),
        });
    }
    if request.stdin.len() as u64 > quotas.stdin_bytes {
        return Err(Error::LimitExceeded {
            limit: "stdin_bytes",
            message: format!(
                "stdin is {} bytes, over the {}-byte quota (HEIST_QUOTA_STDIN_BYTES): write \
                 the data to a file with fs.write and read it from there",
                request.stdin.len(),
                quotas.stdin_bytes
            ),
        });
    }
    let timeout = request.timeout.unwrap_or(quotas.default_timeout);
    if timeout > quotas.max_timeout {
        return Err(Error::LimitExceeded {
            limit: "max_timeout_s",
            message: format!(
                "timeout_s {} is over the {} s this worker allows (HEIST_QUOTA_TIMEOUT_MAX_S)",
                timeout.as_secs_f64(),
                quotas.max_timeout.as_secs()
            ),
        });
    }
    let root = workspace.path().to_path_buf();
    let cwd = request.cwd.unwrap_or_else(|| root.clone());
    let left = quotas.disk_bytes.saturating_sub(usage.bytes);
    let limits = CommandLimits {
        // Over quota already: nothing may grow (a write of even one byte fails).
        file_size: if usage.bytes >= quotas.disk_bytes {
            0
        } else {
            left + 1
        },
        processes: quotas.processes,
        cpu_seconds: quotas.cpu_seconds,
        memory_bytes: quotas.memory_bytes,
        open_files: quotas.open_files,
        nice: settings.nice,
    };
    let env = env::build(&root, &cwd, python_bin, request.env);
    Ok(Job {
        session: workspace.id().to_string(),
        root,
        argv: request.argv,
        cwd,
        env,
        stdin: request.stdin,
        timeout,
        read_only: request.read_only,
        limits,
    })
}

/// The workspace's usage, measured off the async runtime when not cached.
pub(super) async fn usage_of(workspace: &Arc<Workspace>, quotas: &Quotas) -> Result<Usage, Error> {
    let ws = Arc::clone(workspace);
    let quotas = quotas.clone();
    tokio::task::spawn_blocking(move || ws.usage().lock().current(ws.path(), &quotas))
        .await
        .map_err(|e| Error::Internal(format!("usage task failed: {e}")))?
        .map_err(|e| Error::io("cannot measure the workspace", e))
}

/// One of a session's concurrent-command slots, released on drop.
pub(super) struct CommandSlot(Arc<Workspace>);

impl CommandSlot {
    pub(super) fn take(workspace: &Arc<Workspace>, max: u32) -> Result<Self, Error> {
        let running = workspace.running_commands();
        let taken = running.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        });
        match taken {
            Ok(_) => Ok(Self(Arc::clone(workspace))),
            Err(_) => Err(Error::LimitExceeded {
                limit: "concurrent_commands",
                message: format!(
                    "the session already runs {max} commands (HEIST_QUOTA_CONCURRENT_COMMANDS): \
                     wait for one to finish"
                ),
            }),
        }
    }
}

impl Drop for CommandSlot {
    fn drop(&mut self) {
        self.0.running_commands().fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counter type of the concurrent-command slots kept in each workspace.
pub type RunningCommands = AtomicU32;

/// How a command that took its workspace over a quota was held to it.
pub(crate) enum Held {
    /// Killed for it while running (quota polling).
    Stopped,
    /// Its workspace is a file system of its own, which refuses writes at its end.
    FileSystem,
    /// Found over it when the command ended.
    Measured,
}

/// A quota error for a command that took the workspace over a quota. What it wrote stays, and
/// the session cannot grow until files are deleted.
pub(crate) fn quota_error(quota: &'static str, used: u64, limit: u64, held: Held) -> Error {
    let (unit, setting) = match quota {
        "disk_bytes" => ("bytes", "HEIST_QUOTA_DISK_BYTES"),
        _ => ("entries", "HEIST_QUOTA_FILES"),
    };
    let held = match held {
        Held::Stopped => ", and was stopped",
        Held::FileSystem => {
            ", which its file system enforces (writes past the end fail with ENOSPC, No space \
             left on device)"
        }
        Held::Measured => "",
    };
    Error::LimitExceeded {
        limit: quota,
        message: format!(
            "the command took the session's workspace to {used} {unit}, over its quota of \
             {limit} {unit} ({setting}){held}; what it wrote is still there: delete files to \
             get back under the quota"
        ),
    }
}
