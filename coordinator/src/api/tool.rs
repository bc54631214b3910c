//! heist.v1.ToolService: the merged tool catalogue, and tool calls (unary and streamed)
//! adapted to the call pipeline in [`crate::calls`].

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _};
use heist_proto::{
    ids::{RequestId, SessionId},
    json::struct_to_map,
    v1::{
        CallToolRequest, CallToolResponse, ListToolsRequest, ListToolsResponse, ToolEvent,
        tool_service_server::ToolService,
    },
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    app::App,
    auth_layer::principal,
    calls::{self, ToolCall},
    convert::optional_session,
    worker_client::call_deadline,
};

/// What CallToolStream answers with.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<ToolEvent, Status>> + Send>>;

/// ToolService handlers.
pub struct ToolApi {
    app: Arc<App>,
}

impl ToolApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    /// The domain call for a request.
    fn tool_call(&self, request: Request<CallToolRequest>) -> Result<ToolCall, Status> {
        let principal = principal(&request)?.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        let req = request.into_inner();
        Ok(ToolCall {
            principal,
            session: SessionId::parse(req.session_id)?,
            tool: req.tool,
            arguments: req
                .arguments
                .as_ref()
                .map(struct_to_map)
                .unwrap_or_default(),
            request_id: RequestId::parse_optional(&req.request_id)?,
            deadline,
        })
    }
}

#[tonic::async_trait]
impl ToolService for ToolApi {
    #[instrument(level = "debug", skip_all, fields(session_id = %request.get_ref().session_id))]
    async fn list_tools(
        &self,
        request: Request<ListToolsRequest>,
    ) -> Result<Response<ListToolsResponse>, Status> {
        let caller = principal(&request)?.clone();
        let session = optional_session(&request.into_inner().session_id)?;
        calls::list_tools(&self.app, &caller, session.as_ref())
            .map(|tools| Response::new(ListToolsResponse { tools }))
            .map_err(Status::from)
    }

    #[instrument(level = "debug", skip_all, fields(session_id = %request.get_ref().session_id, tool = %request.get_ref().tool))]
    async fn call_tool(
        &self,
        request: Request<CallToolRequest>,
    ) -> Result<Response<CallToolResponse>, Status> {
        let call = self.tool_call(request)?;
        calls::call(&self.app, call)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    type CallToolStreamStream = EventStream;

    #[instrument(level = "debug", skip_all, fields(session_id = %request.get_ref().session_id, tool = %request.get_ref().tool))]
    async fn call_tool_stream(
        &self,
        request: Request<CallToolRequest>,
    ) -> Result<Response<Self::CallToolStreamStream>, Status> {
        let call = self.tool_call(request)?;
        let events = calls::call_stream(&self.app, call).await?;
        Ok(Response::new(Box::pin(
            events.map(|e| e.map_err(Status::from)),
        )))
    }
}
