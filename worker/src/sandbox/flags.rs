//! The worker's sandbox and quota flags (each with its environment variable), flattened into
//! the `worker` command line.

use std::{path::PathBuf, time::Duration};

use super::Mode;
use crate::{Config, quota::Quotas};

/// Sandbox and quota flags.
#[derive(Clone, Debug, clap::Args)]
pub struct SandboxFlags {
    /// How commands (exec, run.python) are isolated: `process` (namespaces + rlimits +
    /// Landlock), `docker` (a container per session, HEIST_SANDBOX_IMAGE) or `unconfined`
    /// (rlimits, timeouts and output caps only; logged loudly).
    #[arg(long, env = "HEIST_SANDBOX", value_enum, default_value_t = Mode::Process)]
    pub sandbox: Mode,
    /// The heist-sandbox helper binary (default: next to the worker binary).
    #[arg(long, env = "HEIST_SANDBOX_HELPER")]
    pub sandbox_helper: Option<PathBuf>,
    /// uid commands run as when the worker runs as root (never 0).
    #[arg(long, env = "HEIST_SANDBOX_UID", default_value_t = 65_534)]
    pub sandbox_uid: u32,
    /// gid commands run as when the worker runs as root (never 0).
    #[arg(long, env = "HEIST_SANDBOX_GID", default_value_t = 65_534)]
    pub sandbox_gid: u32,
    /// Niceness commands run at (0-19), so they cannot starve the worker.
    #[arg(long, env = "HEIST_SANDBOX_NICE", default_value_t = 19)]
    pub sandbox_nice: i32,
    /// Python interpreter for run.python (default: python3 on PATH).
    #[arg(long, env = "HEIST_PYTHON")]
    pub python: Option<PathBuf>,
    /// Milliseconds a timed-out command gets between SIGTERM and SIGKILL.
    #[arg(long, env = "HEIST_SANDBOX_KILL_GRACE_MS", default_value_t = 500)]
    pub kill_grace_ms: u64,
    /// How often a running command's workspace is measured against the quotas, in ms.
    #[arg(long, env = "HEIST_QUOTA_POLL_MS", default_value_t = 500)]
    pub quota_poll_ms: u64,
    /// Bytes of file content a session's workspace may hold.
    #[arg(long, env = "HEIST_QUOTA_DISK_BYTES", default_value_t = 1 << 30)]
    pub quota_disk_bytes: u64,
    /// How the disk quota is enforced: `fs` (each session's workspace is its own size-limited
    /// ext4 file system: a hard limit; needs root, loop devices, mkfs.ext4), `polling` (the
    /// workspace is measured while commands run) or `auto` (`fs` where the host allows it).
    #[arg(long, env = "HEIST_DISK_QUOTA", value_enum, default_value_t = crate::diskfs::DiskQuotaMode::Auto)]
    pub disk_quota: crate::diskfs::DiskQuotaMode,
    /// Where the per-session disk images are kept under the `fs` disk quota (default:
    /// BASE_WORKSPACE/../disk-images).
    #[arg(long, env = "HEIST_DISK_IMAGE_DIR")]
    pub disk_image_dir: Option<PathBuf>,
    /// File systems the `fs` disk quota keeps formatted and mounted ahead of time, so that
    /// opening a session does not wait for mkfs (0: none, every open formats its own; at most
    /// 64).
    #[arg(long, env = "HEIST_DISK_POOL", default_value_t = 4)]
    pub disk_pool: usize,
    /// Files, directories and symlinks a session's workspace may hold.
    #[arg(long, env = "HEIST_QUOTA_FILES", default_value_t = 100_000)]
    pub quota_files: u64,
    /// Processes one command may have at once (RLIMIT_NPROC in its user namespace).
    #[arg(long, env = "HEIST_QUOTA_PROCESSES", default_value_t = 256)]
    pub quota_processes: u64,
    /// CPU seconds per process of a command (RLIMIT_CPU).
    #[arg(long, env = "HEIST_QUOTA_CPU_SECONDS", default_value_t = 60)]
    pub quota_cpu_seconds: u64,
    /// Address space per process of a command, in bytes (RLIMIT_AS).
    #[arg(long, env = "HEIST_QUOTA_MEMORY_BYTES", default_value_t = 4 << 30)]
    pub quota_memory_bytes: u64,
    /// Open files per process of a command (RLIMIT_NOFILE).
    #[arg(long, env = "HEIST_QUOTA_OPEN_FILES", default_value_t = 1024)]
    pub quota_open_files: u64,
    /// Bytes of stdout and of stderr kept per command (the rest is dropped, flagged truncated).
    #[arg(long, env = "HEIST_QUOTA_OUTPUT_BYTES", default_value_t = 1 << 20)]
    pub quota_output_bytes: u64,
    /// Bytes of argv plus environment a command may be given.
    #[arg(long, env = "HEIST_QUOTA_ARGV_BYTES", default_value_t = 256 << 10)]
    pub quota_argv_bytes: u64,
    /// Bytes of stdin (and of run.python code) a command may be given.
    #[arg(long, env = "HEIST_QUOTA_STDIN_BYTES", default_value_t = 1 << 20)]
    pub quota_stdin_bytes: u64,
    /// Timeout of a command that asks for none, in seconds.
    #[arg(long, env = "HEIST_EXEC_TIMEOUT_S", default_value_t = 30)]
    pub exec_timeout_s: u64,
    /// Longest timeout a command may ask for, in seconds (keep it within the coordinator's
    /// HEIST_WORKER_CALL_TIMEOUT_S, 300 by default, or the coordinator cuts the call first).
    #[arg(long, env = "HEIST_QUOTA_TIMEOUT_MAX_S", default_value_t = 300)]
    pub quota_timeout_max_s: u64,
    /// Commands one session may run at once.
    #[arg(long, env = "HEIST_QUOTA_CONCURRENT_COMMANDS", default_value_t = 4)]
    pub quota_concurrent_commands: u32,
    /// Memory all of a session's commands may use together, in bytes (its cgroup's hard limit,
    /// swap included).
    #[arg(long, env = "HEIST_QUOTA_SESSION_MEMORY_BYTES", default_value_t = 2 << 30)]
    pub quota_session_memory_bytes: u64,
    /// Memory one command (all its processes) may use, in bytes (its cgroup's hard limit).
    #[arg(long, env = "HEIST_QUOTA_COMMAND_MEMORY_BYTES", default_value_t = 1 << 30)]
    pub quota_command_memory_bytes: u64,
    /// Processes and threads all of a session's commands may have at once (cgroup pids.max).
    #[arg(long, env = "HEIST_QUOTA_SESSION_PROCESSES", default_value_t = 512)]
    pub quota_session_processes: u64,
    /// CPU a session's commands may use together, in percent of one core (cgroup CPU quota).
    #[arg(long, env = "HEIST_QUOTA_SESSION_CPU_PERCENT", default_value_t = 100)]
    pub quota_session_cpu_percent: u64,
    /// Relative CPU weight of each command, 1-10000 (100: the kernel's default share).
    #[arg(long, env = "HEIST_QUOTA_CPU_WEIGHT", default_value_t = 100)]
    pub quota_cpu_weight: u64,
    /// Where the cgroup file system is mounted; the worker uses `<root>/heist/<worker id>` (v2)
    /// or `<root>/<controller>/heist/<worker id>` (v1). Empty: no cgroups (reported as
    /// `cgroup:none` in the worker's isolation).
    // A String, not a PathBuf: clap refuses an empty path, and empty means "off".
    #[arg(long, env = "HEIST_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: String,
    /// Filesystem operations the fs tools may run at once on this worker (a worker with all
    /// of them busy reports itself saturated and gets no new sessions).
    #[arg(long, env = "HEIST_FS_POOL_THREADS", default_value_t = 16)]
    pub fs_pool_threads: usize,
    /// Of those, how many one session may run at once.
    #[arg(long, env = "HEIST_FS_POOL_PER_SESSION", default_value_t = 4)]
    pub fs_pool_per_session: usize,
    /// Longest an fs tool waits for one filesystem operation, in seconds (the call's deadline
    /// applies when earlier).
    #[arg(long, env = "HEIST_FS_OP_TIMEOUT_S", default_value_t = 30)]
    pub fs_op_timeout_s: u64,
}

impl SandboxFlags {
    /// Writes these settings into `config`.
    pub fn apply(self, config: &mut Config) {
        config.sandbox = self.sandbox;
        config.sandbox_helper = self.sandbox_helper.filter(|p| !p.as_os_str().is_empty());
        config.sandbox_uid = self.sandbox_uid;
        config.sandbox_gid = self.sandbox_gid;
        config.sandbox_nice = self.sandbox_nice;
        config.python = self.python.filter(|p| !p.as_os_str().is_empty());
        config.kill_grace = Duration::from_millis(self.kill_grace_ms);
        config.quota_poll_interval = Duration::from_millis(self.quota_poll_ms);
        config.quotas = Quotas {
            disk_bytes: self.quota_disk_bytes,
            files: self.quota_files,
            processes: self.quota_processes,
            cpu_seconds: self.quota_cpu_seconds,
            memory_bytes: self.quota_memory_bytes,
            open_files: self.quota_open_files,
            output_bytes: self.quota_output_bytes,
            argv_bytes: self.quota_argv_bytes,
            stdin_bytes: self.quota_stdin_bytes,
            default_timeout: Duration::from_secs(self.exec_timeout_s),
            max_timeout: Duration::from_secs(self.quota_timeout_max_s),
            concurrent_commands: self.quota_concurrent_commands,
            session_memory_bytes: self.quota_session_memory_bytes,
            command_memory_bytes: self.quota_command_memory_bytes,
            session_processes: self.quota_session_processes,
            session_cpu_percent: self.quota_session_cpu_percent,
            cpu_weight: self.quota_cpu_weight,
        };
        config.disk_quota = self.disk_quota;
        config.disk_image_dir = self.disk_image_dir.filter(|p| !p.as_os_str().is_empty());
        config.disk_pool = self.disk_pool;
        config.cgroup_root = Some(self.cgroup_root)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        config.fs_pool = crate::tools::PoolLimits {
            threads: self.fs_pool_threads,
            per_session: self.fs_pool_per_session,
            op_timeout: Duration::from_secs(self.fs_op_timeout_s),
        };
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sandbox: SandboxFlags,
    }

    #[test]
    fn flag_defaults_match_the_config_defaults() {
        let cli = Cli::try_parse_from(["worker"]).expect("parse");
        let mut config = Config::default();
        cli.sandbox.apply(&mut config);
        let defaults = Config::default();
        assert_eq!(config.quotas, defaults.quotas);
        assert_eq!(config.sandbox, defaults.sandbox);
        assert_eq!(config.kill_grace, defaults.kill_grace);
        assert_eq!(config.quota_poll_interval, defaults.quota_poll_interval);
        assert_eq!(config.fs_pool, defaults.fs_pool);
        assert_eq!(config.cgroup_root, defaults.cgroup_root);
        assert_eq!(config.disk_quota, defaults.disk_quota);
        assert_eq!(config.disk_image_dir, defaults.disk_image_dir);
        assert_eq!(config.disk_pool, defaults.disk_pool);
        assert_eq!(
            (config.sandbox_uid, config.sandbox_gid),
            (defaults.sandbox_uid, defaults.sandbox_gid)
        );
    }

    #[test]
    fn unconfined_is_spelled_out() {
        let cli = Cli::try_parse_from([
            "worker",
            "--sandbox",
            "unconfined",
            "--quota-disk-bytes",
            "5",
        ])
        .expect("parse");
        let mut config = Config::default();
        cli.sandbox.apply(&mut config);
        assert_eq!(config.sandbox, Mode::Unconfined);
        assert_eq!(config.quotas.disk_bytes, 5);
    }

    #[test]
    fn an_empty_cgroup_root_turns_cgroups_off() {
        let cli = Cli::try_parse_from(["worker", "--cgroup-root", ""]).expect("parse");
        let mut config = Config::default();
        cli.sandbox.apply(&mut config);
        assert_eq!(config.cgroup_root, None);
        let cli = Cli::try_parse_from(["worker"]).expect("parse");
        cli.sandbox.apply(&mut config);
        assert_eq!(config.cgroup_root, Some(PathBuf::from("/sys/fs/cgroup")));
    }
}
