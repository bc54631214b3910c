//! heist.v1.ClusterService: the workers the coordinator knows.

use std::sync::Arc;

use heist_proto::{
    ids::WorkerId,
    v1::{
        GetWorkerRequest, ListWorkersRequest, ListWorkersResponse, Worker,
        cluster_service_server::ClusterService,
    },
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{app::App, error::Error};

/// ClusterService handlers.
pub struct ClusterApi {
    app: Arc<App>,
}

impl ClusterApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    #[instrument(skip_all)]
    async fn list_workers(
        &self,
        _request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self
            .app
            .registry
            .list()
            .into_iter()
            .map(|w| self.app.worker_view(w))
            .collect();
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    #[instrument(skip_all, fields(worker_id = %request.get_ref().worker_id))]
    async fn get_worker(
        &self,
        request: Request<GetWorkerRequest>,
    ) -> Result<Response<Worker>, Status> {
        get_worker(&self.app, &request.into_inner().worker_id)
            .map(Response::new)
            .map_err(Status::from)
    }
}

fn get_worker(app: &App, raw_id: &str) -> Result<Worker, Error> {
    let id = WorkerId::parse(raw_id)?;
    let worker = app.registry.get(&id).ok_or(Error::WorkerNotFound(id))?;
    Ok(app.worker_view(worker))
}
