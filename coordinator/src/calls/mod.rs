//! The tool call pipeline: one path for every tool call, whoever makes it (gRPC's ToolService
//! today; the MCP endpoint and agent turns next).
//!
//! ```text
//! admit ─► gate ─► run once ─► forward ─► audit ─► after-hooks
//! session   token   request-id  unary or   tool.     metrics,
//! owner,    scopes  dedup       stream to  executed  mutation count,
//! READY,    ∩       (runner)    the worker (audited) auto-checkpoint
//! route,    session
//! catalogue,policy; refusals audited
//! store
//! writable
//! ```
//!
//! The `tool.executed` record ([`audited`]) is written inside the run-once body, so it is in
//! the store before the request-id record and rides on its flush.
//!
//! A call is a domain [`ToolCall`] (principal, session, tool, JSON arguments, request id,
//! deadline) and its result a `CallToolResponse` (the wire's MCP-shaped result); nothing here
//! depends on tonic. [`gate`] is the one place a call is allowed, under the session's
//! [`policy`]; [`hooks`] lists what runs after.

pub mod audited;
pub mod gate;
pub mod hooks;
pub mod policy;
mod stream;

use std::{collections::BTreeMap, sync::Arc};

use heist_proto::{
    ids::{RequestId, SessionId, WorkerId},
    json::map_to_struct,
    v1::{CallToolRequest, CallToolResponse, ToolSpec},
};
use prost::Message as _;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tracing::{Instrument as _, debug_span};

pub use stream::{ToolEvents, call_stream};

use crate::{
    app::App,
    auth_layer::Principal,
    error::Error,
    idempotency::Fingerprint,
    lifecycle::session_worker,
    registry::Route,
    runner::{self, Dedup},
};

/// Idempotency method name: a streamed call and a unary call with the same request id are the
/// same call.
const CALL: &str = "CallTool";

/// One tool call, as every front end describes it.
#[derive(Clone, Debug)]
pub struct ToolCall {
    /// Who calls.
    pub principal: Principal,
    /// The session whose workspace the tool works in.
    pub session: SessionId,
    /// The tool's name, as in the catalogue.
    pub tool: String,
    /// The arguments, checked by the worker against the tool's input schema.
    pub arguments: Map<String, Value>,
    /// Makes a call of a mutating tool apply at most once; ignored for read-only tools.
    pub request_id: Option<RequestId>,
    /// When the caller stops waiting (already capped by HEIST_WORKER_CALL_TIMEOUT_S).
    pub deadline: Instant,
}

impl ToolCall {
    /// The worker-plane request for this call.
    fn to_request(&self) -> CallToolRequest {
        CallToolRequest {
            session_id: self.session.to_string(),
            tool: self.tool.clone(),
            arguments: Some(map_to_struct(&self.arguments)),
            request_id: self
                .request_id
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_default(),
        }
    }

    /// Session, tool and arguments (prost `Struct` fields are a BTreeMap, so the encoding is
    /// canonical); the request id is not part of it.
    pub fn fingerprint(&self) -> [u8; 32] {
        let args = map_to_struct(&self.arguments).encode_to_vec();
        Fingerprint::new(CALL)
            .field(self.session.as_str().as_bytes())
            .field(self.tool.as_bytes())
            .field(&args)
            .finish()
    }
}

/// What a call established before it runs: the caller owns the session and it is READY, its
/// worker is connected and offers the tool, the gate allowed it, and, for a tool that is not
/// read-only, the request id to deduplicate by.
struct Admitted {
    worker: WorkerId,
    route: Route,
    read_only: bool,
    dedup: Option<Dedup>,
}

/// Admits and gates a call (see [`Admitted`]).
fn admit(app: &App, call: &ToolCall) -> Result<Admitted, Error> {
    let worker = session_worker(app, &call.principal.id, &call.session, true)?;
    let route = app.registry.route(&worker)?;
    let Some(spec) = route.catalogue.get(&call.tool) else {
        return Err(Error::ToolNotFound {
            tool: call.tool.clone(),
            worker,
        });
    };
    let policy = session_policy(app, &call.session)?;
    if let Err(err) = gate::allow(&call.principal, &call.session, &policy, &spec.name) {
        audit_denied(app, &call.principal, Some(&call.session), &call.tool, &err);
        return Err(err);
    }
    let read_only = spec.read_only;
    if !read_only {
        // Nothing leaves for the worker while the store cannot record it (disk full).
        app.store.writable()?;
    }
    let dedup = if read_only {
        None
    } else {
        let request_id = call.request_id.clone();
        Dedup::new(&call.principal.id, CALL, request_id, call.fingerprint())
    };
    Ok(Admitted {
        worker,
        route,
        read_only,
        dedup,
    })
}

/// Runs a tool call to its result: admit, gate, run once per request id, forward to the
/// session's worker, then the after-hooks.
pub async fn call(app: &Arc<App>, call: ToolCall) -> Result<CallToolResponse, Error> {
    let span = heist_proto::trace::tool_call_span(&call.tool, call.session.as_str());
    pipeline(app, call).instrument(span).await
}

async fn pipeline(app: &Arc<App>, call: ToolCall) -> Result<CallToolResponse, Error> {
    let admitted = admit(app, &call)?;
    let read_only = admitted.read_only;
    let resp = run(app, &call, admitted).await?;
    hooks::after(app, &call, read_only, &resp).await;
    Ok(resp)
}

async fn run(
    app: &Arc<App>,
    call: &ToolCall,
    admitted: Admitted,
) -> Result<CallToolResponse, Error> {
    let Admitted {
        worker,
        route,
        dedup,
        read_only,
    } = admitted;
    let (owner, deadline, req) = (call.principal.id.clone(), call.deadline, call.to_request());
    let execution = audited::Execution::start(app, call, read_only, "call");
    let Some(dedup) = dedup else {
        let result = forward(&route, worker, &owner, deadline, req).await;
        execution.finish(result.as_ref(), false).await;
        return result;
    };
    let span = debug_span!("call-tool", request_id = %dedup.request_id);
    runner::run_once(
        app,
        Some(dedup),
        |_, bytes| replayed(bytes),
        async move {
            let result = forward(&route, worker, &owner, deadline, req).await;
            execution.finish(result.as_ref(), true).await;
            result
        }
        .instrument(span),
    )
    .await
}

/// Sends the call to the worker and stamps the response with the worker id.
async fn forward(
    route: &Route,
    worker: WorkerId,
    owner: &str,
    deadline: Instant,
    req: CallToolRequest,
) -> Result<CallToolResponse, Error> {
    let mut resp = route.client.call_tool(owner, deadline, req).await?;
    resp.worker_id = worker.into_string();
    Ok(resp)
}

/// A recorded response, marked as replayed.
fn replayed(recorded: &[u8]) -> Result<CallToolResponse, Error> {
    let mut resp: CallToolResponse = runner::decode(recorded)?;
    resp.replayed = true;
    Ok(resp)
}

/// The tool policy of a session (its record must exist: the caller checked it is theirs).
pub fn session_policy(app: &App, session: &SessionId) -> Result<policy::ToolPolicy, Error> {
    app.sessions
        .with(session, |s| policy::ToolPolicy::stored(&s.allowed_tools))
        .ok_or_else(|| Error::SessionNotFound(session.clone()))
}

/// Appends a refused tool call to the audit log: who, in which session, which tool, and why.
pub fn audit_denied(
    app: &App,
    principal: &Principal,
    session: Option<&SessionId>,
    tool: &str,
    why: &Error,
) {
    let session = session.map_or("", SessionId::as_str);
    let reason = match why {
        Error::ToolScopeMissing { scope, .. } => format!("token lacks {scope}"),
        Error::ToolNotAllowed { allowed, .. } => format!("session allows only {allowed}"),
        other => other.to_string(),
    };
    let detail = format!("session={session} tool={tool} reason={reason}");
    app.audit.record("tool.denied", &principal.id, &detail);
}

/// The tools a caller may call: those of the session's worker that the gate allows in that
/// session when `session` is given (the caller must own it), otherwise those of the merged
/// catalogue of every connected worker that the token allows.
pub fn list_tools(
    app: &App,
    principal: &Principal,
    session: Option<&SessionId>,
) -> Result<Vec<ToolSpec>, Error> {
    if let Some(id) = session {
        let worker = session_worker(app, &principal.id, id, false)?;
        let policy = session_policy(app, id)?;
        return Ok(app
            .registry
            .catalogue(&worker)
            .map(|c| {
                c.tools()
                    .iter()
                    .filter(|t| gate::allow(principal, id, &policy, &t.name).is_ok())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default());
    }
    Ok(all_tools(app)
        .into_iter()
        .filter(|t| gate::token_allows(principal, &t.name).is_ok())
        .collect())
}

/// The merged catalogue of every connected worker (the first worker's spec of each name),
/// unfiltered.
pub fn all_tools(app: &App) -> Vec<ToolSpec> {
    let mut merged: BTreeMap<&str, &ToolSpec> = BTreeMap::new();
    let catalogues = app.registry.connected_catalogues();
    for catalogue in &catalogues {
        for tool in catalogue.tools() {
            merged.entry(tool.name.as_str()).or_insert(tool);
        }
    }
    merged.into_values().cloned().collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn call(args: Value) -> ToolCall {
        let Value::Object(arguments) = args else {
            panic!("object")
        };
        ToolCall {
            principal: Principal {
                id: "alice".to_owned(),
                scopes: vec![],
            },
            session: SessionId::parse("s-1").expect("id"),
            tool: "fs.write".to_owned(),
            arguments,
            request_id: RequestId::parse_optional("r1").expect("id"),
            deadline: Instant::now() + Duration::from_secs(1),
        }
    }

    #[test]
    fn fingerprint_is_canonical_and_ignores_the_request_id() {
        let a = call(json!({"path": "a.txt", "content": "x", "opts": {"b": 1, "a": 2}}));
        let mut b = call(json!({"opts": {"a": 2, "b": 1}, "content": "x", "path": "a.txt"}));
        b.request_id = RequestId::parse_optional("other").expect("id");
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = call(json!({"path": "a.txt", "content": "y"}));
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
