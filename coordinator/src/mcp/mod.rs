//! The coordinator as an MCP server: Streamable HTTP at `/mcp` (official Rust SDK `rmcp`), and
//! the OAuth 2.1 resource-server documents next to it. It only adapts MCP to the layers gRPC
//! uses too, like [`crate::api`] adapts protobuf:
//!
//! ```text
//! POST /mcp ─► AuthLayer (bearer JWT, any scope) ─► rmcp (Host/Origin, body limit, protocol)
//!          ─► [`server::HeistMcp`]: tools/list filtered by scope, tools/call ─►
//!             session_* / checkpoint_* / session_fork ─► crate::lifecycle
//!             worker tools (fs_read, exec, …)         ─► crate::calls (call / call_stream)
//!             agent_list / agent_turn                  ─► crate::turns
//! ```
//!
//! - Protocol: stateless (revision 2026-07-28: no `Mcp-Session-Id`, `server/discover`), and the
//!   `initialize` handshake of the earlier revisions, each request served on its own.
//! - Names: worker tools are listed with `.` replaced by `_` (`fs.read` → `fs_read`), the
//!   portable subset every client accepts; the dotted name is accepted in calls too.
//! - Request ids: `_meta["io.heist/requestId"]` on `tools/call` makes a retry of a mutating call
//!   apply once, exactly like a gRPC request id.
//! - Tracing: `_meta.traceparent` (and `_meta.tracestate`) on `tools/call` make the call's span
//!   the child of the client's, so it joins the client's trace; the result's
//!   `_meta["io.heist/traceId"]` names the trace the call belongs to.
//! - Streaming: `exec`, `run.python` and `agent_turn` send `notifications/progress` (when the
//!   request has a `progressToken`) with output and turn events as they happen; a closed
//!   response stream cancels the call (the worker kills the command, a turn is cancelled).
//! - Auth: [`oauth`] serves RFC 9728 / RFC 8414 metadata and `POST /oauth/token`.

mod config;
pub mod oauth;
mod run;
mod server;
mod tools;

use std::sync::Arc;

use axum::Router;
use rmcp::transport::{
    StreamableHttpServerConfig, StreamableHttpService,
    streamable_http_server::session::never::NeverSessionManager,
};

pub use config::McpConfig;
pub use server::HeistMcp;

use crate::app::App;

/// The MCP endpoint's path.
pub const PATH: &str = "/mcp";
/// The `_meta` key of a call's request id (idempotent retries).
pub const REQUEST_ID_META: &str = "io.heist/requestId";
/// The `_meta` key of the trace id a call's result names.
pub const TRACE_ID_META: &str = "io.heist/traceId";

/// `/mcp` plus the OAuth documents and token endpoint.
pub fn routes(app: Arc<App>) -> Router {
    let cfg = &app.config.mcp;
    let mut http = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_cancellation_token(app.shutdown.child_token())
        .with_max_request_body_bytes(cfg.max_request_bytes)
        .with_allowed_origins(cfg.allowed_origins.clone())
        .enforce_origin_validation();
    http = if cfg.allowed_hosts.iter().any(|h| h == "*") {
        http.disable_allowed_hosts()
    } else {
        http.with_allowed_hosts(cfg.allowed_hosts.clone())
    };
    let handler = HeistMcp::new(app.clone());
    let service = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(NeverSessionManager::default()),
        http,
    );
    Router::new()
        .route_service(PATH, service)
        .merge(oauth::routes(app))
}
