//! heist.v1.ToolService: the merged tool catalogue, and tool calls routed to the session's worker.
//!
//! The call path reads only memory (session table, registry) and reuses the worker's channel; a
//! call to a read-only tool never touches sled. Calls to other tools with a request id go
//! through [`crate::idempotency`] and run in a tracked task, so a caller that gives up cannot
//! leave a half-recorded call behind.

use std::{collections::BTreeMap, sync::Arc};

use heist_proto::{
    ids::{RequestId, SessionId, WorkerId},
    v1::{
        CallToolRequest, CallToolResponse, ListToolsRequest, ListToolsResponse, SessionState,
        ToolSpec, tool_service_server::ToolService,
    },
};
use prost::Message as _;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{Instrument as _, info_span, instrument};

use crate::{
    app::App,
    auth_layer::principal,
    error::Error,
    idempotency::{self, Begin, Fingerprint},
    registry::Route,
    worker_client::call_deadline,
};

const CALL: &str = "CallTool";

/// ToolService handlers.
pub struct ToolApi {
    app: Arc<App>,
}

impl ToolApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl ToolService for ToolApi {
    #[instrument(skip_all, fields(session_id = %request.get_ref().session_id))]
    async fn list_tools(
        &self,
        request: Request<ListToolsRequest>,
    ) -> Result<Response<ListToolsResponse>, Status> {
        let owner = principal(&request)?.id.clone();
        list_tools(&self.app, &owner, &request.into_inner().session_id)
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(session_id = %request.get_ref().session_id, tool = %request.get_ref().tool))]
    async fn call_tool(
        &self,
        request: Request<CallToolRequest>,
    ) -> Result<Response<CallToolResponse>, Status> {
        let owner = principal(&request)?.id.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        call_tool(&self.app, owner, deadline, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    type CallToolStreamStream = super::tool_stream::EventStream;

    #[instrument(skip_all, fields(session_id = %request.get_ref().session_id, tool = %request.get_ref().tool))]
    async fn call_tool_stream(
        &self,
        request: Request<CallToolRequest>,
    ) -> Result<Response<Self::CallToolStreamStream>, Status> {
        let owner = principal(&request)?.id.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        super::tool_stream::call_tool_stream(&self.app, owner, deadline, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

fn list_tools(app: &App, owner: &str, session_id: &str) -> Result<ListToolsResponse, Error> {
    if !session_id.is_empty() {
        let id = SessionId::parse(session_id)?;
        let worker = session_worker(app, owner, &id, false)?;
        let tools = app
            .registry
            .catalogue(&worker)
            .map(|c| c.tools().to_vec())
            .unwrap_or_default();
        return Ok(ListToolsResponse { tools });
    }
    let mut merged: BTreeMap<&str, &ToolSpec> = BTreeMap::new();
    let catalogues = app.registry.connected_catalogues();
    for catalogue in &catalogues {
        for tool in catalogue.tools() {
            merged.entry(tool.name.as_str()).or_insert(tool);
        }
    }
    Ok(ListToolsResponse {
        tools: merged.into_values().cloned().collect(),
    })
}

/// The worker of the caller's session; with `ready`, the session must also be READY.
pub(super) fn session_worker(
    app: &App,
    owner: &str,
    id: &SessionId,
    ready: bool,
) -> Result<WorkerId, Error> {
    app.sessions
        .with(id, |s| {
            if s.owner != owner {
                return Err(Error::SessionNotFound(id.clone()));
            }
            if ready && s.state != SessionState::Ready as i32 {
                let state = SessionState::try_from(s.state).map_or("unknown", |st| match st {
                    SessionState::Creating => "creating",
                    SessionState::Closing => "closing",
                    SessionState::Closed => "closed",
                    SessionState::Failed => "failed",
                    SessionState::Ready | SessionState::Unspecified => "unknown",
                });
                return Err(Error::SessionNotReady {
                    id: id.clone(),
                    state,
                });
            }
            Ok(WorkerId::parse(s.worker_id.as_str())?)
        })
        .unwrap_or_else(|| Err(Error::SessionNotFound(id.clone())))
}

/// What CallTool and CallToolStream both establish before a call runs: the caller owns the
/// session and it is READY, its worker is connected and offers the tool, and, for a tool that is
/// not read-only, the request id to deduplicate by.
pub(super) struct Admitted {
    /// The session.
    pub(super) session: SessionId,
    /// Its worker.
    pub(super) worker: WorkerId,
    /// How to reach the worker.
    pub(super) route: Route,
    /// Set only for mutating tools called with a request id.
    pub(super) request_id: Option<RequestId>,
}

/// Checks a call before it runs (see [`Admitted`]).
pub(super) fn admit(app: &App, owner: &str, req: &CallToolRequest) -> Result<Admitted, Error> {
    let session = SessionId::parse(req.session_id.as_str())?;
    let worker = session_worker(app, owner, &session, true)?;
    let route = app.registry.route(&worker)?;
    let Some(read_only) = route.catalogue.get(&req.tool).map(|spec| spec.read_only) else {
        return Err(Error::ToolNotFound {
            tool: req.tool.clone(),
            worker,
        });
    };
    let request_id = if read_only {
        None
    } else {
        RequestId::parse_optional(&req.request_id)?
    };
    Ok(Admitted {
        session,
        worker,
        route,
        request_id,
    })
}

/// A recorded response, marked as replayed.
pub(super) fn replayed(recorded: &[u8]) -> Result<CallToolResponse, Error> {
    let mut resp = CallToolResponse::decode(recorded).map_err(|source| Error::Corrupt {
        what: "idempotency",
        source,
    })?;
    resp.replayed = true;
    Ok(resp)
}

/// A tool call, then (with HEIST_AUTO_CHECKPOINT) a checkpoint if the tool is not read-only.
async fn call_tool(
    app: &Arc<App>,
    owner: String,
    deadline: Instant,
    req: CallToolRequest,
) -> Result<CallToolResponse, Error> {
    let (session, tool) = (req.session_id.clone(), req.tool.clone());
    let resp = call_tool_once(app, owner.clone(), deadline, req).await?;
    super::checkpoint::after_tool_call(app, &owner, &session, &tool, &resp, deadline).await;
    Ok(resp)
}

async fn call_tool_once(
    app: &Arc<App>,
    owner: String,
    deadline: Instant,
    req: CallToolRequest,
) -> Result<CallToolResponse, Error> {
    let Admitted {
        session: id,
        worker,
        route,
        request_id,
    } = admit(app, &owner, &req)?;
    let Some(request_id) = request_id else {
        return forward(&route, worker, &owner, deadline, req).await;
    };

    let fingerprint = fingerprint(&req);
    let key = idempotency::key(&owner, CALL, &request_id);
    let guard = match app.idempotency.begin(key, fingerprint, &request_id).await? {
        Begin::Replay(bytes) => return replayed(&bytes),
        Begin::Run(guard) => guard,
    };
    let span = info_span!("call-tool", session_id = %id, request_id = %request_id);
    app.tasks
        .spawn(
            async move {
                let resp = forward(&route, worker, &owner, deadline, req).await?;
                guard.complete(fingerprint, resp.encode_to_vec()).await?;
                Ok(resp)
            }
            .instrument(span),
        )
        .await?
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
    resp.replayed = false;
    Ok(resp)
}

/// Session, tool and arguments (prost `Struct` fields are a BTreeMap, so the encoding is
/// canonical).
pub(super) fn fingerprint(req: &CallToolRequest) -> [u8; 32] {
    let args = req
        .arguments
        .as_ref()
        .map(|a| a.encode_to_vec())
        .unwrap_or_default();
    Fingerprint::new(CALL)
        .field(req.session_id.as_bytes())
        .field(req.tool.as_bytes())
        .field(&args)
        .finish()
}

#[cfg(test)]
mod tests {
    use heist_proto::json::json_to_struct;
    use serde_json::json;

    use super::*;

    fn req(args: serde_json::Value) -> CallToolRequest {
        CallToolRequest {
            session_id: "s-1".to_owned(),
            tool: "fs.write".to_owned(),
            arguments: json_to_struct(&args),
            request_id: "r1".to_owned(),
        }
    }

    #[test]
    fn fingerprint_is_canonical_and_ignores_the_request_id() {
        let a = req(json!({"path": "a.txt", "content": "x", "opts": {"b": 1, "a": 2}}));
        let mut b = req(json!({"opts": {"a": 2, "b": 1}, "content": "x", "path": "a.txt"}));
        b.request_id = "other".to_owned();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let c = req(json!({"path": "a.txt", "content": "y"}));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }
}
