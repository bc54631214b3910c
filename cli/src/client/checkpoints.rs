//! CheckpointService calls. Mutating calls carry a request id and are retried on transport
//! failures (the same id makes the retry safe).

use std::collections::BTreeMap;

use heist_proto::v1::{self, checkpoint_service_client::CheckpointServiceClient};

use super::Client;
use crate::error::Error;

impl Client {
    fn checkpoints(&self) -> CheckpointServiceClient<tonic::transport::Channel> {
        CheckpointServiceClient::new(self.channel.clone())
            .max_decoding_message_size(256 * 1024 * 1024)
    }

    /// Snapshots a session.
    pub async fn create_checkpoint(
        &self,
        session_id: &str,
        labels: BTreeMap<String, String>,
        request_id: &str,
    ) -> Result<v1::Checkpoint, Error> {
        let message = v1::CreateCheckpointRequest {
            session_id: session_id.to_owned(),
            labels: labels.into_iter().collect(),
            request_id: request_id.to_owned(),
        };
        self.retrying(|| async {
            let request = self.authed(message.clone())?;
            Ok(self
                .checkpoints()
                .create_checkpoint(request)
                .await?
                .into_inner())
        })
        .await
    }

    /// The caller's checkpoints (of one session when given), newest first, every page.
    pub async fn list_checkpoints(
        &self,
        session_id: Option<&str>,
    ) -> Result<Vec<v1::Checkpoint>, Error> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = self.authed(v1::ListCheckpointsRequest {
                session_id: session_id.unwrap_or_default().to_owned(),
                page_size: 1000,
                page_token: page_token.clone(),
            })?;
            let page = self
                .checkpoints()
                .list_checkpoints(request)
                .await?
                .into_inner();
            out.extend(page.checkpoints);
            if page.next_page_token.is_empty() || page.next_page_token == page_token {
                return Ok(out);
            }
            page_token = page.next_page_token;
        }
    }

    /// One checkpoint, with its manifest when asked.
    pub async fn get_checkpoint(
        &self,
        checkpoint_id: &str,
        include_manifest: bool,
    ) -> Result<v1::Checkpoint, Error> {
        let request = self.authed(v1::GetCheckpointRequest {
            checkpoint_id: checkpoint_id.to_owned(),
            include_manifest,
        })?;
        Ok(self
            .checkpoints()
            .get_checkpoint(request)
            .await?
            .into_inner())
    }

    /// Restores a checkpoint into a session (its own when `session_id` is None).
    pub async fn restore_checkpoint(
        &self,
        checkpoint_id: &str,
        session_id: Option<&str>,
        request_id: &str,
    ) -> Result<v1::Session, Error> {
        let message = v1::RestoreCheckpointRequest {
            checkpoint_id: checkpoint_id.to_owned(),
            session_id: session_id.unwrap_or_default().to_owned(),
            request_id: request_id.to_owned(),
        };
        self.retrying(|| async {
            let request = self.authed(message.clone())?;
            Ok(self
                .checkpoints()
                .restore_checkpoint(request)
                .await?
                .into_inner())
        })
        .await
    }

    /// A new session from a checkpoint.
    pub async fn fork_session(
        &self,
        checkpoint_id: &str,
        labels: BTreeMap<String, String>,
        request_id: &str,
    ) -> Result<v1::Session, Error> {
        let message = v1::ForkSessionRequest {
            checkpoint_id: checkpoint_id.to_owned(),
            labels: labels.into_iter().collect(),
            request_id: request_id.to_owned(),
        };
        self.retrying(|| async {
            let request = self.authed(message.clone())?;
            Ok(self.checkpoints().fork_session(request).await?.into_inner())
        })
        .await
    }

    /// Deletes a checkpoint.
    pub async fn delete_checkpoint(
        &self,
        checkpoint_id: &str,
        request_id: &str,
    ) -> Result<v1::DeleteCheckpointResponse, Error> {
        let message = v1::DeleteCheckpointRequest {
            checkpoint_id: checkpoint_id.to_owned(),
            request_id: request_id.to_owned(),
        };
        self.retrying(|| async {
            let request = self.authed(message.clone())?;
            Ok(self
                .checkpoints()
                .delete_checkpoint(request)
                .await?
                .into_inner())
        })
        .await
    }
}
