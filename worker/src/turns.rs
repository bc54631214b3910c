//! Agent turns on this worker: WorkerService.RunTurn and CancelTurn.
//!
//! [`AgentHost`] holds what turns need (the agent specs, the model gateway, every session's
//! [`AgentStates`] and the directory their files live in, outside the workspaces). [`Turns`] is
//! the registry of turns by id: each keeps its events in memory (so the coordinator's relay can
//! re-attach from any event number after its stream broke), a watch channel for live readers,
//! its cancellation token and whether it finished. Finished turns are forgotten after
//! `turn_retention` or when more than `max_finished_turns` are kept, oldest first.
//!
//! A turn: the coordinator-signed grant is checked ([`Grant`]), the session must run no other
//! turn, the agent spec is cloned for the turn (model override, sealed instructions appended to
//! its system prompt: they exist only in that clone, never in events or state), the loop runs
//! ([`crate::agent::Turn`]) with the session's tools through [`RegistryRunner`], its events are
//! numbered [`v1::TurnEvent`]s ending with `finished`, and the session's agent state is saved
//! atomically to `<agent state dir>/<session>.json`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use futures::{StreamExt as _, stream::BoxStream};
use heist_proto::{
    ids::SessionId,
    token::Claims,
    v1::{self, turn_event::Event},
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

use crate::{
    Error,
    agent::{AgentSpec, AgentState, AgentStates, RegistryRunner, Turn, TurnError, TurnId, lock},
    model::{Gateway, GatewayError},
    state::State,
    tools::ToolContext,
};

/// Everything turns need besides the session's workspace and tools.
pub struct AgentHost {
    /// Agents by name (built-in and configured).
    pub specs: BTreeMap<String, AgentSpec>,
    /// Model providers and their policy.
    pub gateway: Gateway,
    /// Per-session agent state (shared with the memory tools).
    pub states: Arc<AgentStates>,
    /// Where `<session>.json` agent state files live (outside every workspace).
    pub dir: PathBuf,
    /// The turns this worker runs or ran recently.
    pub turns: Turns,
}

impl AgentHost {
    /// The agent state file of a session.
    pub fn state_path(&self, session: &SessionId) -> PathBuf {
        self.dir.join(format!("{session}.json"))
    }

    /// Loads a session's saved agent state (if it has one) into [`AgentStates`], recovering a
    /// turn the worker was interrupted in.
    pub fn load_session(&self, session: &SessionId) -> Result<(), Error> {
        let path = self.state_path(session);
        if !path.exists() {
            return Ok(());
        }
        let mut state = AgentState::load(&path)?;
        if let Some(turn) = state.recover_interrupted() {
            info!(session_id = %session, turn_id = %turn.turn_id, "interrupted turn recovered");
        }
        self.states.insert(session.clone(), state);
        Ok(())
    }

    /// Installs `state` as the session's agent state and saves it.
    pub fn install(&self, session: &SessionId, mut state: AgentState) -> Result<(), Error> {
        state.recover_interrupted();
        state.save(&self.state_path(session))?;
        self.states.insert(session.clone(), state);
        Ok(())
    }

    /// The session's agent state as blob bytes, `None` when it has none.
    pub fn snapshot(&self, session: &SessionId) -> Result<Option<Vec<u8>>, Error> {
        let state = lock(&self.states.get(session)).clone();
        if state == AgentState::default() {
            return Ok(None);
        }
        Ok(Some(state.to_bytes()?))
    }

    /// Forgets a leaving session's agent state (memory and file) and stops its turns.
    pub fn forget_session(&self, session: &SessionId) {
        self.turns.cancel_session(session);
        self.states.remove(session);
        let path = self.state_path(session);
        if let Err(err) = std::fs::remove_file(&path)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            warn!(session_id = %session, error = %err, "cannot remove the agent state file");
        }
    }

    /// The agents as Register declares them.
    pub fn declared(&self) -> Vec<v1::AgentSpec> {
        self.specs
            .values()
            .map(|a| v1::AgentSpec {
                name: a.name.clone(),
                role: a.role.clone(),
                model: a.model.clone(),
                tools: a.allowed_tools.clone(),
                step_limit: a.step_limit,
            })
            .collect()
    }
}

/// What a turn's grant says, from the coordinator-signed token's `scope`: `turn:<id>`,
/// `session:<id>` and one `tool:<name>` per tool the turn's caller may call.
pub struct Grant {
    /// Tools the caller may call.
    pub tools: BTreeSet<String>,
}

impl Grant {
    /// Checks `claims` are for `turn` in `session`.
    pub fn from_claims(claims: &Claims, turn: &TurnId, session: &SessionId) -> Result<Self, Error> {
        let mut tools = BTreeSet::new();
        let (mut for_turn, mut for_session) = (false, false);
        for item in claims.scope.split_whitespace() {
            if let Some(t) = item.strip_prefix("turn:") {
                for_turn |= t == turn.as_str();
            } else if let Some(s) = item.strip_prefix("session:") {
                for_session |= s == session.as_str();
            } else if let Some(tool) = item.strip_prefix("tool:") {
                tools.insert(tool.to_owned());
            }
        }
        if !for_turn || !for_session {
            return Err(Error::BadGrant(format!(
                "it is not for turn {turn} in session {session}"
            )));
        }
        Ok(Self { tools })
    }
}

/// One turn's record.
struct Entry {
    session: SessionId,
    events: Mutex<Vec<v1::TurnEvent>>,
    /// (number of events, finished), sent after every change.
    progress: watch::Sender<(usize, bool)>,
    cancel: CancellationToken,
    finished_at: Mutex<Option<Instant>>,
}

impl Entry {
    fn push(&self, agent: &str, event: Event) {
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = events.len() as u64 + 1;
        let finished = matches!(event, Event::Finished(_));
        events.push(v1::TurnEvent {
            turn_id: String::new(),
            seq,
            agent: agent.to_owned(),
            at: Some(SystemTime::now().into()),
            event: Some(event),
        });
        let count = events.len();
        drop(events);
        if finished {
            *self
                .finished_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
        self.progress.send_replace((count, finished));
    }

    fn running(&self) -> bool {
        !self.progress.borrow().1
    }
}

/// The turns of this worker by id.
pub struct Turns {
    by_id: Mutex<HashMap<TurnId, Arc<Entry>>>,
    retention: Duration,
    max_finished: usize,
}

impl Turns {
    /// An empty registry keeping finished turns `retention` long, at most `max_finished`.
    pub fn new(retention: Duration, max_finished: usize) -> Self {
        Self {
            by_id: Mutex::default(),
            retention,
            max_finished,
        }
    }

    fn get(&self, id: &TurnId) -> Option<Arc<Entry>> {
        self.by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Registers a new turn in `session`, refusing it while another turn runs there.
    fn insert(
        &self,
        id: &TurnId,
        session: &SessionId,
        cancel: CancellationToken,
    ) -> Result<Arc<Entry>, Error> {
        let mut all = self.by_id.lock().unwrap_or_else(PoisonError::into_inner);
        self.prune(&mut all);
        if let Some((running, _)) = all
            .iter()
            .find(|(_, e)| &e.session == session && e.running())
        {
            return Err(Error::TurnInProgress {
                session: session.to_string(),
                turn: running.to_string(),
            });
        }
        let entry = Arc::new(Entry {
            session: session.clone(),
            events: Mutex::default(),
            progress: watch::channel((0, false)).0,
            cancel,
            finished_at: Mutex::default(),
        });
        all.insert(id.clone(), Arc::clone(&entry));
        Ok(entry)
    }

    /// Forgets finished turns older than the retention, then the oldest beyond the count.
    fn prune(&self, all: &mut HashMap<TurnId, Arc<Entry>>) {
        let now = Instant::now();
        let finished_at = |e: &Entry| *e.finished_at.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|_, e| finished_at(e).is_none_or(|at| now.duration_since(at) < self.retention));
        let mut finished: Vec<(Instant, TurnId)> = all
            .iter()
            .filter_map(|(id, e)| finished_at(e).map(|at| (at, id.clone())))
            .collect();
        if finished.len() > self.max_finished {
            finished.sort();
            for (_, id) in &finished[..finished.len() - self.max_finished] {
                all.remove(id);
            }
        }
    }

    /// Cancels a turn; returns whether it was running.
    pub fn cancel(&self, id: &TurnId) -> Result<bool, Error> {
        let entry = self
            .get(id)
            .ok_or_else(|| Error::TurnNotFound(id.to_string()))?;
        let running = entry.running();
        entry.cancel.cancel();
        Ok(running)
    }

    /// Cancels every turn of a session (it is leaving the worker, or its state is replaced).
    pub fn cancel_session(&self, session: &SessionId) {
        for entry in self
            .by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|e| &e.session == session)
        {
            entry.cancel.cancel();
        }
    }

    /// A turn's events from `from_seq` on, then live until `finished`.
    fn follow(id: &TurnId, entry: Arc<Entry>, from_seq: u64) -> BoxStream<'static, v1::TurnEvent> {
        let rx = entry.progress.subscribe();
        let next = usize::try_from(from_seq.max(1)).unwrap_or(usize::MAX);
        let turn_id = id.to_string();
        futures::stream::unfold((entry, rx, next), move |(entry, mut rx, next)| {
            let turn_id = turn_id.clone();
            async move {
                loop {
                    let (count, finished) = *rx.borrow_and_update();
                    if next <= count {
                        let mut event = entry.events.lock().unwrap_or_else(PoisonError::into_inner)
                            [next - 1]
                            .clone();
                        event.turn_id = turn_id;
                        return Some((event, (entry, rx, next + 1)));
                    }
                    if finished || rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        })
        .boxed()
    }
}

impl State {
    fn agent_host(&self) -> Result<&Arc<AgentHost>, Error> {
        self.agents
            .as_ref()
            .ok_or_else(|| Error::Internal("this worker was started without agents".to_owned()))
    }

    /// RunTurn: starts the turn (or attaches to it: the same turn id is never started twice)
    /// and streams its events from `from_seq`.
    pub async fn run_turn(
        &self,
        claims: Claims,
        request: v1::WorkerRunTurnRequest,
    ) -> Result<BoxStream<'static, v1::TurnEvent>, Error> {
        let host = Arc::clone(self.agent_host()?);
        let session =
            SessionId::parse(request.session_id.as_str()).map_err(|s| Error::InvalidArgument {
                field: "session_id".to_owned(),
                message: s.message().to_owned(),
            })?;
        if request.turn_id.is_empty() {
            return Err(Error::InvalidArgument {
                field: "turn_id".to_owned(),
                message: "turn_id is required".to_owned(),
            });
        }
        let turn_id = TurnId::from_text(request.turn_id.as_str());
        let grant = Grant::from_claims(&claims, &turn_id, &session)?;
        if let Some(entry) = host.turns.get(&turn_id) {
            return Ok(Turns::follow(&turn_id, entry, request.from_seq));
        }
        if request.from_seq > 1 {
            // Re-attaching to a turn this worker forgot (restarted, or retention passed):
            // never start it again.
            return Err(Error::TurnNotFound(turn_id.to_string()));
        }
        let workspace = self.sessions.get(&session)?;
        let mut spec =
            host.specs
                .get(&request.agent)
                .cloned()
                .ok_or_else(|| Error::AgentNotFound {
                    name: request.agent.clone(),
                    available: host.specs.keys().cloned().collect::<Vec<_>>().join(", "),
                })?;
        if !request.model.is_empty() {
            host.gateway
                .chain(&request.model)
                .map_err(|e| Error::InvalidArgument {
                    field: "model".to_owned(),
                    message: e.to_string(),
                })?;
            spec.model = request.model.clone();
        }
        if !request.instructions.is_empty() {
            spec.system_prompt = format!("{}\n\n{}", spec.system_prompt, request.instructions);
        }
        let cancel = self.hard_stop.child_token();
        let entry = host.turns.insert(&turn_id, &session, cancel.clone())?;
        let context = ToolContext {
            workspace,
            limits: self.limits,
            cancel,
            sandbox: Arc::clone(&self.sandbox),
            output: None,
            services: Arc::clone(&self.services),
        };
        let runner = RegistryRunner::new(Arc::clone(&self.tools), context);
        let span =
            info_span!("turn", turn_id = %turn_id, session_id = %session, agent = %spec.name);
        let drive = Drive {
            host: Arc::clone(&host),
            entry: Arc::clone(&entry),
            turn_id: turn_id.clone(),
            session,
            spec,
            grant: grant.tools,
            runner,
        };
        self.tasks
            .spawn(drive.run(request.message).instrument(span));
        Ok(Turns::follow(&turn_id, entry, request.from_seq))
    }

    /// CancelTurn.
    pub fn cancel_turn(&self, request: &v1::WorkerCancelTurnRequest) -> Result<bool, Error> {
        self.agent_host()?
            .turns
            .cancel(&TurnId::from_text(request.turn_id.as_str()))
    }
}

/// A running turn's task.
struct Drive {
    host: Arc<AgentHost>,
    entry: Arc<Entry>,
    turn_id: TurnId,
    session: SessionId,
    spec: AgentSpec,
    grant: BTreeSet<String>,
    runner: RegistryRunner,
}

impl Drive {
    async fn run(self, message: String) {
        let started = std::time::Instant::now();
        let state = self.host.states.get(&self.session);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let turn = Turn {
            turn_id: self.turn_id.clone(),
            agent: &self.spec,
            gateway: &self.host.gateway,
            tools: &self.runner,
            grant: &self.grant,
            state: &state,
            events: tx,
            cancel: self.entry.cancel.clone(),
        };
        let agent = self.spec.name.as_str();
        let pump = async {
            while let Some(event) = rx.recv().await {
                self.entry.push(agent, event.kind.into_wire());
            }
        };
        let (result, ()) = tokio::join!(turn.run(message), pump);
        let snapshot = lock(&state).clone();
        let path = self.host.state_path(&self.session);
        match tokio::task::spawn_blocking(move || snapshot.save(&path)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %err, "cannot save the agent state"),
            Err(err) => warn!(error = %err, "saving the agent state panicked"),
        }
        let end = match &result {
            Ok(_) => v1::TurnState::Completed,
            Err(TurnError::StepLimit { .. }) => v1::TurnState::StepLimit,
            Err(TurnError::Cancelled | TurnError::Model(GatewayError::Cancelled)) => {
                v1::TurnState::Cancelled
            }
            Err(TurnError::Model(_)) => v1::TurnState::Failed,
        };
        info!(state = ?end, "turn finished");
        let state_name = end.as_str_name().trim_start_matches("TURN_STATE_");
        self.host.gateway.metrics().turn(
            agent,
            &state_name.to_ascii_lowercase(),
            started.elapsed(),
        );
        self.entry.push(agent, Event::Finished(end as i32));
    }
}

/// The agent state directory for a worker whose workspaces are under `base`: next to it, so
/// no session's workspace can reach it.
pub fn state_dir(base: &Path) -> PathBuf {
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "workspaces".to_owned());
    base.parent()
        .unwrap_or(base)
        .join(format!("{name}.agent-state"))
}

#[cfg(test)]
mod tests {
    use heist_proto::token::TokenSigner;

    use super::*;

    fn claims(scope: &str) -> Claims {
        TokenSigner::claims(
            "heist",
            "heist-worker:w1",
            "alice",
            scope,
            Duration::from_secs(60),
        )
    }

    #[test]
    fn a_grant_names_its_turn_session_and_tools() {
        let (turn, session) = (
            TurnId::from_text("t-1"),
            SessionId::parse("s-1").expect("id"),
        );
        let grant = Grant::from_claims(
            &claims("turn:t-1 session:s-1 tool:fs.read tool:calc"),
            &turn,
            &session,
        )
        .expect("valid");
        assert_eq!(
            grant.tools.into_iter().collect::<Vec<_>>(),
            ["calc", "fs.read"]
        );
        for scope in [
            "turn:t-2 session:s-1",
            "turn:t-1 session:s-2",
            "session:s-1",
            "",
        ] {
            assert!(
                matches!(
                    Grant::from_claims(&claims(scope), &turn, &session),
                    Err(Error::BadGrant(_))
                ),
                "{scope:?}"
            );
        }
    }

    #[tokio::test]
    async fn one_turn_per_session_and_followers_get_every_event_once() {
        let turns = Turns::new(Duration::from_secs(60), 1);
        let session = SessionId::parse("s-1").expect("id");
        let first = TurnId::from_text("t-1");
        let entry = turns
            .insert(&first, &session, CancellationToken::new())
            .expect("first");
        let busy = turns.insert(
            &TurnId::from_text("t-2"),
            &session,
            CancellationToken::new(),
        );
        assert!(matches!(busy, Err(Error::TurnInProgress { .. })));

        entry.push("a", Event::Started("hi".to_owned()));
        let late = Turns::follow(&first, Arc::clone(&entry), 2);
        entry.push("a", Event::TextDelta("x".to_owned()));
        entry.push("a", Event::Finished(v1::TurnState::Completed as i32));
        let seqs: Vec<u64> = late.map(|e| e.seq).collect().await;
        assert_eq!(seqs, [2, 3]);
        let all: Vec<v1::TurnEvent> = Turns::follow(&first, entry, 1).collect().await;
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|e| e.turn_id == "t-1"));

        // Finished: the session takes another turn; beyond the count the oldest is forgotten.
        let second = TurnId::from_text("t-2");
        let e2 = turns
            .insert(&second, &session, CancellationToken::new())
            .expect("second");
        e2.push("a", Event::Finished(v1::TurnState::Cancelled as i32));
        turns
            .insert(
                &TurnId::from_text("t-3"),
                &session,
                CancellationToken::new(),
            )
            .expect("third");
        assert!(
            turns.get(&first).is_none(),
            "oldest finished turn forgotten"
        );
        assert!(turns.get(&second).is_some());
        assert!(matches!(
            turns.cancel(&TurnId::from_text("t-9")),
            Err(Error::TurnNotFound(_))
        ));
    }
}
