//! The tool call pipeline: one path for every tool call, whoever makes it (gRPC's ToolService
//! today; the MCP endpoint and agent turns next).
//!
//! ```text
//! admit ─► gate ─► run once ─► forward ─► after-hooks
//! session   scopes  request-id  unary or    auto-checkpoint
//! owner,    (per    dedup       stream to   (audit, metrics
//! READY,    tool    (runner)    the worker  plug in here)
//! route,    later)
//! catalogue,
//! store writable
//! ```
//!
//! A call is a domain [`ToolCall`] (principal, session, tool, JSON arguments, request id,
//! deadline) and its result a `CallToolResponse` (the wire's MCP-shaped result); nothing here
//! depends on tonic. [`gate`] is the one place a call is allowed; [`hooks`] lists what runs after.

pub mod gate;
pub mod hooks;
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
use tracing::{Instrument as _, info_span};

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
    gate::allow(&call.principal, spec)?;
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
    let span = info_span!("tool_call", tool = %call.tool, session_id = %call.session);
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
        ..
    } = admitted;
    let (owner, deadline, req) = (call.principal.id.clone(), call.deadline, call.to_request());
    let Some(dedup) = dedup else {
        return forward(&route, worker, &owner, deadline, req).await;
    };
    let span = info_span!("call-tool", session_id = %call.session, request_id = %dedup.request_id);
    runner::run_once(
        app,
        Some(dedup),
        |_, bytes| replayed(bytes),
        async move { forward(&route, worker, &owner, deadline, req).await }.instrument(span),
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

/// The tools a caller can call: those of the session's worker when `session` is given (the
/// caller must own it), otherwise the merged catalogue of every connected worker.
pub fn list_tools(
    app: &App,
    principal: &Principal,
    session: Option<&SessionId>,
) -> Result<Vec<ToolSpec>, Error> {
    if let Some(id) = session {
        let worker = session_worker(app, &principal.id, id, false)?;
        return Ok(app
            .registry
            .catalogue(&worker)
            .map(|c| c.tools().to_vec())
            .unwrap_or_default());
    }
    let mut merged: BTreeMap<&str, &ToolSpec> = BTreeMap::new();
    let catalogues = app.registry.connected_catalogues();
    for catalogue in &catalogues {
        for tool in catalogue.tools() {
            merged.entry(tool.name.as_str()).or_insert(tool);
        }
    }
    Ok(merged.into_values().cloned().collect())
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
