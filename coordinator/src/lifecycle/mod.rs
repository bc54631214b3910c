//! The session lifecycle at the coordinator: place, open, close, checkpoint, restore, fork,
//! and failover from a lost worker ([`failover`]).
//!
//! Every adapter (gRPC's SessionService and CheckpointService, the tool call pipeline's
//! auto-checkpoint hook, and next MCP and agent turns) goes through these functions; they take
//! domain values (a [`Principal`](crate::Principal), parsed ids, a deadline) and never tonic types. Mutating entry
//! points run through [`crate::runner::run_once`] so a request id makes them apply once.

mod checkpoint;
pub mod failover;
mod session;

use heist_proto::{
    ids::{SessionId, WorkerId},
    v1::{Session, SessionState},
};

pub use checkpoint::{
    AUTO_LABEL, create_checkpoint, delete_checkpoint, fork, owned_checkpoint, restore,
    take_checkpoint,
};
pub use session::{Placement, close_session, create_session, owned_session, place_and_open};

use crate::{app::App, error::Error, runner};

/// The caller's session and its worker; with `ready`, the session must also be READY.
/// Another principal's session is NOT_FOUND, like one that does not exist.
pub fn session_worker(
    app: &App,
    owner: &str,
    id: &SessionId,
    ready: bool,
) -> Result<WorkerId, Error> {
    app.sessions
        .with(id, |s| {
            if s.owner != owner {
                return Err(Error::SessionNotFound(id.clone()));
            }
            if ready && s.state == SessionState::Recovering as i32 {
                return Err(Error::SessionRecovering(id.clone()));
            }
            if ready && s.state != SessionState::Ready as i32 {
                return Err(Error::SessionNotReady {
                    id: id.clone(),
                    state: state_name(s.state),
                });
            }
            Ok(WorkerId::parse(s.worker_id.as_str())?)
        })
        .unwrap_or_else(|| Err(Error::SessionNotFound(id.clone())))
}

/// The lower-case name of a session state, for messages.
fn state_name(state: i32) -> &'static str {
    SessionState::try_from(state).map_or("unknown", |st| match st {
        SessionState::Creating => "creating",
        SessionState::Closing => "closing",
        SessionState::Closed => "closed",
        SessionState::Failed => "failed",
        SessionState::Recovering => "recovering",
        SessionState::Ready | SessionState::Unspecified => "unknown",
    })
}

/// A recorded session response replayed: the session as it is now (it may have changed since).
fn replay_session(app: &App, bytes: &[u8]) -> Result<Session, Error> {
    let stored: Session = runner::decode(bytes)?;
    let current = SessionId::parse(stored.id.as_str())
        .ok()
        .and_then(|id| app.sessions.get(&id))
        .unwrap_or(stored);
    Ok(app.view(current))
}
