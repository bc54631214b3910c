//! The `docker` backend: one container per session, from the sandbox image
//! (HEIST_SANDBOX_IMAGE), talked to through the engine API with bollard.
//!
//! - **Container:** created on the session's first command, removed when the session leaves
//!   the worker. Its workspace is bind-mounted at `/workspace`; the root filesystem is
//!   read-only with a tmpfs `/tmp`; it runs as a non-root user (HEIST_SANDBOX_UID/GID when the
//!   worker is root, else the worker's own ids) with every capability dropped and
//!   `no-new-privileges`; network `none` (HEIST_DOCKER_NETWORK); memory (no swap), pids and
//!   CPU limits from the session quotas; the engine's init as PID 1 reaps orphans. Labelled
//!   `io.heist.worker=<worker id>-<digest>` and `io.heist.session=<id>`: at start the worker
//!   removes every container with its label (it owns none yet; adopted sessions get a fresh
//!   container on their next command).
//! - **Commands:** `docker exec` as that user, through `prlimit` for the per-process rlimits
//!   (CPU seconds, address space, open files, file size from the disk quota left), output
//!   streamed into the shared `collect`. Host paths beneath the workspace in argv, the
//!   environment and the working directory become `/workspace/...`; extra read-only paths
//!   (run.python's code) are copied into the session's inbox, mounted read-only at
//!   `/heist/in`; the worker's Python interpreter becomes the image's `python3`.
//! - **Stopping:** the engine has no "kill an exec"; a timeout or cancellation signals every
//!   process of the sandbox user in the container (`kill -1`), which stops the session's other
//!   running commands too. The container's own processes run as another uid (`nobody`), out
//!   of that signal's reach. When even that cannot start (a fork bomb at the pids limit) the
//!   container is killed and restarted for the next command.
//! - **Exit status:** the engine reports an exit code only; codes 129–192 are read as
//!   128 + signal, like a shell does. A command killed by SIGKILL that the worker did not
//!   stop is checked for an OOM kill, answered like the process backend's. While the
//!   container runs, its own cgroup counter (`oom_kill`) decides, and the engine's `oom`
//!   events of the kills it showed are accounted for whenever they arrive (an event trailing
//!   by seconds is not taken for a later command's kill). When the kill took the whole
//!   container down, the engine's `oom` events for the worker's containers (followed from the
//!   start, replayed after the stream breaks) decide: the check waits for one up to
//!   HEIST_DOCKER_OOM_WAIT_MS.
//!   The CPU rlimit is soft at the quota and hard a second later, so SIGXCPU comes first.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bollard::{
    Docker,
    container::LogOutput,
    exec::{CreateExecOptions, StartExecOptions, StartExecResults},
    models::{ContainerCreateBody, HostConfig, Mount, MountType, ResourcesUlimits},
    query_parameters::{
        CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
        RemoveContainerOptionsBuilder,
    },
};
use futures::{Stream, StreamExt as _, future::BoxFuture};
use heist_proto::ids::SessionId;
use tokio::io::AsyncWriteExt as _;
use tracing::{debug, info, warn};

use super::{
    Backend, Chunk, Event, Execution, ExitInfo, Job, MemoryLimit, Settings, Stream as Out,
};
use crate::{Error, quota::Quotas};

/// Label naming the worker (and its workspace directory) that owns a container.
pub const WORKER_LABEL: &str = "io.heist.worker";
/// Label naming the session a container belongs to.
pub const SESSION_LABEL: &str = "io.heist.session";
/// Where the workspace is inside the container.
const WORKSPACE: &str = "/workspace";
/// Where the session's inbox (read-only extra files) is inside the container.
const INBOX: &str = "/heist/in";
/// How long the startup checks may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an exec's exit code may take to appear after its output ended.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// The docker backend's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerSettings {
    /// Engine address (`unix:///...`, `tcp://...`); `None`: DOCKER_HOST, else the local socket.
    pub host: Option<String>,
    /// The sandbox image sessions run in.
    pub image: String,
    /// Network mode of session containers (`none` keeps them off every network).
    pub network: String,
    /// Host directory holding each session's inbox (copied read-only inputs).
    pub inbox_dir: PathBuf,
    /// How long a command killed by SIGKILL (not by the worker), whose container went down
    /// with it, waits for the engine's `oom` event before it is answered as killed rather than
    /// out of memory.
    pub oom_wait: Duration,
}

impl Default for DockerSettings {
    fn default() -> Self {
        Self {
            host: None,
            image: "heist-sandbox:latest".to_owned(),
            network: "none".to_owned(),
            inbox_dir: PathBuf::from("./data/docker-inbox"),
            oom_wait: Duration::from_secs(1),
        }
    }
}

/// One session's container.
struct Container {
    id: String,
    /// (device, inode) of the workspace directory it was created on: a restore that replaces
    /// the directory needs a new bind mount, hence a new container.
    workspace: (u64, u64),
    /// The container's own cgroup OOM kill count already accounted for (it restarts at zero
    /// with the container).
    oom_seen: AtomicU64,
    /// The engine's `oom` events for it already accounted for.
    oom_events_seen: AtomicU64,
}

/// The engine's `oom` events for this worker's containers, counted per container id.
#[derive(Default)]
struct OomEvents {
    counts: Mutex<HashMap<String, u64>>,
    changed: tokio::sync::Notify,
}

impl OomEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, container: &str) {
        *self.lock().entry(container.to_owned()).or_default() += 1;
        self.changed.notify_waiters();
    }

    fn forget(&self, container: &str) {
        self.lock().remove(container);
    }

    /// The container's count now.
    fn count(&self, container: &str) -> u64 {
        self.lock().get(container).copied().unwrap_or(0)
    }

    /// The container's count as soon as it passes `seen`, else what it is after `wait`.
    async fn past(&self, container: &str, seen: u64, wait: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let n = self.count(container);
            if n > seen || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.count(container);
            }
        }
    }
}

/// Follows the engine's `oom` events for containers labelled `label` into `events`. When the
/// stream breaks (an engine restart), it reconnects (after 1 s, doubling to 30 s while it keeps
/// failing) and replays from the last event it counted, so none is lost or counted twice.
async fn follow_oom_events(docker: Docker, label: String, events: Arc<OomEvents>) {
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        ("event".to_owned(), vec!["oom".to_owned()]),
        ("label".to_owned(), vec![format!("{WORKER_LABEL}={label}")]),
    ]);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    // When the last event counted happened (nanoseconds since the epoch).
    let mut last: Option<i64> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let since = last.unwrap_or(started);
        let opts = bollard::query_parameters::EventsOptions {
            since: Some(format!(
                "{}.{:09}",
                since / 1_000_000_000,
                since % 1_000_000_000
            )),
            until: None,
            filters: Some(filters.clone()),
        };
        let opened = tokio::time::Instant::now();
        let mut stream = docker.events(Some(opts));
        while let Some(item) = stream.next().await {
            match item {
                Ok(msg) => {
                    let at = msg.time_nano.unwrap_or(0);
                    if last.is_some_and(|l| at <= l) {
                        continue;
                    }
                    last = Some(at);
                    if let Some(id) = msg.actor.and_then(|a| a.id) {
                        debug!(container = %id, "the engine reports an OOM kill");
                        events.record(&id);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "the engine's event stream broke: reconnecting");
                    break;
                }
            }
        }
        // A stream that held for a while starts the backoff over.
        if opened.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_secs(1);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The docker backend.
pub struct DockerBackend {
    docker: Docker,
    settings: DockerSettings,
    label: String,
    user: String,
    /// Who the container's own processes (init, `sleep infinity`) run as: a uid other than
    /// the sandbox user's, so a command's `kill -1` cannot stop the container under it.
    keeper: String,
    /// Hand workspace entries to the sandbox user before each command (the worker is root).
    chown: Option<(u32, u32)>,
    quotas: Quotas,
    /// The worker's interpreter, replaced by the image's `python3`.
    python: Option<PathBuf>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: tokio::sync::Mutex<()>,
    oom_events: Arc<OomEvents>,
    /// The task following the engine's `oom` events; stopped with the backend.
    oom_follower: tokio::task::JoinHandle<()>,
}

fn engine_error(what: &str, err: &bollard::errors::Error) -> Error {
    Error::SandboxUnavailable {
        missing: "docker",
        message: format!("docker engine: {what}: {err}"),
    }
}

/// Connects to the engine, checks the image and sweeps this worker's old containers; the
/// error says why the backend cannot work (the worker then refuses commands).
pub async fn connect(settings: &Settings) -> Result<(DockerBackend, Vec<String>), String> {
    let ds = settings.docker.clone();
    let docker = match &ds.host {
        Some(host) => Docker::connect_with_host(host),
        None => Docker::connect_with_defaults(),
    }
    .map_err(|e| format!("cannot reach the docker engine: {e}"))?;
    let probe = async {
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| format!("the docker engine does not answer: {e}"))?;
        docker.inspect_image(&ds.image).await.map_err(|e| {
            format!(
                "the sandbox image {} is not on the engine ({e}): build it with `make \
                 docker-sandbox` or set HEIST_SANDBOX_IMAGE",
                ds.image
            )
        })?;
        Ok::<_, String>(docker)
    };
    let docker = tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .map_err(|_| "the docker engine did not answer in time".to_owned())??;
    let euid = nix::unistd::geteuid().as_raw();
    let (uid, gid, chown) = if euid == 0 {
        (
            settings.uid,
            settings.gid,
            Some((settings.uid, settings.gid)),
        )
    } else {
        (euid, nix::unistd::getegid().as_raw(), None)
    };
    heist_proto::files::private_dir(&ds.inbox_dir)
        .map_err(|e| format!("cannot create {}: {e}", ds.inbox_dir.display()))?;
    let oom_events = Arc::new(OomEvents::default());
    let oom_follower = tokio::spawn(follow_oom_events(
        docker.clone(),
        settings.cgroup_name.clone(),
        Arc::clone(&oom_events),
    ));
    let backend = DockerBackend {
        docker,
        label: settings.cgroup_name.clone(),
        user: format!("{uid}:{gid}"),
        keeper: keeper_user(uid),
        chown,
        quotas: settings.quotas.clone(),
        python: None,
        containers: Mutex::new(HashMap::new()),
        creating: tokio::sync::Mutex::new(()),
        oom_events,
        oom_follower,
        settings: ds,
    };
    backend.sweep().await.map_err(|e| e.to_string())?;
    let network = if backend.settings.network == "none" {
        "netns:none".to_owned()
    } else {
        format!("network:{}", backend.settings.network)
    };
    let isolation = vec![
        "docker".to_owned(),
        format!("image:{}", backend.settings.image),
        network,
        "rootfs:read-only".to_owned(),
        "caps:none".to_owned(),
        "no_new_privs".to_owned(),
        format!("user:{uid}"),
        "cgroup:memory,pids,cpu".to_owned(),
    ];
    info!(image = %backend.settings.image, label = %backend.label, "docker sandbox ready");
    Ok((backend, isolation))
}

impl DockerBackend {
    /// The worker's interpreter path, which commands name as the image's `python3`.
    pub fn set_python(&mut self, python: Option<PathBuf>) {
        self.python = python;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes every container labelled as this worker's (at start it owns none).
    async fn sweep(&self) -> Result<(), Error> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{WORKER_LABEL}={}", self.label)],
        )]);
        let list = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let stale = self
            .docker
            .list_containers(Some(list))
            .await
            .map_err(|e| engine_error("cannot list containers", &e))?;
        for c in stale {
            if let Some(id) = c.id {
                info!(container = %id, "removing a container this worker left behind");
                self.remove(&id).await;
            }
        }
        Ok(())
    }

    async fn remove(&self, id: &str) {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => warn!(container = %id, error = %e, "cannot remove a sandbox container"),
        }
        self.oom_events.forget(id);
    }

    fn inbox(&self, session: &str) -> PathBuf {
        self.settings.inbox_dir.join(session)
    }

    /// The session's container, created (or re-created after a restore) and running.
    async fn container(&self, job: &Job) -> Result<Arc<Container>, Error> {
        let meta = tokio::fs::metadata(&job.root)
            .await
            .map_err(|e| Error::io("cannot stat the workspace", e))?;
        let workspace = (meta.dev(), meta.ino());
        let _creating = self.creating.lock().await;
        let existing = self.lock().get(&job.session).cloned();
        if let Some(c) = existing {
            if c.workspace == workspace {
                if self.ensure_running(&c.id).await? {
                    // A restarted container's cgroup counts from zero.
                    c.oom_seen.store(0, Ordering::SeqCst);
                }
                return Ok(c);
            }
            self.lock().remove(&job.session);
            self.remove(&c.id).await;
        }
        let c = Arc::new(self.create(job, workspace).await?);
        self.lock().insert(job.session.clone(), Arc::clone(&c));
        Ok(c)
    }

    /// Starts the container if it is not running; whether it had to.
    async fn ensure_running(&self, id: &str) -> Result<bool, Error> {
        let state = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| engine_error("cannot inspect the session's container", &e))?;
        if state.state.and_then(|s| s.running) != Some(true) {
            self.docker
                .start_container(id, None)
                .await
                .map_err(|e| engine_error("cannot restart the session's container", &e))?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn create(&self, job: &Job, workspace: (u64, u64)) -> Result<Container, Error> {
        let inbox = self.inbox(&job.session);
        std::fs::create_dir_all(&inbox).map_err(|e| Error::io("cannot create the inbox", e))?;
        let q = &self.quotas;
        let bind = |source: &Path, target: &str, read_only| Mount {
            source: Some(source.display().to_string()),
            target: Some(target.to_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(read_only),
            ..Mount::default()
        };
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let host = HostConfig {
            mounts: Some(vec![
                bind(&job.root, WORKSPACE, false),
                bind(&inbox, INBOX, true),
            ]),
            network_mode: Some(self.settings.network.clone()),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                format!("rw,nosuid,nodev,size={},mode=1777", q.disk_bytes),
            )])),
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
            init: Some(true),
            memory: Some(signed(q.session_memory_bytes)),
            memory_swap: Some(signed(q.session_memory_bytes)),
            pids_limit: Some(signed(q.session_processes)),
            nano_cpus: Some(signed(q.session_cpu_percent.saturating_mul(10_000_000))),
            ulimits: Some(vec![ResourcesUlimits {
                name: Some("nofile".to_owned()),
                soft: Some(signed(q.open_files)),
                hard: Some(signed(q.open_files)),
            }]),
            ..HostConfig::default()
        };
        let body = ContainerCreateBody {
            image: Some(self.settings.image.clone()),
            user: Some(self.keeper.clone()),
            entrypoint: Some(vec!["sleep".to_owned()]),
            cmd: Some(vec!["infinity".to_owned()]),
            working_dir: Some(WORKSPACE.to_owned()),
            hostname: Some("sandbox".to_owned()),
            network_disabled: Some(self.settings.network == "none"),
            labels: Some(HashMap::from([
                (WORKER_LABEL.to_owned(), self.label.clone()),
                (SESSION_LABEL.to_owned(), job.session.clone()),
            ])),
            host_config: Some(host),
            ..ContainerCreateBody::default()
        };
        let name = container_name(&self.label, &job.session);
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = match self
            .docker
            .create_container(Some(opts.clone()), body.clone())
            .await
        {
            // A container of that name left by a crash between sweep and now: replace it.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                self.remove(&name).await;
                self.docker.create_container(Some(opts), body).await
            }
            other => other,
        }
        .map_err(|e| engine_error("cannot create the session's container", &e))?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            self.remove(&created.id).await;
            return Err(engine_error("cannot start the session's container", &e));
        }
        debug!(session_id = %job.session, container = %created.id, "sandbox container started");
        Ok(Container {
            id: created.id,
            workspace,
            oom_seen: AtomicU64::new(0),
            oom_events_seen: AtomicU64::new(0),
        })
    }

    /// argv (wrapped in `prlimit`), env and cwd with host paths replaced by the container's.
    fn translate(&self, job: &Job) -> (Vec<String>, Vec<String>, String) {
        translate(job, self.python.as_deref())
    }
}

/// argv (wrapped in `prlimit`), env and cwd of `job` with host paths replaced by the
/// container's; `python` (the worker's interpreter) becomes the image's `python3`.
fn translate(job: &Job, python: Option<&Path>) -> (Vec<String>, Vec<String>, String) {
    let mut map: Vec<(String, String)> = job
        .read_only
        .iter()
        .map(|p| (p.display().to_string(), format!("{INBOX}/{}", inbox_key(p))))
        .collect();
    map.push((job.root.display().to_string(), WORKSPACE.to_owned()));
    let tr = |s: &str| -> String {
        for (from, to) in &map {
            if let Some(rest) = s.strip_prefix(from.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return format!("{to}{rest}");
            }
        }
        s.to_owned()
    };
    let mut argv: Vec<String> = job.argv.iter().map(|a| tr(a)).collect();
    if let (Some(first), Some(python)) = (argv.first_mut(), python)
        && Path::new(first.as_str()) == python
    {
        *first = "python3".to_owned();
    }
    let l = &job.limits;
    let mut wrapped = vec![
        "/usr/bin/prlimit".to_owned(),
        // Soft at the quota, hard a second later: SIGXCPU (answered as the CPU quota) first.
        format!(
            "--cpu={}:{}",
            l.cpu_seconds,
            l.cpu_seconds.saturating_add(1)
        ),
        format!("--as={}", l.memory_bytes),
        format!("--nofile={}", l.open_files),
        format!("--fsize={}", l.file_size),
        "--".to_owned(),
    ];
    wrapped.append(&mut argv);
    let env = job
        .env
        .iter()
        .map(|(k, v)| {
            let v = v.split(':').map(tr).collect::<Vec<_>>().join(":");
            format!("{k}={v}")
        })
        .collect();
    (wrapped, env, tr(&job.cwd.display().to_string()))
}

impl Drop for DockerBackend {
    /// A stopping worker removes its sessions' containers (they are re-created on the next
    /// command after a restart; after a crash, the next start sweeps them). Runs on a thread
    /// of its own with a fresh client: the worker's runtime may be shutting down.
    fn drop(&mut self) {
        self.oom_follower.abort();
        let ids: Vec<String> = self.lock().drain().map(|(_, c)| c.id.clone()).collect();
        if ids.is_empty() {
            return;
        }
        let host = self.settings.host.clone();
        let removal = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let docker = match &host {
                    Some(host) => Docker::connect_with_host(host),
                    None => Docker::connect_with_defaults(),
                }
                .map_err(|e| e.to_string())?
                .negotiate_version()
                .await
                .map_err(|e| e.to_string())?;
                let opts = RemoveContainerOptionsBuilder::default().force(true).build();
                for id in ids {
                    if let Err(e) = docker.remove_container(&id, Some(opts.clone())).await {
                        warn!(container = %id, error = %e, "cannot remove a sandbox container");
                    }
                }
                Ok::<(), String>(())
            })
        });
        match removal.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot remove this worker's sandbox containers"),
            Err(_) => warn!("the container removal thread panicked"),
        }
    }
}

/// The container's keeper: `nobody`'s ids, or the next ones down when the sandbox user is
/// `nobody`. Never root, never the sandbox user.
fn keeper_user(sandbox_uid: u32) -> String {
    const NOBODY: u32 = 65534;
    let id = if sandbox_uid == NOBODY {
        NOBODY - 1
    } else {
        NOBODY
    };
    format!("{id}:{id}")
}

/// A container name from the worker label and the session id (`[A-Za-z0-9_.-]` only).
fn container_name(label: &str, session: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("heist-{}-{}", clean(label), clean(session))
}

/// The inbox folder a read-only path is copied to.
fn inbox_key(path: &Path) -> String {
    let hash = blake3::hash(path.as_os_str().as_encoded_bytes());
    hash.to_hex()[..16].to_owned()
}

/// Copies `from` (a file or directory tree) to `to`, readable by everyone.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if meta.is_file() {
        std::fs::copy(from, to)?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// Gives every entry beneath `root` (and `root`) to `ids`, not following symlinks.
fn chown_tree(root: &Path, ids: (u32, u32)) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(root)?;
    if meta.uid() != ids.0 || meta.gid() != ids.1 {
        std::os::unix::fs::lchown(root, Some(ids.0), Some(ids.1))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(root)? {
            chown_tree(&entry?.path(), ids)?;
        }
    }
    Ok(())
}

/// Runs a short helper command in `container` as `user`; its exit code and stdout.
async fn run_quick(
    docker: &Docker,
    container: &str,
    user: &str,
    cmd: &[&str],
) -> Result<(Option<i64>, Vec<u8>), bollard::errors::Error> {
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                cmd: Some(cmd.iter().map(|s| (*s).to_owned()).collect()),
                user: Some(user.to_owned()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..CreateExecOptions::default()
            },
        )
        .await?;
    let mut out = Vec::new();
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while let Some(item) = output.next().await {
            if let LogOutput::StdOut { message } = item? {
                out.extend_from_slice(&message);
            }
        }
    }
    let code = exit_code(docker, &exec.id).await?;
    Ok((code, out))
}

/// An exec's exit code, waiting (with a deadline) for the engine to record it.
async fn exit_code(docker: &Docker, exec: &str) -> Result<Option<i64>, bollard::errors::Error> {
    let deadline = tokio::time::Instant::now() + EXIT_WAIT;
    loop {
        let inspect = docker.inspect_exec(exec).await?;
        if inspect.running != Some(true) || tokio::time::Instant::now() >= deadline {
            return Ok(inspect.exit_code);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `oom_kill` count in the container's memory cgroup (v2 `memory.events`, v1
/// `memory.oom_control`), as the container sees it.
async fn oom_kills(docker: &Docker, container: &str, user: &str) -> Option<u64> {
    let script = "cat /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control \
                  2>/dev/null; true";
    let (_, out) = run_quick(docker, container, user, &["/bin/sh", "-c", script])
        .await
        .ok()?;
    String::from_utf8_lossy(&out).lines().find_map(|line| {
        line.strip_prefix("oom_kill ")
            .and_then(|n| n.trim().parse().ok())
    })
}

/// Signals every process of the sandbox user in the container; when no process can start
/// there (the pids limit is reached), kills the container itself.
async fn signal_all(docker: &Docker, container: &str, user: &str, signal: &str) {
    let script = format!("kill -{signal} -1");
    let sent = run_quick(docker, container, user, &["/bin/sh", "-c", &script]).await;
    if sent.is_err() && signal == "KILL" {
        warn!(container = %container, "cannot start kill in the container: killing the container");
        let opts = KillContainerOptionsBuilder::default()
            .signal("KILL")
            .build();
        if let Err(e) = docker.kill_container(container, Some(opts)).await {
            warn!(container = %container, error = %e, "cannot kill the container");
            return;
        }
        // The next command restarts it; one that looks before it has stopped would find a
        // dying container and fail.
        let deadline = tokio::time::Instant::now() + EXIT_WAIT;
        while tokio::time::Instant::now() < deadline {
            match docker.inspect_container(container, None).await {
                Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => break,
            }
        }
    }
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// A command running in a session's container.
struct DockerExecution {
    docker: Docker,
    container: Arc<Container>,
    user: String,
    exec: String,
    output: OutputStream,
    finished: bool,
    stopped: bool,
    memory: MemoryLimit,
    oom_events: Arc<OomEvents>,
    oom_wait: Duration,
    /// How the command ended, being read (set once its output ended).
    exit: Option<BoxFuture<'static, Result<ExitInfo, Error>>>,
}

/// Whether the container had an OOM kill since the last one accounted for. While it still
/// runs, its own cgroup counter says, and the engine's events of the kills it counted are
/// taken as seen, arrived or not: an event trailing its kill must not make a later command's
/// SIGKILL look like one. When the counter cannot be read (the kill took the container down),
/// the engine's `oom` event says (waited for up to `wait`).
async fn out_of_memory(
    docker: &Docker,
    c: &Container,
    user: &str,
    events: &OomEvents,
    wait: Duration,
) -> bool {
    let seen = c.oom_events_seen.load(Ordering::SeqCst);
    if let Some(n) = oom_kills(docker, &c.id, user).await {
        let kills = n.saturating_sub(c.oom_seen.fetch_max(n, Ordering::SeqCst));
        let arrived = events.count(&c.id);
        c.oom_events_seen
            .fetch_max(arrived.max(seen + kills), Ordering::SeqCst);
        return kills > 0;
    }
    let now = events.past(&c.id, seen, wait).await;
    c.oom_events_seen.fetch_max(now, Ordering::SeqCst);
    now > seen
}

impl DockerExecution {
    /// Reads how the command ended, once its output has: the exit code, and for a SIGKILL
    /// the worker did not send, whether it was an OOM kill. A future of its own, kept in
    /// `self.exit`: `next` is cancelled by the caller's other events and resumes it.
    fn read_exit(&self) -> BoxFuture<'static, Result<ExitInfo, Error>> {
        let (docker, exec, container) = (
            self.docker.clone(),
            self.exec.clone(),
            Arc::clone(&self.container),
        );
        let (user, events) = (self.user.clone(), Arc::clone(&self.oom_events));
        let (stopped, memory, wait) = (self.stopped, self.memory, self.oom_wait);
        Box::pin(async move {
            let code = exit_code(&docker, &exec)
                .await
                .map_err(|e| engine_error("cannot read the command's exit code", &e))?;
            let mut exit = ExitInfo::default();
            match code {
                Some(c) if (129..=192).contains(&c) => exit.signal = i32::try_from(c - 128).ok(),
                Some(c) => exit.code = i32::try_from(c).ok(),
                None => exit.signal = Some(9),
            }
            if exit.signal == Some(9)
                && !stopped
                && out_of_memory(&docker, &container, &user, &events, wait).await
            {
                exit.out_of_memory = Some(memory);
            }
            Ok(exit)
        })
    }
}

impl Execution for DockerExecution {
    fn next(&mut self) -> BoxFuture<'_, Result<Event, Error>> {
        Box::pin(async move {
            if self.exit.is_none() {
                while let Some(item) = self.output.next().await {
                    let (stream, data) = match item {
                        Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                            (Out::Stdout, message)
                        }
                        Ok(LogOutput::StdErr { message }) => (Out::Stderr, message),
                        Ok(LogOutput::StdIn { .. }) => continue,
                        // The attach connection broke (e.g. the container was killed): the
                        // exit code tells the rest.
                        Err(e) => {
                            debug!(error = %e, "exec output ended with an error");
                            break;
                        }
                    };
                    return Ok(Event::Output(Chunk {
                        stream,
                        data: data.to_vec(),
                    }));
                }
                self.finished = true;
                self.exit = Some(self.read_exit());
            }
            let reading = self.exit.as_mut().expect("set when the output ended");
            let exit = reading.await;
            self.exit = None;
            Ok(Event::Exited(exit?))
        })
    }

    fn terminate(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stopped = true;
            signal_all(&self.docker, &self.container.id, &self.user, "TERM").await;
        })
    }

    fn kill(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stopped = true;
            signal_all(&self.docker, &self.container.id, &self.user, "KILL").await;
        })
    }
}

impl Drop for DockerExecution {
    /// A dropped command (cancelled call, closed session) is killed.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let docker = self.docker.clone();
            let container = self.container.id.clone();
            let user = self.user.clone();
            handle.spawn(async move { signal_all(&docker, &container, &user, "KILL").await });
        }
    }
}

impl Backend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn prepare<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if let Some(ids) = self.chown {
                let root = job.root.clone();
                tokio::task::spawn_blocking(move || chown_tree(&root, ids))
                    .await
                    .map_err(|e| Error::Internal(format!("chown task failed: {e}")))?
                    .map_err(|e| Error::io("cannot hand the workspace to the sandbox user", e))?;
            }
            if !job.read_only.is_empty() {
                let inbox = self.inbox(&job.session);
                let paths = job.read_only.clone();
                tokio::task::spawn_blocking(move || {
                    paths
                        .iter()
                        .try_for_each(|p| copy_tree(p, &inbox.join(inbox_key(p))))
                })
                .await
                .map_err(|e| Error::Internal(format!("copy task failed: {e}")))?
                .map_err(|e| Error::io("cannot copy the command's inputs", e))?;
            }
            self.container(job).await.map(drop)
        })
    }

    fn exec<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Box<dyn Execution>, Error>> {
        Box::pin(async move {
            let container = self
                .lock()
                .get(&job.session)
                .cloned()
                .ok_or_else(|| Error::Internal("the session has no container".to_owned()))?;
            let (cmd, env, cwd) = self.translate(job);
            let stdin = !job.stdin.is_empty();
            let exec = self
                .docker
                .create_exec(
                    &container.id,
                    CreateExecOptions {
                        cmd: Some(cmd),
                        env: Some(env),
                        working_dir: Some(cwd),
                        user: Some(self.user.clone()),
                        attach_stdin: Some(stdin),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..CreateExecOptions::default()
                    },
                )
                .await
                .map_err(|e| engine_error("cannot create the command", &e))?;
            let start = StartExecOptions {
                output_capacity: Some(64 * 1024),
                ..StartExecOptions::default()
            };
            let StartExecResults::Attached { output, mut input } = self
                .docker
                .start_exec(&exec.id, Some(start))
                .await
                .map_err(|e| engine_error("cannot start the command", &e))?
            else {
                return Err(Error::Internal("the exec started detached".to_owned()));
            };
            if stdin {
                let data = job.stdin.clone();
                tokio::spawn(async move {
                    // A command that exits without reading its input is not an error.
                    let _ = input.write_all(&data).await;
                    let _ = input.shutdown().await;
                });
            }
            Ok(Box::new(DockerExecution {
                docker: self.docker.clone(),
                container,
                user: self.user.clone(),
                exec: exec.id,
                output,
                finished: false,
                stopped: false,
                memory: MemoryLimit {
                    quota: "session_memory_bytes",
                    bytes: self.quotas.session_memory_bytes,
                },
                oom_events: Arc::clone(&self.oom_events),
                oom_wait: self.settings.oom_wait,
                exit: None,
            }) as Box<dyn Execution>)
        })
    }

    fn cleanup<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for p in &job.read_only {
                let dir = self.inbox(&job.session).join(inbox_key(p));
                let _ = tokio::fs::remove_dir_all(&dir).await;
                let _ = tokio::fs::remove_file(&dir).await;
            }
        })
    }

    fn close_session<'a>(
        &'a self,
        session: &'a SessionId,
        _path: &'a Path,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let key = session.to_string();
            let container = self.lock().remove(&key);
            let id = container.map_or_else(|| container_name(&self.label, &key), |c| c.id.clone());
            self.remove(&id).await;
            let _ = tokio::fs::remove_dir_all(self.inbox(&key)).await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_become_container_paths() {
        let code = PathBuf::from("/tmp/heist-run-x");
        let job = Job {
            session: "s1".to_owned(),
            root: PathBuf::from("/ws/s1"),
            argv: vec![
                "/opt/py/bin/python3.11".to_owned(),
                "/tmp/heist-run-x/main.py".to_owned(),
                "/ws/s1/data".to_owned(),
                "/ws/s10".to_owned(),
            ],
            cwd: PathBuf::from("/ws/s1/sub"),
            env: vec![
                ("HOME".to_owned(), "/ws/s1".to_owned()),
                ("PYTHONPATH".to_owned(), "/ws/s1:/ws/s1/lib".to_owned()),
            ],
            stdin: Vec::new(),
            timeout: Duration::from_secs(1),
            read_only: vec![code.clone()],
            limits: super::super::CommandLimits {
                file_size: 10,
                processes: 1,
                cpu_seconds: 2,
                memory_bytes: 3,
                open_files: 4,
                nice: 19,
            },
        };
        let (argv, env, cwd) = translate(&job, Some(Path::new("/opt/py/bin/python3.11")));
        let inbox = format!("{INBOX}/{}", inbox_key(&code));
        assert_eq!(
            argv,
            [
                "/usr/bin/prlimit",
                "--cpu=2:3",
                "--as=3",
                "--nofile=4",
                "--fsize=10",
                "--",
                "python3",
                &format!("{inbox}/main.py"),
                "/workspace/data",
                "/ws/s10",
            ]
        );
        assert_eq!(
            env,
            ["HOME=/workspace", "PYTHONPATH=/workspace:/workspace/lib"]
        );
        assert_eq!(cwd, "/workspace/sub");
    }

    #[test]
    fn container_names_keep_to_the_engines_alphabet() {
        assert_eq!(
            container_name("w-1-abc", "s:1/x"),
            "heist-w-1-abc-s_1_x".to_owned()
        );
    }
}
