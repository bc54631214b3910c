//! Failover: the sessions of a worker that is LOST for good (its lease expired) move to healthy
//! workers from their latest checkpoint, by policy.
//!
//! For each session open on the lost worker: policy `manual` (label `heist.failover`, else
//! HEIST_FAILOVER) leaves it alone; with no checkpoint it becomes FAILED with a reason that says
//! so; otherwise it is placed on a healthy worker (preferring one that holds the checkpoint's
//! blobs) and is RECOVERING there while the worker opens it and restores the checkpoint, then
//! READY with `recovered_from`: the checkpoint, when it was taken, and how many acknowledged
//! mutating calls came after it (their effects were only on the lost worker). If the lost
//! worker comes back, reconciliation tells it to evict the sessions that moved.

use std::{collections::HashSet, sync::Arc, time::SystemTime};

use futures::StreamExt as _;
use heist_proto::{
    ids::{CheckpointId, SessionId, WorkerId},
    v1::{OpenSessionRequest, RecoveredFrom, RestoreWorkspaceRequest, Session, SessionState},
};
use tokio::time::Instant;
use tracing::{Instrument as _, info, info_span, warn};

use super::{
    checkpoint::manifest_with_blobs,
    session::{choose_worker, close_on_worker},
};
use crate::{app::App, config::Failover, error::Error};

/// The label that sets a session's failover policy.
pub const FAILOVER_LABEL: &str = "heist.failover";

/// What became of one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// READY on another worker.
    Recovered,
    /// FAILED: no checkpoint, or the failover itself failed.
    Failed,
    /// Left alone (policy manual, or no longer open there).
    Skipped,
}

/// How a lost worker's failover went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Report {
    /// Sessions READY elsewhere.
    pub recovered: usize,
    /// Sessions FAILED.
    pub failed: usize,
    /// Sessions left alone.
    pub skipped: usize,
}

/// Fails over every open session of `lost` (see the module docs), a few at a time.
pub async fn worker_lost(app: &Arc<App>, lost: &WorkerId) -> Report {
    let sessions = app.sessions.open_on(lost);
    let detail = format!("open_sessions={}", sessions.len());
    app.audit.record("worker.lost", lost.as_str(), &detail);
    if sessions.is_empty() {
        return Report::default();
    }
    let started = Instant::now();
    let total = sessions.len();
    info!(worker_id = %lost, sessions = total, "worker lost: failing over its sessions");
    let outcomes: Vec<Outcome> = futures::stream::iter(sessions)
        .map(|session| {
            let span = info_span!("failover", session_id = %session.id, worker_id = %lost);
            async move {
                let id = session.id.clone();
                fail_over(app, lost, session).await.unwrap_or_else(|err| {
                    warn!(session_id = %id, %err, "failover failed");
                    Outcome::Failed
                })
            }
            .instrument(span)
        })
        .buffer_unordered(app.config.failover_parallelism)
        .collect()
        .await;
    let mut report = Report::default();
    for outcome in outcomes {
        match outcome {
            Outcome::Recovered => report.recovered += 1,
            Outcome::Failed => report.failed += 1,
            Outcome::Skipped => report.skipped += 1,
        }
    }
    app.audit.settle().await;
    if let Err(err) = app.store.flush().await {
        warn!(%err, "cannot flush after failover");
    }
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    info!(
        worker_id = %lost,
        recovered = report.recovered,
        failed = report.failed,
        skipped = report.skipped,
        elapsed_ms,
        "failover finished"
    );
    report
}

/// The failover policy of `session`.
fn policy(app: &App, session: &Session) -> Failover {
    session
        .labels
        .get(FAILOVER_LABEL)
        .and_then(|v| Failover::parse(v))
        .unwrap_or(app.config.failover)
}

async fn fail_over(app: &Arc<App>, lost: &WorkerId, session: Session) -> Result<Outcome, Error> {
    if policy(app, &session) == Failover::Manual {
        info!(session_id = %session.id, "failover is manual for this session: left as it is");
        return Ok(Outcome::Skipped);
    }
    let id = SessionId::parse(session.id.as_str())?;
    let checkpoint = app
        .checkpoints
        .head(&id)
        .and_then(|c| app.checkpoints.get(&c));
    let Some(checkpoint) = checkpoint else {
        let reason = format!(
            "worker {lost} was lost and session {id} had no checkpoint to recover from: its \
             workspace is gone (take checkpoints, or set HEIST_CHECKPOINT_EVERY, to make \
             failover possible)"
        );
        fail(app, &id, lost, reason)?;
        return Ok(Outcome::Failed);
    };
    let checkpoint_id = CheckpointId::parse(checkpoint.id.as_str())?;
    let _pin = app.checkpoints.pin();
    let manifest = match manifest_with_blobs(app, &checkpoint_id).await {
        Ok(manifest) => manifest,
        Err(err) => {
            let reason = format!(
                "worker {lost} was lost and checkpoint {checkpoint_id} of session {id} cannot \
                 be restored: {err}"
            );
            fail(app, &id, lost, reason)?;
            return Ok(Outcome::Failed);
        }
    };
    let mut prefer: HashSet<String> = app.checkpoints.holders(&checkpoint_id);
    prefer.remove(lost.as_str());
    let placed = app.sessions.relocate(&id, lost, |slots| {
        choose_worker(app, slots, &session.labels, &prefer)
    });
    let placed = match placed {
        Ok(Some(placed)) => placed,
        Ok(None) => return Ok(Outcome::Skipped),
        Err(err) => {
            let reason =
                format!("worker {lost} was lost and no worker can take session {id}: {err}");
            fail(app, &id, lost, reason)?;
            return Ok(Outcome::Failed);
        }
    };
    app.store.flush().await?;
    let worker = WorkerId::parse(placed.worker_id.as_str())?;
    let owner = placed.owner.clone();
    let deadline = Instant::now() + app.config.worker_call_timeout;
    let restored = async {
        let route = app.registry.route(&worker)?;
        route
            .client
            .open_session(
                &owner,
                deadline,
                OpenSessionRequest {
                    session_id: id.to_string(),
                    owner: owner.clone(),
                },
            )
            .await?;
        route
            .client
            .restore_workspace(
                &owner,
                deadline,
                RestoreWorkspaceRequest {
                    session_id: id.to_string(),
                    manifest: Some(manifest),
                    checkpoint_id: checkpoint_id.to_string(),
                },
            )
            .await
    }
    .await;
    if let Err(err) = restored {
        app.sessions.finish_create(&id);
        let reason = format!(
            "worker {lost} was lost and restoring checkpoint {checkpoint_id} on worker {worker} \
             failed: {err}"
        );
        fail(app, &id, lost, reason)?;
        if let Err(close_err) = close_on_worker(app, &owner, deadline, &worker, &id).await {
            warn!(session_id = %id, err = %close_err, "cannot remove the failed recovery's workspace");
        }
        return Ok(Outcome::Failed);
    }
    app.checkpoints.set_head(&id, &checkpoint_id)?;
    app.checkpoints.add_holder(&checkpoint_id, worker.as_str());
    let lost_calls = placed
        .acked_mutations
        .saturating_sub(checkpoint.session_mutations);
    let recovered_from = RecoveredFrom {
        checkpoint_id: checkpoint_id.to_string(),
        checkpoint_created_at: checkpoint.created_at,
        recovered_at: Some(SystemTime::now().into()),
        lost_worker_id: lost.to_string(),
        lost_calls,
    };
    app.sessions.update(&id, |s| {
        s.state == SessionState::Recovering as i32 && {
            s.state = SessionState::Ready as i32;
            s.recovered_from = Some(recovered_from);
            true
        }
    })?;
    app.sessions.finish_create(&id);
    let detail = format!(
        "session={id} from={lost} to={worker} checkpoint={checkpoint_id} lost_calls={lost_calls}"
    );
    app.audit
        .append("session.failed_over", &owner, detail)
        .await;
    app.store.flush().await?;
    info!(session_id = %id, from = %lost, to = %worker, checkpoint_id = %checkpoint_id, lost_calls, "session failed over");
    Ok(Outcome::Recovered)
}

/// Marks a session of the lost worker FAILED with `reason`.
fn fail(app: &App, id: &SessionId, lost: &WorkerId, reason: String) -> Result<(), Error> {
    warn!(session_id = %id, worker_id = %lost, %reason, "session failed");
    let owner = app
        .sessions
        .with(id, |s| s.owner.clone())
        .unwrap_or_default();
    let detail = format!("session={id} worker={lost} reason={reason}");
    app.audit.record("session.failed", &owner, &detail);
    app.sessions.update(id, |s| {
        (s.state == SessionState::Ready as i32
            || s.state == SessionState::Creating as i32
            || s.state == SessionState::Recovering as i32)
            && {
                s.state = SessionState::Failed as i32;
                s.failure_reason = reason;
                true
            }
    })?;
    Ok(())
}
