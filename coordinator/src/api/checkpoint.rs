//! heist.v1.CheckpointService: create, list, get, restore, fork, delete.
//!
//! Create: the session must be READY and the caller's. The session's worker captures the
//! workspace (uploading only blobs the store lacks); the coordinator then checks that every
//! blob the manifest names is in the store, commits the record (flushed) and applies retention.
//! Restore and fork check every blob first, so a missing blob fails with BLOB_MISSING before any
//! workspace is touched. Mutating calls with a request id go through [`crate::idempotency`] and
//! run in tracked tasks, so a caller that gives up never leaves half a checkpoint behind.

use std::{collections::HashMap, future::Future, sync::Arc, time::SystemTime};

use heist_proto::{
    errors,
    ids::{CheckpointId, RequestId, SessionId, WorkerId},
    v1::{
        CallToolResponse, CaptureWorkspaceRequest, Checkpoint, CreateCheckpointRequest,
        DeleteCheckpointRequest, DeleteCheckpointResponse, EntryKind, ForkSessionRequest,
        GetCheckpointRequest, ListCheckpointsRequest, ListCheckpointsResponse, Manifest,
        RestoreCheckpointRequest, RestoreWorkspaceRequest, Session, SessionState,
        WorkerCloseSessionRequest, checkpoint_service_server::CheckpointService,
    },
};
use prost::Message;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{Instrument as _, Span, info, info_span, instrument, warn};

use crate::{
    app::App,
    auth_layer::principal,
    cas::hex,
    checkpoints,
    error::Error,
    idempotency::{self, Begin, Fingerprint},
    worker_client::call_deadline,
};

const CREATE: &str = "CreateCheckpoint";
const RESTORE: &str = "RestoreCheckpoint";
const FORK: &str = "ForkSession";
const DELETE: &str = "DeleteCheckpoint";
/// Page size when the request says 0.
const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page.
const MAX_PAGE_SIZE: usize = 1000;
/// Label put on checkpoints taken by auto-checkpoint.
pub const AUTO_LABEL: (&str, &str) = ("heist.auto", "true");

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
        let owner = principal(&request)?.id.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        create(&self.app, owner, deadline, request.into_inner())
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
        let owner = principal(&request)?.id.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        restore(&self.app, owner, deadline, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(checkpoint_id = %request.get_ref().checkpoint_id))]
    async fn fork_session(
        &self,
        request: Request<ForkSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        let owner = principal(&request)?.id.clone();
        let deadline = call_deadline(request.metadata(), self.app.config.worker_call_timeout);
        fork(&self.app, owner, deadline, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    #[instrument(skip_all, fields(checkpoint_id = %request.get_ref().checkpoint_id))]
    async fn delete_checkpoint(
        &self,
        request: Request<DeleteCheckpointRequest>,
    ) -> Result<Response<DeleteCheckpointResponse>, Status> {
        let owner = principal(&request)?.id.clone();
        delete(&self.app, owner, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// Runs `body` in a tracked task, deduplicated by `request_id` when one is given: a retry
/// replays the stored response through `replay`.
async fn once<T, Fut>(
    app: &Arc<App>,
    owner: &str,
    method: &'static str,
    request_id: Option<RequestId>,
    fingerprint: [u8; 32],
    replay: impl FnOnce(&App, &[u8]) -> Result<T, Error>,
    body: Fut,
) -> Result<T, Error>
where
    T: Message + Send + 'static,
    Fut: Future<Output = Result<T, Error>> + Send + 'static,
{
    let guard = match &request_id {
        None => None,
        Some(rid) => match app
            .idempotency
            .begin(idempotency::key(owner, method, rid), fingerprint, rid)
            .await?
        {
            Begin::Replay(bytes) => return replay(app, &bytes),
            Begin::Run(guard) => Some(guard),
        },
    };
    app.tasks
        .spawn(
            async move {
                let out = body.await?;
                if let Some(guard) = guard {
                    guard.complete(fingerprint, out.encode_to_vec()).await?;
                }
                Ok(out)
            }
            .instrument(Span::current()),
        )
        .await?
}

fn decode<T: Message + Default>(bytes: &[u8]) -> Result<T, Error> {
    T::decode(bytes).map_err(|source| Error::Corrupt {
        what: "idempotency",
        source,
    })
}

/// A stored session response replayed as the session is now.
fn replay_session(app: &App, bytes: &[u8]) -> Result<Session, Error> {
    let stored: Session = decode(bytes)?;
    let current = SessionId::parse(stored.id.as_str())
        .ok()
        .and_then(|id| app.sessions.get(&id))
        .unwrap_or(stored);
    Ok(app.view(current))
}

/// The caller's READY session and its worker.
fn ready_session(app: &App, owner: &str, id: &SessionId) -> Result<(Session, WorkerId), Error> {
    let session = app
        .sessions
        .get(id)
        .filter(|s| s.owner == owner)
        .ok_or_else(|| Error::SessionNotFound(id.clone()))?;
    if session.state != SessionState::Ready as i32 {
        let state = SessionState::try_from(session.state).map_or("unknown", |st| match st {
            SessionState::Creating => "creating",
            SessionState::Closing => "closing",
            SessionState::Closed => "closed",
            SessionState::Failed => "failed",
            SessionState::Ready | SessionState::Unspecified => "unknown",
        });
        return Err(Error::SessionNotReady {
            id: id.clone(),
            state,
        });
    }
    let worker = WorkerId::parse(session.worker_id.as_str())?;
    Ok((session, worker))
}

/// The caller's checkpoint (NOT_FOUND for another principal's).
fn owned(app: &App, owner: &str, id: &CheckpointId) -> Result<Checkpoint, Error> {
    app.checkpoints
        .get(id)
        .filter(|c| c.owner == owner)
        .ok_or_else(|| Error::CheckpointNotFound(id.clone()))
}

/// The manifest of a checkpoint, with every blob it names checked present in the store.
async fn manifest_with_blobs(app: &App, id: &CheckpointId) -> Result<Manifest, Error> {
    let manifest = app
        .checkpoints
        .get_full(id)?
        .ok_or_else(|| Error::CheckpointNotFound(id.clone()))?
        .manifest
        .unwrap_or_default();
    check_blobs(app, manifest, false).await
}

/// Fails with BLOB_MISSING unless every blob `manifest` names is in the store (see
/// [`checkpoints::Checkpoints::missing_blobs`] for `trust_refs`).
async fn check_blobs(app: &App, manifest: Manifest, trust_refs: bool) -> Result<Manifest, Error> {
    let table = app.checkpoints.clone();
    let (manifest, missing) = tokio::task::spawn_blocking(move || {
        let missing = table.missing_blobs(&manifest, trust_refs);
        (manifest, missing)
    })
    .await?;
    match missing.first() {
        None => Ok(manifest),
        Some(first) => Err(Error::BlobMissing {
            hash: hex(first),
            missing: missing.len(),
        }),
    }
}

async fn create(
    app: &Arc<App>,
    owner: String,
    deadline: Instant,
    req: CreateCheckpointRequest,
) -> Result<Checkpoint, Error> {
    super::validate_labels(&req.labels)?;
    let session = SessionId::parse(req.session_id.as_str())?;
    let request_id = RequestId::parse_optional(&req.request_id)?;
    let fingerprint = Fingerprint::new(CREATE)
        .field(session.as_str().as_bytes())
        .map(&req.labels)
        .finish();
    let task_app = app.clone();
    let task_owner = owner.clone();
    once(
        app,
        &owner,
        CREATE,
        request_id,
        fingerprint,
        |_, bytes| decode(bytes),
        async move { create_inner(&task_app, &task_owner, deadline, &session, req.labels).await },
    )
    .await
}

/// Captures, verifies, commits (flushed), then applies the session's retention.
async fn create_inner(
    app: &Arc<App>,
    owner: &str,
    deadline: Instant,
    session: &SessionId,
    labels: HashMap<String, String>,
) -> Result<Checkpoint, Error> {
    if app.shutdown.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    let (_, worker) = ready_session(app, owner, session)?;
    let route = app.registry.route(&worker)?;
    let id = CheckpointId::generate();
    let pin = app.checkpoints.pin();
    let captured = route
        .client
        .capture_workspace(
            owner,
            deadline,
            CaptureWorkspaceRequest {
                session_id: session.to_string(),
                checkpoint_id: id.to_string(),
            },
        )
        .await?;
    let manifest = check_manifest(captured.manifest.unwrap_or_default())?;
    let manifest = check_blobs(app, manifest, true).await?;
    let stats = captured.stats.unwrap_or_default();
    let record = Checkpoint {
        id: id.to_string(),
        session_id: session.to_string(),
        owner: owner.to_owned(),
        parent_id: String::new(),
        labels,
        created_at: Some(SystemTime::now().into()),
        file_count: stats.files,
        total_bytes: stats.bytes,
        agent_state: Vec::new(),
        worker_id: worker.to_string(),
        stats: Some(stats),
        manifest: Some(manifest),
    };
    let committed = app.checkpoints.commit(session, record)?;
    app.store.flush().await?;
    drop(pin);
    info!(checkpoint_id = %id, session_id = %session, worker_id = %worker, files = committed.file_count, bytes = committed.total_bytes, parent_id = %committed.parent_id, "checkpoint committed");

    let (table, limits, retained) = (app.checkpoints.clone(), app.retention(), session.clone());
    match tokio::task::spawn_blocking(move || table.retain(&retained, limits, SystemTime::now()))
        .await?
    {
        Ok(freed) if freed.checkpoints > 0 => app.store.flush().await?,
        Ok(_) => {}
        Err(err) => warn!(%err, session_id = %session, "checkpoint retention failed"),
    }
    Ok(committed)
}

/// A manifest from a worker, checked for the shape the store relies on.
fn check_manifest(manifest: Manifest) -> Result<Manifest, Error> {
    let bad = |why: String| {
        Error::Status(Status::internal(format!(
            "the worker returned a malformed manifest ({why}); nothing was committed"
        )))
    };
    for entry in &manifest.entries {
        if entry.path.is_empty() {
            return Err(bad("an empty path".to_owned()));
        }
        if entry.kind == EntryKind::File as i32 && entry.hash.len() != 32 {
            return Err(bad(format!("{:?} has no 32-byte hash", entry.path)));
        }
    }
    Ok(manifest)
}

/// With HEIST_AUTO_CHECKPOINT, takes a checkpoint after a successful (not replayed, not
/// `is_error`) call of a tool that is not read-only. Failures are logged, not returned: the
/// tool call itself succeeded.
pub async fn after_tool_call(
    app: &Arc<App>,
    owner: &str,
    session: &str,
    tool: &str,
    resp: &CallToolResponse,
    deadline: Instant,
) {
    if !app.config.auto_checkpoint || resp.is_error || resp.replayed {
        return;
    }
    let mutating = WorkerId::parse(resp.worker_id.as_str())
        .ok()
        .and_then(|w| app.registry.catalogue(&w))
        .and_then(|c| c.get(tool).map(|t| !t.read_only))
        .unwrap_or(false);
    if let (true, Ok(session)) = (mutating, SessionId::parse(session)) {
        auto_checkpoint(app, owner, &session, deadline).await;
    }
}

/// Takes a checkpoint labelled [`AUTO_LABEL`], logging a failure.
async fn auto_checkpoint(app: &Arc<App>, owner: &str, session: &SessionId, deadline: Instant) {
    let labels = HashMap::from([(AUTO_LABEL.0.to_owned(), AUTO_LABEL.1.to_owned())]);
    let (task_app, task_owner, task_session) = (app.clone(), owner.to_owned(), session.clone());
    let span = info_span!("auto-checkpoint", session_id = %session);
    let done =
        app.tasks
            .spawn(
                async move {
                    create_inner(&task_app, &task_owner, deadline, &task_session, labels).await
                }
                .instrument(span),
            )
            .await;
    match done {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => warn!(%err, session_id = %session, "auto-checkpoint failed"),
        Err(err) => warn!(%err, session_id = %session, "auto-checkpoint task failed"),
    }
}

fn list(
    app: &App,
    owner: &str,
    req: &ListCheckpointsRequest,
) -> Result<ListCheckpointsResponse, Error> {
    let session = if req.session_id.is_empty() {
        None
    } else {
        Some(SessionId::parse(req.session_id.as_str())?)
    };
    let limit = match usize::try_from(req.page_size).unwrap_or(MAX_PAGE_SIZE) {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    let after = if req.page_token.is_empty() {
        None
    } else {
        Some(
            checkpoints::decode_page_token(&req.page_token).ok_or_else(|| {
                Error::Status(errors::invalid_argument(
                    "page_token",
                    "page_token is not one this server issued: pass next_page_token unchanged, \
                     or leave it empty for the first page",
                ))
            })?,
        )
    };
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
    let summary = owned(app, owner, &id)?;
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

async fn restore(
    app: &Arc<App>,
    owner: String,
    deadline: Instant,
    req: RestoreCheckpointRequest,
) -> Result<Session, Error> {
    let id = CheckpointId::parse(req.checkpoint_id.as_str())?;
    let target = if req.session_id.is_empty() {
        None
    } else {
        Some(SessionId::parse(req.session_id.as_str())?)
    };
    let request_id = RequestId::parse_optional(&req.request_id)?;
    let fingerprint = Fingerprint::new(RESTORE)
        .field(id.as_str().as_bytes())
        .field(req.session_id.as_bytes())
        .finish();
    let (task_app, task_owner) = (app.clone(), owner.clone());
    once(
        app,
        &owner,
        RESTORE,
        request_id,
        fingerprint,
        replay_session,
        async move { restore_inner(&task_app, &task_owner, deadline, &id, target).await },
    )
    .await
}

async fn restore_inner(
    app: &Arc<App>,
    owner: &str,
    deadline: Instant,
    id: &CheckpointId,
    target: Option<SessionId>,
) -> Result<Session, Error> {
    let checkpoint = owned(app, owner, id)?;
    let target = match target {
        Some(t) => t,
        None => SessionId::parse(checkpoint.session_id.as_str())?,
    };
    let (_, worker) = ready_session(app, owner, &target)?;
    let route = app.registry.route(&worker)?;
    let _pin = app.checkpoints.pin();
    let manifest = manifest_with_blobs(app, id).await?;
    let done = route
        .client
        .restore_workspace(
            owner,
            deadline,
            RestoreWorkspaceRequest {
                session_id: target.to_string(),
                manifest: Some(manifest),
            },
        )
        .await?;
    app.checkpoints.set_head(&target, id)?;
    app.checkpoints.add_holder(id, worker.as_str());
    app.store.flush().await?;
    let stats = done.stats.unwrap_or_default();
    info!(checkpoint_id = %id, session_id = %target, worker_id = %worker, files = stats.files, fetched_blobs = stats.fetched_blobs, "checkpoint restored");
    let session = app
        .sessions
        .get(&target)
        .ok_or_else(|| Error::SessionNotFound(target.clone()))?;
    Ok(app.view(session))
}

async fn fork(
    app: &Arc<App>,
    owner: String,
    deadline: Instant,
    req: ForkSessionRequest,
) -> Result<Session, Error> {
    super::validate_labels(&req.labels)?;
    let id = CheckpointId::parse(req.checkpoint_id.as_str())?;
    let request_id = RequestId::parse_optional(&req.request_id)?;
    let fingerprint = Fingerprint::new(FORK)
        .field(id.as_str().as_bytes())
        .map(&req.labels)
        .finish();
    let (task_app, task_owner) = (app.clone(), owner.clone());
    once(
        app,
        &owner,
        FORK,
        request_id,
        fingerprint,
        replay_session,
        async move { fork_inner(&task_app, &task_owner, deadline, &id, req.labels).await },
    )
    .await
}

/// Places and opens a new session (preferring a worker holding the blobs), then restores the
/// checkpoint into it. If the restore fails the new session is marked FAILED and closed.
async fn fork_inner(
    app: &Arc<App>,
    owner: &str,
    deadline: Instant,
    id: &CheckpointId,
    labels: HashMap<String, String>,
) -> Result<Session, Error> {
    owned(app, owner, id)?;
    let _pin = app.checkpoints.pin();
    let manifest = manifest_with_blobs(app, id).await?;
    let prefer = app.checkpoints.holders(id);
    let session = super::session::place_and_open(app, owner, deadline, labels, &prefer).await?;
    let new_id = SessionId::parse(session.id.as_str())?;
    if session.state != SessionState::Ready as i32 {
        return Ok(session); // closed while it was being created
    }
    let worker = WorkerId::parse(session.worker_id.as_str())?;
    let restored = match app.registry.route(&worker) {
        Ok(route) => route
            .client
            .restore_workspace(
                owner,
                deadline,
                RestoreWorkspaceRequest {
                    session_id: new_id.to_string(),
                    manifest: Some(manifest),
                },
            )
            .await
            .map(|_| ()),
        Err(err) => Err(err),
    };
    if let Err(err) = restored {
        warn!(checkpoint_id = %id, session_id = %new_id, worker_id = %worker, %err, "fork failed; closing the new session");
        let reason = format!("fork of checkpoint {id} failed: {err}");
        app.sessions.update(&new_id, |s| {
            s.state = SessionState::Failed as i32;
            s.failure_reason = reason;
            true
        })?;
        app.store.flush().await?;
        if let Ok(route) = app.registry.route(&worker) {
            let msg = WorkerCloseSessionRequest {
                session_id: new_id.to_string(),
            };
            if let Err(close_err) = route.client.close_session(owner, deadline, msg).await {
                warn!(session_id = %new_id, err = %close_err, "cannot remove the failed fork's workspace");
            }
        }
        return Err(err);
    }
    app.checkpoints.set_head(&new_id, id)?;
    app.checkpoints.add_holder(id, worker.as_str());
    app.store.flush().await?;
    info!(checkpoint_id = %id, session_id = %new_id, worker_id = %worker, warm = prefer.contains(worker.as_str()), "session forked");
    let session = app
        .sessions
        .get(&new_id)
        .ok_or_else(|| Error::SessionNotFound(new_id.clone()))?;
    Ok(app.view(session))
}

async fn delete(
    app: &Arc<App>,
    owner: String,
    req: DeleteCheckpointRequest,
) -> Result<DeleteCheckpointResponse, Error> {
    let id = CheckpointId::parse(req.checkpoint_id.as_str())?;
    let request_id = RequestId::parse_optional(&req.request_id)?;
    let fingerprint = Fingerprint::new(DELETE)
        .field(id.as_str().as_bytes())
        .finish();
    let task_app = app.clone();
    let task_owner = owner.clone();
    once(
        app,
        &owner,
        DELETE,
        request_id,
        fingerprint,
        |_, bytes| decode(bytes),
        async move {
            let table = task_app.checkpoints.clone();
            let deleted = id.clone();
            let freed =
                tokio::task::spawn_blocking(move || table.delete(&task_owner, &deleted)).await??;
            task_app.store.flush().await?;
            info!(checkpoint_id = %id, freed_blobs = freed.blobs, freed_bytes = freed.bytes, "checkpoint deleted");
            Ok(DeleteCheckpointResponse {
                freed_blobs: freed.blobs,
                freed_bytes: freed.bytes,
            })
        },
    )
    .await
}
