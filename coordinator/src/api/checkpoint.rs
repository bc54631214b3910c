//! heist.v1.CheckpointService: create, list, get, restore, fork, delete, adapted to
//! [`crate::lifecycle`] (the mutating calls) and the checkpoint table (the reads).

use std::sync::Arc;

use heist_proto::{
    ids::CheckpointId,
    v1::{
        Checkpoint, CreateCheckpointRequest, DeleteCheckpointRequest, DeleteCheckpointResponse,
        ForkSessionRequest, GetCheckpointRequest, ListCheckpointsRequest, ListCheckpointsResponse,
        RestoreCheckpointRequest, Session, checkpoint_service_server::CheckpointService,
    },
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    app::App,
    auth_layer::principal,
    checkpoints,
    convert::{optional_session, page_after, page_limit},
    error::Error,
    lifecycle,
    worker_client::call_deadline,
};

/// CheckpointService handlers.
pub struct CheckpointApi {
    app: Arc<App>,
}

impl CheckpointApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl CheckpointService for CheckpointApi {
    #[instrument(skip_all, fields(session_id = %request.get_ref().session_id))]
    async fn create_checkpoint(
        &self,
        request: Request<CreateCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        let caller = principal(&request)?.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        let req = request.into_inner().try_into()?;
        lifecycle::create_checkpoint(&self.app, &caller, deadline, req)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all)]
    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let owner = principal(&request)?.id.clone();
        list(&self.app, &owner, &request.into_inner())
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(checkpoint_id = %request.get_ref().checkpoint_id))]
    async fn get_checkpoint(
        &self,
        request: Request<GetCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        let owner = principal(&request)?.id.clone();
        get(&self.app, &owner, &request.into_inner())
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(checkpoint_id = %request.get_ref().checkpoint_id))]
    async fn restore_checkpoint(
        &self,
        request: Request<RestoreCheckpointRequest>,
    ) -> Result<Response<Session>, Status> {
        let caller = principal(&request)?.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        let req = request.into_inner().try_into()?;
        lifecycle::restore(&self.app, &caller, deadline, req)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(checkpoint_id = %request.get_ref().checkpoint_id))]
    async fn fork_session(
        &self,
        request: Request<ForkSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        let caller = principal(&request)?.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        let req = request.into_inner().try_into()?;
        lifecycle::fork(&self.app, &caller, deadline, req)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(checkpoint_id = %request.get_ref().checkpoint_id))]
    async fn delete_checkpoint(
        &self,
        request: Request<DeleteCheckpointRequest>,
    ) -> Result<Response<DeleteCheckpointResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner().try_into()?;
        lifecycle::delete_checkpoint(&self.app, &caller, req)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

fn list(
    app: &App,
    owner: &str,
    req: &ListCheckpointsRequest,
) -> Result<ListCheckpointsResponse, Error> {
    let session = optional_session(&req.session_id)?;
    let limit = page_limit(req.page_size);
    let after = page_after(&req.page_token, checkpoints::decode_page_token)?;
    let (page, next) = app
        .checkpoints
        .list(owner, session.as_ref(), after.as_ref(), limit);
    Ok(ListCheckpointsResponse {
        checkpoints: page,
        next_page_token: next
            .as_ref()
            .map(checkpoints::encode_page_token)
            .unwrap_or_default(),
    })
}

fn get(app: &App, owner: &str, req: &GetCheckpointRequest) -> Result<Checkpoint, Error> {
    let id = CheckpointId::parse(req.checkpoint_id.as_str())?;
    let summary = lifecycle::owned_checkpoint(app, owner, &id)?;
    if !req.include_manifest {
        return Ok(summary);
    }
    let mut full = app
        .checkpoints
        .get_full(&id)?
        .ok_or_else(|| Error::CheckpointNotFound(id.clone()))?;
    // The in-memory record is authoritative for lineage (retention may have re-parented it).
    full.parent_id = summary.parent_id;
    Ok(full)
}
