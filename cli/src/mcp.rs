//! A small MCP client for the coordinator's `/mcp` endpoint: one JSON-RPC request per HTTP
//! POST (the stateless Streamable HTTP transport), the answer read as JSON or as a server-sent
//! event stream whose notifications are handed to the caller as they arrive. Used by
//! `heistctl mcp` (the stdio bridge) and the MCP phase of `heistctl bench`.

use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::Error;

/// The protocol revision sent in `MCP-Protocol-Version` (served statelessly by the coordinator,
/// no `initialize` needed).
pub const PROTOCOL_VERSION: &str = "2025-11-25";

/// The coordinator's MCP endpoint with a bearer token.
#[derive(Clone, Debug)]
pub struct McpHttp {
    http: reqwest::Client,
    url: String,
    token: String,
}

/// The end of one request: its `result`, or its JSON-RPC `error` object.
pub type Reply = Result<Value, Value>;

impl McpHttp {
    /// `coordinator` is the base URL (`http://127.0.0.1:50051`); requests go to `…/mcp`.
    /// `http2` speaks HTTP/2 without TLS (prior knowledge), else HTTP/1.1 with keep-alive.
    pub fn new(coordinator: &str, token: String, http2: bool) -> Result<Self, Error> {
        Self::with_ca(coordinator, token, http2, None)
    }

    /// Like [`McpHttp::new`]; an `https://` coordinator is verified against the PEM CA
    /// certificate `ca_pem` when given (else the public web roots).
    pub fn with_ca(
        coordinator: &str,
        token: String,
        http2: bool,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, Error> {
        let mut builder = reqwest::Client::builder().tcp_nodelay(true);
        if let Some(pem) = ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| Error::Usage(format!("--ca-cert is not a PEM certificate: {e}")))?;
            builder = builder.add_root_certificate(ca);
        }
        let builder = if http2 {
            builder.http2_prior_knowledge()
        } else {
            builder.http1_only()
        };
        let http = builder
            .build()
            .map_err(|e| Error::Mcp(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            url: format!("{}/mcp", coordinator.trim_end_matches('/')),
            token,
        })
    }

    /// Sends `method` with `params` and returns its reply; every notification that arrives
    /// before the reply is sent to `notes` first (when given). Dropping the future closes the
    /// response stream, which cancels the call at the coordinator.
    pub async fn request(
        &self,
        id: u64,
        method: &str,
        params: Value,
        notes: Option<&UnboundedSender<Value>>,
    ) -> Result<Reply, Error> {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let resp = self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-protocol-version", PROTOCOL_VERSION)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| Error::Mcp(format!("cannot reach {}: {e}", self.url)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Error::Mcp(format!(
                "{} refused the token (401): run `heistctl login` or pass --token",
                self.url
            )));
        }
        let sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !sse {
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| Error::Mcp(format!("reading the reply: {e}")))?;
            let message: Value = serde_json::from_slice(&bytes).map_err(|_| {
                Error::Mcp(format!(
                    "HTTP {status} from {}: {}",
                    self.url,
                    String::from_utf8_lossy(&bytes)
                ))
            })?;
            return reply(message);
        }
        let mut stream = resp.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::Mcp(format!("reading the event stream: {e}")))?;
            buffer.extend_from_slice(&chunk);
            while let Some(end) = event_end(&buffer) {
                let event: Vec<u8> = buffer.drain(..end).collect();
                let Some(data) = event_data(&event) else {
                    continue;
                };
                let Ok(message) = serde_json::from_str::<Value>(&data) else {
                    continue;
                };
                if message.get("id").is_some()
                    && (message.get("result").is_some() || message.get("error").is_some())
                {
                    return reply(message);
                }
                if let Some(notes) = notes {
                    let _ = notes.send(message);
                }
            }
        }
        Err(Error::Mcp(
            "the event stream ended before the reply".to_owned(),
        ))
    }
}

fn reply(message: Value) -> Result<Reply, Error> {
    if let Some(error) = message.get("error") {
        return Ok(Err(error.clone()));
    }
    match message.get("result") {
        Some(result) => Ok(Ok(result.clone())),
        None => Err(Error::Mcp(format!("not a JSON-RPC reply: {message}"))),
    }
}

/// Where the first complete event in `buffer` ends (after its blank line).
fn event_end(buffer: &[u8]) -> Option<usize> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The joined `data:` lines of one event.
fn event_data(event: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_and_join() {
        let raw = b"event: message\ndata: {\"a\":\ndata: 1}\n\nretry: 3\n\n";
        let end = event_end(raw).expect("one event");
        assert_eq!(event_data(&raw[..end]).as_deref(), Some("{\"a\":\n1}"));
        assert_eq!(event_data(&raw[end..]), None);
    }
}
