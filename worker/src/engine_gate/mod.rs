//! `worker engine-gate`: the restricted path from workers in containers to the Docker engine.
//!
//! The engine's API is root on its host, so a worker never holds the raw socket. The gate
//! does: it listens on a Unix socket of its own (shared with the workers through a volume)
//! and passes on only what the docker sandbox backend does ([`policy`]): version probes, the
//! sandbox image's inspect, lists filtered by the worker label, creating containers that are
//! confined (sandbox image, non-root, read-only, no capabilities, no-new-privileges, limits,
//! the configured network, bind mounts only beneath the workspaces directory), and start,
//! inspect, kill, wait, remove and exec on containers carrying the worker label. Exec output
//! (an upgraded connection) is relayed byte for byte.
//!
//! Bind sources are rewritten from the gate's view of the workspaces directory to the host's
//! (found from the gate's own container's mounts, or given), so the workers and the gate
//! mount the same volume at the same path.

pub mod policy;

use std::{
    collections::HashSet,
    convert::Infallible,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use self::policy::{Denied, Policy, Route};

/// How many verified container and exec ids are remembered before the sets start over.
const REMEMBERED: usize = 4096;
/// How long a call to the engine may take to answer (exec streams, once upgraded, are not
/// bounded).
const ENGINE_TIMEOUT: Duration = Duration::from_secs(60);

/// The gate's settings (`worker engine-gate --help`).
#[derive(Debug, Clone, clap::Args)]
pub struct GateArgs {
    /// The Unix socket the gate listens on (workers set HEIST_DOCKER_HOST=unix://<this>).
    #[arg(
        long,
        env = "HEIST_GATE_SOCKET",
        default_value = "/run/heist-engine/engine.sock"
    )]
    pub socket: PathBuf,
    /// The engine's own Unix socket.
    #[arg(
        long,
        env = "HEIST_GATE_ENGINE",
        default_value = "/var/run/docker.sock"
    )]
    pub engine: PathBuf,
    /// The only image session containers may be made from.
    #[arg(
        long,
        env = "HEIST_SANDBOX_IMAGE",
        default_value = "heist-sandbox:latest"
    )]
    pub image: String,
    /// The only network mode session containers may have.
    #[arg(long, env = "HEIST_DOCKER_NETWORK", default_value = "none")]
    pub network: String,
    /// The workspaces directory (the workers' volume, mounted here at the same path).
    #[arg(
        long,
        env = "HEIST_GATE_WORKSPACES",
        default_value = "/var/lib/heist/workspaces"
    )]
    pub workspaces: PathBuf,
    /// The host's path of that directory; `auto`: the source of the gate's own container's
    /// mount there, or the same path when the gate is not in a container.
    #[arg(long, env = "HEIST_GATE_HOST_WORKSPACES", default_value = "auto")]
    pub host_workspaces: String,
    /// Owner of the socket, `uid:gid` (another uid needs CAP_CHOWN; the gate's own uid and a
    /// group it is in do not); unset: the gate's own.
    #[arg(long, env = "HEIST_GATE_SOCKET_OWNER")]
    pub socket_owner: Option<String>,
    /// Permission bits of the socket, octal.
    #[arg(long, env = "HEIST_GATE_SOCKET_MODE", default_value = "660")]
    pub socket_mode: String,
    /// Largest request body passed on, in bytes (container and exec bodies are a few KiB).
    #[arg(long, env = "HEIST_GATE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Most sandbox containers (running or not, of every worker) the gate lets exist: a
    /// create beyond it is refused.
    #[arg(long, env = "HEIST_GATE_MAX_CONTAINERS", default_value_t = 512)]
    pub max_containers: usize,
    /// Ask a running gate's socket for the engine's `/_ping` and exit 0 when it answers (the
    /// container's healthcheck).
    #[arg(long)]
    pub probe: bool,
}

type Body = BoxBody<Bytes, hyper::Error>;

struct Gate {
    engine: PathBuf,
    policy: Policy,
    max_body: usize,
    max_containers: usize,
    /// Full ids of containers seen carrying the worker label (labels never change).
    containers: Mutex<HashSet<String>>,
    /// Exec ids created through the gate on such containers.
    execs: Mutex<HashSet<String>>,
}

/// Runs the gate until `shutdown` resolves.
pub async fn run(
    args: GateArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if args.probe {
        return probe(&args.socket).await;
    }
    let workspaces = std::fs::canonicalize(&args.workspaces)
        .with_context(|| format!("the workspaces directory {}", args.workspaces.display()))?;
    let host_workspaces = match args.host_workspaces.as_str() {
        "auto" => own_mount_source(&args.engine, &workspaces)
            .await?
            .unwrap_or_else(|| workspaces.clone()),
        path => PathBuf::from(path),
    };
    let gate = Arc::new(Gate {
        engine: args.engine.clone(),
        policy: Policy {
            image: args.image.clone(),
            network: args.network.clone(),
            workspaces,
            host_workspaces,
        },
        max_body: args.max_body_bytes,
        max_containers: args.max_containers,
        containers: Mutex::new(HashSet::new()),
        execs: Mutex::new(HashSet::new()),
    });
    let listener = bind(&args)?;
    info!(
        socket = %args.socket.display(),
        engine = %args.engine.display(),
        image = %gate.policy.image,
        network = %gate.policy.network,
        workspaces = %gate.policy.workspaces.display(),
        host_workspaces = %gate.policy.host_workspaces.display(),
        "engine gate listening"
    );
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let gate = Arc::clone(&gate);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let gate = Arc::clone(&gate);
                async move { Ok::<_, Infallible>(gate.handle(req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
            {
                debug!(error = %e, "gate connection ended");
            }
        });
    }
    let _ = std::fs::remove_file(&args.socket);
    info!("engine gate stopped");
    Ok(())
}

/// Binds the socket (replacing a stale one) with its owner and mode.
fn bind(args: &GateArgs) -> anyhow::Result<UnixListener> {
    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&args.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("removing the stale socket"),
    }
    let listener = UnixListener::bind(&args.socket)
        .with_context(|| format!("binding {}", args.socket.display()))?;
    let mode = u32::from_str_radix(&args.socket_mode, 8)
        .with_context(|| format!("--socket-mode {:?} is not octal", args.socket_mode))?;
    // The mode first: once the socket is handed over, only its owner may change it.
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(mode))
        .context("setting the socket's mode")?;
    if let Some(owner) = &args.socket_owner {
        let (uid, gid) = owner
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
            .with_context(|| format!("--socket-owner {owner:?} is not uid:gid"))?;
        std::os::unix::fs::chown(&args.socket, Some(uid), Some(gid))
            .context("handing the socket to its owner")?;
    }
    Ok(listener)
}

/// The host source of the gate's own container's mount at `dir`, when the gate runs in one of
/// the engine's containers (its host name is its container id); `None` elsewhere.
async fn own_mount_source(engine: &Path, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    if !Path::new("/.dockerenv").exists() {
        return Ok(None);
    }
    let me = nix::unistd::gethostname()
        .context("reading the host name")?
        .to_string_lossy()
        .into_owned();
    let inspect = match engine_json(engine, &format!("/containers/{me}/json")).await {
        Ok(inspect) => inspect,
        // In a container this engine does not run (the engine shares the gate's file system).
        Err(e) if e.to_string().starts_with("404") => {
            info!(host_name = %me, "not in one of this engine's containers: host paths are the gate's");
            return Ok(None);
        }
        Err(e) => return Err(e.context(format!("inspecting the gate's own container {me}"))),
    };
    let source = inspect["Mounts"].as_array().and_then(|mounts| {
        mounts.iter().find_map(|m| {
            (m["Destination"].as_str().map(Path::new) == Some(dir))
                .then(|| m["Source"].as_str().map(PathBuf::from))
                .flatten()
        })
    });
    match source {
        Some(source) => Ok(Some(source)),
        None => anyhow::bail!(
            "the gate's container has no mount at {}: mount the workers' workspaces volume \
             there, or set --host-workspaces",
            dir.display()
        ),
    }
}

/// `GET path` on the engine, parsed.
async fn engine_json(engine: &Path, path: &str) -> anyhow::Result<Value> {
    let req = Request::get(path)
        .header(header::HOST, "docker")
        .body(Full::new(Bytes::new()))?;
    let resp = send(engine, req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body)?)
}

/// One request on a fresh connection to the engine (kept open for an upgrade).
async fn send(engine: &Path, req: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>> {
    let exchange = async {
        let stream = UnixStream::connect(engine)
            .await
            .with_context(|| format!("connecting to the engine at {}", engine.display()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "engine connection ended");
            }
        });
        Ok::<_, anyhow::Error>(sender.send_request(req).await?)
    };
    tokio::time::timeout(ENGINE_TIMEOUT, exchange)
        .await
        .context("the engine did not answer in time")?
}

/// The gate's socket answers `/_ping`.
async fn probe(socket: &Path) -> anyhow::Result<()> {
    let ping = tokio::time::timeout(Duration::from_secs(3), engine_json_raw(socket, "/_ping"))
        .await
        .context("the gate did not answer in time")??;
    anyhow::ensure!(ping.trim() == "OK", "the gate answered {ping:?}");
    Ok(())
}

async fn engine_json_raw(socket: &Path, path: &str) -> anyhow::Result<String> {
    let req = Request::get(path)
        .header(header::HOST, "docker")
        .body(Full::new(Bytes::new()))?;
    let resp = send(socket, req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// An answer in the engine's error format, which Docker clients print.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "message": message }).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())
        .unwrap_or_else(|_| Response::new(BoxBody::default()))
}

fn remember(set: &Mutex<HashSet<String>>, id: &str) {
    let mut set = set.lock().unwrap_or_else(PoisonError::into_inner);
    if set.len() >= REMEMBERED {
        set.clear();
    }
    set.insert(id.to_owned());
}

fn known(set: &Mutex<HashSet<String>>, id: &str) -> bool {
    set.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(id)
}

enum Refusal {
    Denied(Denied),
    Engine(anyhow::Error),
}

impl From<Denied> for Refusal {
    fn from(d: Denied) -> Self {
        Self::Denied(d)
    }
}

impl From<anyhow::Error> for Refusal {
    fn from(e: anyhow::Error) -> Self {
        Self::Engine(e)
    }
}

impl Gate {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        match self.pass(req).await {
            Ok(resp) => resp,
            Err(Refusal::Denied(Denied(why))) => {
                warn!(%method, %path, reason = %why, "engine gate refused a call");
                error(StatusCode::FORBIDDEN, &format!("engine gate: {why}"))
            }
            Err(Refusal::Engine(e)) => {
                warn!(%method, %path, error = %format!("{e:#}"), "engine gate: engine call failed");
                error(
                    StatusCode::BAD_GATEWAY,
                    &format!("engine gate: the engine: {e:#}"),
                )
            }
        }
    }

    async fn pass(&self, mut req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
        let downstream = hyper::upgrade::on(&mut req);
        let (parts, body) = req.into_parts();
        let route = policy::route(&parts.method, parts.uri.path())?;
        let mut body = Limited::new(body, self.max_body)
            .collect()
            .await
            .map_err(|e| {
                Denied(format!(
                    "request body over {} bytes or unreadable: {e}",
                    self.max_body
                ))
            })?
            .to_bytes();
        let mut created_exec = false;
        let mut created_container = false;
        match route {
            Route::Probe | Route::ImageInspect => {}
            Route::ContainerList | Route::Events => policy::check_list(parts.uri.query())?,
            Route::ContainerCreate => {
                let mut json = parse(&body)?;
                self.policy.check_create(&mut json)?;
                self.check_count().await?;
                body = Bytes::from(json.to_string());
                created_container = true;
            }
            Route::Container { id, exec } => {
                self.check_container(id).await?;
                if exec {
                    policy::check_exec(&parse(&body)?)?;
                    created_exec = true;
                }
            }
            Route::Exec { id } => self.check_exec_id(id).await?,
        }
        let mut forward = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
        for (name, value) in &parts.headers {
            if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
                forward = forward.header(name, value);
            }
        }
        if !body.is_empty() || parts.method == Method::POST {
            forward = forward.header(header::CONTENT_LENGTH, body.len());
        }
        let forward = forward
            .body(Full::new(body))
            .map_err(|e| anyhow::anyhow!("rebuilding the request: {e}"))?;
        let mut resp = send(&self.engine, forward).await?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(upstream, downstream) {
                    Ok((up, down)) => {
                        let (mut up, mut down) = (TokioIo::new(up), TokioIo::new(down));
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            });
            return Ok(resp.map(|b| b.boxed()));
        }
        if (created_exec || created_container) && resp.status().is_success() {
            // Remember what was made through the gate, so later calls on it skip a lookup.
            let (head, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the engine's answer: {e}"))?
                .to_bytes();
            if let Some(id) = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["Id"].as_str().map(str::to_owned))
            {
                remember(
                    if created_exec {
                        &self.execs
                    } else {
                        &self.containers
                    },
                    &id,
                );
            }
            return Ok(Response::from_parts(
                head,
                Full::new(bytes).map_err(|e| match e {}).boxed(),
            ));
        }
        Ok(resp.map(|b| b.boxed()))
    }

    /// Fewer sandbox containers exist than the gate allows.
    async fn check_count(&self) -> Result<(), Refusal> {
        let filters = serde_json::json!({ "label": [crate::sandbox::WORKER_LABEL] }).to_string();
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("all", "true")
            .append_pair("filters", &filters)
            .finish();
        let list = engine_json(&self.engine, &format!("/containers/json?{query}")).await?;
        let n = list.as_array().map_or(0, Vec::len);
        if n >= self.max_containers {
            return Err(Denied(format!(
                "{n} sandbox containers exist, the most allowed (HEIST_GATE_MAX_CONTAINERS); \
                 close sessions first"
            ))
            .into());
        }
        Ok(())
    }

    /// The container carries the worker label (looked up once per full id).
    async fn check_container(&self, id: &str) -> Result<(), Refusal> {
        if known(&self.containers, id) {
            return Ok(());
        }
        let inspect = self.inspect(&format!("/containers/{id}/json")).await?;
        if !policy::is_sandbox_container(&inspect) {
            return Err(Denied(format!("container {id} is not a heist sandbox container")).into());
        }
        if let Some(full) = inspect["Id"].as_str() {
            remember(&self.containers, full);
        }
        Ok(())
    }

    /// The exec was made through the gate, or belongs to a labelled container.
    async fn check_exec_id(&self, id: &str) -> Result<(), Refusal> {
        if known(&self.execs, id) {
            return Ok(());
        }
        let exec = self.inspect(&format!("/exec/{id}/json")).await?;
        let container = exec["ContainerID"]
            .as_str()
            .ok_or_else(|| Denied(format!("exec {id} names no container")))?;
        self.check_container(container).await?;
        remember(&self.execs, id);
        Ok(())
    }

    /// A lookup on the engine; a missing object is refused as unknown.
    async fn inspect(&self, path: &str) -> Result<Value, Refusal> {
        if !path.split('/').all(|s| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        }) {
            return Err(Denied(format!("{path} names an object oddly")).into());
        }
        engine_json(&self.engine, path)
            .await
            .map_err(|e| Denied(format!("cannot look up {path}: {e:#}")).into())
    }
}

fn parse(body: &[u8]) -> Result<Value, Denied> {
    serde_json::from_slice(body).map_err(|e| Denied(format!("the body is not JSON: {e}")))
}
