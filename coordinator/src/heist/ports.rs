//! [`Ports`] over the coordinator itself: a game's sessions, tool calls, turns and checkpoints
//! go through the same lifecycle, call pipeline and turn relay as a client's, on behalf of the
//! player who started the game.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt as _, future::BoxFuture, stream::BoxStream};
use heist_proto::{
    ids::{CheckpointId, SessionId},
    json::struct_to_json,
    v1 as pb,
};
use serde_json::Value as Json;
use tokio::time::Instant;

use super::game::{Ports, ToolOutput};
use crate::{Principal, app::App, calls, convert, error::Error, lifecycle, turns};

/// How long one setup call, tool call or checkpoint of a game may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The cluster as a game sees it.
pub struct ClusterPorts {
    /// The coordinator.
    pub app: Arc<App>,
    /// The player.
    pub principal: Principal,
}

impl ClusterPorts {
    fn deadline() -> Instant {
        Instant::now() + CALL_TIMEOUT
    }

    /// Closes a game's session (its round checkpoints stay, so the game can still be forked).
    pub async fn close_session(&self, session: &str) -> Result<(), Error> {
        let req = convert::CloseSession {
            session: SessionId::parse(session)?,
            request_id: None,
        };
        lifecycle::close_session(&self.app, &self.principal, Self::deadline(), req).await?;
        Ok(())
    }
}

impl Ports for ClusterPorts {
    fn create_session(&self) -> BoxFuture<'_, Result<String, Error>> {
        Box::pin(async move {
            // No selector: a game may run on any worker.
            let req = convert::NewSession {
                labels: Default::default(),
                request_id: None,
                allowed_tools: Vec::new(),
            };
            let session =
                lifecycle::create_session(&self.app, &self.principal, Self::deadline(), req)
                    .await?;
            if session.state != pb::SessionState::Ready as i32 {
                return Err(Error::Status(tonic::Status::unavailable(format!(
                    "the game's session {} is not ready: {}",
                    session.id, session.failure_reason
                ))));
            }
            Ok(session.id)
        })
    }

    fn call_tool<'a>(
        &'a self,
        session: &'a str,
        tool: &'a str,
        arguments: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            let call = calls::ToolCall {
                principal: self.principal.clone(),
                session: SessionId::parse(session)?,
                tool: tool.to_owned(),
                arguments: match arguments {
                    Json::Object(map) => map,
                    _ => serde_json::Map::new(),
                },
                request_id: None,
                deadline: Self::deadline(),
            };
            let response = calls::call(&self.app, call).await?;
            let text = response
                .content
                .iter()
                .filter_map(|b| match &b.block {
                    Some(pb::content_block::Block::Text(t)) => Some(t.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n");
            Ok(ToolOutput {
                text,
                structured: response.structured_content.as_ref().map(struct_to_json),
                is_error: response.is_error,
            })
        })
    }

    fn run_turn<'a>(
        &'a self,
        session: &'a str,
        agent: &'a str,
        message: String,
        instructions: String,
        model: &'a str,
    ) -> BoxFuture<'a, Result<BoxStream<'static, Result<pb::TurnEvent, Error>>, Error>> {
        Box::pin(async move {
            let turn = turns::start(
                &self.app,
                turns::TurnRequest {
                    principal: self.principal.clone(),
                    session: SessionId::parse(session)?,
                    agent: agent.to_owned(),
                    message,
                    request_id: None,
                    instructions,
                    model: model.to_owned(),
                },
            )
            .await?;
            Ok(turns::follow(&self.app, &self.principal, &turn, 1)?.boxed())
        })
    }

    fn checkpoint<'a>(
        &'a self,
        session: &'a str,
        label: &'a str,
    ) -> BoxFuture<'a, Result<String, Error>> {
        Box::pin(async move {
            let req = convert::NewCheckpoint {
                session: SessionId::parse(session)?,
                labels: [("heist.round".to_owned(), label.to_owned())].into(),
                request_id: None,
            };
            Ok(
                lifecycle::create_checkpoint(&self.app, &self.principal, Self::deadline(), req)
                    .await?
                    .id,
            )
        })
    }

    fn fork<'a>(&'a self, checkpoint: &'a str) -> BoxFuture<'a, Result<String, Error>> {
        Box::pin(async move {
            let req = convert::Fork {
                checkpoint: CheckpointId::parse(checkpoint)?,
                labels: Default::default(),
                request_id: None,
            };
            Ok(
                lifecycle::fork(&self.app, &self.principal, Self::deadline(), req)
                    .await?
                    .id,
            )
        })
    }
}
