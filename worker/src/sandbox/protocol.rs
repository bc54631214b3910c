//! What the worker and `heist-sandbox` say to each other over the helper's stdin, a Unix
//! socket: JSON lines both ways.
//!
//! ```text
//! worker -> helper   Spec                      (one line)
//! helper -> worker   Report::Unshared          (confined only: new namespaces exist)
//! worker -> helper   "mapped" [+ mount fds]    (the worker wrote the uid/gid maps; with
//!                                               SCM_RIGHTS: id-mapped workspace mounts)
//! helper -> worker   Report::Started | Failed  (the command runs as PID 1 of its namespace)
//! worker -> helper   "term" | "kill"           (at any time; end of file means "kill")
//! helper -> worker   Report::Exited | Failed
//! ```
//!
//! The command's stdout and stderr are the helper's own (pipes the worker reads); the helper
//! never writes to them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Worker to helper: carry on after the uid/gid maps are written.
pub const MAPPED: &str = "mapped";
/// Worker to helper: send SIGTERM to the command's process group.
pub const TERM: &str = "term";
/// Worker to helper: send SIGKILL to the command's process group.
pub const KILL: &str = "kill";

/// Exit status the helper uses when it could not run the command at all.
pub const HELPER_FAILED: u8 = 125;

/// Everything the helper needs to run one command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Program and arguments; `argv[0]` is looked up on the command's PATH.
    pub argv: Vec<String>,
    /// Absolute working directory.
    pub cwd: PathBuf,
    /// The whole environment of the command.
    pub env: Vec<(String, String)>,
    /// Standard input, base64 (empty: /dev/null).
    pub stdin_b64: String,
    /// Resource limits, applied with setrlimit before the command starts.
    pub limits: Rlimits,
    /// Niceness the command runs at (0-19): below the worker, so a busy command cannot starve
    /// it.
    pub nice: i32,
    /// Namespaces and Landlock; `None` runs unconfined (rlimits only).
    pub confine: Option<Confinement>,
}

/// setrlimit values (soft = hard unless noted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    /// RLIMIT_CPU seconds (soft; the hard limit is one second later, so SIGXCPU comes first).
    pub cpu_seconds: u64,
    /// RLIMIT_AS bytes.
    pub address_space: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_NPROC (counted in the command's own user namespace when confined).
    pub processes: u64,
    /// RLIMIT_FSIZE bytes.
    pub file_size: u64,
}

/// Where the command sees its workspace (the host path is never shown to it).
pub const WORKSPACE: &str = "/workspace";

/// Most paths a job may add read-only (`extra`): the worker passes one mount per path.
pub const MAX_EXTRA: usize = 8;

/// How to confine the command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confinement {
    /// The session workspace on the host; the command sees it, read-write, at [`WORKSPACE`].
    pub workspace: PathBuf,
    /// System directories and files bound read-only at the same path in the command's root
    /// (symlinks, such as a merged-/usr `/bin`, are recreated as symlinks).
    pub system: Vec<PathBuf>,
    /// The job's own read-only paths (run.python's code directory), bound at the same path.
    pub extra: Vec<PathBuf>,
    /// Device nodes bound from the host (/dev/null and friends).
    pub devices: Vec<PathBuf>,
    /// The worker sends, with [`MAPPED`], id-mapped mounts of `workspace` and then of each
    /// `extra` path (a worker running as root: host root's files appear owned by the command,
    /// whose own id is the unprivileged sandbox user). Otherwise they are bound by path.
    pub idmapped: bool,
    /// Bytes the command's private /tmp (a tmpfs, charged to memory) may hold.
    pub tmp_bytes: u64,
    /// Host name inside the UTS namespace.
    pub hostname: String,
}

/// Helper to worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case", deny_unknown_fields)]
pub enum Report {
    /// The helper is in its new namespaces and waits for its uid/gid maps.
    Unshared,
    /// The command runs.
    Started {
        /// Its pid, as the worker sees it.
        pid: i32,
        /// The isolation really in force (`userns`, `landlock:v6`, `rlimits`, ...).
        features: Vec<String>,
    },
    /// The command ended.
    Exited {
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal number, when a signal killed it.
        signal: Option<i32>,
        /// User + system CPU time of the command and everything it waited for, in ms.
        cpu_ms: u64,
    },
    /// The helper could not do what was asked.
    Failed {
        /// Which step failed (`unshare`, `landlock`, `spawn`, ...).
        stage: String,
        /// Why.
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_as_tagged_json_lines() {
        let reports = [
            Report::Unshared,
            Report::Started {
                pid: 42,
                features: vec!["userns".into()],
            },
            Report::Exited {
                code: Some(3),
                signal: None,
                cpu_ms: 7,
            },
            Report::Failed {
                stage: "spawn".into(),
                error: "no such file".into(),
            },
        ];
        for report in reports {
            let line = serde_json::to_string(&report).expect("encode");
            assert!(!line.contains('\n'));
            assert_eq!(
                serde_json::from_str::<Report>(&line).expect("decode"),
                report
            );
        }
        let line = serde_json::to_string(&Report::Unshared).expect("encode");
        assert_eq!(line, r#"{"report":"unshared"}"#);
    }

    #[test]
    fn specs_refuse_unknown_fields() {
        let err = serde_json::from_str::<Spec>(r#"{"argv":[],"bogus":1}"#).expect_err("refused");
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
