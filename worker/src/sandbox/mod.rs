//! Running untrusted commands: the [`Backend`] trait (prepare -> exec -> collect -> cleanup)
//! and [`Sandbox`], the worker's entry point that picks a backend at startup, reports what
//! isolation really works, and takes every command through the phases.
//!
//! - `process` ([`Mode::Process`], the default): the `heist-sandbox` helper puts each command in
//!   new user, mount, pid, network, IPC and UTS namespaces, caps it with rlimits, empties its
//!   capability bounding set and confines its filesystem with Landlock (see [`helper`]).
//! - [`Mode::Unconfined`]: the same helper with rlimits only, for hosts without user
//!   namespaces or Landlock, chosen explicitly by an operator and logged loudly.
//! - [`Mode::Docker`] (`docker`): one container per session from the sandbox image, through
//!   the engine's API: `prepare` ensures the session's container, `exec` starts `docker exec`,
//!   `collect` is shared, `close_session` removes the container (see `docker`).
//!
//! Resources: `cgroup` puts each session and each command in its own control group (memory,
//! pids, CPU) where the host lets the worker; the process backend sets them up through the
//! per-session hooks ([`Backend::open_session`], [`Backend::close_session`]) and per command.
//!
//! The parts: `admit` (a request checked against the quotas, turned into a [`Job`]),
//! [`protocol`] (worker <-> helper lines), `confine` (the helper's steps), `process` (the
//! worker side of the process backend), `collect` (output caps, timeout, quota polling, shared
//! by every backend), `env` (the environment allow-list), `probe` (startup checks), `flags`
//! (the worker's command-line flags for all of this).

mod admit;
mod cgroup;
mod collect;
mod confine;
mod docker;
mod env;
mod flags;
pub mod helper;
mod idmap;
mod init;
mod probe;
mod process;
pub mod protocol;
mod rootfs;
mod seccomp;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::future::BoxFuture;
use heist_proto::ids::SessionId;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

pub use self::{
    admit::{CommandLimits, Job, Request, RunningCommands},
    collect::{Captured, Finished},
    docker::{DockerSettings, SESSION_LABEL, WORKER_LABEL},
    env::validate_env,
    flags::SandboxFlags,
    probe::Python,
};

use crate::{
    Error,
    metrics::SandboxMetrics,
    quota::Quotas,
    sessions::Workspace,
    tools::{FsPool, PoolLimits},
};

/// How commands are isolated (HEIST_SANDBOX / --sandbox).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Namespaces + rlimits + Landlock via the `heist-sandbox` helper (the default).
    #[default]
    Process,
    /// rlimits, timeout, output caps and a scrubbed environment only. Weaker: commands can read
    /// and write whatever the worker's user can and reach the network.
    Unconfined,
    /// One container per session from the sandbox image, through the Docker engine's API.
    Docker,
}

impl Mode {
    /// Whether nothing a command started runs on once it has ended: its processes live in a
    /// pid namespace of their own, which ends with it. (A session's container outlives its
    /// commands; unconfined commands can leave their process group.)
    pub fn commands_end_whole(self) -> bool {
        self == Self::Process
    }
}

/// The sandbox settings from the worker's configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Backend choice.
    pub mode: Mode,
    /// The `heist-sandbox` binary; `None` means next to the running executable.
    pub helper: Option<PathBuf>,
    /// uid outside the namespace that commands run as when the worker runs as root.
    pub uid: u32,
    /// gid outside the namespace that commands run as when the worker runs as root.
    pub gid: u32,
    /// The Python interpreter for run.python; `None` means `python3` on PATH.
    pub python: Option<PathBuf>,
    /// How long a timed-out command gets between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// How often a running command's workspace is measured against the disk quotas.
    pub poll_interval: Duration,
    /// Niceness commands run at (0-19).
    pub nice: i32,
    /// Session quotas.
    pub quotas: Quotas,
    /// Where the cgroup file system is mounted; `None`: no cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// Names this worker's cgroup subtree ([`cgroup_name`]).
    pub cgroup_name: String,
    /// The pool the fs tools run their filesystem work on.
    pub fs_pool: PoolLimits,
    /// Whether every session's workspace is its own size-limited file system (the disk quota
    /// is then enforced by the kernel: `disk-quota:fs`), else it is polled.
    pub disk_fs: bool,
    /// The docker backend's engine, image and network.
    pub docker: DockerSettings,
}

/// The name of a worker's cgroup subtree: its id and a digest of its workspace directory, so
/// that a restarted worker (same id, same directory) sweeps what its crashed predecessor left,
/// and two workers that share an id on one host (tests) never touch each other's groups.
pub fn cgroup_name(worker_id: &str, base_workspace: &Path) -> String {
    let digest = blake3::hash(base_workspace.as_os_str().as_encoded_bytes());
    let hex = digest.to_hex();
    format!("{worker_id}-{}", &hex.as_str()[..12])
}

/// Which output stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A piece of live output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Where it came from.
    pub stream: Stream,
    /// The bytes (at most the part that fits under the output quota).
    pub data: Vec<u8>,
}

/// Where live output goes while a command runs (the streaming call's event channel).
pub type OutputSink = mpsc::Sender<Chunk>;

/// How a command ended, as a backend saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// CPU time used, in ms.
    pub cpu_ms: u64,
    /// Set when the kernel killed a process of the command for lack of memory: the limit hit.
    pub out_of_memory: Option<MemoryLimit>,
}

/// The cgroup memory limit an out-of-memory kill was due to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    /// The quota's name (`session_memory_bytes` or `command_memory_bytes`).
    pub quota: &'static str,
    /// Its value in bytes.
    pub bytes: u64,
}

/// What a running command produces next.
#[derive(Debug)]
pub enum Event {
    /// Output.
    Output(Chunk),
    /// It ended (and its output is drained).
    Exited(ExitInfo),
}

/// A started command.
pub trait Execution: Send {
    /// The next output or the exit; an error means the backend lost the command. Cancel-safe:
    /// the caller drops it for its timers and polls, and the next call resumes where it was.
    fn next(&mut self) -> BoxFuture<'_, Result<Event, Error>>;
    /// Asks the command's processes to stop (SIGTERM to its process group).
    fn terminate(&mut self) -> BoxFuture<'_, ()>;
    /// Stops the command's processes now (SIGKILL). Dropping an execution does this too.
    fn kill(&mut self) -> BoxFuture<'_, ()>;
    /// The `cgroup.procs` file listing the command's processes, when it has a cgroup (the disk
    /// quota polling then also counts files they hold open after unlinking them).
    fn processes(&self) -> Option<PathBuf> {
        None
    }
}

/// A way to run commands in isolation. The phases run in order for every command; `cleanup`
/// runs whatever happened in between.
pub trait Backend: Send + Sync + 'static {
    /// Name reported to the coordinator (`process`, `docker`).
    fn name(&self) -> &'static str;
    /// Phase 1: readies what the command needs, or says why it cannot run.
    fn prepare<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<(), Error>>;
    /// Phase 2: starts the command.
    fn exec<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Box<dyn Execution>, Error>>;
    /// Phase 3: follows the command to its end, capturing output under the caps, enforcing the
    /// timeout and the disk quotas. The shared implementation fits every backend whose
    /// workspace is a host directory.
    fn collect<'a>(
        &'a self,
        job: &'a Job,
        execution: Box<dyn Execution>,
        watch: collect::Watch<'a>,
    ) -> BoxFuture<'a, Result<Finished, Error>> {
        Box::pin(collect::collect(job, execution, watch))
    }
    /// Phase 4: releases what prepare and exec set up.
    fn cleanup<'a>(&'a self, _job: &'a Job) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    /// Per-session hook: runs once when a session's workspace comes into use on this worker (created, adopted at start-up), after its directory exists and before the workspace is opened as a capability.
    fn open_session<'a>(
        &'a self,
        session: &'a SessionId,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let _ = (session, path);
        Box::pin(async { Ok(()) })
    }
    /// Per-session hook: runs once when a session leaves this worker (closed or evicted), after its commands stopped and before its directory is removed.
    fn close_session<'a>(
        &'a self,
        session: &'a SessionId,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let _ = (session, path);
        Box::pin(async { Ok(()) })
    }
}

/// A backend chosen from the configuration, before the host's system paths are known.
enum Selected {
    /// `process` and `unconfined`: the `heist-sandbox` helper.
    Process(process::ProcessBackend),
    /// `docker`: a container per session (boxed: its engine client is large).
    Docker(Box<docker::DockerBackend>),
}

impl Selected {
    /// The backend, told which host paths commands may read, with its resource controls set
    /// up; what they enforce is added to `isolation`.
    async fn into_backend(
        self,
        system_paths: Vec<PathBuf>,
        python: Option<&Python>,
        settings: &Settings,
        isolation: &mut Vec<String>,
    ) -> Box<dyn Backend> {
        let disk_quota = if settings.disk_fs {
            "disk-quota:fs"
        } else {
            "disk-quota:polling"
        };
        match self {
            Self::Docker(mut backend) => {
                backend.set_python(python.map(|p| p.executable.clone()));
                isolation.push(disk_quota.to_owned());
                backend
            }
            Self::Process(mut backend) => {
                backend.set_read_only(system_paths);
                isolation.push(backend.use_cgroups(settings).await);
                // Either each workspace is its own size-limited file system, or the disk quota
                // is measured (walks, plus unlinked-but-open files of commands with a cgroup).
                isolation.push(disk_quota.to_owned());
                Box::new(backend)
            }
        }
    }
}

/// The one place a backend is chosen from [`Settings::mode`] and probed: a new backend (docker)
/// is a new arm here, and callers only ever see `dyn Backend`.
async fn select_backend(settings: &Settings) -> Result<(Selected, Vec<String>), String> {
    match settings.mode {
        Mode::Process | Mode::Unconfined => probe::probe(settings)
            .await
            .map(|(backend, isolation)| (Selected::Process(backend), isolation)),
        Mode::Docker => docker::connect(settings)
            .await
            .map(|(backend, isolation)| (Selected::Docker(Box::new(backend)), isolation)),
    }
}

/// The worker's sandbox: the backend (when it works), what it isolates, and the quotas.
pub struct Sandbox {
    mode: Mode,
    backend: Result<Box<dyn Backend>, String>,
    isolation: Vec<String>,
    settings: Settings,
    python: Result<Python, String>,
    system_paths: Vec<PathBuf>,
    fs_pool: Arc<FsPool>,
    metrics: Arc<SandboxMetrics>,
}

impl Sandbox {
    /// Probes the host and picks the backend: a test command runs through the real pipeline at
    /// startup, so what is reported is what works. A sandbox that does not work is not an error
    /// here: the worker still serves, and exec/run.python say why they cannot run.
    pub async fn start(settings: Settings) -> Self {
        // Both spawn processes; neither needs the other.
        let (python, probed) = tokio::join!(
            probe::find_python(settings.python.as_deref()),
            select_backend(&settings),
        );
        let system_paths = probe::system_paths(python.as_ref().ok());
        let mut sandbox = Self {
            mode: settings.mode,
            backend: Err("not probed yet".to_owned()),
            isolation: Vec::new(),
            fs_pool: FsPool::new(settings.fs_pool),
            metrics: Arc::default(),
            settings,
            python,
            system_paths,
        };
        match probed {
            Ok((selected, mut isolation)) => {
                let backend = selected
                    .into_backend(
                        sandbox.system_paths.clone(),
                        sandbox.python.as_ref().ok(),
                        &sandbox.settings,
                        &mut isolation,
                    )
                    .await;
                if sandbox.mode == Mode::Unconfined {
                    warn!(
                        isolation = ?isolation,
                        "SANDBOX IS UNCONFINED (--sandbox unconfined): commands run without namespaces \
                         or Landlock and can read and write anything this worker's user can, and reach \
                         the network; only rlimits, timeouts, output caps and a scrubbed environment apply"
                    );
                } else {
                    info!(isolation = ?isolation, "sandbox ready");
                }
                sandbox.backend = Ok(backend);
                sandbox.isolation = isolation;
            }
            Err(reason) => {
                warn!(
                    reason = %reason,
                    "the sandbox does not work on this host: exec and run.python will be refused \
                     (an operator may choose --sandbox unconfined to run commands without isolation)"
                );
                sandbox.backend = Err(reason);
            }
        }
        match &sandbox.python {
            Ok(python) => info!(python = %python.executable.display(), "python found"),
            Err(reason) => warn!(reason = %reason, "run.python will be refused"),
        }
        sandbox
    }

    /// A sandbox that refuses every command (tests of other tools, control-loop tests).
    pub fn disabled(reason: &str, quotas: Quotas) -> Self {
        Self {
            mode: Mode::Process,
            backend: Err(reason.to_owned()),
            isolation: Vec::new(),
            settings: Settings {
                mode: Mode::Process,
                helper: None,
                uid: 65_534,
                gid: 65_534,
                python: None,
                kill_grace: Duration::from_millis(500),
                poll_interval: Duration::from_millis(500),
                nice: 19,
                quotas,
                cgroup_root: None,
                cgroup_name: String::new(),
                fs_pool: PoolLimits::default(),
                disk_fs: false,
                docker: DockerSettings::default(),
            },
            python: Err(reason.to_owned()),
            system_paths: Vec::new(),
            fs_pool: FsPool::new(PoolLimits::default()),
            metrics: Arc::default(),
        }
    }

    /// Tells the backend (when one works) that a session's workspace comes into use here; see
    /// [`Backend::open_session`].
    pub async fn open_session(&self, session: &SessionId, path: &Path) -> Result<(), Error> {
        match &self.backend {
            Ok(backend) => backend.open_session(session, path).await,
            Err(_) => Ok(()),
        }
    }

    /// Tells the backend (when one works) that a session leaves this worker; see
    /// [`Backend::close_session`].
    pub async fn close_session(&self, session: &SessionId, path: &Path) -> Result<(), Error> {
        match &self.backend {
            Ok(backend) => backend.close_session(session, path).await,
            Err(_) => Ok(()),
        }
    }

    /// The backend name for Register (`none` when no backend works).
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Ok(backend) => backend.name(),
            Err(_) => "none",
        }
    }

    /// Why commands cannot run here, when they cannot.
    pub fn problem(&self) -> Option<&str> {
        self.backend.as_ref().err().map(String::as_str)
    }

    /// The isolation really in force, for Register.
    pub fn isolation(&self) -> Vec<String> {
        self.isolation.clone()
    }

    /// The pool the fs tools run on (its saturation goes into the heartbeat).
    pub fn fs_pool(&self) -> &Arc<FsPool> {
        &self.fs_pool
    }

    /// The session quotas.
    pub fn quotas(&self) -> &Quotas {
        &self.settings.quotas
    }

    /// The Python interpreter, or why run.python cannot run.
    pub fn python(&self) -> Result<&Python, Error> {
        self.python
            .as_ref()
            .map_err(|reason| Error::SandboxUnavailable {
                missing: "python",
                message: format!("run.python is unavailable on this worker: {reason}"),
            })
    }

    /// The sandbox's metrics (commands, durations, quota rejections).
    pub fn metrics(&self) -> &Arc<SandboxMetrics> {
        &self.metrics
    }

    /// Runs `request` in `workspace`, streaming output into `sink` when given. Dropping the
    /// returned future kills the command. In a `sandbox_command` span, recorded in the metrics.
    pub async fn run(
        &self,
        workspace: &Arc<Workspace>,
        request: Request,
        sink: Option<OutputSink>,
    ) -> Result<Finished, Error> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!("sandbox_command", backend = self.backend_name());
        let result =
            tracing::Instrument::instrument(self.run_command(workspace, request, sink), span).await;
        self.metrics.record(&result, started.elapsed());
        result
    }

    async fn run_command(
        &self,
        workspace: &Arc<Workspace>,
        request: Request,
        sink: Option<OutputSink>,
    ) -> Result<Finished, Error> {
        let backend = self
            .backend
            .as_ref()
            .map_err(|reason| Error::SandboxUnavailable {
                missing: "sandbox",
                message: format!(
                    "this worker cannot run commands safely: {reason}. An operator may start the \
                 worker with --sandbox unconfined (HEIST_SANDBOX=unconfined) to run them without \
                 isolation"
                ),
            })?;
        let quotas = &self.settings.quotas;
        let _slot = admit::CommandSlot::take(workspace, quotas.concurrent_commands)?;
        let before = admit::usage_of(workspace, quotas).await?;
        let python_bin = self
            .python
            .as_ref()
            .ok()
            .and_then(|p| p.executable.parent());
        let job = admit::admit(&self.settings, python_bin, workspace, request, before)?;
        backend.prepare(&job).await?;
        let run = async {
            let execution = backend.exec(&job).await?;
            let watch = collect::Watch {
                sink,
                kill_grace: self.settings.kill_grace,
                poll_interval: self.settings.poll_interval,
                quotas,
                before,
                usage: workspace.usage(),
            };
            backend.collect(&job, execution, watch).await
        };
        // Closing the session drops the run, which kills the command.
        let result = tokio::select! {
            result = run => result,
            () = workspace.closed().cancelled() => Err(Error::SessionNotFound(job.session.clone())),
        };
        backend.cleanup(&job).await;
        match &result {
            Ok(f) => debug!(
                session_id = %job.session,
                exit_code = ?f.exit_code,
                signal = ?f.signal,
                timed_out = f.timed_out,
                duration_ms = u64::try_from(f.duration.as_millis()).unwrap_or(u64::MAX),
                stdout_bytes = f.stdout.total,
                stderr_bytes = f.stderr.total,
                "command finished"
            ),
            Err(err) => {
                debug!(session_id = %job.session, error = %err, "command refused or stopped")
            }
        }
        result
    }
}
