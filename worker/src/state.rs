//! The worker's shared state and the operations behind each WorkerService call.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use heist_proto::{
    ids::{SessionId, WorkerId},
    json,
    space::Reserve,
    v1::{self, worker_service_server::WorkerServiceServer},
};
use serde_json::{Map, Value as Json};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{Instrument as _, debug, info, instrument};

use crate::{
    Error,
    applied::{self, Applied},
    auth::Auth,
    checkpoint::Checkpointer,
    inflight::InFlight,
    lifecycle::Leave,
    metrics::WorkerMetrics,
    quota::Quotas,
    sandbox::{OutputSink, Sandbox},
    service::WorkerApi,
    sessions::Sessions,
    tools::{Limits, Registry, ToolContext},
};

/// Everything the gRPC handlers and the control loop share.
pub(crate) struct State {
    /// This worker's id.
    pub worker_id: WorkerId,
    /// Open sessions and their workspaces.
    pub sessions: Sessions,
    /// The tool catalogue.
    pub tools: Arc<Registry>,
    /// Verifier of coordinator credentials.
    pub auth: Auth,
    /// Calls being served.
    pub inflight: InFlight,
    /// Limits for tool calls.
    pub limits: Limits,
    /// Cancelled when shutdown stops waiting for in-flight calls.
    pub hard_stop: CancellationToken,
    /// Every task spawned on the worker's behalf (the control loop, evictions, streamed
    /// calls), each with a named span; closed and waited for at shutdown.
    pub tasks: TaskTracker,
    /// Runs commands for exec and run.python (disabled until [`State::with_sandbox`]).
    pub sandbox: Arc<Sandbox>,
    /// Services shared by every tool call (see [`ToolContext::services`]).
    pub services: Arc<http::Extensions>,
    /// Checkpoint capture and restore (none until [`State::with_checkpoints`]).
    pub checkpoints: Option<Checkpointer>,
    /// Agents, the model gateway, agent state and turns (none until [`State::with_agents`]).
    pub agents: Option<Arc<crate::turns::AgentHost>>,
    /// The request ids this worker applied, with their results (none until
    /// [`State::with_applied`]: calls then run without that record).
    pub applied: Option<Applied>,
    /// Prometheus metrics, served on `/metrics`.
    pub metrics: Arc<WorkerMetrics>,
    /// Whether `/metrics` is served without a token.
    pub metrics_public: bool,
    /// Free-space reserves of the state store's and the blob cache's directories: mutating
    /// calls are refused while one is below HEIST_WORKER_MIN_FREE_BYTES (none until
    /// [`State::with_reserves`]).
    pub reserves: Vec<Reserve>,
    /// Whether the control stream is registered right now.
    registered: AtomicBool,
    health: HealthReporter,
}

impl State {
    /// Shared state around `sessions` and `tools`.
    pub fn new(
        worker_id: WorkerId,
        sessions: Sessions,
        tools: Registry,
        limits: Limits,
        health: HealthReporter,
    ) -> Self {
        Self {
            worker_id,
            sessions,
            tools: Arc::new(tools),
            auth: Auth::default(),
            inflight: InFlight::default(),
            limits,
            hard_stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            sandbox: Arc::new(Sandbox::disabled(
                "no sandbox was configured for this worker",
                Quotas::default(),
            )),
            services: Arc::default(),
            checkpoints: None,
            agents: None,
            applied: None,
            metrics: Arc::default(),
            metrics_public: false,
            reserves: Vec::new(),
            registered: AtomicBool::new(false),
            health,
        }
    }

    /// The same state with `checkpoints` capturing and restoring workspaces.
    pub fn with_checkpoints(mut self, checkpoints: Checkpointer) -> Self {
        self.checkpoints = Some(checkpoints);
        self
    }

    /// The same state with `applied` recording what calls with a request id did.
    pub fn with_applied(mut self, applied: Applied) -> Self {
        self.applied = Some(applied);
        self
    }

    /// The same state with `agents` running turns.
    pub fn with_agents(mut self, agents: crate::turns::AgentHost) -> Self {
        self.agents = Some(Arc::new(agents));
        self
    }

    /// The same state with `metrics` (registered with the sandbox's and the gateway's).
    pub fn with_metrics(mut self, metrics: WorkerMetrics, public: bool) -> Self {
        self.metrics = Arc::new(metrics);
        self.metrics_public = public;
        self
    }

    /// The same state with `reserves` guarding its disks.
    pub fn with_reserves(mut self, reserves: Vec<Reserve>) -> Self {
        self.reserves = reserves;
        self
    }

    /// Before a call of `tool` applies anything: refused (STORE_FULL) when the tool is not
    /// read-only and a disk of the worker is below its reserve.
    pub fn writable_for(&self, tool: &str) -> Result<(), Error> {
        if self.tools.read_only(tool) {
            return Ok(());
        }
        self.writable()
    }

    /// Refused (STORE_FULL) while a disk of the worker is below its reserve.
    pub fn writable(&self) -> Result<(), Error> {
        for reserve in &self.reserves {
            reserve.check().map_err(Error::StoreFull)?;
        }
        Ok(())
    }

    /// Measures `reserve` every second, probing the directory with a test write when space is
    /// back, and republishes health whenever it turns (un)writable; ends with `stop`.
    pub async fn watch_space(&self, reserve: Reserve, stop: CancellationToken) {
        let dir = reserve.path().to_path_buf();
        let probe = move || {
            let dir = dir.clone();
            async move {
                match tokio::task::spawn_blocking(move || probe_dir(&dir)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(err) => Err(err.to_string()),
                }
            }
        };
        let mut states = reserve.subscribe();
        let follow = async {
            while states.changed().await.is_ok() {
                self.publish_health().await;
            }
        };
        tokio::select! {
            () = reserve.monitor(SPACE_PERIOD, probe, stop.cancelled()) => {}
            () = follow => {}
        }
    }

    /// The same state with `sandbox` running commands.
    pub fn with_sandbox(mut self, sandbox: Arc<Sandbox>) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// Records whether the control stream is registered and republishes health.
    pub async fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::SeqCst);
        self.publish_health().await;
    }

    /// Stops taking new sessions and republishes health.
    pub async fn drain(&self) {
        self.sessions.set_draining();
        self.publish_health().await;
    }

    /// Why the worker cannot take calls now, if it cannot: it must be registered with its
    /// coordinator, not draining, and its disks above their reserve.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.sessions.is_draining() {
            return Err("draining: the worker is shutting down");
        }
        if !self.registered.load(Ordering::SeqCst) {
            return Err("not registered with the coordinator yet");
        }
        if self.reserves.iter().any(|r| !r.is_writable()) {
            return Err(
                "a disk of the worker (its state store or blob cache) is below its \
                        free-space reserve (HEIST_WORKER_MIN_FREE_BYTES) or cannot be written: \
                        free space there",
            );
        }
        Ok(())
    }

    /// SERVING while registered and not draining, NOT_SERVING otherwise.
    async fn publish_health(&self) {
        let status = if self.readiness().is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in ["", <WorkerServiceServer<WorkerApi> as NamedService>::NAME] {
            self.health.set_service_status(name, status).await;
        }
    }

    /// OpenSession: creates the workspace (idempotent).
    #[instrument(skip_all, fields(session_id = %request.session_id, owner = %request.owner))]
    pub async fn open_session(
        &self,
        request: v1::OpenSessionRequest,
    ) -> Result<v1::OpenSessionResponse, Error> {
        let id = parse_session_id(request.session_id)?;
        self.writable()?;
        let workspace = self.enter_session(id).await?;
        info!(workspace = %workspace.path().display(), "session open");
        Ok(v1::OpenSessionResponse {
            workspace: workspace.path().display().to_string(),
        })
    }

    /// CloseSession: removes the workspace (idempotent).
    #[instrument(skip_all, fields(session_id = %request.session_id))]
    pub async fn close_session(
        &self,
        request: v1::WorkerCloseSessionRequest,
    ) -> Result<v1::WorkerCloseSessionResponse, Error> {
        let id = parse_session_id(request.session_id)?;
        let was_open = self.leave_session(&id, Leave::Close).await?;
        Ok(v1::WorkerCloseSessionResponse { was_open })
    }

    /// CallTool: validates and runs a tool in an open session. A call with a request id runs
    /// at most once here (see [`crate::applied`]): in a tracked task, so it finishes and is
    /// recorded even if the coordinator stops waiting (or dies), and a retry replays it.
    pub async fn call_tool(
        self: &Arc<Self>,
        request: v1::CallToolRequest,
        deadline: Option<Duration>,
    ) -> Result<v1::CallToolResponse, Error> {
        if self.applied.is_none() || request.request_id.is_empty() {
            return self.run_tool(request, deadline, None).await;
        }
        // Claim, run and record in a task of its own: the caller going away (or dying) at any
        // point neither stops the call half-way nor loses its record.
        let state = Arc::clone(self);
        self.tasks
            .spawn(heist_proto::trace::in_current(async move {
                let _call = state.inflight.enter();
                let mut claim = match state.claim(&request).await? {
                    Some(applied::Begin::Run(claim)) => claim,
                    Some(applied::Begin::Replay(response)) => return Ok(response),
                    None => return state.run_tool(request, deadline, None).await,
                };
                claim.start();
                let result = state.run_tool(request, deadline, None).await;
                settle(claim, result).await
            }))
            .await
            .map_err(|e| Error::Internal(format!("the tool call's task failed: {e}")))?
    }

    /// For a call with a request id (when this worker records them): replay or a claim to
    /// run it. `None`: run the call as it is.
    pub(crate) async fn claim(
        &self,
        request: &v1::CallToolRequest,
    ) -> Result<Option<applied::Begin>, Error> {
        let Some(store) = self
            .applied
            .as_ref()
            .filter(|_| !request.request_id.is_empty())
        else {
            return Ok(None);
        };
        // Before the claim is written: a full disk refuses the call here, unapplied.
        self.writable_for(&request.tool)?;
        let id = parse_session_id(request.session_id.clone())?;
        self.sessions.get(&id)?;
        let fingerprint = applied::fingerprint(request);
        store
            .begin(&id, &request.request_id, fingerprint)
            .await
            .map(Some)
    }

    /// Runs a tool; with `output`, tools that produce output as they go (exec, run.python)
    /// send it there while they run.
    /// Runs in the call's RPC span when the call is that RPC, else in a `tool_call` span.
    pub async fn run_tool(
        &self,
        request: v1::CallToolRequest,
        deadline: Option<Duration>,
        output: Option<OutputSink>,
    ) -> Result<v1::CallToolResponse, Error> {
        let started = Instant::now();
        let tool = request.tool.clone();
        let span = heist_proto::trace::tool_call_span(&tool, &request.session_id);
        let result = self
            .dispatch(request, deadline, output)
            .instrument(span)
            .await;
        let known = self.tools.contains(&tool);
        let outcome = result.as_ref().ok().map(|r| r.is_error);
        self.metrics
            .tool_call(&tool, known, outcome, started.elapsed());
        result
    }

    async fn dispatch(
        &self,
        request: v1::CallToolRequest,
        deadline: Option<Duration>,
        output: Option<OutputSink>,
    ) -> Result<v1::CallToolResponse, Error> {
        let id = parse_session_id(request.session_id)?;
        let workspace = self.sessions.get(&id)?;
        self.writable_for(&request.tool)?;
        let args = request
            .arguments
            .as_ref()
            .map_or_else(|| Json::Object(Map::new()), json::struct_to_json);
        let cancel = self.hard_stop.child_token();
        let _cancel_when_dropped = cancel.clone().drop_guard();
        let ctx = ToolContext {
            workspace,
            limits: self.limits,
            cancel: cancel.clone(),
            sandbox: Arc::clone(&self.sandbox),
            output,
            services: Arc::clone(&self.services),
        };
        let started = Instant::now();
        let run = self.tools.call(&request.tool, &ctx, args);
        let output = tokio::select! {
            output = run_with_deadline(run, deadline) => output?,
            () = cancel.cancelled() => return Err(Error::Stopped),
        };
        let duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        debug!(
            is_error = output.is_error,
            duration_us, "tool call finished"
        );
        let mut response = output.into_response();
        response.worker_id = self.worker_id.to_string();
        response.duration_us = duration_us;
        Ok(response)
    }
}

impl State {
    fn checkpointer(&self) -> Result<&Checkpointer, Error> {
        self.checkpoints.as_ref().ok_or_else(|| {
            Error::Internal("this worker was started without checkpoints".to_owned())
        })
    }

    /// CaptureWorkspace: the session's manifest, every blob durable at the coordinator.
    #[instrument(skip_all, fields(session_id = %request.session_id, checkpoint_id = %request.checkpoint_id))]
    pub async fn capture_workspace(
        &self,
        request: v1::CaptureWorkspaceRequest,
    ) -> Result<v1::CaptureWorkspaceResponse, Error> {
        let id = parse_session_id(request.session_id)?;
        let checkpointer = self.checkpointer()?;
        let mut response = checkpointer
            .capture(
                &self.sessions,
                &id,
                &request.checkpoint_id,
                &request.base_checkpoint_id,
            )
            .await?;
        if let Some(agents) = &self.agents
            && let Some(bytes) = agents.snapshot(&id)?
            && let Some(manifest) = response.manifest.as_mut()
        {
            let (hash, size) = checkpointer.put_bytes(bytes).await?;
            manifest.agent_state_hash = hash.to_vec();
            manifest.agent_state_size = size;
        }
        Ok(response)
    }

    /// RestoreWorkspace: replaces the session's workspace with the manifest's tree.
    #[instrument(skip_all, fields(session_id = %request.session_id))]
    pub async fn restore_workspace(
        &self,
        request: v1::RestoreWorkspaceRequest,
    ) -> Result<v1::RestoreWorkspaceResponse, Error> {
        let id = parse_session_id(request.session_id)?;
        self.writable()?;
        let manifest = request.manifest.unwrap_or_default();
        let agent_state = (manifest.agent_state_hash.clone(), manifest.agent_state_size);
        let checkpointer = self.checkpointer()?;
        if let Some(agents) = &self.agents {
            // A turn running on the state being replaced would write into the old one.
            agents.turns.cancel_session(&id);
        }
        let response = checkpointer
            .restore(&self.sessions, &id, manifest, &request.checkpoint_id)
            .await?;
        if let Some(agents) = &self.agents {
            let state = match <[u8; 32]>::try_from(agent_state.0.as_slice()) {
                Ok(hash) => {
                    let bytes = checkpointer.get_bytes(hash, agent_state.1).await?;
                    crate::agent::AgentState::from_bytes(&bytes)?
                }
                Err(_) => crate::agent::AgentState::default(),
            };
            agents.install(&id, state)?;
        }
        Ok(response)
    }
}

/// Records a claimed call's result (or failure) before it is returned.
pub(crate) async fn settle(
    claim: applied::Claim,
    result: Result<v1::CallToolResponse, Error>,
) -> Result<v1::CallToolResponse, Error> {
    match result {
        Ok(response) => {
            claim.done(&response).await?;
            Ok(response)
        }
        Err(err) => {
            claim.failed(&err).await?;
            Err(err)
        }
    }
}

/// How often the worker's disks are measured in the background.
const SPACE_PERIOD: Duration = Duration::from_secs(1);

/// The monitor's test write: a small file in `dir`, synced, then removed.
fn probe_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = dir.join(".heist-space-probe");
    let result = std::fs::File::create(&path).and_then(|mut file| {
        file.write_all(b"probe")?;
        file.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    result
}

async fn run_with_deadline<F, T>(run: F, deadline: Option<Duration>) -> Result<T, Error>
where
    F: Future<Output = Result<T, Error>>,
{
    match deadline {
        Some(deadline) => tokio::time::timeout(deadline, run)
            .await
            .map_err(|_| Error::DeadlineExceeded)?,
        None => run.await,
    }
}

fn parse_session_id(raw: String) -> Result<SessionId, Error> {
    SessionId::parse(raw).map_err(|status| Error::InvalidArgument {
        field: "session_id".to_owned(),
        message: status.message().to_owned(),
    })
}
