//! Agent turns through the coordinator: start, follow, cancel, get, transcripts and the merged
//! agent list. Tonic-free, like [`crate::calls`]: `api::agent` and the heist game call these.
//!
//! ```text
//! start: admit (owner, READY, route, agent) ─► run once by request id ─► mint the grant ─►
//!        worker RunTurn ─► Turn record + event stream ─► relay task (tracked, named)
//! relay: worker events ─► EventLog (sled, numbered) ─► live followers; stream broke while the
//!        worker is connected: re-attach from last+1; worker lost: `error` + `finished(FAILED)`
//! ```
//!
//! A turn outlives every stream: its events are stored before followers see them, and
//! [`follow`] replays from any number then continues live. The grant names the turn, the
//! session and the tools the caller may call (the [`calls::gate`] decides, per tool of the
//! session worker's catalogue: token scopes ∩ the session's tool policy); the worker intersects
//! it with the agent's own tools.
//!
//! Records: tree `turns` (turn id → `pb::Turn`), `turn_owners` (turn id → principal),
//! `session_turns` (`session 0x00 turn id` → nothing: the transcript's index, in start order
//! since turn ids are time-ordered), and the event log `turn_events`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{StreamExt as _, stream::BoxStream};
use heist_proto::{
    ids::{RequestId, SessionId, TurnId, WorkerId},
    v1::{self as pb, turn_event::Event},
};
use tokio::time::Instant;
use tracing::{Instrument as _, info, info_span, warn};

use crate::{
    app::App,
    auth_layer::Principal,
    calls::{self, gate},
    error::Error,
    eventlog::EventLog,
    idempotency::Fingerprint,
    lifecycle::session_worker,
    runner::{self, Dedup},
    store::Store,
};

/// Idempotency method name of a turn start.
const RUN_TURN: &str = "RunTurn";
/// How long a turn's grant is valid (re-minted for every re-attach).
pub(crate) const GRANT_TTL: Duration = Duration::from_secs(300);
/// How long the worker may take to accept a turn or a cancel.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times the relay re-attaches to a broken worker stream before giving up.
const REATTACH_ATTEMPTS: u32 = 20;
/// The pause between re-attaches.
const REATTACH_PAUSE: Duration = Duration::from_millis(250);
/// Default and largest transcript page.
const PAGE_DEFAULT: usize = 200;
const PAGE_MAX: usize = 1000;

/// Turn records and their events.
pub struct TurnStore {
    turns: sled::Tree,
    owners: sled::Tree,
    index: sled::Tree,
    /// Every turn's numbered events.
    pub events: Arc<EventLog<pb::TurnEvent>>,
}

impl TurnStore {
    /// Opens the trees of `store`.
    pub fn open(store: &Store) -> Result<Self, Error> {
        Ok(Self {
            turns: store.open_tree("turns")?,
            owners: store.open_tree("turn_owners")?,
            index: store.open_tree("session_turns")?,
            events: EventLog::open(store, "turn_events")?,
        })
    }

    /// Ends the turns a previous run of the coordinator left RUNNING (their relay died with
    /// it; the outcome on the worker is unknown): `error` + `finished(FAILED)` after their last
    /// stored event. Returns how many.
    pub fn recover(&self) -> Result<usize, Error> {
        let running: Vec<pb::Turn> = Store::load_all::<pb::Turn>(&self.turns, "turn")?
            .into_iter()
            .filter(|t| t.state == pb::TurnState::Running as i32)
            .collect();
        for mut turn in running.iter().cloned() {
            let mut last = self.events.last_seq(&turn.id)?;
            for event in [
                Event::Error(
                    "the coordinator restarted while the turn ran: its outcome is unknown; run \
                     the turn again"
                        .to_owned(),
                ),
                Event::Finished(pb::TurnState::Failed as i32),
            ] {
                last += 1;
                let event = pb::TurnEvent {
                    turn_id: turn.id.clone(),
                    seq: last,
                    agent: turn.agent.clone(),
                    at: Some(std::time::SystemTime::now().into()),
                    event: Some(event),
                };
                self.events.append(&turn.id, last, &event)?;
            }
            turn.state = pb::TurnState::Failed as i32;
            turn.last_seq = last;
            turn.finished_at = Some(std::time::SystemTime::now().into());
            self.put(&turn)?;
            warn!(turn_id = %turn.id, "turn interrupted by a coordinator restart");
        }
        Ok(running.len())
    }

    /// Drops every turn of `session` with its events and transcript index (the session was
    /// collected). Returns how many turns.
    pub fn forget_session(&self, session: &SessionId) -> Result<usize, Error> {
        let mut prefix = session.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut n = 0;
        for key in self.index.scan_prefix(&prefix).keys() {
            let key = key?;
            if let Some(turn) = key.get(prefix.len()..) {
                self.turns.remove(turn)?;
                self.owners.remove(turn)?;
                self.events.remove(&String::from_utf8_lossy(turn))?;
            }
            self.index.remove(key)?;
            n += 1;
        }
        Ok(n)
    }

    fn put(&self, turn: &pb::Turn) -> Result<(), Error> {
        Store::put(&self.turns, turn.id.as_bytes(), turn)
    }

    fn get(&self, id: &TurnId) -> Result<Option<pb::Turn>, Error> {
        Store::get(&self.turns, id.as_str().as_bytes(), "turn")
    }

    /// The turn, if `owner` owns it (another principal's turn is not found, like a missing one).
    fn owned(&self, owner: &str, id: &TurnId) -> Result<pb::Turn, Error> {
        let mine = self
            .owners
            .get(id.as_str())?
            .is_some_and(|o| o.as_ref() == owner.as_bytes());
        match self.get(id)? {
            Some(turn) if mine => Ok(turn),
            _ => Err(Error::TurnNotFound(id.clone())),
        }
    }
}

/// A turn to start.
#[derive(Clone, Debug)]
pub struct TurnRequest {
    /// Who starts it (owns the session; the grant is what they may call).
    pub principal: Principal,
    /// The session.
    pub session: SessionId,
    /// Agent name.
    pub agent: String,
    /// The user's message.
    pub message: String,
    /// A retry with the same id attaches to the same turn.
    pub request_id: Option<RequestId>,
    /// Sealed instructions appended to the agent's system prompt for this turn only (never
    /// stored in events, transcripts or checkpoints).
    pub instructions: String,
    /// Model chain override; empty for the agent's own.
    pub model: String,
}

impl TurnRequest {
    fn fingerprint(&self) -> [u8; 32] {
        Fingerprint::new(RUN_TURN)
            .field(self.session.as_str().as_bytes())
            .field(self.agent.as_bytes())
            .field(self.message.as_bytes())
            .field(self.instructions.as_bytes())
            .field(self.model.as_bytes())
            .finish()
    }
}

/// Starts a turn (or, for a retried request id, finds the turn the first call started).
pub async fn start(app: &Arc<App>, request: TurnRequest) -> Result<TurnId, Error> {
    let worker = session_worker(app, &request.principal.id, &request.session, true)?;
    let route = app.registry.route(&worker)?;
    if route.catalogue.agent(&request.agent).is_none() {
        return Err(Error::AgentNotFound {
            agent: request.agent.clone(),
            worker,
        });
    }
    let policy = calls::session_policy(app, &request.session)?;
    let tools: Vec<String> = route
        .catalogue
        .tools()
        .iter()
        .filter(|t| gate::allow(&request.principal, &request.session, &policy, &t.name).is_ok())
        .map(|t| t.name.clone())
        .collect();
    let dedup = Dedup::new(
        &request.principal.id,
        RUN_TURN,
        request.request_id.clone(),
        request.fingerprint(),
    );
    let span = info_span!("run-turn", session_id = %request.session, agent = %request.agent);
    let app2 = Arc::clone(app);
    let turn = runner::run_once(
        app,
        dedup,
        |_, bytes| runner::decode::<pb::Turn>(bytes),
        async move { begin(&app2, request, worker, tools).await }.instrument(span),
    )
    .await?;
    Ok(TurnId::parse(turn.id)?)
}

/// Asks the worker to run the turn, records it and spawns its relay.
async fn begin(
    app: &Arc<App>,
    request: TurnRequest,
    worker: WorkerId,
    tools: Vec<String>,
) -> Result<pb::Turn, Error> {
    let id = TurnId::generate();
    let relay = Relay {
        app: Arc::clone(app),
        turn: id.clone(),
        worker,
        principal: request.principal.id.clone(),
        tools,
        request: pb::WorkerRunTurnRequest {
            session_id: request.session.to_string(),
            turn_id: id.to_string(),
            agent: request.agent.clone(),
            message: request.message,
            grant: String::new(),
            instructions: request.instructions,
            model: request.model,
            from_seq: 1,
        },
    };
    let events = relay.attach(1).await?;
    let turn = pb::Turn {
        id: id.to_string(),
        session_id: request.session.to_string(),
        agent: request.agent,
        state: pb::TurnState::Running as i32,
        last_seq: 0,
        started_at: Some(std::time::SystemTime::now().into()),
        finished_at: None,
    };
    let store = &app.turns;
    store.put(&turn)?;
    store
        .owners
        .insert(id.as_str(), request.principal.id.as_bytes())?;
    store.index.insert(index_key(&request.session, &id), &[])?;
    store.events.open_stream(id.as_str());
    app.store.flush().await?;
    info!(turn_id = %id, "turn started");
    let span = info_span!("turn-relay", turn_id = %id, session_id = %turn.session_id);
    app.tasks
        .spawn(relay.run(events, turn.clone()).instrument(span));
    Ok(turn)
}

/// Copies a turn's events from its worker into the event log until `finished`.
struct Relay {
    app: Arc<App>,
    turn: TurnId,
    worker: WorkerId,
    principal: String,
    tools: Vec<String>,
    request: pb::WorkerRunTurnRequest,
}

impl Relay {
    /// Calls the worker's RunTurn from `from_seq`, with a fresh grant.
    async fn attach(
        &self,
        from_seq: u64,
    ) -> Result<BoxStream<'static, Result<pb::TurnEvent, Error>>, Error> {
        let client = self.app.registry.route(&self.worker)?.client;
        let mut scope = format!(
            "turn:{} session:{}",
            self.request.turn_id, self.request.session_id
        );
        for tool in &self.tools {
            scope.push_str(" tool:");
            scope.push_str(tool);
        }
        let request = pb::WorkerRunTurnRequest {
            grant: client.grant(&self.principal, &scope, GRANT_TTL)?,
            from_seq,
            ..self.request.clone()
        };
        client
            .run_turn(&self.principal, Instant::now() + START_TIMEOUT, request)
            .await
    }

    async fn run(
        self,
        mut events: BoxStream<'static, Result<pb::TurnEvent, Error>>,
        mut turn: pb::Turn,
    ) {
        let log = Arc::clone(&self.app.turns.events);
        let id = self.turn.as_str();
        let mut last = 0;
        let mut end = None;
        let mut attempts = 0;
        let mut tool_calls = ToolCallClock::default();
        while end.is_none() {
            let next = tokio::select! {
                () = self.app.shutdown.cancelled() => {
                    self.fail(&log, &mut last, "the coordinator shut down while the turn ran: its outcome is unknown; run the turn again");
                    end = Some(pb::TurnState::Failed as i32);
                    break;
                }
                next = events.next() => next,
            };
            match next {
                Some(Ok(mut event)) => {
                    if event.seq != last + 1 {
                        continue;
                    }
                    event.turn_id = id.to_owned();
                    if let Some(Event::Finished(state)) = &event.event {
                        end = Some(*state);
                    }
                    if let Err(err) = log.append(id, event.seq, &event) {
                        warn!(%err, "cannot store a turn event");
                    }
                    self.audit_tool_call(&event, &mut tool_calls).await;
                    last = event.seq;
                    attempts = 0;
                }
                Some(Err(err)) => {
                    warn!(%err, last, "turn stream from the worker failed");
                    events = futures::stream::empty().boxed();
                }
                None => {
                    if !self.app.registry.is_connected(&self.worker)
                        || attempts >= REATTACH_ATTEMPTS
                    {
                        self.fail(&log, &mut last, "the session's worker was lost during the turn: its outcome is unknown; run the turn again");
                        end = Some(pb::TurnState::Failed as i32);
                        break;
                    }
                    attempts += 1;
                    if attempts > 1 {
                        tokio::time::sleep(REATTACH_PAUSE).await;
                    }
                    match self.attach(last + 1).await {
                        Ok(stream) => events = stream,
                        Err(err) => warn!(%err, attempts, "cannot re-attach to the turn"),
                    }
                }
            }
        }
        turn.state = end.unwrap_or(pb::TurnState::Failed as i32);
        turn.last_seq = last;
        turn.finished_at = Some(std::time::SystemTime::now().into());
        if let Err(err) = self.app.turns.put(&turn) {
            warn!(%err, "cannot store the finished turn");
        }
        if let Err(err) = log.close(id).await {
            warn!(%err, "cannot flush the turn's events");
        }
        info!(state = turn.state, events = last, "turn finished");
    }

    /// Writes the audit record of an agent tool call when its `tool_call_finished` event
    /// arrives: `tool.executed` (argument digest from its `tool_call_requested` event,
    /// duration from its `tool_call_started` event, outcome) or, for a call the worker's gate
    /// refused (no start), `tool.denied`. It is in the store before the turn's events are
    /// flushed.
    async fn audit_tool_call(&self, event: &pb::TurnEvent, clock: &mut ToolCallClock) {
        let at = event
            .at
            .and_then(|t| std::time::SystemTime::try_from(t).ok());
        let call = match &event.event {
            Some(Event::ToolCallRequested(call)) => {
                let args = calls::audited::args_digest(&call.arguments.clone().unwrap_or_default());
                clock.requested.insert(call.call_id.clone(), args);
                return;
            }
            Some(Event::ToolCallStarted(call)) => {
                clock.started.insert(call.call_id.clone(), at);
                return;
            }
            Some(Event::ToolCallFinished(call)) => call,
            _ => return,
        };
        let started = clock.started.remove(&call.call_id);
        let args = clock.requested.remove(&call.call_id).unwrap_or_default();
        let session = &self.request.session_id;
        let via = format!("turn turn={} agent={}", self.turn, event.agent);
        let (kind, detail) = match started {
            None => (
                "tool.denied",
                format!(
                    "session={session} tool={} reason=refused by the worker's gate (turn grant ∩ the agent's tools) via={via}",
                    call.tool
                ),
            ),
            Some(started) => {
                let read_only = self
                    .app
                    .registry
                    .catalogue(&self.worker)
                    .and_then(|c| c.get(&call.tool).map(|t| t.read_only))
                    .unwrap_or(false);
                if !self.app.config.audit_calls.records(read_only) {
                    return;
                }
                let took = match (started, at) {
                    (Some(s), Some(f)) => f.duration_since(s).unwrap_or_default(),
                    _ => Duration::ZERO,
                };
                let outcome = call
                    .result
                    .as_ref()
                    .map_or_else(|| "unknown".to_owned(), |r| calls::audited::outcome(Ok(r)));
                (
                    calls::audited::EXECUTED,
                    calls::audited::detail(session, &call.tool, &args, &outcome, took, &via),
                )
            }
        };
        self.app.audit.append(kind, &self.principal, detail).await;
    }

    /// Appends `error` and `finished(FAILED)` after event `last`.
    fn fail(&self, log: &EventLog<pb::TurnEvent>, last: &mut u64, why: &str) {
        for event in [
            Event::Error(why.to_owned()),
            Event::Finished(pb::TurnState::Failed as i32),
        ] {
            *last += 1;
            let event = pb::TurnEvent {
                turn_id: self.turn.to_string(),
                seq: *last,
                agent: self.request.agent.clone(),
                at: Some(std::time::SystemTime::now().into()),
                event: Some(event),
            };
            if let Err(err) = log.append(self.turn.as_str(), *last, &event) {
                warn!(%err, "cannot store a turn event");
            }
        }
    }
}

/// What the audit record of an agent tool call needs from its earlier events, by the model's
/// call id.
#[derive(Default)]
struct ToolCallClock {
    /// The argument digest of each requested call.
    requested: std::collections::HashMap<String, String>,
    /// When each call started.
    started: std::collections::HashMap<String, Option<std::time::SystemTime>>,
}

/// The turn's events from `from_seq` on (1 = from the start), live until it finishes.
pub fn follow(
    app: &App,
    principal: &Principal,
    turn: &TurnId,
    from_seq: u64,
) -> Result<BoxStream<'static, Result<pb::TurnEvent, Error>>, Error> {
    app.turns.owned(&principal.id, turn)?;
    Ok(app.turns.events.follow(turn.as_str(), from_seq))
}

/// One turn's summary.
pub fn get(app: &App, principal: &Principal, turn: &TurnId) -> Result<pb::Turn, Error> {
    let mut record = app.turns.owned(&principal.id, turn)?;
    if record.state == pb::TurnState::Running as i32 {
        record.last_seq = app.turns.events.last_seq(turn.as_str())?;
    }
    Ok(record)
}

/// Stops a running turn (and the command it runs); a finished turn is returned unchanged.
pub async fn cancel(app: &App, principal: &Principal, turn: &TurnId) -> Result<pb::Turn, Error> {
    let record = get(app, principal, turn)?;
    if record.state != pb::TurnState::Running as i32 {
        return Ok(record);
    }
    let session = SessionId::parse(record.session_id.as_str())?;
    let worker = session_worker(app, &principal.id, &session, false)?;
    let client = app.registry.route(&worker)?.client;
    client
        .cancel_turn(
            &principal.id,
            Instant::now() + START_TIMEOUT,
            pb::WorkerCancelTurnRequest {
                turn_id: turn.to_string(),
            },
        )
        .await?;
    info!(turn_id = %turn, "turn cancelled");
    Ok(record)
}

/// A page of a session's transcript: every event of every turn, turns in start order. The
/// page token is `<turn id>/<next seq>`.
pub fn transcript(
    app: &App,
    principal: &Principal,
    session: &SessionId,
    page_size: u32,
    page_token: &str,
) -> Result<pb::GetTranscriptResponse, Error> {
    session_worker(app, &principal.id, session, false)?;
    let limit = match page_size {
        0 => PAGE_DEFAULT,
        n => (n as usize).min(PAGE_MAX),
    };
    let (mut from_turn, mut from_seq) = (String::new(), 1);
    if !page_token.is_empty() {
        let bad = || {
            Error::Status(heist_proto::errors::invalid_argument(
                "page_token",
                "page_token is not one GetTranscript returned: start again without it",
            ))
        };
        let (turn, seq) = page_token.split_once('/').ok_or_else(bad)?;
        from_turn = turn.to_owned();
        from_seq = seq.parse().map_err(|_| bad())?;
    }
    let mut prefix = session.as_str().as_bytes().to_vec();
    prefix.push(0);
    let mut events = Vec::new();
    for key in app.turns.index.scan_prefix(&prefix).keys() {
        let key = key?;
        let turn = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        if turn < from_turn {
            continue;
        }
        let start = if turn == from_turn { from_seq } else { 1 };
        let page = app
            .turns
            .events
            .read(&turn, start, limit - events.len() + 1)?;
        for (seq, event) in page {
            if events.len() == limit {
                return Ok(pb::GetTranscriptResponse {
                    events,
                    next_page_token: format!("{turn}/{seq}"),
                });
            }
            events.push(event);
        }
    }
    Ok(pb::GetTranscriptResponse {
        events,
        next_page_token: String::new(),
    })
}

/// The agents the caller can run: the session's worker's when `session` is given (the caller
/// must own it), otherwise merged by name across connected workers.
pub fn list_agents(
    app: &App,
    principal: &Principal,
    session: Option<&SessionId>,
) -> Result<Vec<pb::AgentSpec>, Error> {
    if let Some(id) = session {
        let worker = session_worker(app, &principal.id, id, false)?;
        return Ok(app
            .registry
            .catalogue(&worker)
            .map(|c| c.agents().to_vec())
            .unwrap_or_default());
    }
    let mut merged: BTreeMap<String, pb::AgentSpec> = BTreeMap::new();
    for catalogue in app.registry.connected_catalogues() {
        for agent in catalogue.agents() {
            merged
                .entry(agent.name.clone())
                .or_insert_with(|| agent.clone());
        }
    }
    Ok(merged.into_values().collect())
}

fn index_key(session: &SessionId, turn: &TurnId) -> Vec<u8> {
    let mut key = session.as_str().as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(turn.as_str().as_bytes());
    key
}
