//! HeistService calls. Starting and forking carry a request id, so a retry attaches to the same
//! game instead of starting another.

use heist_proto::v1::{self, heist_service_client::HeistServiceClient};

use super::Client;
use crate::error::Error;

/// A game's live events.
pub type HeistEvents = tonic::Streaming<v1::HeistEvent>;

impl Client {
    fn heists(&self) -> HeistServiceClient<tonic::transport::Channel> {
        HeistServiceClient::new(self.channel.clone())
    }

    /// Starts a game; its events, live. The stream has no deadline: a game takes minutes.
    pub async fn start_heist(&self, message: v1::StartHeistRequest) -> Result<HeistEvents, Error> {
        let mut request = self.authed(message)?;
        request.set_timeout(std::time::Duration::from_secs(24 * 3600));
        Ok(self.heists().start_heist(request).await?.into_inner())
    }

    /// Re-attaches to a game from event `from_seq`.
    pub async fn watch_heist(&self, game_id: &str, from_seq: u64) -> Result<HeistEvents, Error> {
        let mut request = self.authed(v1::WatchHeistRequest {
            game_id: game_id.to_owned(),
            from_seq,
        })?;
        request.set_timeout(std::time::Duration::from_secs(24 * 3600));
        Ok(self.heists().watch_heist(request).await?.into_inner())
    }

    /// Forks a game after a round; the new game's events, live.
    pub async fn fork_heist(&self, message: v1::ForkHeistRequest) -> Result<HeistEvents, Error> {
        let mut request = self.authed(message)?;
        request.set_timeout(std::time::Duration::from_secs(24 * 3600));
        Ok(self.heists().fork_heist(request).await?.into_inner())
    }

    /// One game.
    pub async fn get_heist(&self, game_id: &str) -> Result<v1::Heist, Error> {
        let request = self.authed(v1::GetHeistRequest {
            game_id: game_id.to_owned(),
        })?;
        Ok(self.heists().get_heist(request).await?.into_inner())
    }

    /// The caller's games, newest first (every page).
    pub async fn list_heists(&self) -> Result<Vec<v1::Heist>, Error> {
        let mut games = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = self.authed(v1::ListHeistsRequest {
                page_size: 500,
                page_token,
            })?;
            let page = self.heists().list_heists(request).await?.into_inner();
            games.extend(page.games);
            if page.next_page_token.is_empty() {
                return Ok(games);
            }
            page_token = page.next_page_token;
        }
    }

    /// The analyzer's suspicion scores.
    pub async fn analyze_heist(&self, game_id: &str) -> Result<v1::Analysis, Error> {
        let request = self.authed(v1::AnalyzeRequest {
            game_id: game_id.to_owned(),
        })?;
        Ok(self.heists().analyze(request).await?.into_inner())
    }

    /// The player's guess; the outcome and the reveal.
    pub async fn guess_heist(&self, game_id: &str, agent: &str) -> Result<v1::GuessResult, Error> {
        let request = self.authed(v1::GuessRequest {
            game_id: game_id.to_owned(),
            agent: agent.to_owned(),
        })?;
        Ok(self.heists().guess(request).await?.into_inner())
    }

    /// Statistics over the caller's games.
    pub async fn heist_stats(&self) -> Result<v1::HeistStats, Error> {
        let request = self.authed(v1::HeistStatsRequest {})?;
        Ok(self.heists().stats(request).await?.into_inner())
    }
}
