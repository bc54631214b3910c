//! `tools/call`, tool by tool, through the layers gRPC uses: [`crate::lifecycle`] for sessions
//! and checkpoints, [`crate::calls`] for worker tools, [`crate::turns`] for agent turns. Each
//! coordinator tool answers with `structuredContent` (matching its output schema) and the same
//! JSON as text for clients that read only content.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use futures::{StreamExt as _, stream::BoxStream};
use heist_proto::{
    errors,
    ids::{CheckpointId, SessionId, TurnId},
    json::{struct_to_map, value_to_json},
    v1::{self as pb, content_block::Block, tool_event, turn_event::Event},
};
use rmcp::{
    ErrorData, Peer, RoleServer,
    model::{
        CallToolResult, ContentBlock, ErrorCode, JsonObject, ProgressNotificationParam,
        ProgressToken,
    },
};
use serde_json::{Value, json};
use tracing::info;

use super::{
    server::{Call, meta},
    tools::{self, Builtin},
};
use crate::{
    app::App,
    calls::{self, ToolCall, gate},
    convert::{CloseSession, Fork, NewCheckpoint, NewSession, Restore},
    error::Error,
    lifecycle,
    turns::{self, TurnRequest},
};

/// Worker tools whose output is streamed as progress notifications.
const STREAMING: &[&str] = &["exec", "run.python"];
/// Most sessions or checkpoints one list returns.
const LIST_LIMIT: usize = 1000;

/// Why a call has no result.
pub(super) enum Failure {
    /// Not a call this caller can make (unknown or forbidden tool, malformed `_meta`), or
    /// cancelled: a JSON-RPC error.
    Protocol(ErrorData),
    /// The tool ran, or tried to, and failed: an `isError` result.
    Tool(Error),
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        Self::Tool(err)
    }
}

/// Progress notifications of one request (sent only when it carries a `progressToken`).
pub(super) struct Progress {
    peer: Peer<RoleServer>,
    token: Option<ProgressToken>,
    sent: AtomicU64,
}

impl Progress {
    /// Progress to `peer` under `token`.
    pub fn new(peer: Peer<RoleServer>, token: Option<ProgressToken>) -> Self {
        Self {
            peer,
            token,
            sent: AtomicU64::new(0),
        }
    }

    /// Sends `message` as the next progress step (a closed stream is noticed by the caller's
    /// cancellation token, so a failed send is ignored here).
    async fn send(&self, message: String) {
        let Some(token) = &self.token else { return };
        let n = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        let param = ProgressNotificationParam::new(token.clone(), n as f64).with_message(message);
        let _ = self.peer.notify_progress(param).await;
    }
}

/// Runs the tool `name` for `call`.
pub(super) async fn dispatch(
    app: &std::sync::Arc<App>,
    call: &Call,
    name: &str,
    mut args: JsonObject,
) -> Result<CallToolResult, Failure> {
    if let Some(builtin) = Builtin::by_name(name) {
        if !call.principal.has(builtin.scope()) {
            return Err(forbidden(name, builtin.scope()));
        }
        return run_builtin(app, call, builtin, args).await;
    }
    let catalogue = calls::all_tools(app);
    let Some(spec) = catalogue
        .iter()
        .find(|s| s.name == name || tools::mcp_name(&s.name) == name)
    else {
        return Err(Failure::Protocol(ErrorData::invalid_params(
            format!("unknown tool `{name}`: tools/list shows the tools you can call"),
            None,
        )));
    };
    let session = session_arg(&mut args, true)?.ok_or_else(|| missing("session_id"))?;
    if let Err(err) = gate::token_allows(&call.principal, &spec.name) {
        calls::audit_denied(app, &call.principal, Some(&session), &spec.name, &err);
        return Err(Failure::Protocol(ErrorData::invalid_params(
            format!("tool `{name}` is not available to this token: {err}"),
            None,
        )));
    }
    let tool_call = ToolCall {
        principal: call.principal.clone(),
        session,
        tool: spec.name.clone(),
        arguments: args,
        request_id: call.request_id.clone(),
        deadline: call.deadline,
    };
    let resp = if STREAMING.contains(&spec.name.as_str()) {
        streamed(app, call, tool_call).await?
    } else {
        cancellable(call, calls::call(app, tool_call)).await??
    };
    Ok(tool_result(resp))
}

/// Runs `work` unless the caller goes away first (the future is dropped: a worker call in
/// flight is cancelled with it).
async fn cancellable<T>(call: &Call, work: impl Future<Output = T>) -> Result<T, Failure> {
    tokio::select! {
        out = work => Ok(out),
        () = call.cancel.cancelled() => {
            info!("call cancelled by the client");
            Err(Failure::Protocol(ErrorData::new(ErrorCode(-32800), "request cancelled", None)))
        }
    }
}

/// A streamed worker call: output chunks become progress, the last event is the result.
async fn streamed(
    app: &std::sync::Arc<App>,
    call: &Call,
    tool_call: ToolCall,
) -> Result<pb::CallToolResponse, Failure> {
    let mut events = cancellable(call, calls::call_stream(app, tool_call)).await??;
    loop {
        // Returning drops `events`: the worker's stream is cancelled and the command killed.
        match cancellable(call, events.next()).await? {
            None => {
                return Err(Failure::Tool(Error::Status(tonic::Status::unavailable(
                    "the call ended without a result: retry it",
                ))));
            }
            Some(Err(err)) => return Err(err.into()),
            Some(Ok(pb::ToolEvent {
                event: Some(tool_event::Event::Output(chunk)),
            })) => {
                call.progress
                    .send(String::from_utf8_lossy(&chunk.data).into_owned())
                    .await;
            }
            Some(Ok(pb::ToolEvent {
                event: Some(tool_event::Event::Result(resp)),
            })) => {
                return Ok(resp);
            }
            Some(Ok(_)) => {}
        }
    }
}

/// A worker's MCP-shaped response as an MCP result; `_meta` says which worker ran it and
/// whether it was a replay of an earlier call with the same request id.
fn tool_result(resp: pb::CallToolResponse) -> CallToolResult {
    let content = resp
        .content
        .iter()
        .filter_map(|block| match &block.block {
            Some(Block::Text(text)) => Some(ContentBlock::text(text.clone())),
            Some(Block::Json(value)) => Some(ContentBlock::text(value_to_json(value).to_string())),
            None => None,
        })
        .collect();
    let mut result = if resp.is_error {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    };
    result.structured_content = resp
        .structured_content
        .as_ref()
        .map(|s| Value::Object(struct_to_map(s)));
    result.meta = Some(meta(json!({
        "io.heist/workerId": resp.worker_id,
        "io.heist/replayed": resp.replayed,
        "io.heist/durationUs": resp.duration_us,
    })));
    result
}

/// A coordinator tool's structured answer (also as text).
fn structured(value: Value) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(value.to_string())]);
    result.structured_content = Some(value);
    result
}

async fn run_builtin(
    app: &std::sync::Arc<App>,
    call: &Call,
    builtin: Builtin,
    mut args: JsonObject,
) -> Result<CallToolResult, Failure> {
    let (who, deadline, request_id) = (&call.principal, call.deadline, call.request_id.clone());
    let value = match builtin {
        Builtin::SessionCreate => {
            let req = NewSession {
                labels: labels_arg(&args)?,
                request_id,
                allowed_tools: strings_arg(&args, "allowed_tools")?,
            };
            let work = lifecycle::create_session(app, who, deadline, req);
            session_json(&cancellable(call, work).await??)
        }
        Builtin::SessionList => {
            let closed = args
                .get("include_closed")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let (page, _) = app.sessions.list(&who.id, closed, None, LIST_LIMIT);
            let sessions: Vec<Value> = page
                .into_iter()
                .map(|s| session_json(&app.view(s)))
                .collect();
            json!({ "sessions": sessions })
        }
        Builtin::SessionClose => {
            let session = session_arg(&mut args, true)?.ok_or_else(|| missing("session_id"))?;
            let req = CloseSession {
                session,
                request_id,
            };
            let work = lifecycle::close_session(app, who, deadline, req);
            session_json(&cancellable(call, work).await??)
        }
        Builtin::CheckpointCreate => {
            let session = session_arg(&mut args, true)?.ok_or_else(|| missing("session_id"))?;
            let req = NewCheckpoint {
                session,
                labels: labels_arg(&args)?,
                request_id,
            };
            let work = lifecycle::create_checkpoint(app, who, deadline, req);
            checkpoint_json(&cancellable(call, work).await??)
        }
        Builtin::CheckpointList => {
            let session = session_arg(&mut args, false)?;
            let (page, _) = app
                .checkpoints
                .list(&who.id, session.as_ref(), None, LIST_LIMIT);
            let checkpoints: Vec<Value> = page.iter().map(checkpoint_json).collect();
            json!({ "checkpoints": checkpoints })
        }
        Builtin::CheckpointRestore => {
            let req = Restore {
                checkpoint: checkpoint_arg(&args)?,
                target: session_arg(&mut args, false)?,
                request_id,
            };
            let work = lifecycle::restore(app, who, deadline, req);
            session_json(&cancellable(call, work).await??)
        }
        Builtin::SessionFork => {
            let req = Fork {
                checkpoint: checkpoint_arg(&args)?,
                labels: labels_arg(&args)?,
                request_id,
            };
            let work = lifecycle::fork(app, who, deadline, req);
            session_json(&cancellable(call, work).await??)
        }
        Builtin::AgentList => {
            let session = session_arg(&mut args, false)?;
            let agents = turns::list_agents(app, who, session.as_ref())?;
            let agents: Vec<Value> = agents
                .iter()
                .map(|a| {
                    json!({
                        "name": a.name, "role": a.role, "model": a.model,
                        "tools": a.tools, "step_limit": a.step_limit,
                    })
                })
                .collect();
            json!({ "agents": agents })
        }
        Builtin::AgentTurn => return agent_turn(app, call, args).await,
    };
    Ok(structured(value))
}

/// Runs a turn and follows it to its end; every event is a progress step. A caller that goes
/// away cancels the turn.
async fn agent_turn(
    app: &std::sync::Arc<App>,
    call: &Call,
    mut args: JsonObject,
) -> Result<CallToolResult, Failure> {
    let session = session_arg(&mut args, true)?.ok_or_else(|| missing("session_id"))?;
    let request = TurnRequest {
        principal: call.principal.clone(),
        session,
        agent: string_arg(&args, "agent")?,
        message: string_arg(&args, "message")?,
        request_id: call.request_id.clone(),
        instructions: String::new(),
        model: String::new(),
    };
    let turn = cancellable(call, turns::start(app, request)).await??;
    let mut events: BoxStream<'static, Result<pb::TurnEvent, Error>> =
        turns::follow(app, &call.principal, &turn, 1)?;
    let (mut count, mut final_message) = (0u64, String::new());
    let state = loop {
        let next = tokio::select! {
            next = events.next() => next,
            () = call.cancel.cancelled() => {
                info!(turn_id = %turn, "turn cancelled by the client");
                let _ = turns::cancel(app, &call.principal, &turn).await;
                return Err(Failure::Protocol(ErrorData::new(ErrorCode(-32800), "request cancelled", None)));
            }
        };
        let Some(event) = next.transpose()? else {
            break pb::TurnState::Failed;
        };
        count += 1;
        if let Some(Event::FinalMessage(text)) = &event.event {
            final_message.clone_from(text);
        }
        if let Some(text) = describe(&event) {
            call.progress.send(text).await;
        }
        if let Some(Event::Finished(state)) = event.event {
            break pb::TurnState::try_from(state).unwrap_or(pb::TurnState::Unspecified);
        }
    };
    Ok(structured(json!({
        "turn_id": turn_id(&turn),
        "state": state.as_str_name(),
        "final_message": final_message,
        "events": count,
    })))
}

fn turn_id(turn: &TurnId) -> String {
    turn.to_string()
}

/// One line per turn event for a progress message.
fn describe(event: &pb::TurnEvent) -> Option<String> {
    Some(match event.event.as_ref()? {
        Event::Started(text) => format!("started: {text}"),
        Event::TextDelta(text) => text.clone(),
        Event::ToolCallRequested(c) => format!("tool call requested: {}", c.tool),
        Event::ToolCallStarted(c) => format!("tool call started: {}", c.tool),
        Event::ToolCallFinished(c) => format!("tool call finished: {}", c.tool),
        Event::Usage(u) => format!("usage: {} in, {} out", u.input_tokens, u.output_tokens),
        Event::Summary(text) => format!("summary: {text}"),
        Event::Fallback(text) => format!("fallback: {text}"),
        Event::Error(text) => format!("error: {text}"),
        Event::FinalMessage(text) => text.clone(),
        Event::Finished(state) => format!(
            "finished: {}",
            pb::TurnState::try_from(*state).map_or("UNKNOWN", |s| s.as_str_name())
        ),
    })
}

fn session_json(s: &pb::Session) -> Value {
    json!({
        "session_id": s.id,
        "state": pb::SessionState::try_from(s.state).map_or("UNKNOWN", |st| st.as_str_name()),
        "worker_id": s.worker_id,
        "labels": s.labels,
        "failure_reason": s.failure_reason,
        "allowed_tools": s.allowed_tools,
    })
}

fn checkpoint_json(c: &pb::Checkpoint) -> Value {
    json!({
        "checkpoint_id": c.id,
        "session_id": c.session_id,
        "parent_id": c.parent_id,
        "file_count": c.file_count,
        "total_bytes": c.total_bytes,
        "labels": c.labels,
    })
}

fn forbidden(name: &str, scope: &str) -> Failure {
    Failure::Protocol(ErrorData::invalid_params(
        format!("tool `{name}` is not available to this token: it needs the `{scope}` scope"),
        None,
    ))
}

fn missing(field: &str) -> Failure {
    Failure::Tool(Error::Status(errors::invalid_argument(
        field,
        format!("`{field}` is required"),
    )))
}

fn bad(field: &str, what: &str) -> Failure {
    Failure::Tool(Error::Status(errors::invalid_argument(
        field,
        what.to_owned(),
    )))
}

/// Takes `session_id` out of `args` (worker tools do not know it).
fn session_arg(args: &mut JsonObject, required: bool) -> Result<Option<SessionId>, Failure> {
    match args.remove("session_id") {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(missing("session_id")),
        Some(Value::String(id)) => Ok(Some(SessionId::parse(id).map_err(Error::from)?)),
        Some(_) => Err(bad("session_id", "`session_id` must be a string")),
    }
}

fn checkpoint_arg(args: &JsonObject) -> Result<CheckpointId, Failure> {
    let id = string_arg(args, "checkpoint_id")?;
    Ok(CheckpointId::parse(id).map_err(Error::from)?)
}

fn string_arg(args: &JsonObject, field: &str) -> Result<String, Failure> {
    match args.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(missing(field)),
        Some(_) => Err(bad(field, "must be a string")),
    }
}

/// An optional array of strings (empty when absent).
fn strings_arg(args: &JsonObject, field: &str) -> Result<Vec<String>, Failure> {
    match args.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(bad(field, "must be an array of strings")),
            })
            .collect(),
        Some(_) => Err(bad(field, "must be an array of strings")),
    }
}

fn labels_arg(args: &JsonObject) -> Result<HashMap<String, String>, Failure> {
    let Some(labels) = args.get("labels") else {
        return Ok(HashMap::new());
    };
    let Value::Object(map) = labels else {
        return Err(bad("labels", "`labels` must be an object of strings"));
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::String(v) => Ok((k.clone(), v.clone())),
            _ => Err(bad("labels", "`labels` values must be strings")),
        })
        .collect()
}
