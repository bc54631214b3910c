//! Playing a game: the session, the target's files, the rounds, the checkpoints; then the
//! analysis, the guess, the outcome and the reveal.
//!
//! The engine reaches the cluster only through [`Ports`] (sessions, tool calls, agent turns and
//! checkpoints through the coordinator's one call pipeline), so a game is made of the same calls
//! a client could make and is gated, audited and checkpointed like them.

use std::collections::HashMap;

use base64::Engine as _;
use futures::{StreamExt as _, future::BoxFuture, stream::BoxStream};
use heist_proto::v1 as pb;
use serde_json::Value as Json;

use super::{
    analyzer::{self, Facts, Message, ToolUse},
    crew::{self, Mole},
    database,
    scenario::{Facts as Truth, Scenario},
};
use crate::error::Error;

/// What a game needs from the cluster, on behalf of the player who started it.
pub trait Ports: Send + Sync {
    /// Opens a session for the game.
    fn create_session(&self) -> BoxFuture<'_, Result<String, Error>>;
    /// Calls a tool in the game's session; the result's structured content or text.
    fn call_tool<'a>(
        &'a self,
        session: &'a str,
        tool: &'a str,
        arguments: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>>;
    /// Runs a crew member's turn with sealed instructions; its events until `finished`.
    fn run_turn<'a>(
        &'a self,
        session: &'a str,
        agent: &'a str,
        message: String,
        instructions: String,
        model: &'a str,
    ) -> BoxFuture<'a, Result<BoxStream<'static, Result<pb::TurnEvent, Error>>, Error>>;
    /// Checkpoints the session; the checkpoint id.
    fn checkpoint<'a>(
        &'a self,
        session: &'a str,
        label: &'a str,
    ) -> BoxFuture<'a, Result<String, Error>>;
    /// A new session from a checkpoint (for forks).
    fn fork<'a>(&'a self, checkpoint: &'a str) -> BoxFuture<'a, Result<String, Error>>;
}

/// A tool's answer.
#[derive(Clone, Debug, Default)]
pub struct ToolOutput {
    /// Text content.
    pub text: String,
    /// Structured content, when the tool has it.
    pub structured: Option<Json>,
    /// The tool ran and failed.
    pub is_error: bool,
}

/// Where the engine sends the game's events (the caller stores and broadcasts them).
pub trait Sink: Send {
    /// One event, in order.
    fn emit(&mut self, event: pb::heist_event::Event) -> Result<(), Error>;
}

/// The game to play.
pub struct Plan<'a> {
    /// The target.
    pub scenario: &'a Scenario,
    /// The sealed mole.
    pub mole: &'a Mole,
    /// First round to play (1, or the round after a fork).
    pub first_round: u32,
    /// Last round.
    pub rounds: u32,
    /// Model chain.
    pub model: &'a str,
    /// The player's note to the crew.
    pub note: &'a str,
    /// The session, when forked (else a new one is created and the target written into it).
    pub session: Option<String>,
}

/// How the rounds went.
#[derive(Clone, Debug, Default)]
pub struct Played {
    /// The game's session.
    pub session: String,
    /// Checkpoint after each round played, in order.
    pub checkpoints: Vec<String>,
}

/// Plays the rounds. Each turn's events go to `sink` as they come. `played` says how far the
/// game got, also when it fails midway: the session it opened (which the caller then closes)
/// and the rounds checkpointed.
pub async fn play(
    ports: &dyn Ports,
    plan: Plan<'_>,
    sink: &mut dyn Sink,
    played: &mut Played,
) -> Result<(), Error> {
    let session = match plan.session.clone() {
        Some(s) => s,
        None => {
            let s = ports.create_session().await?;
            played.session = s.clone();
            write_target(ports, &s, plan.scenario).await?;
            s
        }
    };
    played.session = session.clone();
    let mut said: Vec<(String, String)> = Vec::new();
    for round in plan.first_round..=plan.rounds {
        sink.emit(pb::heist_event::Event::RoundStarted(round))?;
        let heard = std::mem::take(&mut said);
        for role in crew::ROLES {
            let message = round_message(round, plan.rounds, role, &heard, plan.note);
            let mole = (plan.mole.agent == *role).then_some(plan.mole);
            let instructions = crew::instructions(role, round, plan.rounds, mole);
            let mut events = ports
                .run_turn(&session, role, message, instructions, plan.model)
                .await?;
            while let Some(event) = events.next().await {
                let event = event?;
                if let Some(pb::turn_event::Event::FinalMessage(text)) = &event.event {
                    said.push(((*role).to_owned(), text.clone()));
                }
                sink.emit(pb::heist_event::Event::Turn(event))?;
            }
        }
        let checkpoint = ports
            .checkpoint(&session, &format!("heist round {round}"))
            .await?;
        let plan_text = read_plan(ports, &session).await;
        played.checkpoints.push(checkpoint.clone());
        sink.emit(pb::heist_event::Event::RoundFinished(pb::RoundFinished {
            round,
            checkpoint_id: checkpoint,
            plan: plan_text,
        }))?;
    }
    Ok(())
}

/// Writes the blueprints and the security database into the session.
async fn write_target(ports: &dyn Ports, session: &str, scenario: &Scenario) -> Result<(), Error> {
    for (path, content) in scenario.files() {
        expect_ok(
            ports
                .call_tool(
                    session,
                    "fs.write",
                    serde_json::json!({"path": path, "content": content}),
                )
                .await?,
            "fs.write",
        )?;
    }
    let db = database::build(scenario)
        .map_err(|e| game_error(format!("cannot build the target's database: {e}")))?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(db);
    let args = serde_json::json!({"path": "security.db", "content": encoded, "encoding": "base64"});
    expect_ok(
        ports.call_tool(session, "fs.write", args).await?,
        "fs.write",
    )?;
    Ok(())
}

fn expect_ok(out: ToolOutput, tool: &str) -> Result<ToolOutput, Error> {
    if out.is_error {
        return Err(game_error(format!(
            "{tool} failed while setting up the game: {}",
            out.text
        )));
    }
    Ok(out)
}

async fn read_plan(ports: &dyn Ports, session: &str) -> String {
    match ports
        .call_tool(session, "fs.read", serde_json::json!({"path": "plan.md"}))
        .await
    {
        Ok(out) if !out.is_error => out
            .structured
            .as_ref()
            .and_then(|s| s["content"].as_str())
            .map_or(out.text, str::to_owned),
        _ => String::new(),
    }
}

/// What a crew member is told at the start of its turn: the round, and what the others said
/// in the previous round.
fn round_message(
    round: u32,
    rounds: u32,
    role: &str,
    heard: &[(String, String)],
    note: &str,
) -> String {
    let mut out = format!("Round {round} of {rounds}. Read brief.md if you have not. ");
    let others: Vec<String> = heard
        .iter()
        .filter(|(who, _)| who != role)
        .map(|(who, text)| format!("{who}: {text}"))
        .collect();
    if !others.is_empty() {
        out.push_str("Last round the crew said:\n");
        out.push_str(&others.join("\n"));
        out.push('\n');
    }
    if !note.is_empty() {
        out.push_str(&format!("A note from the boss: {note}\n"));
    }
    out.push_str(&format!("Your part as the {role}?"));
    out
}

/// The analyzer's view of a game's turns, from its stored events.
pub fn messages(events: &[pb::HeistEvent]) -> Vec<Message> {
    let mut round = 0;
    let mut open: HashMap<String, Message> = HashMap::new();
    let mut requested: HashMap<String, Json> = HashMap::new();
    let mut out = Vec::new();
    for e in events {
        match &e.event {
            Some(pb::heist_event::Event::RoundStarted(r)) => round = *r,
            Some(pb::heist_event::Event::Turn(t)) => {
                let m = open.entry(t.turn_id.clone()).or_insert_with(|| Message {
                    round,
                    agent: t.agent.clone(),
                    turn_id: t.turn_id.clone(),
                    ..Message::default()
                });
                match &t.event {
                    Some(pb::turn_event::Event::ToolCallRequested(call)) => {
                        if let Some(args) = &call.arguments {
                            requested.insert(
                                call.call_id.clone(),
                                heist_proto::json::struct_to_json(args),
                            );
                        }
                    }
                    Some(pb::turn_event::Event::ToolCallFinished(call)) => {
                        let result = call.result.clone().unwrap_or_default();
                        m.tools.push(ToolUse {
                            tool: call.tool.clone(),
                            arguments: call
                                .arguments
                                .as_ref()
                                .map(heist_proto::json::struct_to_json)
                                .or_else(|| requested.get(&call.call_id).cloned())
                                .unwrap_or(Json::Null),
                            result: result_text(&result),
                            denied: result.is_error && result_text(&result).contains("not allowed"),
                            seq: t.seq,
                        });
                    }
                    Some(pb::turn_event::Event::FinalMessage(text)) => {
                        m.text = text.clone();
                        m.seq = t.seq;
                    }
                    Some(pb::turn_event::Event::Finished(_)) => {
                        if let Some(done) = open.remove(&t.turn_id) {
                            out.push(done);
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    out.extend(open.into_values());
    out
}

fn result_text(result: &pb::CallToolResponse) -> String {
    let mut parts: Vec<String> = result
        .content
        .iter()
        .filter_map(|b| match &b.block {
            Some(pb::content_block::Block::Text(t)) => Some(t.clone()),
            Some(pb::content_block::Block::Json(v)) => {
                Some(heist_proto::json::value_to_json(v).to_string())
            }
            None => None,
        })
        .collect();
    if let Some(s) = &result.structured_content {
        parts.push(heist_proto::json::struct_to_json(s).to_string());
    }
    parts.join("\n")
}

/// The crew's tools by role, for the analyzer.
pub fn roles() -> HashMap<String, Vec<String>> {
    crew::ROLES
        .iter()
        .map(|r| {
            (
                (*r).to_owned(),
                crew::tools(r).iter().map(|t| (*t).to_owned()).collect(),
            )
        })
        .collect()
}

/// Analyzes a game: suspicion per crew member, from its events and the target's database.
pub async fn analyze(
    ports: &dyn Ports,
    session: &str,
    events: &[pb::HeistEvent],
) -> Result<Vec<analyzer::Suspicion>, Error> {
    let mut cache: Vec<(String, Vec<Vec<String>>)> = Vec::new();
    // Facts::load runs its queries through a sync closure: run them first, then replay.
    for sql in Facts::QUERIES {
        cache.push(((*sql).to_owned(), query(ports, session, sql).await?));
    }
    let facts = Facts::load(|sql| {
        cache
            .iter()
            .find(|(q, _)| q == sql)
            .map(|(_, rows)| rows.clone())
            .ok_or_else(|| game_error(format!("unplanned query {sql}")))
    })?;
    Ok(analyzer::analyze(&messages(events), &roles(), &facts))
}

/// Runs a query with `db.query` in the game's session; rows as text cells.
async fn query(ports: &dyn Ports, session: &str, sql: &str) -> Result<Vec<Vec<String>>, Error> {
    let out = ports
        .call_tool(
            session,
            "db.query",
            serde_json::json!({"database": "security.db", "sql": sql}),
        )
        .await?;
    let out = expect_ok(out, "db.query")?;
    let rows = out
        .structured
        .as_ref()
        .and_then(|s| s["rows"].as_array().cloned())
        .unwrap_or_default();
    Ok(rows
        .iter()
        .map(|row| {
            row.as_array()
                .map(|cells| {
                    cells
                        .iter()
                        .map(|c| match c {
                            Json::String(s) => s.clone(),
                            Json::Null => String::new(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect())
}

/// Whether the final plan holds up against the truth; the lines (or missing parts) that do not.
pub fn check_plan(plan: &str, truth: &Truth) -> Vec<String> {
    let mut errors = Vec::new();
    let line = |key: &str| {
        plan.lines()
            .rev()
            .find(|l| l.trim_start().starts_with(&format!("- {key}:")))
    };
    let mut need = |key: &str, wants: Vec<String>| match line(key) {
        None => errors.push(format!("the plan has no {key} line")),
        Some(l) => {
            for want in wants {
                if !l.contains(&want) {
                    errors.push(format!("{}: should say {want}", l.trim()));
                }
            }
        }
    };
    need(
        "entry",
        vec![
            truth.entrance.clone(),
            truth.window_opens.hhmm(),
            truth.window_closes.hhmm(),
        ],
    );
    need("camera", vec![truth.camera.clone()]);
    need(
        "vault",
        vec![format!("drill {} minutes", truth.drill_minutes)],
    );
    need(
        "getaway",
        vec![
            truth.route.clone(),
            format!("{} minutes", truth.route_minutes),
        ],
    );
    errors
}

/// The outcome of a guess (see HeistOutcome in heist.proto).
pub fn outcome(correct: bool, plan_sound: bool) -> pb::HeistOutcome {
    match (correct, plan_sound) {
        (false, _) => pb::HeistOutcome::Busted,
        (true, true) => pb::HeistOutcome::Success,
        (true, false) => pb::HeistOutcome::Failure,
    }
}

/// A game that cannot go on (its setup or a query it needs failed).
fn game_error(message: String) -> Error {
    Error::Status(tonic::Status::internal(message))
}
