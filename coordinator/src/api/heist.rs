//! heist.v1.HeistService, adapted to [`crate::heist::service::Heists`].

use std::sync::Arc;

use futures::{StreamExt as _, stream::BoxStream};
use heist_proto::{
    ids::RequestId,
    v1::{
        Analysis, AnalyzeRequest, ForkHeistRequest, GetHeistRequest, GuessRequest, GuessResult,
        Heist, HeistEvent, HeistStats, HeistStatsRequest, ListHeistsRequest, ListHeistsResponse,
        StartHeistRequest, WatchHeistRequest, heist_service_server::HeistService,
    },
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    app::App,
    auth_layer::principal,
    convert::page_limit,
    heist::service::{ForkGame, Heists, NewGame},
    idempotency::Fingerprint,
    runner::{self, Dedup},
};

/// HeistService handlers.
pub struct HeistApi {
    app: Arc<App>,
}

impl HeistApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    /// The game's events from `from`, as a response stream.
    fn stream(
        &self,
        caller: &crate::Principal,
        id: &str,
        from: u64,
    ) -> Result<Response<Events>, Status> {
        let events = self.app.heists.watch(caller, id, from)?;
        Ok(Response::new(
            events.map(|e| e.map_err(Status::from)).boxed(),
        ))
    }
}

type Events = BoxStream<'static, Result<HeistEvent, Status>>;

/// What makes a start or a fork apply once: the method, the client's request id, the request.
struct Once {
    method: &'static str,
    request_id: Option<RequestId>,
    fingerprint: [u8; 32],
}

impl Once {
    fn new(method: &'static str, request_id: &str, fingerprint: [u8; 32]) -> Result<Self, Status> {
        Ok(Self {
            method,
            request_id: RequestId::parse_optional(request_id)?,
            fingerprint,
        })
    }
}

impl HeistApi {
    /// Runs `begin` (which starts a game and returns its id) once per request id, then streams
    /// the game: a retry attaches to the game the first call started.
    async fn once(
        &self,
        caller: &crate::Principal,
        once: Once,
        begin: impl Future<Output = Result<String, crate::error::Error>> + Send + 'static,
    ) -> Result<Response<Events>, Status> {
        let dedup = Dedup::new(&caller.id, once.method, once.request_id, once.fingerprint);
        let game = runner::run_once(
            &self.app,
            dedup,
            |_, bytes| runner::decode::<Heist>(bytes),
            async move {
                Ok(Heist {
                    id: begin.await?,
                    ..Default::default()
                })
            },
        )
        .await?;
        self.stream(caller, &game.id, 1)
    }
}

#[tonic::async_trait]
impl HeistService for HeistApi {
    type StartHeistStream = Events;
    type WatchHeistStream = Events;
    type ForkHeistStream = Events;

    #[instrument(skip_all, fields(seed = request.get_ref().seed))]
    async fn start_heist(
        &self,
        request: Request<StartHeistRequest>,
    ) -> Result<Response<Events>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let fingerprint = Fingerprint::new("StartHeist")
            .field(&req.seed.to_be_bytes())
            .field(&req.rounds.to_be_bytes())
            .field(req.model.as_bytes())
            .finish();
        let (app, who) = (self.app.clone(), caller.clone());
        let new = NewGame {
            seed: req.seed,
            rounds: req.rounds,
            model: req.model,
        };
        let once = Once::new("StartHeist", &req.request_id, fingerprint)?;
        self.once(&caller, once, async move {
            Heists::start(&app, &who, new).await
        })
        .await
    }

    #[instrument(skip_all, fields(game_id = %request.get_ref().game_id))]
    async fn watch_heist(
        &self,
        request: Request<WatchHeistRequest>,
    ) -> Result<Response<Events>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        self.stream(&caller, &req.game_id, req.from_seq.max(1))
    }

    #[instrument(skip_all, fields(game_id = %request.get_ref().game_id))]
    async fn fork_heist(
        &self,
        request: Request<ForkHeistRequest>,
    ) -> Result<Response<Events>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let fingerprint = Fingerprint::new("ForkHeist")
            .field(req.game_id.as_bytes())
            .field(&req.round.to_be_bytes())
            .field(req.model.as_bytes())
            .field(req.note.as_bytes())
            .finish();
        let (app, who) = (self.app.clone(), caller.clone());
        let fork = ForkGame {
            game: req.game_id,
            round: req.round,
            model: req.model,
            note: req.note,
        };
        let once = Once::new("ForkHeist", &req.request_id, fingerprint)?;
        self.once(&caller, once, async move {
            Heists::fork(&app, &who, fork).await
        })
        .await
    }

    #[instrument(skip_all, fields(game_id = %request.get_ref().game_id))]
    async fn get_heist(
        &self,
        request: Request<GetHeistRequest>,
    ) -> Result<Response<Heist>, Status> {
        let caller = principal(&request)?.clone();
        let record = self
            .app
            .heists
            .record(&caller, &request.into_inner().game_id)?;
        Ok(Response::new(record.game.unwrap_or_default()))
    }

    #[instrument(skip_all)]
    async fn list_heists(
        &self,
        request: Request<ListHeistsRequest>,
    ) -> Result<Response<ListHeistsResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let limit = page_limit(req.page_size);
        let after = Some(req.page_token.as_str()).filter(|t| !t.is_empty());
        let games = self.app.heists.list(&caller, after, limit)?;
        let next_page_token = if games.len() == limit {
            games.last().map(|g| g.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListHeistsResponse {
            games,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(game_id = %request.get_ref().game_id))]
    async fn analyze(
        &self,
        request: Request<AnalyzeRequest>,
    ) -> Result<Response<Analysis>, Status> {
        let caller = principal(&request)?.clone();
        Heists::analyze(&self.app, &caller, &request.into_inner().game_id)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(game_id = %request.get_ref().game_id))]
    async fn guess(&self, request: Request<GuessRequest>) -> Result<Response<GuessResult>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        Heists::guess(&self.app, &caller, &req.game_id, &req.agent)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all)]
    async fn stats(
        &self,
        request: Request<HeistStatsRequest>,
    ) -> Result<Response<HeistStats>, Status> {
        let caller = principal(&request)?.clone();
        self.app
            .heists
            .stats(&caller)
            .map(Response::new)
            .map_err(Status::from)
    }
}
