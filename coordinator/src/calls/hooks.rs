//! After-hooks: what runs after every tool call that reached a result, unary or streamed.
//!
//! A hook is an [`AfterCall`]; [`AFTER_CALL`] lists them in the order they run. Adding one
//! (audit, metrics) is one line there. Hooks cannot fail the call: the tool already ran, so a
//! hook logs its own failures.

use std::{collections::HashMap, sync::Arc};

use futures::future::BoxFuture;
use heist_proto::v1::CallToolResponse;
use tracing::{Instrument as _, info_span, warn};

use super::ToolCall;
use crate::{app::App, lifecycle};

/// Something that runs after a tool call.
pub trait AfterCall: Send + Sync {
    /// Runs after `call` answered `response`; `read_only` is the tool's catalogue flag.
    fn after<'a>(
        &'a self,
        app: &'a Arc<App>,
        call: &'a ToolCall,
        read_only: bool,
        response: &'a CallToolResponse,
    ) -> BoxFuture<'a, ()>;
}

/// The hooks, in order.
pub const AFTER_CALL: &[&dyn AfterCall] = &[&CallMetrics, &CountMutation, &AutoCheckpoint];

/// Whether `response` is a newly applied (not replayed, not failed) call of a mutating tool.
fn applied(read_only: bool, response: &CallToolResponse) -> bool {
    !read_only && !response.is_error && !response.replayed
}

/// Counts the session's acknowledged mutating calls (`Session.acked_mutations`): what a
/// failover reports as lost when they came after the checkpoint it recovers from.
pub struct CountMutation;

impl AfterCall for CountMutation {
    fn after<'a>(
        &'a self,
        app: &'a Arc<App>,
        call: &'a ToolCall,
        read_only: bool,
        response: &'a CallToolResponse,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if !applied(read_only, response) {
                return;
            }
            if let Err(err) = app.sessions.count_mutation(&call.session) {
                warn!(%err, session_id = %call.session, "cannot count the call");
            }
        })
    }
}

/// Runs every hook in [`AFTER_CALL`].
pub async fn after(app: &Arc<App>, call: &ToolCall, read_only: bool, response: &CallToolResponse) {
    for hook in AFTER_CALL {
        hook.after(app, call, read_only, response).await;
    }
}

/// With HEIST_AUTO_CHECKPOINT, takes a checkpoint labelled [`lifecycle::AUTO_LABEL`] after a
/// successful (not replayed, not `is_error`) call of a tool that is not read-only; with
/// HEIST_CHECKPOINT_EVERY = N, after every N-th such call of the session (continuous
/// checkpoints, bounding what a failover loses). A failure is logged: the tool call itself
/// succeeded.
pub struct AutoCheckpoint;

impl AfterCall for AutoCheckpoint {
    fn after<'a>(
        &'a self,
        app: &'a Arc<App>,
        call: &'a ToolCall,
        read_only: bool,
        response: &'a CallToolResponse,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if !applied(read_only, response) {
                return;
            }
            let every = app.config.checkpoint_every;
            let due = app.config.auto_checkpoint
                || (every > 0
                    && app
                        .sessions
                        .with(&call.session, |s| s.acked_mutations % every == 0)
                        .unwrap_or(false));
            if !due {
                return;
            }
            let (label, value) = lifecycle::AUTO_LABEL;
            let labels = HashMap::from([(label.to_owned(), value.to_owned())]);
            let (task_app, owner) = (app.clone(), call.principal.id.clone());
            let (session, deadline) = (call.session.clone(), call.deadline);
            let span = info_span!("auto-checkpoint", session_id = %session);
            let done = app
                .tasks
                .spawn(
                    async move {
                        lifecycle::take_checkpoint(&task_app, &owner, deadline, &session, labels)
                            .await
                    }
                    .instrument(span),
                )
                .await;
            match done {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => warn!(%err, session_id = %call.session, "auto-checkpoint failed"),
                Err(err) => warn!(%err, session_id = %call.session, "auto-checkpoint task failed"),
            }
        })
    }
}

/// Counts the call in `heist_tool_calls_total` (by tool and outcome) and, when it was answered
/// from a recorded result, in `heist_idempotent_replays_total`.
pub struct CallMetrics;

impl AfterCall for CallMetrics {
    fn after<'a>(
        &'a self,
        app: &'a Arc<App>,
        call: &'a ToolCall,
        _read_only: bool,
        response: &'a CallToolResponse,
    ) -> BoxFuture<'a, ()> {
        app.metrics
            .tool_call(&call.tool, response.is_error, response.replayed);
        Box::pin(std::future::ready(()))
    }
}
