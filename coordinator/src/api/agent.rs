//! heist.v1.AgentService: agent turns adapted to [`crate::turns`]. RunTurn is start + follow
//! from event 1; a client closing its stream does not cancel the turn.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _};
use heist_proto::{
    ids::{RequestId, SessionId, TurnId},
    v1::{
        CancelTurnRequest, GetTranscriptRequest, GetTranscriptResponse, GetTurnRequest,
        ListAgentsRequest, ListAgentsResponse, RunTurnRequest, Turn, TurnEvent, WatchTurnRequest,
        agent_service_server::AgentService,
    },
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    app::App,
    auth_layer::principal,
    convert::optional_session,
    turns::{self, TurnRequest},
};

/// What RunTurn and WatchTurn answer with.
pub type TurnStream = Pin<Box<dyn Stream<Item = Result<TurnEvent, Status>> + Send>>;

/// AgentService handlers.
pub struct AgentApi {
    app: Arc<App>,
}

impl AgentApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

fn stream(
    events: futures::stream::BoxStream<'static, Result<TurnEvent, crate::error::Error>>,
) -> TurnStream {
    Box::pin(events.map(|e| e.map_err(Status::from)))
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    #[instrument(skip_all, fields(session_id = %request.get_ref().session_id))]
    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let caller = principal(&request)?.clone();
        let session = optional_session(&request.into_inner().session_id)?;
        let agents = turns::list_agents(&self.app, &caller, session.as_ref())?;
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    type RunTurnStream = TurnStream;

    #[instrument(skip_all, fields(session_id = %request.get_ref().session_id, agent = %request.get_ref().agent))]
    async fn run_turn(
        &self,
        request: Request<RunTurnRequest>,
    ) -> Result<Response<Self::RunTurnStream>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let turn = turns::start(
            &self.app,
            TurnRequest {
                principal: caller.clone(),
                session: SessionId::parse(req.session_id)?,
                agent: req.agent,
                message: req.message,
                request_id: RequestId::parse_optional(&req.request_id)?,
                instructions: String::new(),
                model: String::new(),
            },
        )
        .await?;
        let events = turns::follow(&self.app, &caller, &turn, 1)?;
        Ok(Response::new(stream(events)))
    }

    type WatchTurnStream = TurnStream;

    #[instrument(skip_all, fields(turn_id = %request.get_ref().turn_id, from_seq = request.get_ref().from_seq))]
    async fn watch_turn(
        &self,
        request: Request<WatchTurnRequest>,
    ) -> Result<Response<Self::WatchTurnStream>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let turn = TurnId::parse(req.turn_id)?;
        let events = turns::follow(&self.app, &caller, &turn, req.from_seq)?;
        Ok(Response::new(stream(events)))
    }

    #[instrument(skip_all, fields(turn_id = %request.get_ref().turn_id))]
    async fn cancel_turn(
        &self,
        request: Request<CancelTurnRequest>,
    ) -> Result<Response<Turn>, Status> {
        let caller = principal(&request)?.clone();
        let turn = TurnId::parse(request.into_inner().turn_id)?;
        Ok(Response::new(
            turns::cancel(&self.app, &caller, &turn).await?,
        ))
    }

    #[instrument(skip_all, fields(turn_id = %request.get_ref().turn_id))]
    async fn get_turn(&self, request: Request<GetTurnRequest>) -> Result<Response<Turn>, Status> {
        let caller = principal(&request)?.clone();
        let turn = TurnId::parse(request.into_inner().turn_id)?;
        Ok(Response::new(turns::get(&self.app, &caller, &turn)?))
    }

    #[instrument(skip_all, fields(session_id = %request.get_ref().session_id))]
    async fn get_transcript(
        &self,
        request: Request<GetTranscriptRequest>,
    ) -> Result<Response<GetTranscriptResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let session = SessionId::parse(req.session_id)?;
        let page = turns::transcript(&self.app, &caller, &session, req.page_size, &req.page_token)?;
        Ok(Response::new(page))
    }
}
