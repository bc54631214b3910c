//! The in-process baseline of the agent benchmark: the worker's own turn loop, scripted model and
//! tool registry, run inside heistctl against a temp workspace — no coordinator, no worker
//! process, no gRPC, no sandbox process (the measured turns run no command). What a phase
//! measures through the cluster minus what this measures is what the cluster adds.
//!
//! [`InProcess`] is also a [`Ports`] for the heist engine, so the same game code plays the
//! same seeded game here and on the cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

use futures::{StreamExt as _, future::BoxFuture, stream::BoxStream};
use heist_coordinator::{
    Error as CoordError,
    heist::game::{Ports, ToolOutput},
};
use heist_proto::{ids::SessionId, v1};
use heist_worker::{
    agent::{AgentSpec, AgentStates, RegistryRunner, Turn, TurnId, builtin_agents},
    model::{Gateway, ModelsConfig},
    quota::Quotas,
    sandbox::Sandbox,
    sessions::Workspace,
    tools::{Content, Limits, Registry, ToolContext, builtin_tools},
};
use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use anyhow::{Context as _, anyhow};

/// The session id of the one in-process workspace.
const SESSION: &str = "s-inproc";

/// One workspace with the worker's built-in agents, tools and scripted model.
pub struct InProcess {
    _root: tempfile::TempDir,
    context: ToolContext,
    states: Arc<AgentStates>,
    registry: Arc<Registry>,
    gateway: Gateway,
    specs: BTreeMap<String, AgentSpec>,
    /// Every tool (the cluster's turns run with an admin token, which may call all of them).
    grant: BTreeSet<String>,
}

impl InProcess {
    /// A fresh temp workspace with the worker's defaults (file limits, agent specs, models).
    pub fn new() -> anyhow::Result<Self> {
        let root = tempfile::tempdir()?;
        let path = root.path().join("ws");
        std::fs::create_dir(&path)?;
        let session = SessionId::parse(SESSION).map_err(|e| anyhow!("{}", e.message()))?;
        let workspace = Workspace::open(session, path)?;
        let defaults = heist_worker::Config::default();
        let context = ToolContext {
            workspace: Arc::new(workspace),
            limits: Limits {
                max_file_bytes: defaults.max_file_bytes,
                max_list_entries: defaults.max_list_entries,
            },
            cancel: CancellationToken::new(),
            sandbox: Arc::new(Sandbox::disabled(
                "the in-process baseline runs no commands",
                Quotas::default(),
            )),
            output: None,
            services: Arc::default(),
        };
        let states = Arc::new(AgentStates::new());
        let registry = Arc::new(
            Registry::new(builtin_tools(&states, Default::default()))
                .map_err(|e| anyhow!("{e}"))?,
        );
        let gateway = Gateway::from_config(&ModelsConfig::default()).map_err(|e| anyhow!("{e}"))?;
        let grant = registry.specs().into_iter().map(|s| s.name).collect();
        let specs = builtin_agents()
            .into_iter()
            .map(|a| (a.name.clone(), a))
            .collect();
        Ok(Self {
            _root: root,
            context,
            states,
            registry,
            gateway,
            specs,
            grant,
        })
    }

    /// Runs a tool in the workspace.
    pub async fn tool(&self, tool: &str, arguments: Json) -> anyhow::Result<ToolOutput> {
        let out = self
            .registry
            .call(tool, &self.context, arguments)
            .await
            .with_context(|| format!("in-process {tool}"))?;
        let text = out
            .content
            .iter()
            .filter_map(|c| match c {
                Content::Text(t) => Some(t.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n");
        Ok(ToolOutput {
            text,
            structured: out.structured.map(Json::Object),
            is_error: out.is_error,
        })
    }

    /// Runs one turn to its end, the way the worker does (model override, sealed instructions
    /// appended to the agent's prompt); its events as the wire numbers them.
    pub async fn turn(
        &self,
        agent: &str,
        message: String,
        instructions: &str,
        model: &str,
    ) -> anyhow::Result<Vec<v1::TurnEvent>> {
        let mut spec = self
            .specs
            .get(agent)
            .cloned()
            .with_context(|| format!("no agent {agent:?}"))?;
        if !model.is_empty() {
            spec.model = model.to_owned();
        }
        if !instructions.is_empty() {
            spec.system_prompt = format!("{}\n\n{instructions}", spec.system_prompt);
        }
        let runner = RegistryRunner::new(Arc::clone(&self.registry), self.context.clone());
        let state = self.states.get(self.context.workspace.id());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let turn = Turn {
            turn_id: TurnId::new(),
            agent: &spec,
            gateway: &self.gateway,
            tools: &runner,
            grant: &self.grant,
            state: &state,
            events: tx,
            cancel: CancellationToken::new(),
        };
        let result = turn.run(message).await;
        let mut events = Vec::new();
        while let Ok(event) = rx.try_recv() {
            events.push(v1::TurnEvent {
                turn_id: String::new(),
                seq: event.seq,
                agent: agent.to_owned(),
                at: Some(SystemTime::now().into()),
                event: Some(event.kind.into_wire()),
            });
        }
        let end = if result.is_ok() {
            v1::TurnState::Completed
        } else {
            v1::TurnState::Failed
        };
        events.push(v1::TurnEvent {
            seq: events.len() as u64 + 1,
            agent: agent.to_owned(),
            event: Some(v1::turn_event::Event::Finished(end as i32)),
            ..Default::default()
        });
        Ok(events)
    }
}

fn port_error(err: anyhow::Error) -> CoordError {
    CoordError::Status(tonic::Status::internal(format!("{err:#}")))
}

impl Ports for InProcess {
    fn create_session(&self) -> BoxFuture<'_, Result<String, CoordError>> {
        Box::pin(async { Ok(SESSION.to_owned()) })
    }

    fn call_tool<'a>(
        &'a self,
        _session: &'a str,
        tool: &'a str,
        arguments: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, CoordError>> {
        Box::pin(async move { self.tool(tool, arguments).await.map_err(port_error) })
    }

    fn run_turn<'a>(
        &'a self,
        _session: &'a str,
        agent: &'a str,
        message: String,
        instructions: String,
        model: &'a str,
    ) -> BoxFuture<'a, Result<BoxStream<'static, Result<v1::TurnEvent, CoordError>>, CoordError>>
    {
        Box::pin(async move {
            let events = self
                .turn(agent, message, &instructions, model)
                .await
                .map_err(port_error)?;
            Ok(futures::stream::iter(events.into_iter().map(Ok)).boxed())
        })
    }

    /// No checkpoint: the phases time turns, not rounds.
    fn checkpoint<'a>(
        &'a self,
        _session: &'a str,
        label: &'a str,
    ) -> BoxFuture<'a, Result<String, CoordError>> {
        Box::pin(async move { Ok(format!("inproc:{label}")) })
    }

    fn fork<'a>(&'a self, _checkpoint: &'a str) -> BoxFuture<'a, Result<String, CoordError>> {
        Box::pin(async {
            Err(CoordError::Status(tonic::Status::unimplemented(
                "the in-process baseline does not fork",
            )))
        })
    }
}
