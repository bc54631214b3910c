//! heist.v1.SessionService: create, get, list, close, adapted to [`crate::lifecycle`].

use std::sync::Arc;

use heist_proto::{
    ids::SessionId,
    v1::{
        CloseSessionRequest, CreateSessionRequest, GetSessionRequest, ListSessionsRequest,
        ListSessionsResponse, Session, session_service_server::SessionService,
    },
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    app::App,
    auth_layer::principal,
    convert::{page_after, page_limit},
    error::Error,
    lifecycle, sessions,
    worker_client::call_deadline,
};

/// SessionService handlers.
pub struct SessionApi {
    app: Arc<App>,
}

impl SessionApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    #[instrument(skip_all, fields(principal))]
    async fn create_session(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        let caller = principal(&request)?.clone();
        tracing::Span::current().record("principal", caller.id.as_str());
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        let req = request.into_inner().try_into()?;
        lifecycle::create_session(&self.app, &caller, deadline, req)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(session_id = %request.get_ref().session_id))]
    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        let owner = principal(&request)?.id.clone();
        let id = SessionId::parse(request.into_inner().session_id)?;
        lifecycle::owned_session(&self.app, &owner, &id)
            .map(|s| Response::new(self.app.view(s)))
            .map_err(Status::from)
    }

    #[instrument(skip_all)]
    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let owner = principal(&request)?.id.clone();
        list_sessions(&self.app, &owner, &request.into_inner())
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(session_id = %request.get_ref().session_id))]
    async fn close_session(
        &self,
        request: Request<CloseSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        let caller = principal(&request)?.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        let req = request.into_inner().try_into()?;
        lifecycle::close_session(&self.app, &caller, deadline, req)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

fn list_sessions(
    app: &App,
    owner: &str,
    req: &ListSessionsRequest,
) -> Result<ListSessionsResponse, Error> {
    let limit = page_limit(req.page_size);
    let after = page_after(&req.page_token, sessions::decode_page_token)?;
    let (page, next) = app
        .sessions
        .list(owner, req.include_closed, after.as_ref(), limit);
    Ok(ListSessionsResponse {
        sessions: page.into_iter().map(|s| app.view(s)).collect(),
        next_page_token: next
            .as_ref()
            .map(sessions::encode_page_token)
            .unwrap_or_default(),
    })
}
