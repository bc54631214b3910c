//! The WorkerService gRPC handlers: check the credential, count the call, delegate to
//! [`State`], map the error.

use std::sync::Arc;

use futures::StreamExt as _;
use heist_proto::{
    metadata,
    v1::{self, worker_service_server::WorkerService},
};
use tonic::{Request, Response, Status};

use crate::state::State;

/// WorkerService over the shared worker state.
#[derive(Clone)]
pub struct WorkerApi {
    state: Arc<State>,
}

impl WorkerApi {
    pub(crate) fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn open_session(
        &self,
        request: Request<v1::OpenSessionRequest>,
    ) -> Result<Response<v1::OpenSessionResponse>, Status> {
        self.state.auth.check_call(&request, "OpenSession").await?;
        let _call = self.state.inflight.enter();
        let response = self.state.open_session(request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn close_session(
        &self,
        request: Request<v1::WorkerCloseSessionRequest>,
    ) -> Result<Response<v1::WorkerCloseSessionResponse>, Status> {
        self.state.auth.check_call(&request, "CloseSession").await?;
        let _call = self.state.inflight.enter();
        let response = self.state.close_session(request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn call_tool(
        &self,
        request: Request<v1::CallToolRequest>,
    ) -> Result<Response<v1::CallToolResponse>, Status> {
        self.state.auth.check_call(&request, "CallTool").await?;
        let _call = self.state.inflight.enter();
        let deadline = metadata::remaining_deadline(request.metadata());
        let response = self.state.call_tool(request.into_inner(), deadline).await?;
        Ok(Response::new(response))
    }

    type CallToolStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::ToolEvent, Status>> + Send>>;

    async fn call_tool_stream(
        &self,
        request: Request<v1::CallToolRequest>,
    ) -> Result<Response<Self::CallToolStreamStream>, Status> {
        self.state
            .auth
            .check_call(&request, "CallToolStream")
            .await?;
        let deadline = metadata::remaining_deadline(request.metadata());
        let events = self.state.call_tool_stream(request.into_inner(), deadline);
        Ok(Response::new(Box::pin(events)))
    }

    async fn capture_workspace(
        &self,
        request: Request<v1::CaptureWorkspaceRequest>,
    ) -> Result<Response<v1::CaptureWorkspaceResponse>, Status> {
        self.state
            .auth
            .check_call(&request, "CaptureWorkspace")
            .await?;
        let _call = self.state.inflight.enter();
        let response = self.state.capture_workspace(request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn restore_workspace(
        &self,
        request: Request<v1::RestoreWorkspaceRequest>,
    ) -> Result<Response<v1::RestoreWorkspaceResponse>, Status> {
        self.state
            .auth
            .check_call(&request, "RestoreWorkspace")
            .await?;
        let _call = self.state.inflight.enter();
        let response = self.state.restore_workspace(request.into_inner()).await?;
        Ok(Response::new(response))
    }

    type RunTurnStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::TurnEvent, Status>> + Send>>;

    async fn run_turn(
        &self,
        request: Request<v1::WorkerRunTurnRequest>,
    ) -> Result<Response<Self::RunTurnStream>, Status> {
        self.state.auth.check_call(&request, "RunTurn").await?;
        let request = request.into_inner();
        let claims = self.state.auth.check_grant(&request.grant)?;
        let events = self.state.run_turn(claims, request).await?;
        Ok(Response::new(Box::pin(events.map(Ok))))
    }

    async fn cancel_turn(
        &self,
        request: Request<v1::WorkerCancelTurnRequest>,
    ) -> Result<Response<v1::WorkerCancelTurnResponse>, Status> {
        self.state.auth.check_call(&request, "CancelTurn").await?;
        let was_running = self.state.cancel_turn(request.get_ref())?;
        Ok(Response::new(v1::WorkerCancelTurnResponse { was_running }))
    }
}
