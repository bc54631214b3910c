//! Checkpoints of a session: capture (create), restore into a session, fork into a new one,
//! delete. Restore and fork check every blob first, so a missing blob fails with BLOB_MISSING
//! before any workspace is touched.
//!
//! A capture names the session's head as the base a delta may be taken against
//! ([`crate::checkpoints::Checkpoints::delta_base`]); the worker answers with a delta when it
//! remembers that checkpoint's tree, else with the whole tree. Restores and forks tell the
//! worker which checkpoint they materialise, so the next capture there can be a delta too.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use heist_proto::{
    ids::{CheckpointId, SessionId, WorkerId},
    v1::{
        CaptureStats, CaptureWorkspaceRequest, Checkpoint, DeleteCheckpointResponse, EntryKind,
        Manifest, ManifestDelta, RestoreWorkspaceRequest, Session, SessionState,
    },
};
use tokio::time::Instant;
use tonic::Status;
use tracing::{info, warn};

use super::{replay_session, session::close_on_worker, session_worker};
use crate::{
    app::App,
    auth_layer::Principal,
    cas::hex,
    convert::{DeleteCheckpoint, Fork, NewCheckpoint, Restore},
    error::Error,
    idempotency::Fingerprint,
    runner::{self, Dedup},
};

const CREATE: &str = "CreateCheckpoint";
const RESTORE: &str = "RestoreCheckpoint";
const FORK: &str = "ForkSession";
const DELETE: &str = "DeleteCheckpoint";
/// Label put on checkpoints taken by auto-checkpoint.
pub const AUTO_LABEL: (&str, &str) = ("heist.auto", "true");

/// Captures the caller's READY session into a new checkpoint, once per request id.
pub async fn create_checkpoint(
    app: &Arc<App>,
    principal: &Principal,
    deadline: Instant,
    req: NewCheckpoint,
) -> Result<Checkpoint, Error> {
    let NewCheckpoint {
        session,
        labels,
        request_id,
    } = req;
    let fingerprint = Fingerprint::new(CREATE)
        .field(session.as_str().as_bytes())
        .map(&labels)
        .finish();
    let dedup = Dedup::new(&principal.id, CREATE, request_id, fingerprint);
    let (task_app, owner) = (app.clone(), principal.id.clone());
    runner::run_once(app, dedup, |_, bytes| runner::decode(bytes), async move {
        take_checkpoint(&task_app, &owner, deadline, &session, labels).await
    })
    .await
}

/// Restores a checkpoint into a session (by default the one it was taken from), once per
/// request id.
pub async fn restore(
    app: &Arc<App>,
    principal: &Principal,
    deadline: Instant,
    req: Restore,
) -> Result<Session, Error> {
    let Restore {
        checkpoint: id,
        target,
        request_id,
    } = req;
    let fingerprint = Fingerprint::new(RESTORE)
        .field(id.as_str().as_bytes())
        .field(target.as_ref().map_or("", SessionId::as_str).as_bytes())
        .finish();
    let dedup = Dedup::new(&principal.id, RESTORE, request_id, fingerprint);
    let (task_app, owner) = (app.clone(), principal.id.clone());
    runner::run_once(app, dedup, replay_session, async move {
        restore_inner(&task_app, &owner, deadline, &id, target).await
    })
    .await
}

/// Forks a checkpoint into a new session, once per request id.
pub async fn fork(
    app: &Arc<App>,
    principal: &Principal,
    deadline: Instant,
    req: Fork,
) -> Result<Session, Error> {
    let Fork {
        checkpoint: id,
        labels,
        request_id,
    } = req;
    let fingerprint = Fingerprint::new(FORK)
        .field(id.as_str().as_bytes())
        .map(&labels)
        .finish();
    let dedup = Dedup::new(&principal.id, FORK, request_id, fingerprint);
    let (task_app, owner) = (app.clone(), principal.id.clone());
    runner::run_once(app, dedup, replay_session, async move {
        fork_inner(&task_app, &owner, deadline, &id, labels).await
    })
    .await
}

/// The caller's checkpoint (NOT_FOUND for another principal's).
pub fn owned_checkpoint(app: &App, owner: &str, id: &CheckpointId) -> Result<Checkpoint, Error> {
    app.checkpoints
        .get(id)
        .filter(|c| c.owner == owner)
        .ok_or_else(|| Error::CheckpointNotFound(id.clone()))
}

/// The manifest of a checkpoint, with every blob it names checked present in the store.
pub(super) async fn manifest_with_blobs(app: &App, id: &CheckpointId) -> Result<Manifest, Error> {
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

/// Captures, verifies, commits (flushed), then applies the session's retention; in a
/// `checkpoint` span, recorded in the checkpoint metrics.
pub async fn take_checkpoint(
    app: &Arc<App>,
    owner: &str,
    deadline: Instant,
    session: &SessionId,
    labels: HashMap<String, String>,
) -> Result<Checkpoint, Error> {
    let started = std::time::Instant::now();
    let span = tracing::info_span!("checkpoint", session_id = %session);
    let taken = tracing::Instrument::instrument(
        capture_and_commit(app, owner, deadline, session, labels),
        span,
    )
    .await;
    let stats = taken.as_ref().ok().and_then(|c| c.stats.as_ref());
    app.metrics.checkpoint(stats, started.elapsed());
    taken
}

async fn capture_and_commit(
    app: &Arc<App>,
    owner: &str,
    deadline: Instant,
    session: &SessionId,
    labels: HashMap<String, String>,
) -> Result<Checkpoint, Error> {
    if app.shutdown.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    let worker = session_worker(app, owner, session, true)?;
    let route = app.registry.route(&worker)?;
    let id = CheckpointId::generate();
    // Calls acknowledged from here on may or may not be in the capture: failover counts them
    // as lost (an upper bound).
    let (session_mutations, allowed_tools) = app
        .sessions
        .with(session, |s| (s.acked_mutations, s.allowed_tools.clone()))
        .unwrap_or_default();
    let pin = app.checkpoints.pin();
    let mut base = app
        .checkpoints
        .delta_base(session, app.config.checkpoint_max_delta_chain);
    let committed = loop {
        let request = CaptureWorkspaceRequest {
            session_id: session.to_string(),
            checkpoint_id: id.to_string(),
            base_checkpoint_id: base.as_ref().map(ToString::to_string).unwrap_or_default(),
        };
        let (manifest, delta, stats) = capture(app, &route, owner, deadline, request).await?;
        let record = Checkpoint {
            id: id.to_string(),
            session_id: session.to_string(),
            owner: owner.to_owned(),
            parent_id: String::new(),
            labels: labels.clone(),
            created_at: Some(SystemTime::now().into()),
            file_count: stats.files,
            total_bytes: stats.bytes,
            agent_state: Vec::new(),
            worker_id: worker.to_string(),
            stats: Some(stats),
            manifest: Some(manifest),
            session_mutations,
            allowed_tools: allowed_tools.clone(),
            delta,
        };
        // Blobs durable before the manifest naming them commits: one sync covers every
        // PutBlobs stream of this capture (and any other upload since the last sync).
        let cas = app.checkpoints.cas().clone();
        tokio::task::spawn_blocking(move || cas.sync_written()).await??;
        match app.checkpoints.commit(session, record) {
            // The base was removed while the worker captured (the session was restored or its
            // head deleted meanwhile): once more, whole.
            Err(Error::DeltaBaseGone { base: gone }) if base.is_some() => {
                info!(checkpoint_id = %id, base = %gone, "delta base removed during the capture; capturing the whole tree");
                base = None;
            }
            committed => break committed?,
        }
    };
    let detail = format!(
        "checkpoint={id} session={session} worker={worker} files={} bytes={} parent={} auto={}",
        committed.file_count,
        committed.total_bytes,
        committed.parent_id,
        committed.labels.contains_key(AUTO_LABEL.0)
    );
    app.audit.append("checkpoint.created", owner, detail).await;
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

/// One CaptureWorkspace call: the manifest (whole, or the changes of `delta`) checked for shape
/// and with every blob it names present in the store.
async fn capture(
    app: &App,
    route: &crate::registry::Route,
    owner: &str,
    deadline: Instant,
    request: CaptureWorkspaceRequest,
) -> Result<(Manifest, Option<ManifestDelta>, CaptureStats), Error> {
    let asked = request.base_checkpoint_id.clone();
    let captured = route
        .client
        .capture_workspace(owner, deadline, request)
        .await?;
    let manifest = check_manifest(captured.manifest.unwrap_or_default())?;
    if let Some(delta) = &captured.delta
        && (delta.base_id.is_empty()
            || delta.base_id != asked
            || delta.removed_paths.iter().any(String::is_empty))
    {
        return Err(Error::Status(Status::internal(
            "the worker returned a delta against another checkpoint than the one asked; \
             nothing was committed",
        )));
    }
    let manifest = check_blobs(app, manifest, true).await?;
    Ok((manifest, captured.delta, captured.stats.unwrap_or_default()))
}

/// A manifest from a worker, checked for the shape the store relies on.
fn check_manifest(manifest: Manifest) -> Result<Manifest, Error> {
    let bad = |why: String| {
        Error::Status(Status::internal(format!(
            "the worker returned a malformed manifest ({why}); nothing was committed"
        )))
    };
    if !manifest.agent_state_hash.is_empty() && manifest.agent_state_hash.len() != 32 {
        return Err(bad("an agent state hash that is not 32 bytes".to_owned()));
    }
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

async fn restore_inner(
    app: &Arc<App>,
    owner: &str,
    deadline: Instant,
    id: &CheckpointId,
    target: Option<SessionId>,
) -> Result<Session, Error> {
    let checkpoint = owned_checkpoint(app, owner, id)?;
    let target = match target {
        Some(t) => t,
        None => SessionId::parse(checkpoint.session_id.as_str())?,
    };
    let worker = session_worker(app, owner, &target, true)?;
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
                checkpoint_id: id.to_string(),
            },
        )
        .await?;
    app.checkpoints.set_head(&target, id)?;
    app.checkpoints.add_holder(id, worker.as_str());
    let stats = done.stats.unwrap_or_default();
    let detail = format!(
        "checkpoint={id} session={target} worker={worker} files={} fetched_blobs={}",
        stats.files, stats.fetched_blobs
    );
    app.audit.append("checkpoint.restored", owner, detail).await;
    app.store.flush().await?;
    info!(checkpoint_id = %id, session_id = %target, worker_id = %worker, files = stats.files, fetched_blobs = stats.fetched_blobs, "checkpoint restored");
    let session = app
        .sessions
        .get(&target)
        .ok_or_else(|| Error::SessionNotFound(target.clone()))?;
    Ok(app.view(session))
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
    let checkpoint = owned_checkpoint(app, owner, id)?;
    let _pin = app.checkpoints.pin();
    let manifest = manifest_with_blobs(app, id).await?;
    let prefer = app.checkpoints.holders(id);
    let placement = super::Placement {
        labels,
        // The fork is as narrow as the session the checkpoint was taken from.
        allowed_tools: checkpoint.allowed_tools,
        prefer: prefer.clone(),
    };
    let session = super::place_and_open(app, owner, deadline, placement).await?;
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
                    checkpoint_id: id.to_string(),
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
        if let Err(close_err) = close_on_worker(app, owner, deadline, &worker, &new_id).await {
            warn!(session_id = %new_id, err = %close_err, "cannot remove the failed fork's workspace");
        }
        return Err(err);
    }
    app.checkpoints.set_head(&new_id, id)?;
    app.checkpoints.add_holder(id, worker.as_str());
    let detail = format!(
        "checkpoint={id} session={new_id} worker={worker} from_session={}",
        checkpoint.session_id
    );
    app.audit.append("checkpoint.forked", owner, detail).await;
    app.store.flush().await?;
    info!(checkpoint_id = %id, session_id = %new_id, worker_id = %worker, warm = prefer.contains(worker.as_str()), "session forked");
    let session = app
        .sessions
        .get(&new_id)
        .ok_or_else(|| Error::SessionNotFound(new_id.clone()))?;
    Ok(app.view(session))
}

/// Deletes the caller's checkpoint (its children are re-parented), once per request id.
pub async fn delete_checkpoint(
    app: &Arc<App>,
    principal: &Principal,
    req: DeleteCheckpoint,
) -> Result<DeleteCheckpointResponse, Error> {
    let DeleteCheckpoint {
        checkpoint: id,
        request_id,
    } = req;
    let fingerprint = Fingerprint::new(DELETE)
        .field(id.as_str().as_bytes())
        .finish();
    let dedup = Dedup::new(&principal.id, DELETE, request_id, fingerprint);
    let (task_app, owner) = (app.clone(), principal.id.clone());
    runner::run_once(app, dedup, |_, bytes| runner::decode(bytes), async move {
        let table = task_app.checkpoints.clone();
        let deleted = id.clone();
        let freed = tokio::task::spawn_blocking(move || table.delete(&owner, &deleted)).await??;
        task_app.store.flush().await?;
        info!(checkpoint_id = %id, freed_blobs = freed.blobs, freed_bytes = freed.bytes, "checkpoint deleted");
        Ok(DeleteCheckpointResponse {
            freed_blobs: freed.blobs,
            freed_bytes: freed.bytes,
        })
    })
    .await
}
