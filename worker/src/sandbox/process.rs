//! The worker side of the `process` backend: start `heist-sandbox` with a Unix socket as its
//! stdin and pipes as its stdout/stderr, send the [`Spec`], write the new user namespace's uid
//! and gid maps when the helper asks (only a process outside the namespace may map ids other
//! than its own), then turn pipe reads and helper reports into [`Event`]s.
//!
//! Id mapping: only the sandbox's own id is mapped. A worker running as root maps uid/gid 0 of
//! the namespace to an unprivileged user (HEIST_SANDBOX_UID/GID, default 65534), so
//! RLIMIT_NPROC applies (the kernel exempts real root from it) and nothing the command does is
//! done as root; the root-owned workspace reaches it as an id-mapped mount (see `idmap`). A
//! worker running as another user maps uid/gid 0 to itself.

use std::{
    collections::VecDeque,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use futures::future::BoxFuture;
use heist_proto::ids::SessionId;
use nix::unistd::{getegid, geteuid};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, Lines},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    process::{Child, ChildStderr, ChildStdout},
    time::{Instant, sleep_until},
};
use tracing::{info, warn};

use super::{
    Backend, Chunk, Event, Execution, ExitInfo, Job, MemoryLimit, Settings, Stream,
    cgroup::{self, Cgroups, Group},
    protocol::{Confinement, KILL, MAPPED, Report, Rlimits, Spec, TERM},
};
use crate::Error;

/// How long output may still arrive after the command exited (until the helper closes it).
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How long the helper has to end after a kill before it is killed itself.
const HELPER_GRACE: Duration = Duration::from_secs(5);
/// How often a running command's cgroup is checked for an out-of-memory kill (one small read).
const OOM_CHECK: Duration = Duration::from_millis(200);
/// Bytes read from a pipe at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Exit code reported when the program could not be started (what shells use).
const NOT_STARTED: i32 = 127;
/// Device files every confined command may read and write.
const DEVICES: [&str; 6] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
];

/// The uid/gid maps of a command's user namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMaps {
    /// `/proc/<pid>/uid_map` content.
    pub uid_map: String,
    /// `/proc/<pid>/gid_map` content.
    pub gid_map: String,
    /// Whether the workspace must reach the command as an id-mapped mount (root-owned files).
    pub idmap: bool,
}

impl IdMaps {
    /// The maps for a worker running with `euid`/`egid`; `sandbox` is the (uid, gid) commands
    /// run as when the worker is root.
    pub fn new(euid: u32, egid: u32, sandbox: (u32, u32)) -> Self {
        if euid == 0 {
            Self {
                uid_map: format!("0 {} 1\n", sandbox.0),
                gid_map: format!("0 {} 1\n", sandbox.1),
                idmap: true,
            }
        } else {
            Self {
                uid_map: format!("0 {euid} 1\n"),
                gid_map: format!("0 {egid} 1\n"),
                idmap: false,
            }
        }
    }

    /// The maps for this worker process.
    pub fn for_this_process(sandbox: (u32, u32)) -> Self {
        Self::new(geteuid().as_raw(), getegid().as_raw(), sandbox)
    }

    fn write(&self, pid: u32) -> std::io::Result<()> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        std::fs::write(proc.join("setgroups"), "deny")?;
        std::fs::write(proc.join("uid_map"), &self.uid_map)?;
        std::fs::write(proc.join("gid_map"), &self.gid_map)
    }
}

/// The process backend.
pub struct ProcessBackend {
    helper: PathBuf,
    /// `None`: unconfined (rlimits only).
    ids: Option<IdMaps>,
    read_only: Vec<PathBuf>,
    /// Bytes of each command's private /tmp.
    tmp_bytes: u64,
    /// Session and command cgroups, where the host has them.
    resources: Option<Arc<Resources>>,
}

/// The cgroup subtree and the limits written into it.
struct Resources {
    cgroups: Cgroups,
    session: cgroup::Limits,
    command: cgroup::Limits,
    /// Names commands' cgroups (`cmd-<n>`), unique for this worker's life.
    next_command: AtomicU64,
}

impl Resources {
    /// The session's (already created) cgroup, created when missing.
    fn session_group(&self, session: &str) -> Result<Group, Error> {
        self.cgroups
            .session(session, &self.session)
            .map_err(|e| cgroup_failed("session", session, &e))
    }
}

impl Drop for Resources {
    /// A worker that stops removes its cgroup subtree (anything still in it is killed; its
    /// commands are stopped by then). A restarted worker recreates the session groups when it
    /// adopts the workspaces; after a crash, start-up sweeps what is left.
    fn drop(&mut self) {
        if let Err(e) = self.cgroups.remove_all() {
            warn!(error = %e, "cannot remove this worker's cgroups");
        }
    }
}

fn cgroup_failed(what: &str, name: &str, err: &std::io::Error) -> Error {
    Error::SandboxUnavailable {
        missing: "cgroup",
        message: format!(
            "cannot set up the {what} cgroup for {name}: {err}; the worker's cgroup subtree is \
             unusable (see HEIST_CGROUP_ROOT), try again or move the session to another worker"
        ),
    }
}

impl ProcessBackend {
    /// A backend running `helper`; `ids` is `None` for unconfined mode.
    pub fn new(
        helper: PathBuf,
        ids: Option<IdMaps>,
        read_only: Vec<PathBuf>,
        tmp_bytes: u64,
    ) -> Self {
        Self {
            helper,
            ids,
            read_only,
            tmp_bytes,
            resources: None,
        }
    }

    /// Sets up the worker's cgroup subtree (sweeping what a crashed predecessor left) and puts
    /// every later session and command in it; returns what is enforced for the isolation list
    /// (`cgroup:none` when the host does not let the worker use cgroups, which is logged).
    pub async fn use_cgroups(&mut self, settings: &Settings) -> String {
        let Some(root) = settings.cgroup_root.clone() else {
            warn!(
                "cgroups are off (HEIST_CGROUP_ROOT is empty): commands' memory, processes \
                   and CPU are bounded by rlimits per process only"
            );
            return "cgroup:none".to_owned();
        };
        let worker = settings.cgroup_name.clone();
        let setup = tokio::task::spawn_blocking(move || Cgroups::setup(&root, &worker)).await;
        let cgroups = match setup {
            Ok(Ok(cgroups)) => cgroups,
            Ok(Err(reason)) => {
                warn!(reason = %reason, "no cgroups: commands' memory, processes and CPU are \
                      bounded by rlimits per process only");
                return "cgroup:none".to_owned();
            }
            Err(e) => {
                warn!(error = %e, "cgroup setup task failed");
                return "cgroup:none".to_owned();
            }
        };
        let q = &settings.quotas;
        let isolation = cgroups.isolation();
        info!(cgroups = %isolation, "commands run in per-session and per-command cgroups");
        self.resources = Some(Arc::new(Resources {
            cgroups,
            session: cgroup::Limits {
                memory_bytes: Some(q.session_memory_bytes),
                pids: Some(q.session_processes),
                cpu_weight: None,
                cpu_percent: Some(q.session_cpu_percent),
            },
            command: cgroup::Limits {
                memory_bytes: Some(q.command_memory_bytes),
                pids: Some(q.processes),
                cpu_weight: Some(q.cpu_weight),
                cpu_percent: None,
            },
            next_command: AtomicU64::new(1),
        }));
        isolation
    }

    /// Creates the cgroup of `job`'s command and moves the helper (`pid`) into it.
    async fn enter_cgroup(&self, job: &Job, pid: u32) -> Result<Option<CommandGroup>, Error> {
        let Some(resources) = self.resources.clone() else {
            return Ok(None);
        };
        let session = job.session.clone();
        let placed = tokio::task::spawn_blocking(move || {
            let name = format!(
                "cmd-{}",
                resources.next_command.fetch_add(1, Ordering::Relaxed)
            );
            let group = resources
                .cgroups
                .command(&session, &resources.session, &name, &resources.command)
                .map_err(|e| cgroup_failed("command", &session, &e))?;
            let entered = group
                .add(pid)
                .map_err(|e| cgroup_failed("command", &session, &e));
            if let Err(err) = entered {
                let _ = group.remove();
                return Err(err);
            }
            Ok(CommandGroup {
                group: Some(group),
                session_limit: resources.session.memory_bytes.unwrap_or(u64::MAX),
                command_limit: resources.command.memory_bytes.unwrap_or(u64::MAX),
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("cgroup task failed: {e}")))??;
        Ok(Some(placed))
    }

    /// Replaces the paths every command may read (once the interpreter is known).
    pub fn set_read_only(&mut self, read_only: Vec<PathBuf>) {
        self.read_only = read_only;
    }

    fn spec(&self, job: &Job) -> Spec {
        Spec {
            argv: job.argv.clone(),
            cwd: job.cwd.clone(),
            env: job.env.clone(),
            stdin_b64: base64::engine::general_purpose::STANDARD.encode(&job.stdin),
            nice: job.limits.nice,
            limits: Rlimits {
                cpu_seconds: job.limits.cpu_seconds,
                address_space: job.limits.memory_bytes,
                open_files: job.limits.open_files,
                processes: job.limits.processes,
                file_size: job.limits.file_size,
            },
            confine: self.ids.as_ref().map(|ids| Confinement {
                workspace: job.root.clone(),
                system: self.read_only.clone(),
                extra: job.read_only.clone(),
                devices: DEVICES.iter().map(PathBuf::from).collect(),
                idmapped: ids.idmap,
                tmp_bytes: self.tmp_bytes,
                hostname: "sandbox".to_owned(),
            }),
        }
    }

    /// Starts the helper and takes it through the handshake; returns the running command and
    /// the isolation the helper reported.
    pub async fn start(&self, job: &Job) -> Result<(ProcessExecution, Vec<String>), Error> {
        let helper_failed = |what: &str, e: std::io::Error| {
            Error::Internal(format!(
                "sandbox helper {}: {what}: {e}",
                self.helper.display()
            ))
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| helper_failed("cannot create its socket", e))?;
        ours.set_nonblocking(true)
            .map_err(|e| helper_failed("cannot set up its socket", e))?;
        let ours = tokio::net::UnixStream::from_std(ours)
            .map_err(|e| helper_failed("cannot set up its socket", e))?;
        let mut child = tokio::process::Command::new(&self.helper)
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| helper_failed("cannot start it", e))?;
        // The helper waits for its spec before it does anything, so everything the command
        // starts is inside the cgroup (children inherit it).
        let pid = child
            .id()
            .ok_or_else(|| Error::Internal("the sandbox helper exited early".to_owned()))?;
        let cgroup = match self.enter_cgroup(job, pid).await {
            Ok(cgroup) => cgroup,
            Err(err) => {
                let _ = child.start_kill();
                return Err(err);
            }
        };
        let (read, mut write) = ours.into_split();
        let mut lines = BufReader::new(read).lines();

        let mut line = serde_json::to_vec(&self.spec(job))
            .map_err(|e| Error::Internal(format!("cannot encode the sandbox spec: {e}")))?;
        line.push(b'\n');
        write
            .write_all(&line)
            .await
            .map_err(|e| helper_failed("it stopped reading", e))?;

        let mut pending = VecDeque::new();
        let mut report = next_report(&mut lines).await?;
        if let (Report::Unshared, Some(ids)) = (&report, &self.ids) {
            let pid = child
                .id()
                .ok_or_else(|| Error::Internal("the sandbox helper exited early".to_owned()))?;
            ids.write(pid).map_err(|e| {
                Error::Internal(format!(
                    "cannot write the uid/gid maps of the sandbox's user namespace: {e}"
                ))
            })?;
            let mounts = if ids.idmap {
                let paths: Vec<&std::path::Path> = std::iter::once(job.root.as_path())
                    .chain(job.read_only.iter().map(PathBuf::as_path))
                    .collect();
                super::idmap::clones(pid, &paths)?
            } else {
                Vec::new()
            };
            super::idmap::send(write.as_ref(), format!("{MAPPED}\n").as_bytes(), &mounts).await?;
            report = next_report(&mut lines).await?;
        }
        let (features, exit) = match report {
            Report::Started { features, .. } => (features, None),
            Report::Failed { stage, error } if stage == "spawn" => {
                // Like a shell: the program does not exist or cannot be executed.
                pending.push_back(Event::Output(Chunk {
                    stream: Stream::Stderr,
                    data: format!("heist: {error}\n").into_bytes(),
                }));
                let exit = ExitInfo {
                    code: Some(NOT_STARTED),
                    ..ExitInfo::default()
                };
                (Vec::new(), Some(exit))
            }
            Report::Failed { stage, error } => {
                return Err(Error::Internal(format!(
                    "the sandbox could not be set up ({stage}): {error}"
                )));
            }
            other => {
                return Err(Error::Internal(format!(
                    "unexpected report from the sandbox helper: {other:?}"
                )));
            }
        };
        let execution = ProcessExecution {
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
            lines,
            control: Some(write),
            exit,
            drain_until: exit.map(|_| Instant::now() + DRAIN_GRACE),
            killed_at: None,
            pending,
            out_buf: vec![0; READ_CHUNK],
            err_buf: vec![0; READ_CHUNK],
            cgroup,
            oom_check_at: Instant::now() + OOM_CHECK,
        };
        Ok((execution, features))
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn prepare<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if !job.cwd.is_dir() {
                return Err(Error::InvalidArgument {
                    field: "cwd".to_owned(),
                    message: format!(
                        "working directory {} does not exist in the workspace",
                        job.cwd.display()
                    ),
                });
            }
            if !self.helper.is_file() {
                return Err(Error::SandboxUnavailable {
                    missing: "sandbox",
                    message: format!(
                        "the sandbox helper {} is gone: reinstall the worker",
                        self.helper.display()
                    ),
                });
            }
            Ok(())
        })
    }

    fn exec<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Box<dyn Execution>, Error>> {
        Box::pin(async move {
            let (execution, _) = self.start(job).await?;
            Ok(Box::new(execution) as Box<dyn Execution>)
        })
    }

    fn open_session<'a>(
        &'a self,
        session: &'a SessionId,
        _path: &'a Path,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let Some(resources) = self.resources.clone() else {
                return Ok(());
            };
            let session = session.to_string();
            tokio::task::spawn_blocking(move || resources.session_group(&session).map(|_| ()))
                .await
                .map_err(|e| Error::Internal(format!("cgroup task failed: {e}")))?
        })
    }

    fn close_session<'a>(
        &'a self,
        session: &'a SessionId,
        _path: &'a Path,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let Some(resources) = self.resources.clone() else {
                return Ok(());
            };
            let session = session.to_string();
            tokio::task::spawn_blocking(move || {
                resources.cgroups.remove_session(&session).map_err(|e| {
                    Error::io(format!("cannot remove the cgroup of session {session}"), e)
                })
            })
            .await
            .map_err(|e| Error::Internal(format!("cgroup task failed: {e}")))?
        })
    }
}

/// A command's cgroup, removed (with anything left in it) when the command is dropped.
struct CommandGroup {
    group: Option<Group>,
    session_limit: u64,
    command_limit: u64,
}

impl CommandGroup {
    /// The memory limit behind an OOM kill in the command, if there was one: the command's
    /// own when its group reached that limit, else the session's (which the command's
    /// processes share with the session's other commands).
    fn out_of_memory(&self) -> Option<MemoryLimit> {
        let events = self.group.as_ref()?.memory_events();
        if events.oom_kills == 0 {
            return None;
        }
        // Within a page or two of the limit counts as reaching it.
        let near = self.command_limit.saturating_sub(1 << 20);
        let command_hit =
            events.limit_hits > 0 || events.peak_bytes.is_some_and(|peak| peak >= near);
        Some(if command_hit {
            MemoryLimit {
                quota: "command_memory_bytes",
                bytes: self.command_limit,
            }
        } else {
            MemoryLimit {
                quota: "session_memory_bytes",
                bytes: self.session_limit,
            }
        })
    }
}

impl Drop for CommandGroup {
    fn drop(&mut self) {
        let Some(group) = self.group.take() else {
            return;
        };
        let remove = move || {
            if let Err(e) = group.remove() {
                warn!(error = %e, "cannot remove a command's cgroup");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

async fn next_report(lines: &mut Lines<BufReader<OwnedReadHalf>>) -> Result<Report, Error> {
    let line = lines
        .next_line()
        .await
        .map_err(|e| Error::Internal(format!("cannot read from the sandbox helper: {e}")))?
        .ok_or_else(|| {
            Error::Internal(
                "the sandbox helper exited without a report (is HEIST_SANDBOX_HELPER a \
                 heist-sandbox binary of this version?)"
                    .to_owned(),
            )
        })?;
    serde_json::from_str(&line)
        .map_err(|e| Error::Internal(format!("bad report from the sandbox helper: {e}: {line}")))
}

/// A command started by the helper.
pub struct ProcessExecution {
    child: Child,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    lines: Lines<BufReader<OwnedReadHalf>>,
    /// Dropping it closes the socket, which makes the helper SIGKILL the command.
    control: Option<OwnedWriteHalf>,
    exit: Option<ExitInfo>,
    drain_until: Option<Instant>,
    killed_at: Option<Instant>,
    pending: VecDeque<Event>,
    out_buf: Vec<u8>,
    err_buf: Vec<u8>,
    /// The command's cgroup (`None` without cgroups).
    cgroup: Option<CommandGroup>,
    /// When the cgroup is next checked for an out-of-memory kill.
    oom_check_at: Instant,
}

impl ProcessExecution {
    async fn send(&mut self, line: &str) {
        if let Some(control) = self.control.as_mut()
            && control
                .write_all(format!("{line}\n").as_bytes())
                .await
                .is_err()
        {
            self.control = None;
        }
    }

    async fn step(&mut self) -> Result<Option<Event>, Error> {
        let drain_at = self.drain_until.unwrap_or_else(Instant::now);
        let give_up_at = self
            .killed_at
            .map_or_else(Instant::now, |at| at + HELPER_GRACE);
        let watch_memory = self.cgroup.is_some() && self.exit.is_none() && self.killed_at.is_none();
        tokio::select! {
            () = sleep_until(self.oom_check_at), if watch_memory => {
                self.oom_check_at = Instant::now() + OOM_CHECK;
                // The kernel killed one of its processes at a memory limit: the command is
                // stopped as a whole (as cgroup v2's memory.oom.group does), and reported so
                // when it exits.
                if self.cgroup.as_ref().and_then(CommandGroup::out_of_memory).is_some() {
                    self.send(KILL).await;
                    self.control = None;
                    self.killed_at = Some(Instant::now());
                }
                Ok(None)
            }
            read = read_some(self.stdout.as_mut(), &mut self.out_buf), if self.stdout.is_some() => {
                Ok(chunk(read, Stream::Stdout, &mut self.stdout, &self.out_buf))
            }
            read = read_some(self.stderr.as_mut(), &mut self.err_buf), if self.stderr.is_some() => {
                Ok(chunk(read, Stream::Stderr, &mut self.stderr, &self.err_buf))
            }
            line = self.lines.next_line(), if self.exit.is_none() => {
                let line = line.map_err(|e| Error::Internal(format!("cannot read from the sandbox helper: {e}")))?;
                let Some(line) = line else {
                    return Err(Error::Internal("the sandbox helper exited before the command ended".to_owned()));
                };
                match serde_json::from_str(&line) {
                    Ok(Report::Exited { code, signal, cpu_ms }) => {
                        let out_of_memory = self.cgroup.as_ref().and_then(CommandGroup::out_of_memory);
                        self.exit = Some(ExitInfo { code, signal, cpu_ms, out_of_memory });
                        self.drain_until = Some(Instant::now() + DRAIN_GRACE);
                        Ok(None)
                    }
                    Ok(Report::Failed { stage, error }) => Err(Error::Internal(format!(
                        "the sandbox helper failed ({stage}): {error}"
                    ))),
                    _ => Err(Error::Internal(format!("unexpected report from the sandbox helper: {line}"))),
                }
            }
            () = sleep_until(drain_at), if self.drain_until.is_some() => {
                // Something outside the sandbox's pid namespace (unconfined mode) still holds
                // the pipes: stop reading.
                self.stdout = None;
                self.stderr = None;
                Ok(None)
            }
            () = sleep_until(give_up_at), if self.killed_at.is_some() && self.exit.is_none() => {
                let _ = self.child.start_kill();
                Err(Error::Internal("the sandbox helper did not stop the command; killed it".to_owned()))
            }
        }
    }
}

/// Reads into `buf` from `pipe` (which is `Some` whenever this is polled).
async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    pipe: Option<&mut R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match pipe {
        Some(pipe) => pipe.read(buf).await,
        None => Ok(0),
    }
}

/// An output event, or the end of that stream.
fn chunk<R>(
    read: std::io::Result<usize>,
    stream: Stream,
    pipe: &mut Option<R>,
    buf: &[u8],
) -> Option<Event> {
    match read {
        Ok(n) if n > 0 => Some(Event::Output(Chunk {
            stream,
            data: buf[..n].to_vec(),
        })),
        _ => {
            *pipe = None;
            None
        }
    }
}

impl Execution for ProcessExecution {
    fn next(&mut self) -> BoxFuture<'_, Result<Event, Error>> {
        Box::pin(async move {
            loop {
                if let Some(event) = self.pending.pop_front() {
                    return Ok(event);
                }
                if let (Some(exit), None, None) = (self.exit, &self.stdout, &self.stderr) {
                    return Ok(Event::Exited(exit));
                }
                if let Some(event) = self.step().await? {
                    return Ok(event);
                }
            }
        })
    }

    fn terminate(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.send(TERM))
    }

    fn processes(&self) -> Option<PathBuf> {
        self.cgroup.as_ref()?.group.as_ref()?.procs_file()
    }

    fn kill(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.send(KILL).await;
            self.control = None;
            self.killed_at.get_or_insert_with(Instant::now);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_maps_only_the_sandbox_user_and_id_maps_the_workspace() {
        let ids = IdMaps::new(0, 0, (65_534, 65_533));
        assert_eq!(ids.uid_map, "0 65534 1\n");
        assert_eq!(ids.gid_map, "0 65533 1\n");
        assert!(ids.idmap);
    }

    #[test]
    fn another_user_maps_only_itself() {
        let ids = IdMaps::new(1000, 100, (65_534, 65_534));
        assert_eq!(ids.uid_map, "0 1000 1\n");
        assert_eq!(ids.gid_map, "0 100 1\n");
        assert!(!ids.idmap);
    }
}
