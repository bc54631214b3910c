//! The model gateway: one [`ModelProvider`] trait, three providers (`scripted`, `openai`,
//! `anthropic`) and the [`Gateway`] that puts a policy around them per chain (timeout, retry
//! with backoff and jitter, fallback across providers, a circuit breaker per provider, usage and
//! cost accounting, a per-session budget).
//!
//! Configuration ([`ModelsConfig`]) has the shape of the worker config's `[models]` tables. API
//! keys are [`Secret`]s: their `Debug` and `Display` print `<redacted>`, and no event or error
//! carries them.

mod anthropic;
mod config;
mod gateway;
mod openai;
pub mod scripted;
mod sse;
mod types;

#[cfg(test)]
pub(crate) mod tests;

use std::time::Duration;

pub use config::{
    BreakerConfig, BudgetConfig, ChainConfig, HttpProviderConfig, ModelsConfig, Price,
    ProviderConfig, ScriptedConfig,
};
pub use gateway::{Completion, Gateway, GatewayError, GatewayEvent, Spend};
pub use types::{
    FinishReason, Message, ModelEvent, ModelProvider, ModelRequest, ModelStream, Role, Secret,
    ToolCall, ToolSpec, Usage,
};

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The server answered with an error status.
    #[error("HTTP {status}: {message}")]
    Http {
        /// Status code.
        status: u16,
        /// What the server's `Retry-After` asked for, if anything.
        retry_after: Option<Duration>,
        /// The error body (truncated), never containing our key.
        message: String,
    },
    /// The server could not be reached or the connection broke before the response began.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The stream broke after it began (partial output must be discarded).
    #[error("the response stream broke midway: {0}")]
    StreamCut(String),
    /// The call took longer than the chain's timeout.
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
    /// The server sent something that is not the protocol (malformed JSON, missing fields).
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    /// The provider is misconfigured (no API key, bad URL).
    #[error("provider misconfigured: {0}")]
    Config(String),
}

impl ModelError {
    /// Whether trying the same provider again may succeed: 429, 5xx, connection trouble and
    /// timeouts. Protocol and configuration errors go straight to the next provider.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Http { status, .. } => *status == 429 || *status >= 500,
            Self::Connect(_) | Self::StreamCut(_) | Self::Timeout(_) => true,
            Self::Protocol(_) | Self::Config(_) => false,
        }
    }

    /// A short label for events ("http_429", "timeout", ...).
    pub fn kind(&self) -> String {
        match self {
            Self::Http { status, .. } => format!("http_{status}"),
            Self::Connect(_) => "connect".to_owned(),
            Self::StreamCut(_) => "stream_cut".to_owned(),
            Self::Timeout(_) => "timeout".to_owned(),
            Self::Protocol(_) => "protocol".to_owned(),
            Self::Config(_) => "config".to_owned(),
        }
    }
}

/// Rough token count of a text (4 characters a token), for providers that report none and for
/// the context budget.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// Reads an HTTP error response into a [`ModelError::Http`].
async fn http_error(response: reqwest::Response) -> ModelError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64);
    let body = response.text().await.unwrap_or_default();
    let message: String = body.chars().take(500).collect();
    ModelError::Http {
        status,
        retry_after,
        message,
    }
}

/// Maps a reqwest error from sending a request.
fn send_error(err: &reqwest::Error) -> ModelError {
    ModelError::Connect(error_chain(err))
}

/// A reqwest error with its causes (keys travel in headers, never in URLs or these messages).
fn error_chain(err: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Tool names on the wire: providers allow `[a-zA-Z0-9_-]`, ours have dots (`fs.read`).
fn wire_name(name: &str) -> String {
    name.replace('.', "__")
}

/// The tool name a wire name stands for, among the request's tools.
fn tool_name(wire: &str, tools: &[ToolSpec]) -> String {
    tools
        .iter()
        .find(|t| wire_name(&t.name) == wire)
        .map_or_else(|| wire.replace("__", "."), |t| t.name.clone())
}

/// The API key of an HTTP provider: `api_key`, else the variable `api_key_env` names (default
/// `default_env`), else none (local servers need none).
fn key(config: &HttpProviderConfig, default_env: &str) -> Secret {
    config.api_key.clone().unwrap_or_else(|| {
        let var = config.api_key_env.as_deref().unwrap_or(default_env);
        Secret::new(std::env::var(var).unwrap_or_default())
    })
}

/// The HTTP client every provider uses (rustls, no system OpenSSL).
fn client() -> Result<reqwest::Client, GatewayError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| GatewayError::Config(format!("cannot build the HTTP client: {e}")))
}
