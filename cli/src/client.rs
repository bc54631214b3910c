//! A small typed client for the coordinator's public API: one channel, the bearer token, and a
//! per-call deadline. Mutating calls carry a request id and are retried (with the same id) when
//! the transport fails before the coordinator answered, so a retry never applies twice.

use std::{collections::BTreeMap, future::Future, path::Path, time::Duration};

use heist_proto::v1::{
    self, auth_service_client::AuthServiceClient, cluster_service_client::ClusterServiceClient,
    session_service_client::SessionServiceClient, tool_service_client::ToolServiceClient,
};
use tonic::{
    Code, Request,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::error::Error;

mod agents;
mod audit;
mod checkpoints;
mod clients;
mod heist;

pub use heist::HeistEvents;

/// How many times a mutating call is retried after a transport failure.
const TRANSPORT_RETRIES: u32 = 2;
/// First pause before such a retry (doubles each time).
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// The `traceparent` every call of this process carries (see
/// [`heist_proto::trace::process_traceparent`]).
pub fn traceparent() -> &'static str {
    static TRACEPARENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TRACEPARENT.get_or_init(heist_proto::trace::process_traceparent)
}

/// A connection to the coordinator.
#[derive(Clone, Debug)]
pub struct Client {
    url: String,
    channel: Channel,
    token: Option<String>,
    timeout: Duration,
}

impl Client {
    /// Connects to `url`, giving up after `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, Error> {
        Self::connect_with(url, timeout, None).await
    }

    /// Connects to `url`; an `https://` coordinator's certificate is verified against the PEM
    /// CA in `ca_cert` when given, else against the public web roots.
    pub async fn connect_with(
        url: &str,
        timeout: Duration,
        ca_cert: Option<&Path>,
    ) -> Result<Self, Error> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|_| Error::BadUrl {
                url: url.to_owned(),
            })?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let endpoint = match ca_cert {
            None if url.starts_with("https://") => endpoint
                .tls_config(heist_proto::tls::client_config(None))
                .map_err(|e| Error::Usage(format!("cannot set up TLS to {url}: {e}")))?,
            None => endpoint,
            Some(path) => {
                if !url.starts_with("https://") {
                    return Err(Error::Usage(format!(
                        "--ca-cert is for a TLS coordinator but {url:?} is plaintext: use \
                         https://host:port"
                    )));
                }
                let pem = std::fs::read(path).map_err(|e| {
                    Error::io(
                        format!(
                            "cannot read the CA certificate {} (--ca-cert)",
                            path.display()
                        ),
                        e,
                    )
                })?;
                endpoint
                    .tls_config(heist_proto::tls::client_config(Some(pem.as_slice())))
                    .map_err(|e| Error::Usage(format!("--ca-cert {}: {e}", path.display())))?
            }
        };
        let channel = endpoint.connect().await.map_err(|e| Error::Unreachable {
            url: url.to_owned(),
            detail: error_chain(&e),
        })?;
        Ok(Self {
            url: url.to_owned(),
            channel,
            token: None,
            timeout,
        })
    }

    /// The same connection, sending `token` as the bearer credential.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The coordinator URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A request with the deadline and (when set) the bearer token.
    fn request<T>(&self, message: T) -> Result<Request<T>, Error> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        if let Ok(value) = MetadataValue::try_from(traceparent()) {
            request
                .metadata_mut()
                .insert(heist_proto::trace::TRACEPARENT, value);
        }
        if let Some(token) = &self.token {
            let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                Error::Usage("the token contains characters not allowed in a header".to_owned())
            })?;
            request
                .metadata_mut()
                .insert(heist_proto::metadata::AUTHORIZATION, value);
        }
        Ok(request)
    }

    /// A request that must carry a token.
    fn authed<T>(&self, message: T) -> Result<Request<T>, Error> {
        if self.token.is_none() {
            return Err(Error::NotLoggedIn {
                url: self.url.clone(),
            });
        }
        self.request(message)
    }

    /// grpc.health.v1 status of the whole server (service "").
    pub async fn health(&self) -> Result<ServingStatus, Error> {
        let response = HealthClient::new(self.channel.clone())
            .check(self.request(HealthCheckRequest {
                service: String::new(),
            })?)
            .await?;
        Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
    }

    /// Client-credentials grant.
    pub async fn issue_token(
        &self,
        client_id: &str,
        client_secret: &str,
        scopes: Vec<String>,
    ) -> Result<v1::IssueTokenResponse, Error> {
        let request = self.request(v1::IssueTokenRequest {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            scopes,
        })?;
        Ok(AuthServiceClient::new(self.channel.clone())
            .issue_token(request)
            .await?
            .into_inner())
    }

    /// Every worker the coordinator knows.
    pub async fn list_workers(&self) -> Result<Vec<v1::Worker>, Error> {
        let request = self.authed(v1::ListWorkersRequest {})?;
        Ok(ClusterServiceClient::new(self.channel.clone())
            .list_workers(request)
            .await?
            .into_inner()
            .workers)
    }

    /// One worker.
    pub async fn get_worker(&self, worker_id: &str) -> Result<v1::Worker, Error> {
        let request = self.authed(v1::GetWorkerRequest {
            worker_id: worker_id.to_owned(),
        })?;
        Ok(ClusterServiceClient::new(self.channel.clone())
            .get_worker(request)
            .await?
            .into_inner())
    }

    /// Creates a session; `request_id` makes the call safe to retry.
    pub async fn create_session(
        &self,
        labels: BTreeMap<String, String>,
        request_id: &str,
    ) -> Result<v1::Session, Error> {
        self.create_session_with(labels, Vec::new(), request_id)
            .await
    }

    /// Creates a session whose tools are narrowed to `allowed_tools` (names or `prefix.*`
    /// globs; empty for no narrowing).
    pub async fn create_session_with(
        &self,
        labels: BTreeMap<String, String>,
        allowed_tools: Vec<String>,
        request_id: &str,
    ) -> Result<v1::Session, Error> {
        let message = v1::CreateSessionRequest {
            request_id: request_id.to_owned(),
            labels: labels.into_iter().collect(),
            allowed_tools,
        };
        self.retrying(|| async {
            let request = self.authed(message.clone())?;
            Ok(SessionServiceClient::new(self.channel.clone())
                .create_session(request)
                .await?
                .into_inner())
        })
        .await
    }

    /// One session.
    pub async fn get_session(&self, session_id: &str) -> Result<v1::Session, Error> {
        let request = self.authed(v1::GetSessionRequest {
            session_id: session_id.to_owned(),
        })?;
        Ok(SessionServiceClient::new(self.channel.clone())
            .get_session(request)
            .await?
            .into_inner())
    }

    /// The caller's sessions, following every page.
    pub async fn list_sessions(
        &self,
        include_closed: bool,
        page_size: u32,
    ) -> Result<Vec<v1::Session>, Error> {
        let mut sessions = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = self.authed(v1::ListSessionsRequest {
                page_size,
                page_token: page_token.clone(),
                include_closed,
            })?;
            let page = SessionServiceClient::new(self.channel.clone())
                .list_sessions(request)
                .await?
                .into_inner();
            sessions.extend(page.sessions);
            if page.next_page_token.is_empty() || page.next_page_token == page_token {
                return Ok(sessions);
            }
            page_token = page.next_page_token;
        }
    }

    /// Closes a session.
    pub async fn close_session(
        &self,
        session_id: &str,
        request_id: &str,
    ) -> Result<v1::Session, Error> {
        let message = v1::CloseSessionRequest {
            session_id: session_id.to_owned(),
            request_id: request_id.to_owned(),
        };
        self.retrying(|| async {
            let request = self.authed(message.clone())?;
            Ok(SessionServiceClient::new(self.channel.clone())
                .close_session(request)
                .await?
                .into_inner())
        })
        .await
    }

    /// The tool catalogue (of one session's worker when `session_id` is set).
    pub async fn list_tools(&self, session_id: Option<&str>) -> Result<Vec<v1::ToolSpec>, Error> {
        let request = self.authed(v1::ListToolsRequest {
            session_id: session_id.unwrap_or_default().to_owned(),
        })?;
        Ok(ToolServiceClient::new(self.channel.clone())
            .list_tools(request)
            .await?
            .into_inner()
            .tools)
    }

    /// Calls a tool in a session.
    pub async fn call_tool(
        &self,
        session_id: &str,
        tool: &str,
        arguments: prost_types::Struct,
        request_id: &str,
    ) -> Result<v1::CallToolResponse, Error> {
        let message = v1::CallToolRequest {
            session_id: session_id.to_owned(),
            tool: tool.to_owned(),
            arguments: Some(arguments),
            request_id: request_id.to_owned(),
        };
        self.retrying(|| async {
            let request = self.authed(message.clone())?;
            Ok(ToolServiceClient::new(self.channel.clone())
                .call_tool(request)
                .await?
                .into_inner())
        })
        .await
    }

    /// ToolService.CallToolStream, with `timeout` as the deadline of the whole stream (a long
    /// command needs more than the per-call default). Not retried: output may already have
    /// been shown; the request id still makes a retry by the user safe.
    pub async fn call_tool_stream(
        &self,
        session_id: &str,
        tool: &str,
        arguments: prost_types::Struct,
        request_id: &str,
        timeout: Duration,
    ) -> Result<tonic::Streaming<v1::ToolEvent>, Error> {
        let mut request = self.authed(v1::CallToolRequest {
            session_id: session_id.to_owned(),
            tool: tool.to_owned(),
            arguments: Some(arguments),
            request_id: request_id.to_owned(),
        })?;
        request.set_timeout(timeout);
        Ok(ToolServiceClient::new(self.channel.clone())
            .call_tool_stream(request)
            .await?
            .into_inner())
    }

    /// Runs `call`, retrying transport failures (UNAVAILABLE without an ErrorInfo reason: the
    /// coordinator never answered) a few times with backoff.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut backoff = RETRY_BACKOFF;
        let mut attempt = 0;
        loop {
            match call().await {
                Err(err) if attempt < TRANSPORT_RETRIES && is_transport_failure(&err) => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %err, "transport failure; retrying with the same request id");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                other => return other,
            }
        }
    }
}

/// Whether an error is a transport failure (the server did not answer), safe to retry with the
/// same request id.
fn is_transport_failure(err: &Error) -> bool {
    err.code() == Some(Code::Unavailable) && err.reason().is_none()
}

/// An error and its sources, joined with ": ".
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reasonless_unavailable_is_retried() {
        assert!(is_transport_failure(&Error::from(
            tonic::Status::unavailable("connection reset")
        )));
        let with_reason = heist_proto::errors::status(
            Code::Unavailable,
            "worker away",
            heist_proto::errors::reason::WORKER_UNAVAILABLE,
            &[],
        );
        assert!(!is_transport_failure(&Error::from(with_reason)));
        assert!(!is_transport_failure(&Error::from(
            tonic::Status::internal("boom")
        )));
    }

    #[tokio::test]
    async fn a_bad_url_is_a_usage_error() {
        let err = Client::connect("not a url", Duration::from_secs(1))
            .await
            .expect_err("bad url");
        assert!(matches!(err, Error::BadUrl { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn missing_token_says_to_log_in() {
        // Port 9 (discard) on loopback is almost never listening; the call must fail before
        // dialing anyway because no token is set.
        let channel = Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let client = Client {
            url: "http://127.0.0.1:9".to_owned(),
            channel,
            token: None,
            timeout: Duration::from_secs(1),
        };
        let err = client.list_workers().await.expect_err("no token");
        assert!(matches!(err, Error::NotLoggedIn { .. }));
        assert!(err.to_string().contains("heistctl login"));
    }
}
