//! Starts real coordinators and workers in this process (port 0, temp dirs) or as child processes,
//! and talks to them through the generated clients.

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use heist_proto::v1::{
    self, auth_service_client::AuthServiceClient, cluster_service_client::ClusterServiceClient,
    session_service_client::SessionServiceClient, tool_service_client::ToolServiceClient,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Request, transport::Channel};

pub const JOIN_TOKEN: &str = "test-join-token-0123456789";
pub const ADMIN_ID: &str = "admin";
pub const ADMIN_SECRET: &str = "test-admin-secret-0123456789";

/// A test's scratch directory, removed on drop like a [`tempfile::TempDir`]. File systems
/// mounted beneath it are detached first: the per-session workspaces of a worker killed with
/// SIGKILL (nothing restarts on its base directory to collect them), or of a test that
/// panicked, would otherwise stay mounted with their loop devices after the directory is gone.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for mount in mounts_beneath(self.0.path()) {
            // Lazy: a file system still in use (a killed worker's child not yet reaped) goes
            // when its last user does.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&mount)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A fresh scratch directory under the system temp dir.
pub fn tempdir() -> Scratch {
    Scratch(tempfile::tempdir().expect("tempdir"))
}

/// Every mount point in this process's mount namespace, per /proc/self/mountinfo.
fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_point(field)))
        .collect()
}

/// `path` with symlinks resolved (as mountinfo names it), or as given when it cannot be.
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Mount points at or beneath `dir` in this process's mount namespace, deepest first.
pub fn mounts_beneath(dir: &Path) -> Vec<PathBuf> {
    let dir = resolved(dir);
    let mut found: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|point| point.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Whether `path` is a mount point in this process's mount namespace.
pub fn is_mount_point(path: &Path) -> bool {
    let path = resolved(path);
    mount_points().contains(&path)
}

/// A mountinfo path field with its octal escapes (`\040` for a space, ...) decoded.
fn unescape_mount_point(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// How long any wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `check` until it returns Some, failing the test with `what` after WAIT.
/// A registration for `id` at `addr` as a worker sends it: a fresh call-key share, signed by
/// `key`.
pub fn signed_register(
    id: &str,
    addr: &str,
    key: &heist_proto::identity::WorkerKey,
) -> v1::WorkerMessage {
    let mut register = v1::Register {
        worker_id: id.into(),
        advertise_addr: addr.into(),
        capacity: 4,
        credential_key_share: heist_proto::credential::KeyShare::generate()
            .expect("share")
            .public()
            .to_vec(),
        ..Default::default()
    };
    key.sign_register(&mut register);
    v1::WorkerMessage {
        msg: Some(v1::worker_message::Msg::Register(register)),
    }
}

pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn coordinator_config(data_dir: &Path) -> heist_coordinator::Config {
    heist_coordinator::Config {
        data_dir: data_dir.to_path_buf(),
        join_token: JOIN_TOKEN.into(),
        admin_client_id: ADMIN_ID.into(),
        admin_client_secret: ADMIN_SECRET.into(),
        lease_ttl: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(200),
        ..heist_coordinator::Config::default()
    }
}

/// An in-process coordinator.
pub struct Coordinator {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), heist_coordinator::Error>>,
}

impl Coordinator {
    pub async fn start(config: heist_coordinator::Config) -> Self {
        Self::start_on("127.0.0.1:0", config).await
    }

    pub async fn start_on(bind: &str, config: heist_coordinator::Config) -> Self {
        let listener = TcpListener::bind(bind).await.expect("bind coordinator");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(heist_coordinator::serve(
            listener,
            config,
            stop.clone().cancelled_owned(),
        ));
        let c = Self { addr, stop, task };
        c.wait_serving().await;
        c
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn wait_serving(&self) {
        let url = self.url();
        wait_for("coordinator health SERVING", || {
            let url = url.clone();
            async move { health_serving(&url).await.then_some(()) }
        })
        .await;
    }

    /// Graceful stop; returns what serve returned.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("coordinator task")
            .expect("coordinator serve returned an error");
    }
}

/// The store of a coordinator that was just stopped. Its lock may be released a moment after
/// `serve` returns, so opening is retried (see [`wait_for`]).
pub async fn open_stopped_store(data_dir: &Path) -> heist_coordinator::store::Store {
    wait_for(
        "the stopped coordinator's store to open",
        move || async move { heist_coordinator::store::Store::open(data_dir).ok() },
    )
    .await
}

/// A last-minute change to a test worker's config.
pub type Configure = Box<dyn FnOnce(&mut heist_worker::Config) + Send>;

pub struct WorkerOpts {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub max_sessions: u32,
    pub join_token: String,
    /// Last-minute changes to the worker's config (quotas, sandbox mode, ...).
    pub configure: Option<Configure>,
}

impl WorkerOpts {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            labels: BTreeMap::new(),
            max_sessions: 16,
            join_token: JOIN_TOKEN.into(),
            configure: None,
        }
    }

    pub fn configure(mut self, f: impl FnOnce(&mut heist_worker::Config) + Send + 'static) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn capacity(mut self, n: u32) -> Self {
        self.max_sessions = n;
        self
    }
}

/// An in-process worker on a runtime of its own, so that [`Worker::crash`] can make it vanish
/// the way a killed process does: every task dropped, every socket closed, no goodbye.
pub struct Worker {
    pub id: String,
    pub addr: SocketAddr,
    pub base_workspace: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<Result<(), heist_worker::Error>>,
    runtime: tokio::runtime::Runtime,
}

impl Worker {
    pub async fn start(coordinator_url: &str, base: &Path, opts: WorkerOpts) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("worker-{}", opts.id))
            .enable_all()
            .build()
            .expect("worker runtime");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind worker");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let base_workspace = base.join(&opts.id);
        let mut config = heist_worker::Config {
            worker_id: opts.id.clone(),
            coordinator_addr: coordinator_url.into(),
            advertise_addr: None,
            max_sessions: opts.max_sessions,
            base_workspace: base_workspace.clone(),
            labels: opts.labels,
            join_token: opts.join_token,
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(10),
            sandbox_helper: Some(sibling_binary("heist-sandbox")),
            // Tests that need the per-session file systems ask for them; the rest poll, so a
            // crashed or stopped test worker leaves no mounts. HEIST_TEST_DISK_QUOTA=fs runs
            // them all with it.
            disk_quota: match std::env::var("HEIST_TEST_DISK_QUOTA").as_deref() {
                Ok("fs") => heist_worker::diskfs::DiskQuotaMode::Fs,
                _ => heist_worker::diskfs::DiskQuotaMode::Polling,
            },
            ..heist_worker::Config::default()
        };
        if let Some(configure) = opts.configure {
            configure(&mut config);
        }
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let task = runtime.spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("tokio listener");
            heist_worker::serve(listener, config, shutdown).await
        });
        Self {
            id: opts.id,
            addr,
            base_workspace,
            stop,
            task,
            runtime,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn workspace(&self, session_id: &str) -> PathBuf {
        self.base_workspace.join(session_id)
    }

    /// Graceful stop (what SIGTERM does): drains, says GoingAway, returns what serve returned.
    pub async fn stop(self) {
        self.stop.cancel();
        let result = self.task.await.expect("worker task");
        self.runtime.shutdown_background();
        result.expect("worker serve returned an error");
    }

    /// Drops the worker without any goodbye (its control stream just breaks).
    pub fn crash(self) {
        self.runtime.shutdown_background();
    }
}

pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

pub async fn health_serving(url: &str) -> bool {
    let Ok(endpoint) = Channel::from_shared(url.to_owned()) else {
        return false;
    };
    let Ok(ch) = endpoint.connect().await else {
        return false;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(ch);
    matches!(
        client
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await,
        Ok(resp) if resp.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

pub async fn issue_token(url: &str, id: &str, secret: &str) -> Result<String, tonic::Status> {
    let mut auth = AuthServiceClient::new(channel(url).await);
    let resp = auth
        .issue_token(v1::IssueTokenRequest {
            client_id: id.into(),
            client_secret: secret.into(),
            scopes: vec![],
        })
        .await?;
    Ok(resp.into_inner().access_token)
}

/// Wraps a message with a bearer token.
pub fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    req
}

/// Typed clients for one coordinator, all sharing a channel and a token.
#[derive(Clone)]
pub struct Client {
    pub token: String,
    pub cluster: ClusterServiceClient<Channel>,
    pub sessions: SessionServiceClient<Channel>,
    pub tools: ToolServiceClient<Channel>,
}

impl Client {
    pub async fn admin(url: &str) -> Self {
        let token = issue_token(url, ADMIN_ID, ADMIN_SECRET)
            .await
            .expect("admin token");
        Self::with_token(url, token).await
    }

    pub async fn with_token(url: &str, token: String) -> Self {
        let ch = channel(url).await;
        Self {
            token,
            cluster: ClusterServiceClient::new(ch.clone()),
            sessions: SessionServiceClient::new(ch.clone()),
            tools: ToolServiceClient::new(ch),
        }
    }

    pub async fn workers(&mut self) -> Vec<v1::Worker> {
        self.cluster
            .list_workers(authed(&self.token, v1::ListWorkersRequest {}))
            .await
            .expect("list workers")
            .into_inner()
            .workers
    }

    /// Waits until the listed workers are READY.
    pub async fn wait_ready(&mut self, ids: &[&str]) {
        let want: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        wait_for(&format!("workers {want:?} READY"), || {
            let mut c = self.clone();
            let want = want.clone();
            async move {
                let workers = c.workers().await;
                want.iter()
                    .all(|id| {
                        workers
                            .iter()
                            .any(|w| &w.id == id && w.state == v1::WorkerState::Ready as i32)
                    })
                    .then_some(())
            }
        })
        .await;
    }

    /// Waits until worker `id` is in `state`.
    pub async fn wait_worker_state(&self, id: &str, state: v1::WorkerState) {
        let mut last = None;
        let reached = tokio::time::timeout(WAIT, async {
            loop {
                let now = self.clone().worker_state(id).await;
                if now == Some(state) {
                    return;
                }
                last = now;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "timed out waiting for worker {id} {state:?}; last seen {last:?}"
        );
    }

    pub async fn worker_state(&mut self, id: &str) -> Option<v1::WorkerState> {
        self.workers()
            .await
            .into_iter()
            .find(|w| w.id == id)
            .and_then(|w| v1::WorkerState::try_from(w.state).ok())
    }

    pub async fn create_session(
        &mut self,
        labels: &[(&str, &str)],
    ) -> Result<v1::Session, tonic::Status> {
        self.create_session_allowing(labels, &[]).await
    }

    /// A session whose tool policy is `allowed_tools` (empty: none).
    pub async fn create_session_allowing(
        &mut self,
        labels: &[(&str, &str)],
        allowed_tools: &[&str],
    ) -> Result<v1::Session, tonic::Status> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.sessions
            .create_session(authed(
                &self.token,
                v1::CreateSessionRequest {
                    request_id: String::new(),
                    labels,
                    allowed_tools: allowed_tools.iter().map(|t| (*t).to_owned()).collect(),
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// The tools ListTools shows, by name, sorted (of `session`'s worker when given).
    pub async fn tool_names(&mut self, session: &str) -> Result<Vec<String>, tonic::Status> {
        let resp = self
            .tools
            .list_tools(authed(
                &self.token,
                v1::ListToolsRequest {
                    session_id: session.into(),
                },
            ))
            .await?;
        let mut names: Vec<String> = resp
            .into_inner()
            .tools
            .into_iter()
            .map(|t| t.name)
            .collect();
        names.sort();
        Ok(names)
    }

    pub async fn get_session(&mut self, id: &str) -> Result<v1::Session, tonic::Status> {
        self.sessions
            .get_session(authed(
                &self.token,
                v1::GetSessionRequest {
                    session_id: id.into(),
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn close_session(&mut self, id: &str) -> Result<v1::Session, tonic::Status> {
        self.sessions
            .close_session(authed(
                &self.token,
                v1::CloseSessionRequest {
                    session_id: id.into(),
                    request_id: String::new(),
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn call(
        &mut self,
        session: &str,
        tool: &str,
        args: serde_json::Value,
    ) -> Result<v1::CallToolResponse, tonic::Status> {
        self.call_with_id(session, tool, args, "").await
    }

    pub async fn call_with_id(
        &mut self,
        session: &str,
        tool: &str,
        args: serde_json::Value,
        request_id: &str,
    ) -> Result<v1::CallToolResponse, tonic::Status> {
        let arguments = heist_proto::json::json_to_struct(&args).expect("arguments object");
        self.tools
            .call_tool(authed(
                &self.token,
                v1::CallToolRequest {
                    session_id: session.into(),
                    tool: tool.into(),
                    arguments: Some(arguments),
                    request_id: request_id.into(),
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }
}

/// The text of a response's first text block.
pub fn text_of(resp: &v1::CallToolResponse) -> String {
    resp.content
        .iter()
        .find_map(|b| match &b.block {
            Some(v1::content_block::Block::Text(t)) => Some(t.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// structured_content as JSON.
pub fn structured(resp: &v1::CallToolResponse) -> serde_json::Value {
    resp.structured_content
        .as_ref()
        .map(heist_proto::json::struct_to_json)
        .unwrap_or(serde_json::Value::Null)
}

/// Asserts a status's code and ErrorInfo reason.
#[track_caller]
pub fn assert_status(err: &tonic::Status, code: tonic::Code, reason: &str) {
    assert_eq!(err.code(), code, "unexpected status: {err:?}");
    assert_eq!(
        heist_proto::errors::reason_of(err).as_deref(),
        Some(reason),
        "unexpected reason in {err:?}"
    );
}

/// A binary built next to this crate's `coordinator` binary (`make test` builds every binary first).
/// Runs `heistctl args` against `url` with `token`, in an empty environment whose HOME is
/// `home`; its output.
pub fn heistctl(
    home: &std::path::Path,
    url: &str,
    token: &str,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new(sibling_binary("heistctl"))
        .env_clear()
        .env("HOME", home)
        .env("HEIST_COORDINATOR", url)
        .env("HEIST_TOKEN", token)
        .args(args)
        .output()
        .expect("heistctl")
}

pub fn sibling_binary(name: &str) -> PathBuf {
    let coordinator = PathBuf::from(env!("CARGO_BIN_EXE_coordinator"));
    let path = coordinator.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (make test does) before this test",
        path.display()
    );
    path
}

/// A free loopback port (bound and released; used where a process must be restarted on the same port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A child process killed (SIGKILL) when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Sends SIGTERM (what a service manager does to stop the process).
    pub fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// [`spawn_coordinator_process`], then waits until it serves.
pub async fn coordinator_process(port: u16, data: &Path, log: &Path) -> ChildGuard {
    let child = spawn_coordinator_process(port, data, log);
    let url = format!("http://127.0.0.1:{port}");
    wait_for("coordinator process SERVING", || {
        let url = url.clone();
        async move { health_serving(&url).await.then_some(()) }
    })
    .await;
    child
}

/// Starts the real `coordinator` binary on `port` with `data_dir`.
pub fn spawn_coordinator_process(port: u16, data_dir: &Path, log: &Path) -> ChildGuard {
    spawn_coordinator_process_with(port, data_dir, log, &[])
}

/// [`spawn_coordinator_process`] with extra environment variables.
pub fn spawn_coordinator_process_with(
    port: u16,
    data_dir: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> ChildGuard {
    let log = std::fs::File::create(log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .envs(env.iter().copied())
        .env("GRPC_PORT", port.to_string())
        .env("HEIST_BIND_ADDR", "127.0.0.1")
        .env("HEIST_DATA_DIR", data_dir)
        .env("HEIST_JOIN_TOKEN", JOIN_TOKEN)
        .env("HEIST_ADMIN_CLIENT_ID", ADMIN_ID)
        .env("HEIST_ADMIN_CLIENT_SECRET", ADMIN_SECRET)
        .env("HEIST_HEARTBEAT_INTERVAL_MS", "200")
        .env("HEIST_LEASE_TTL_MS", "3000")
        .env("LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn coordinator");
    ChildGuard(child)
}

/// `GET path` over plain HTTP/1.1 on `addr`: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, "", "").await
}

/// `method path` over plain HTTP/1.1 with extra header lines: the status code and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}
