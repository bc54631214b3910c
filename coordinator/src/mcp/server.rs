//! The MCP request handler: who calls (the [`Principal`] the auth layer put on the HTTP request),
//! `tools/list` for that caller, and `tools/call` dispatched to [`super::run`]. Tool failures
//! become `isError` results carrying the reason; an unknown or forbidden tool name is a JSON-RPC
//! error (invalid params), as the protocol asks.

use std::sync::Arc;

use heist_proto::{errors::reason_of, ids::RequestId, trace};
use rmcp::{
    ErrorData, RoleServer, ServerHandler,
    model::{
        CacheScope, CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock,
        Implementation, ListToolsResult, MetaObject, PaginatedRequestParams, ServerCapabilities,
        ServerConfig,
    },
    service::RequestContext,
};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tonic::Status;
use tracing::{Instrument as _, Span, field::Empty, info, info_span};

use super::{REQUEST_ID_META, TRACE_ID_META, run, tools};
use crate::{app::App, auth_layer::Principal, calls, error::Error};

/// The MCP server over one coordinator (cheap to clone: one per HTTP request).
#[derive(Clone)]
pub struct HeistMcp {
    app: Arc<App>,
}

impl HeistMcp {
    /// The handler over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

/// What the handler knows about one `tools/call`.
pub(super) struct Call {
    /// Who calls.
    pub principal: Principal,
    /// `_meta["io.heist/requestId"]`.
    pub request_id: Option<RequestId>,
    /// When the caller stops waiting (HEIST_WORKER_CALL_TIMEOUT_S from now).
    pub deadline: Instant,
    /// Where progress goes, when the client asked for it.
    pub progress: run::Progress,
    /// Cancelled when the client closes the response stream or cancels the request.
    pub cancel: tokio_util::sync::CancellationToken,
}

/// The principal the auth layer put on the HTTP request under this MCP request.
fn caller(ctx: &RequestContext<RoleServer>) -> Result<Principal, ErrorData> {
    ctx.extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<Principal>())
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("the request carries no verified caller", None))
}

fn request_id(ctx: &RequestContext<RoleServer>) -> Result<Option<RequestId>, ErrorData> {
    match ctx.meta.0.0.get(REQUEST_ID_META) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => RequestId::parse_optional(id).map_err(|err| {
            ErrorData::invalid_params(format!("_meta[\"{REQUEST_ID_META}\"]: {err}"), None)
        }),
        Some(_) => Err(ErrorData::invalid_params(
            format!("_meta[\"{REQUEST_ID_META}\"] must be a string"),
            None,
        )),
    }
}

impl ServerHandler for HeistMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("heist", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "heist: sandboxed sessions for agents. Call session_create first and pass its \
                 session_id to the file, exec, python, SQL, memory and checkpoint tools.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let caller = caller(&ctx)?;
        let catalogue = calls::list_tools(&self.app, &caller, None)
            .map_err(|err| ErrorData::internal_error(err.to_string(), None))?;
        let mut result = ListToolsResult::with_all_items(tools::visible(&caller, &catalogue));
        // What is listed depends on the token.
        result.cache_scope = Some(CacheScope::Private);
        Ok(result)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let principal = caller(&ctx)?;
        let span = info_span!(
            "mcp-call",
            tool = %request.name,
            principal = %principal.id,
            trace_id = Empty,
        );
        let trace_id = join_trace(&span, &ctx);
        let call = Call {
            principal,
            request_id: request_id(&ctx)?,
            deadline: Instant::now() + self.app.config.worker_call_timeout,
            progress: run::Progress::new(ctx.peer.clone(), ctx.meta.get_progress_token()),
            cancel: ctx.ct.clone(),
        };
        let arguments = request.arguments.unwrap_or_default();
        let outcome = run::dispatch(&self.app, &call, &request.name, arguments)
            .instrument(span)
            .await;
        let result = match outcome {
            Ok(result) => result,
            Err(run::Failure::Protocol(err)) => return Err(err),
            Err(run::Failure::Tool(err)) => tool_error(err),
        };
        let mut result = self.limited(result);
        if let Some(id) = trace_id {
            result
                .meta
                .get_or_insert_with(|| MetaObject(Map::new()))
                .0
                .insert(TRACE_ID_META.to_owned(), Value::String(id));
        }
        Ok(result.into())
    }
}

/// Makes `span` the child of the trace context in the request's `_meta` (`traceparent`, and
/// `tracestate` if given; a malformed one is ignored, as W3C asks); returns the trace id the
/// call belongs to, if any, and records it on the span so log lines carry it.
fn join_trace(span: &Span, ctx: &RequestContext<RoleServer>) -> Option<String> {
    let field = |key: &str| ctx.meta.0.0.get(key).and_then(Value::as_str);
    let remote = field("traceparent").map(|tp| trace::from_w3c(tp, field("tracestate")));
    let remote_id = remote.as_ref().and_then(trace::context_trace_id);
    if let Some(parent) = remote {
        trace::set_parent(span, parent);
    }
    // With the OpenTelemetry layer the span has its (possibly new) trace; without it the
    // client's trace id is still worth naming.
    let id = trace::trace_id(span).or(remote_id)?.to_string();
    span.record("trace_id", id.as_str());
    Some(id)
}

impl HeistMcp {
    /// `result`, or an error result when its JSON exceeds HEIST_MCP_MAX_RESULT_BYTES.
    fn limited(&self, result: CallToolResult) -> CallToolResult {
        let max = self.app.config.mcp.max_result_bytes;
        let size = serde_json::to_vec(&result).map_or(usize::MAX, |b| b.len());
        if size <= max {
            return result;
        }
        info!(size, max, "tool result over the MCP size limit");
        let mut refused = CallToolResult::error(vec![ContentBlock::text(format!(
            "the result is {size} bytes, over this server's limit of {max} bytes \
             (HEIST_MCP_MAX_RESULT_BYTES): ask for less, e.g. read the file in parts"
        ))]);
        refused.meta = Some(meta(json!({"io.heist/reason": "RESULT_TOO_LARGE"})));
        refused
    }
}

/// A failed call as the caller's model should read it: the message says what to do, `_meta`
/// carries the gRPC code and the machine-readable reason.
fn tool_error(err: Error) -> CallToolResult {
    let status = Status::from(err);
    let mut result = CallToolResult::error(vec![ContentBlock::text(status.message().to_owned())]);
    let mut fields = json!({"io.heist/code": format!("{:?}", status.code())});
    if let Some(reason) = reason_of(&status) {
        fields["io.heist/reason"] = Value::String(reason);
    }
    result.meta = Some(meta(fields));
    result
}

/// A `_meta` object from a JSON object literal.
pub(super) fn meta(value: Value) -> MetaObject {
    match value {
        Value::Object(map) => MetaObject(map),
        _ => MetaObject(Map::new()),
    }
}
