//! `heistctl mcp`: an MCP server on stdin/stdout (rmcp's stdio transport) for clients that only
//! launch local processes (desktop apps, editors). It forwards `tools/list` and `tools/call` to
//! the coordinator's `/mcp` with the cached login (or `--token`), relays progress notifications,
//! and cancels the forwarded call when the client cancels. Logs go to stderr only: stdout is the
//! protocol.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use rmcp::{
    ErrorData, RoleServer, ServerHandler, ServiceExt as _,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ErrorCode, Implementation,
        ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities,
        ServerConfig,
    },
    service::RequestContext,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{cli::Context, error::Error, mcp::McpHttp};

/// `heistctl mcp` takes only the global flags (`--coordinator`, `--token`, `--ca-cert`).
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Serves MCP on stdin/stdout until the client closes stdin.
pub async fn run(ctx: &Context, _args: Args) -> Result<u8, Error> {
    let ca = match &ctx.global.ca_cert {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            Error::io(
                format!(
                    "cannot read the CA certificate {} (--ca-cert)",
                    path.display()
                ),
                e,
            )
        })?),
        None => None,
    };
    let http = McpHttp::with_ca(&ctx.global.coordinator, ctx.token()?, false, ca.as_deref())?;
    let bridge = Bridge {
        http,
        ids: Arc::new(AtomicU64::new(1)),
    };
    info!(coordinator = %ctx.global.coordinator, "MCP stdio bridge started");
    let running = bridge
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| Error::Mcp(format!("the MCP client did not start a session: {e}")))?;
    running
        .waiting()
        .await
        .map_err(|e| Error::Mcp(format!("the MCP session failed: {e}")))?;
    Ok(0)
}

/// Forwards to the coordinator.
#[derive(Clone)]
struct Bridge {
    http: McpHttp,
    ids: Arc<AtomicU64>,
}

impl Bridge {
    /// Sends one request to the coordinator, relaying its progress notifications to `ctx`'s
    /// client; the client's cancellation drops the HTTP request (which cancels the call there).
    async fn forward(
        &self,
        method: &str,
        params: Value,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<Value, ErrorData> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let (notes, mut received) = mpsc::unbounded_channel();
        let request = self.http.request(id, method, params, Some(&notes));
        tokio::pin!(request);
        let reply = loop {
            tokio::select! {
                reply = &mut request => break reply,
                Some(note) = received.recv() => relay(ctx, note).await,
                () = ctx.ct.cancelled() => {
                    return Err(ErrorData::new(ErrorCode(-32800), "request cancelled", None));
                }
            }
        };
        // Notifications that arrived just before the reply go out before it.
        while let Ok(note) = received.try_recv() {
            relay(ctx, note).await;
        }
        match reply {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(error)) => Err(serde_json::from_value(error.clone()).unwrap_or_else(|_| {
                ErrorData::internal_error(format!("the coordinator answered {error}"), None)
            })),
            Err(err) => Err(ErrorData::internal_error(err.to_string(), None)),
        }
    }
}

/// Passes a progress notification from the coordinator on to the client (others are dropped).
async fn relay(ctx: &RequestContext<RoleServer>, note: Value) {
    if note.get("method").and_then(Value::as_str) != Some("notifications/progress") {
        return;
    }
    let params = note.get("params").cloned().unwrap_or(Value::Null);
    match serde_json::from_value::<ProgressNotificationParam>(params) {
        Ok(progress) => {
            let _ = ctx.peer.notify_progress(progress).await;
        }
        Err(err) => warn!(%err, "dropping a malformed progress notification"),
    }
}

/// The request's `_meta` minus the protocol's own keys (the bridge speaks its own revision to
/// the coordinator): the progress token and `io.heist/requestId` pass through.
fn forwarded_meta(ctx: &RequestContext<RoleServer>) -> Value {
    let meta: serde_json::Map<String, Value> = ctx
        .meta
        .0
        .0
        .iter()
        .filter(|(k, _)| !k.starts_with("io.modelcontextprotocol/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Value::Object(meta)
}

/// Decodes the coordinator's result. The bridge speaks the previous revision to the
/// coordinator, whose results therefore carry no `resultType`; every one of them is complete,
/// so it is set here (rmcp strips it again for a client on an older revision).
fn decode<T: serde::de::DeserializeOwned>(mut value: Value) -> Result<T, ErrorData> {
    if let Some(object) = value.as_object_mut() {
        object
            .entry("resultType")
            .or_insert_with(|| Value::from("complete"));
    }
    serde_json::from_value(value).map_err(|e| {
        ErrorData::internal_error(format!("the coordinator's answer is malformed: {e}"), None)
    })
}

impl ServerHandler for Bridge {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("heistctl-mcp", heist_proto::VERSION))
            .with_instructions(
                "heist: sandboxed sessions for agents. Call session_create first and pass its \
                 session_id to the file, exec, python, SQL, memory and checkpoint tools.",
            )
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let mut params = request
            .and_then(|r| serde_json::to_value(r).ok())
            .unwrap_or_else(|| json!({}));
        params["_meta"] = forwarded_meta(&ctx);
        decode(self.forward("tools/list", params, &ctx).await?)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let params = json!({
            "name": request.name,
            "arguments": request.arguments.unwrap_or_default(),
            "_meta": forwarded_meta(&ctx),
        });
        let result: CallToolResult = decode(self.forward("tools/call", params, &ctx).await?)?;
        Ok(result.into())
    }
}
