//! One session lifecycle on the worker: every way a session comes to or leaves this worker
//! goes through [`State::enter_session`], [`State::adopt_sessions`] or [`State::leave_session`],
//! and [`Owners`] is the one list of who holds per-session state and is told:
//!
//! | owner | comes into use (open, adopt) | leaves (close, evict) |
//! |---|---|---|
//! | workspace ([`crate::sessions`]) | directory created, its file system mounted ([`crate::diskfs`], `fs` disk quota: a ready one from the pool, else formatted), capability opened | commands told to stop, file system unmounted and image deleted, directory removed |
//! | usage cache, running commands | live in the workspace (fresh on open, restore) | dropped with it |
//! | sandbox backend | [`crate::sandbox::Sandbox::open_session`] | [`crate::sandbox::Sandbox::close_session`] |
//! | checkpoint stat cache | filled on the first capture | forgotten |
//! | agent state ([`crate::turns`]) | loaded from its file (if saved) | turns cancelled, state and file removed |
//!
//! A restore replaces the workspace in place (`Sessions::swap_workspace`): a fresh capability,
//! usage cache and command set; the backend keeps the session. A workspace that is its own file
//! system is restored inside it (its contents are swapped; a mountpoint cannot be renamed).

use std::{path::Path, sync::Arc};

use futures::future::BoxFuture;
use heist_proto::ids::SessionId;
use tracing::{info, warn};

use crate::{
    Error,
    checkpoint::Checkpointer,
    sandbox::Sandbox,
    sessions::{SessionHooks, Workspace},
    state::State,
    turns::AgentHost,
};

/// Why a session leaves this worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leave {
    /// CloseSession from the coordinator.
    Close,
    /// The coordinator's Evict command (it no longer places the session here).
    Evict,
}

impl Leave {
    fn as_str(self) -> &'static str {
        match self {
            Self::Close => "closed",
            Self::Evict => "evicted",
        }
    }
}

/// The owners of per-session state outside the session table.
struct Owners<'a> {
    sandbox: &'a Sandbox,
    checkpoints: Option<&'a Checkpointer>,
    agents: Option<&'a AgentHost>,
}

impl SessionHooks for Owners<'_> {
    fn opening<'a>(
        &'a self,
        id: &'a SessionId,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if let Some(agents) = self.agents {
                agents.load_session(id)?;
            }
            self.sandbox.open_session(id, path).await
        })
    }

    fn closing<'a>(
        &'a self,
        id: &'a SessionId,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if let Some(checkpoints) = self.checkpoints {
                checkpoints.forget(id);
            }
            if let Some(agents) = self.agents {
                agents.forget_session(id);
            }
            self.sandbox.close_session(id, path).await
        })
    }
}

impl State {
    fn owners(&self) -> Owners<'_> {
        Owners {
            sandbox: &self.sandbox,
            checkpoints: self.checkpoints.as_ref(),
            agents: self.agents.as_deref(),
        }
    }

    /// A session comes into use here (OpenSession; idempotent).
    pub(crate) async fn enter_session(&self, id: SessionId) -> Result<Arc<Workspace>, Error> {
        self.sessions.open(id, &self.owners()).await
    }

    /// Tells the owners about the sessions adopted from BASE_WORKSPACE at start-up. A session
    /// an owner refuses stays adopted (the coordinator decides its fate) and is logged.
    pub(crate) async fn adopt_sessions(&self) {
        let owners = self.owners();
        for ws in self.sessions.all() {
            if let Err(err) = owners.opening(ws.id(), ws.path()).await {
                warn!(session_id = %ws.id(), error = %err, "cannot prepare an adopted session");
            }
        }
    }

    /// A session leaves this worker (closed or evicted; idempotent); returns whether it was
    /// open.
    pub(crate) async fn leave_session(&self, id: &SessionId, why: Leave) -> Result<bool, Error> {
        let was_open = self.sessions.close(id, &self.owners()).await?;
        if let Some(applied) = &self.applied {
            applied.forget_session(id);
        }
        info!(session_id = %id, was_open, "session {}", why.as_str());
        Ok(was_open)
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{
        Config,
        sessions::Sessions,
        tools::{Limits, Registry},
    };

    async fn state(base: &Path) -> State {
        let config = Config {
            base_workspace: base.to_path_buf(),
            // Inside the test's directory: by default the cache sits next to the workspaces.
            blob_cache_dir: Some(base.join(".heist-blobs")),
            ..Config::default()
        };
        let checkpoints = Checkpointer::new(&config, CancellationToken::new()).expect("ckpt");
        State::new(
            heist_proto::ids::WorkerId::parse("w1").expect("id"),
            Sessions::load(base, 4).await.expect("sessions"),
            Registry::builtin().expect("tools"),
            Limits {
                max_file_bytes: 1024,
                max_list_entries: 10,
            },
            tonic_health::server::HealthReporter::new(),
        )
        .with_checkpoints(checkpoints)
    }

    #[tokio::test]
    async fn close_and_evict_let_go_of_every_owner() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = state(tmp.path()).await;
        let checkpoints = state.checkpoints.as_ref().expect("checkpointer");
        for (raw, why) in [("s-closed", Leave::Close), ("s-evicted", Leave::Evict)] {
            let id = SessionId::parse(raw).expect("id");
            let ws = state.enter_session(id.clone()).await.expect("open");
            checkpoints.touch(&id);
            assert!(checkpoints.holds(&id));
            assert!(state.leave_session(&id, why).await.expect("leave"));
            assert!(ws.closed().is_cancelled(), "{why:?}: commands told to stop");
            assert!(!ws.path().exists(), "{why:?}: workspace removed");
            assert!(!checkpoints.holds(&id), "{why:?}: stat cache forgotten");
        }
    }
}
