//! AgentService calls: agents, turns (streamed), cancel and transcripts.

use heist_proto::v1::{self, agent_service_client::AgentServiceClient};

use super::Client;
use crate::error::Error;

impl Client {
    fn agents(&self) -> AgentServiceClient<tonic::transport::Channel> {
        AgentServiceClient::new(self.channel.clone())
    }

    /// A turn request without a deadline: a turn's stream lasts as long as the turn.
    fn untimed<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut request = self.authed(message)?;
        request.metadata_mut().remove("grpc-timeout");
        Ok(request)
    }

    /// The agents the caller can run (of one session's worker when given).
    pub async fn list_agents(&self, session_id: Option<&str>) -> Result<Vec<v1::AgentSpec>, Error> {
        let request = self.authed(v1::ListAgentsRequest {
            session_id: session_id.unwrap_or_default().to_owned(),
        })?;
        Ok(self
            .agents()
            .list_agents(request)
            .await?
            .into_inner()
            .agents)
    }

    /// Starts a turn (a retry with the same request id attaches to it) and streams its events.
    pub async fn run_turn(
        &self,
        session_id: &str,
        agent: &str,
        message: &str,
        request_id: &str,
    ) -> Result<tonic::Streaming<v1::TurnEvent>, Error> {
        let message = v1::RunTurnRequest {
            session_id: session_id.to_owned(),
            agent: agent.to_owned(),
            message: message.to_owned(),
            request_id: request_id.to_owned(),
        };
        self.retrying(|| async {
            let request = self.untimed(message.clone())?;
            Ok(self.agents().run_turn(request).await?.into_inner())
        })
        .await
    }

    /// Re-attaches to a turn from event `from_seq`.
    pub async fn watch_turn(
        &self,
        turn_id: &str,
        from_seq: u64,
    ) -> Result<tonic::Streaming<v1::TurnEvent>, Error> {
        let request = self.untimed(v1::WatchTurnRequest {
            turn_id: turn_id.to_owned(),
            from_seq,
        })?;
        Ok(self.agents().watch_turn(request).await?.into_inner())
    }

    /// Stops a running turn.
    pub async fn cancel_turn(&self, turn_id: &str) -> Result<v1::Turn, Error> {
        let request = self.authed(v1::CancelTurnRequest {
            turn_id: turn_id.to_owned(),
        })?;
        Ok(self.agents().cancel_turn(request).await?.into_inner())
    }

    /// A session's whole transcript, every page.
    pub async fn transcript(&self, session_id: &str) -> Result<Vec<v1::TurnEvent>, Error> {
        let mut events = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = self.authed(v1::GetTranscriptRequest {
                session_id: session_id.to_owned(),
                page_size: 1000,
                page_token,
            })?;
            let page = self.agents().get_transcript(request).await?.into_inner();
            events.extend(page.events);
            if page.next_page_token.is_empty() {
                return Ok(events);
            }
            page_token = page.next_page_token;
        }
    }
}
