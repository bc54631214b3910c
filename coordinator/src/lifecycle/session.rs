//! Session create (place + open on the worker) and close.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::SystemTime,
};

use heist_proto::{
    ids::{SessionId, WorkerId},
    v1::{OpenSessionRequest, Session, SessionState, WorkerCloseSessionRequest},
};
use tokio::time::Instant;
use tracing::{Instrument as _, info, info_span, warn};

use super::replay_session;
use crate::{
    app::App,
    auth_layer::Principal,
    calls::{self, policy},
    catalogue,
    convert::{CloseSession, NewSession},
    error::Error,
    idempotency::Fingerprint,
    placement::{self, Candidate},
    runner::{self, Dedup},
};

const CREATE: &str = "CreateSession";
const CLOSE: &str = "CloseSession";

/// The caller's session, or NOT_FOUND (also for another principal's session).
pub fn owned_session(app: &App, owner: &str, id: &SessionId) -> Result<Session, Error> {
    app.sessions
        .get(id)
        .filter(|s| s.owner == owner)
        .ok_or_else(|| Error::SessionNotFound(id.clone()))
}

/// Places a new session and opens it on its worker, once per request id. The session id is
/// reserved in the call's intent, so a retry after a crash (of this process or of the worker
/// call) finds and finishes the same session instead of leaving an orphan behind.
pub async fn create_session(
    app: &Arc<App>,
    principal: &Principal,
    deadline: Instant,
    req: NewSession,
) -> Result<Session, Error> {
    let NewSession {
        labels,
        request_id,
        allowed_tools,
    } = req;
    let allowed_tools = check_allowed_tools(app, &allowed_tools)?;
    let mut fingerprint = Fingerprint::new(CREATE);
    fingerprint.map(&labels);
    if !allowed_tools.is_empty() {
        // Only when given, so the fingerprints of creates without a policy stay what they were.
        fingerprint.field(allowed_tools.join("\n").as_bytes());
    }
    let fingerprint = fingerprint.finish();
    let reserved = SessionId::generate();
    let dedup = Dedup::new(&principal.id, CREATE, request_id, fingerprint)
        .map(|d| d.with_intent(reserved.as_str().as_bytes().to_vec()));
    let (task_app, owner) = (app.clone(), principal.id.clone());
    runner::run_once_with(app, dedup, replay_session, move |intent| {
        let id = intent
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|raw| SessionId::parse(raw).ok())
            .unwrap_or(reserved);
        let span = info_span!("create-session", principal = %owner, session_id = %id);
        async move {
            match resume(&task_app, &owner, deadline, &id).await? {
                Some(session) => Ok(session),
                None => {
                    let placement = Placement {
                        labels,
                        allowed_tools,
                        prefer: HashSet::new(),
                    };
                    place_and_open_as(&task_app, &owner, deadline, id, placement).await
                }
            }
        }
        .instrument(span)
    })
    .await
}

/// The checked tool policy of a new session: its entries must name tools that exist (the
/// built-in ones and those connected workers offer).
fn check_allowed_tools(app: &App, entries: &[String]) -> Result<Vec<String>, Error> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let offered = calls::all_tools(app);
    let mut known: Vec<&str> = catalogue::builtin_names().collect();
    known.extend(offered.iter().map(|t| t.name.as_str()));
    policy::check(entries, known)
}

/// Finishes a session an earlier CreateSession with the same request id reserved, if it
/// exists: one that is ready (or closed since) is the answer; one still creating or failed is
/// opened on its worker again (OpenSession is idempotent there).
async fn resume(
    app: &App,
    owner: &str,
    deadline: Instant,
    id: &SessionId,
) -> Result<Option<Session>, Error> {
    let Some(existing) = app.sessions.get(id) else {
        return Ok(None);
    };
    if existing.owner != owner {
        return Err(Error::SessionNotFound(id.clone()));
    }
    info!(session_id = %id, "resuming a create whose outcome was not recorded");
    match app.sessions.resume_create(id)? {
        Some(session) => open_placed(app, owner, deadline, session).await.map(Some),
        None => Ok(Some(app.view(existing))),
    }
}

/// Closes the caller's session, once per request id.
pub async fn close_session(
    app: &Arc<App>,
    principal: &Principal,
    deadline: Instant,
    req: CloseSession,
) -> Result<Session, Error> {
    let CloseSession {
        session: id,
        request_id,
    } = req;
    let fingerprint = Fingerprint::new(CLOSE)
        .field(id.as_str().as_bytes())
        .finish();
    let dedup = Dedup::new(&principal.id, CLOSE, request_id, fingerprint);
    let (task_app, owner) = (app.clone(), principal.id.clone());
    let span = info_span!("close-session", session_id = %id);
    runner::run_once(
        app,
        dedup,
        replay_session,
        async move { close(&task_app, &owner, deadline, &id).await }.instrument(span),
    )
    .await
}

/// What a new session is placed by and starts with.
pub struct Placement {
    /// The label selector.
    pub labels: HashMap<String, String>,
    /// The session's tool policy (already checked).
    pub allowed_tools: Vec<String>,
    /// Workers that win when one of them is eligible (e.g. holding a checkpoint's blobs).
    pub prefer: HashSet<String>,
}

/// Places a session, stores it CREATING, opens it on the worker, stores READY (or FAILED).
/// Workers in `prefer` (e.g. holding a checkpoint's blobs, for a fork) win when one of them is
/// eligible; otherwise the normal rules pick among all.
pub async fn place_and_open(
    app: &App,
    owner: &str,
    deadline: Instant,
    placement: Placement,
) -> Result<Session, Error> {
    place_and_open_as(app, owner, deadline, SessionId::generate(), placement).await
}

/// [`place_and_open`] under a given (reserved) session id.
async fn place_and_open_as(
    app: &App,
    owner: &str,
    deadline: Instant,
    id: SessionId,
    placement: Placement,
) -> Result<Session, Error> {
    if app.shutdown.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    let Placement {
        labels,
        allowed_tools,
        prefer,
    } = placement;
    let session = app.sessions.create(|slots| {
        let worker = choose_worker(app, slots, &labels, &prefer)?;
        let now = SystemTime::now();
        Ok(Session {
            id: id.to_string(),
            owner: owner.to_owned(),
            worker_id: worker.to_string(),
            state: SessionState::Creating as i32,
            labels: labels.clone(),
            allowed_tools: allowed_tools.clone(),
            created_at: Some(now.into()),
            updated_at: Some(now.into()),
            ..Session::default()
        })
    })?;
    app.store.flush().await?;
    open_placed(app, owner, deadline, session).await
}

/// Picks a worker for a session with `labels` given the slot counts (call under the session
/// table's lock): workers in `prefer` win when one of them is eligible.
pub(super) fn choose_worker(
    app: &App,
    slots: &HashMap<String, u32>,
    labels: &HashMap<String, String>,
    prefer: &HashSet<String>,
) -> Result<WorkerId, Error> {
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
    let worker = match placement::place(&preferred, labels) {
        Ok(worker) => worker,
        Err(_) => placement::place(&candidates, labels)?,
    };
    Ok(worker.clone())
}

/// Opens a CREATING session on its worker and stores READY (or FAILED).
async fn open_placed(
    app: &App,
    owner: &str,
    deadline: Instant,
    session: Session,
) -> Result<Session, Error> {
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
        let _ = close_on_worker(app, owner, deadline, &worker, &id).await;
        return Ok(app.view(session));
    }
    info!(session_id = %id, worker_id = %worker, "session ready");
    Ok(app.view(session))
}

/// Asks `worker` to remove the session's workspace. A disconnected worker is not an error:
/// it is told to evict the session when it re-registers.
pub(super) async fn close_on_worker(
    app: &App,
    owner: &str,
    deadline: Instant,
    worker: &WorkerId,
    id: &SessionId,
) -> Result<(), Error> {
    let Ok(route) = app.registry.route(worker) else {
        return Ok(());
    };
    let msg = WorkerCloseSessionRequest {
        session_id: id.to_string(),
    };
    route
        .client
        .close_session(owner, deadline, msg)
        .await
        .map(|_| ())
}

/// CLOSING, then the worker removes the workspace, then CLOSED. A disconnected worker does not
/// block the close: it is told to evict the session when it re-registers.
async fn close(
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
    match close_on_worker(app, owner, deadline, &worker, id).await {
        Ok(()) => {}
        Err(Error::WorkerUnavailable(_)) => {
            warn!(session_id = %id, worker_id = %worker, "worker unreachable; closing anyway");
        }
        Err(err) => return Err(err),
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
