//! heist.v1.SessionService: create (place + open on the worker), get, list, close.
//!
//! Create and close run their body in a tracked task, so a caller that gives up half way never
//! leaves a session stuck in CREATING or CLOSING; the caller still waits for the result.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::SystemTime,
};

use heist_proto::{
    ids::{RequestId, SessionId, WorkerId},
    v1::{
        CloseSessionRequest, CreateSessionRequest, GetSessionRequest, ListSessionsRequest,
        ListSessionsResponse, OpenSessionRequest, Session, SessionState, WorkerCloseSessionRequest,
        session_service_server::SessionService,
    },
};
use prost::Message as _;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{Instrument as _, info, info_span, instrument, warn};

use crate::{
    app::App,
    auth_layer::principal,
    error::Error,
    idempotency::{self, Begin, Fingerprint},
    placement::{self, Candidate},
    sessions,
    worker_client::call_deadline,
};

/// Page size when the request says 0.
const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page.
const MAX_PAGE_SIZE: usize = 1000;
const CREATE: &str = "CreateSession";
const CLOSE: &str = "CloseSession";

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
        let owner = principal(&request)?.id.clone();
        tracing::Span::current().record("principal", owner.as_str());
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        create_session(&self.app, owner, deadline, request.into_inner())
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
        owned_session(&self.app, &owner, &id)
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
        let owner = principal(&request)?.id.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        close_session(&self.app, owner, deadline, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// The caller's session, or NOT_FOUND (also for another principal's session).
fn owned_session(app: &App, owner: &str, id: &SessionId) -> Result<Session, Error> {
    app.sessions
        .get(id)
        .filter(|s| s.owner == owner)
        .ok_or_else(|| Error::SessionNotFound(id.clone()))
}

/// A stored response replayed: the session as it is now (it may have changed since).
fn replay(app: &App, bytes: &[u8]) -> Result<Session, Error> {
    let stored = Session::decode(bytes).map_err(|source| Error::Corrupt {
        what: "idempotency",
        source,
    })?;
    let current = SessionId::parse(stored.id.as_str())
        .ok()
        .and_then(|id| app.sessions.get(&id))
        .unwrap_or(stored);
    Ok(app.view(current))
}

async fn create_session(
    app: &Arc<App>,
    owner: String,
    deadline: Instant,
    req: CreateSessionRequest,
) -> Result<Session, Error> {
    super::validate_labels(&req.labels)?;
    let request_id = RequestId::parse_optional(&req.request_id)?;
    let fingerprint = Fingerprint::new(CREATE).map(&req.labels).finish();
    let guard = match &request_id {
        None => None,
        Some(rid) => match app
            .idempotency
            .begin(idempotency::key(&owner, CREATE, rid), fingerprint, rid)
            .await?
        {
            Begin::Replay(bytes) => return replay(app, &bytes),
            Begin::Run(guard) => Some(guard),
        },
    };
    let task_app = app.clone();
    let span = info_span!("create-session", principal = %owner);
    app.tasks
        .spawn(
            async move {
                let session =
                    place_and_open(&task_app, &owner, deadline, req.labels, &HashSet::new())
                        .await?;
                if let Some(guard) = guard {
                    guard.complete(fingerprint, session.encode_to_vec()).await?;
                }
                Ok(session)
            }
            .instrument(span),
        )
        .await?
}

/// Places a session, stores it CREATING, opens it on the worker, stores READY (or FAILED).
/// Workers in `prefer` (e.g. holding a checkpoint's blobs, for a fork) win when one of them is
/// eligible; otherwise the normal rules pick among all.
pub(crate) async fn place_and_open(
    app: &App,
    owner: &str,
    deadline: Instant,
    labels: HashMap<String, String>,
    prefer: &HashSet<String>,
) -> Result<Session, Error> {
    if app.shutdown.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    let session = app.sessions.create(|slots| {
        let views = app.registry.placement_views();
        let candidates: Vec<Candidate<'_>> = views
            .iter()
            .map(|v| Candidate {
                id: &v.id,
                labels: &v.labels,
                capacity: v.capacity,
                active_sessions: slots.get(v.id.as_str()).copied().unwrap_or(0),
                in_flight: v.in_flight,
                saturated: v.saturated,
            })
            .collect();
        let preferred: Vec<Candidate<'_>> = candidates
            .iter()
            .filter(|c| prefer.contains(c.id.as_str()))
            .cloned()
            .collect();
        let worker = match placement::place(&preferred, &labels) {
            Ok(worker) => worker,
            Err(_) => placement::place(&candidates, &labels)?,
        };
        let now = SystemTime::now();
        Ok(Session {
            id: SessionId::generate().into_string(),
            owner: owner.to_owned(),
            worker_id: worker.to_string(),
            state: SessionState::Creating as i32,
            labels: labels.clone(),
            created_at: Some(now.into()),
            updated_at: Some(now.into()),
            ..Session::default()
        })
    })?;
    app.store.flush().await?;
    let id = SessionId::parse(session.id.as_str())?;
    let worker = WorkerId::parse(session.worker_id.as_str())?;
    info!(session_id = %id, worker_id = %worker, "session placed");

    let opened = match app.registry.route(&worker) {
        Ok(route) => {
            let msg = OpenSessionRequest {
                session_id: id.to_string(),
                owner: owner.to_owned(),
            };
            route
                .client
                .open_session(owner, deadline, msg)
                .await
                .map(|_| ())
        }
        Err(err) => Err(err),
    };
    let still_creating = |s: &Session| s.state == SessionState::Creating as i32;
    let result = match opened {
        Ok(()) => app
            .sessions
            .update(&id, |s| {
                still_creating(s) && {
                    s.state = SessionState::Ready as i32;
                    true
                }
            })
            .map(|s| s.unwrap_or(session)),
        Err(err) => {
            warn!(session_id = %id, worker_id = %worker, %err, "session creation failed");
            let reason = err.to_string();
            app.sessions
                .update(&id, |s| {
                    still_creating(s) && {
                        s.state = SessionState::Failed as i32;
                        s.failure_reason = reason;
                        true
                    }
                })
                .and(Err(err))
        }
    };
    app.sessions.finish_create(&id);
    app.store.flush().await?;
    let session = result?;
    if session.state != SessionState::Ready as i32 {
        // Closed while the worker was creating it: do not leave the workspace behind.
        if let Ok(route) = app.registry.route(&worker) {
            let msg = WorkerCloseSessionRequest {
                session_id: id.to_string(),
            };
            let _ = route.client.close_session(owner, deadline, msg).await;
        }
        return Ok(app.view(session));
    }
    info!(session_id = %id, worker_id = %worker, "session ready");
    Ok(app.view(session))
}

fn list_sessions(
    app: &App,
    owner: &str,
    req: &ListSessionsRequest,
) -> Result<ListSessionsResponse, Error> {
    let limit = match usize::try_from(req.page_size).unwrap_or(MAX_PAGE_SIZE) {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    let after = if req.page_token.is_empty() {
        None
    } else {
        Some(sessions::decode_page_token(&req.page_token).ok_or_else(|| {
            Error::Status(heist_proto::errors::invalid_argument(
                "page_token",
                "page_token is not one this server issued: pass next_page_token unchanged, or \
                 leave it empty for the first page",
            ))
        })?)
    };
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

async fn close_session(
    app: &Arc<App>,
    owner: String,
    deadline: Instant,
    req: CloseSessionRequest,
) -> Result<Session, Error> {
    let id = SessionId::parse(req.session_id.as_str())?;
    let request_id = RequestId::parse_optional(&req.request_id)?;
    let fingerprint = Fingerprint::new(CLOSE)
        .field(id.as_str().as_bytes())
        .finish();
    let guard = match &request_id {
        None => None,
        Some(rid) => match app
            .idempotency
            .begin(idempotency::key(&owner, CLOSE, rid), fingerprint, rid)
            .await?
        {
            Begin::Replay(bytes) => return replay(app, &bytes),
            Begin::Run(guard) => Some(guard),
        },
    };
    let task_app = app.clone();
    let span = info_span!("close-session", session_id = %id);
    app.tasks
        .spawn(
            async move {
                let session = close_inner(&task_app, &owner, deadline, &id).await?;
                if let Some(guard) = guard {
                    guard.complete(fingerprint, session.encode_to_vec()).await?;
                }
                Ok(session)
            }
            .instrument(span),
        )
        .await?
}

/// CLOSING, then the worker removes the workspace, then CLOSED. A disconnected worker does not
/// block the close: it is told to evict the session when it re-registers.
async fn close_inner(
    app: &App,
    owner: &str,
    deadline: Instant,
    id: &SessionId,
) -> Result<Session, Error> {
    let session = owned_session(app, owner, id)?;
    if session.state == SessionState::Closed as i32 {
        return Ok(app.view(session));
    }
    app.sessions.update(id, |s| {
        s.state != SessionState::Closing as i32 && {
            s.state = SessionState::Closing as i32;
            true
        }
    })?;
    app.store.flush().await?;
    let worker = WorkerId::parse(session.worker_id.as_str())?;
    if let Ok(route) = app.registry.route(&worker) {
        let msg = WorkerCloseSessionRequest {
            session_id: id.to_string(),
        };
        match route.client.close_session(owner, deadline, msg).await {
            Ok(_) => {}
            Err(Error::WorkerUnavailable(_)) => {
                warn!(session_id = %id, worker_id = %worker, "worker unreachable; closing anyway");
            }
            Err(err) => return Err(err),
        }
    }
    let closed = app.sessions.update(id, |s| {
        s.state != SessionState::Closed as i32 && {
            s.state = SessionState::Closed as i32;
            true
        }
    })?;
    app.store.flush().await?;
    info!(session_id = %id, worker_id = %worker, "session closed");
    Ok(app.view(closed.unwrap_or(session)))
}
