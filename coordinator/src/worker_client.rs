//! The data plane: calls from the coordinator to one worker's WorkerService.
//!
//! One lazily connected tonic channel per worker, reused by every call (HTTP/2 multiplexes
//! them). Every call carries `authorization: Bearer <credential>`, made for that one call with
//! the call key agreed at the worker's registration ([`heist_proto::credential`]: a fresh id,
//! the call's digest, short-lived: HEIST_WORKER_CREDENTIAL_TTL_S), and `x-heist-principal`; the caller's deadline (see [`call_deadline`]) is forwarded and enforced
//! here as well, with the current span's W3C trace context (`traceparent`). Worker statuses
//! come back unchanged, except transport failures, which become WORKER_UNAVAILABLE, and an
//! expired deadline, which is DEADLINE_EXCEEDED ([`WorkerClient`]'s `map_status` is the one
//! place). HTTP/2 keep-alive pings (also while idle) close the channel to a frozen or
//! partitioned worker within interval + timeout, so calls in flight there end UNAVAILABLE
//! instead of waiting for their deadline.

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use futures::{StreamExt as _, stream::BoxStream};
use heist_proto::{
    credential::CallKey,
    errors,
    ids::WorkerId,
    metadata,
    token::{TokenSigner, call_digest},
    v1::{
        CallToolRequest, CallToolResponse, CaptureWorkspaceRequest, CaptureWorkspaceResponse,
        OpenSessionRequest, OpenSessionResponse, RestoreWorkspaceRequest, RestoreWorkspaceResponse,
        ToolEvent, TurnEvent, WorkerCancelTurnRequest, WorkerCancelTurnResponse,
        WorkerCloseSessionRequest, WorkerCloseSessionResponse, WorkerRunTurnRequest,
        worker_service_client::WorkerServiceClient,
    },
};
use tokio::time::Instant;
use tonic::{
    Code, Request, Status,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::{Channel, Endpoint},
};
use tracing::warn;

use heist_proto::tls::Tls;

use crate::{error::Error, signing_keys::SigningKeys};

/// Most of the caller's deadline kept back to send our answer in time.
const MAX_DEADLINE_MARGIN: Duration = Duration::from_millis(20);
/// How long dialling a worker may take before the call fails as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Audience a worker requires in the grants the coordinator signs for it.
pub fn credential_audience(worker: &WorkerId) -> String {
    format!("heist-worker:{worker}")
}

/// An advertised address as dialled: a bare `host:port` gets `http://`.
pub fn normalise_address(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

/// How the coordinator's channels to workers are set up.
#[derive(Clone, Debug)]
pub struct ChannelTuning {
    /// Largest message sent or received.
    pub max_message_bytes: usize,
    /// HTTP/2 keep-alive ping interval.
    pub keepalive_interval: Duration,
    /// An unanswered ping closes the channel after this.
    pub keepalive_timeout: Duration,
    /// The coordinator's TLS material: with a cluster CA, channels to workers are mTLS
    /// (`https://` addresses only; the worker's certificate must name its id).
    pub tls: Option<Arc<Tls>>,
}

impl ChannelTuning {
    /// The same tuning with the coordinator's TLS material.
    pub fn with_tls(mut self, tls: Option<Arc<Tls>>) -> Self {
        self.tls = tls;
        self
    }
}

impl From<&crate::Config> for ChannelTuning {
    fn from(config: &crate::Config) -> Self {
        Self {
            max_message_bytes: config.max_message_bytes,
            keepalive_interval: config.worker_keepalive_interval,
            keepalive_timeout: config.worker_keepalive_timeout,
            tls: None,
        }
    }
}

/// A reusable client for one worker.
pub struct WorkerClient {
    worker: WorkerId,
    address: String,
    client: WorkerServiceClient<Channel>,
    credentials: Credentials,
}

impl WorkerClient {
    /// A client for `worker` at `address` (`http://host:port`; a bare `host:port` gets `http://`).
    /// Nothing is dialled until the first call.
    pub fn new(
        worker: WorkerId,
        address: &str,
        keys: Arc<SigningKeys>,
        issuer: &str,
        credential_ttl: Duration,
        tuning: &ChannelTuning,
    ) -> Result<Self, Error> {
        let address = normalise_address(address);
        let endpoint = Endpoint::from_shared(address.clone())
            .map_err(|e| {
                errors::invalid_argument(
                    "advertise_addr",
                    format!("advertise_addr {address:?} is not a URL ({e}): set HEIST_ADVERTISE_ADDR to e.g. http://10.0.0.5:50052"),
                )
            })?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(tuning.keepalive_interval)
            .keep_alive_timeout(tuning.keepalive_timeout)
            .keep_alive_while_idle(true);
        let endpoint = match tuning
            .tls
            .as_deref()
            .and_then(|t| t.cluster_client(Some(worker.as_str())))
        {
            None => endpoint,
            Some(tls) => {
                if !address.starts_with("https://") {
                    return Err(Error::Status(errors::invalid_argument(
                        "advertise_addr",
                        format!(
                            "advertise_addr {address:?} is plaintext but this coordinator talks \
                             to workers over mTLS: set HEIST_ADVERTISE_ADDR to https://host:port \
                             and give the worker HEIST_TLS_CERT, HEIST_TLS_KEY and HEIST_TLS_CA"
                        ),
                    )));
                }
                // The worker's certificate must name its id (not its address): whoever answers
                // at the advertised address must be that worker.
                endpoint.tls_config(tls).map_err(|e| {
                    Error::Status(errors::invalid_argument(
                        "advertise_addr",
                        format!("cannot set up TLS to worker {worker}: {e}"),
                    ))
                })?
            }
        };
        let client = WorkerServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(tuning.max_message_bytes)
            .max_encoding_message_size(tuning.max_message_bytes);
        Ok(Self {
            credentials: Credentials {
                worker_kid: Mutex::new(keys.current().kid().to_owned()),
                keys,
                issuer: issuer.to_owned(),
                audience: credential_audience(&worker),
                ttl: credential_ttl,
                call_key: RwLock::new(None),
            },
            worker,
            address,
            client,
        })
    }

    /// Records that the worker verifies with the coordinator key `kid` (it was in the Accepted
    /// sent to it, or its heartbeat said so): its credentials are signed with that key from now.
    pub fn worker_has_key(&self, kid: &str) {
        let mut current = self
            .credentials
            .worker_kid
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *current != kid {
            kid.clone_into(&mut current);
        }
    }

    /// Makes `key` (agreed at the worker's registration) the key its call credentials are
    /// made with.
    pub fn set_call_key(&self, key: CallKey) {
        *self
            .credentials
            .call_key
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(key));
    }

    /// The address this client dials.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// WorkerService.OpenSession.
    pub async fn open_session(
        &self,
        principal: &str,
        deadline: Instant,
        msg: OpenSessionRequest,
    ) -> Result<OpenSessionResponse, Error> {
        let (request, budget) = self.request("OpenSession", principal, deadline, msg)?;
        let mut client = self.client.clone();
        self.finish(budget, client.open_session(request)).await
    }

    /// WorkerService.CloseSession.
    pub async fn close_session(
        &self,
        principal: &str,
        deadline: Instant,
        msg: WorkerCloseSessionRequest,
    ) -> Result<WorkerCloseSessionResponse, Error> {
        let (request, budget) = self.request("CloseSession", principal, deadline, msg)?;
        let mut client = self.client.clone();
        self.finish(budget, client.close_session(request)).await
    }

    /// WorkerService.CallTool.
    pub async fn call_tool(
        &self,
        principal: &str,
        deadline: Instant,
        msg: CallToolRequest,
    ) -> Result<CallToolResponse, Error> {
        let (request, budget) = self.request("CallTool", principal, deadline, msg)?;
        let mut client = self.client.clone();
        self.finish(budget, client.call_tool(request)).await
    }

    /// WorkerService.CaptureWorkspace.
    pub async fn capture_workspace(
        &self,
        principal: &str,
        deadline: Instant,
        msg: CaptureWorkspaceRequest,
    ) -> Result<CaptureWorkspaceResponse, Error> {
        let (request, budget) = self.request("CaptureWorkspace", principal, deadline, msg)?;
        let mut client = self.client.clone();
        self.finish(budget, client.capture_workspace(request)).await
    }

    /// WorkerService.RestoreWorkspace.
    pub async fn restore_workspace(
        &self,
        principal: &str,
        deadline: Instant,
        msg: RestoreWorkspaceRequest,
    ) -> Result<RestoreWorkspaceResponse, Error> {
        let (request, budget) = self.request("RestoreWorkspace", principal, deadline, msg)?;
        let mut client = self.client.clone();
        self.finish(budget, client.restore_workspace(request)).await
    }

    /// WorkerService.CallToolStream: the worker's events as they come, with statuses mapped
    /// like those of unary calls. Only the start is bounded here; the caller bounds the whole
    /// stream by `deadline` (the worker enforces it too). Dropping the stream cancels the call
    /// on the worker, which kills the tool's processes.
    pub async fn call_tool_stream(
        self: &Arc<Self>,
        principal: &str,
        deadline: Instant,
        msg: CallToolRequest,
    ) -> Result<BoxStream<'static, Result<ToolEvent, Error>>, Error> {
        let (request, budget) = self.request("CallToolStream", principal, deadline, msg)?;
        let mut client = self.client.clone();
        let events = self
            .finish(budget, client.call_tool_stream(request))
            .await?;
        let this = Arc::clone(self);
        Ok(events
            .map(move |event| event.map_err(|status| this.map_status(status)))
            .boxed())
    }

    /// WorkerService.RunTurn: the turn's events from `msg.from_seq`. Only the start is bounded
    /// by `deadline`; the stream lasts as long as the turn. Dropping it does not stop the turn.
    pub async fn run_turn(
        self: &Arc<Self>,
        principal: &str,
        deadline: Instant,
        msg: WorkerRunTurnRequest,
    ) -> Result<BoxStream<'static, Result<TurnEvent, Error>>, Error> {
        let (mut request, budget) = self.request("RunTurn", principal, deadline, msg)?;
        // The worker streams until the turn ends: no grpc-timeout on the stream itself.
        request.metadata_mut().remove("grpc-timeout");
        let mut client = self.client.clone();
        let events = self.finish(budget, client.run_turn(request)).await?;
        let this = Arc::clone(self);
        Ok(events
            .map(move |event| event.map_err(|status| this.map_status(status)))
            .boxed())
    }

    /// WorkerService.CancelTurn.
    pub async fn cancel_turn(
        &self,
        principal: &str,
        deadline: Instant,
        msg: WorkerCancelTurnRequest,
    ) -> Result<WorkerCancelTurnResponse, Error> {
        let (request, budget) = self.request("CancelTurn", principal, deadline, msg)?;
        let mut client = self.client.clone();
        self.finish(budget, client.cancel_turn(request)).await
    }

    /// Signs a turn grant for this worker: `turn:<id> session:<id> tool:<name>...` in the
    /// scope claim, the principal as subject, `ttl` long.
    pub fn grant(&self, principal: &str, scope: &str, ttl: Duration) -> Result<String, Error> {
        let claims = TokenSigner::claims(
            &self.credentials.issuer,
            &self.credentials.audience,
            principal,
            scope,
            ttl,
        );
        self.credentials
            .signer()
            .sign(&claims)
            .map_err(Error::Signing)
    }

    /// A request with credential, principal and the time left until `deadline` as its
    /// `grpc-timeout`; also returns that time.
    fn request<T: prost::Message>(
        &self,
        method: &str,
        principal: &str,
        deadline: Instant,
        msg: T,
    ) -> Result<(Request<T>, Duration), Error> {
        let budget = deadline.saturating_duration_since(Instant::now());
        if budget.is_zero() {
            return Err(Error::DeadlineExceeded(self.worker.clone()));
        }
        let principal = AsciiMetadataValue::try_from(principal).ok();
        let credential = self.credentials.header(
            &self.worker,
            &call_digest(
                method,
                principal
                    .as_ref()
                    .and_then(|p| p.to_str().ok())
                    .unwrap_or_default(),
                &msg.encode_to_vec(),
            ),
        )?;
        let mut request = Request::new(msg);
        let md = request.metadata_mut();
        md.insert(metadata::AUTHORIZATION, credential);
        if let Some(value) = principal {
            md.insert(metadata::PRINCIPAL, value);
        }
        heist_proto::trace::inject_current(md);
        request.set_timeout(budget);
        Ok((request, budget))
    }

    /// Awaits a call, enforcing the deadline here too: the caller then gets DEADLINE_EXCEEDED
    /// from us rather than whatever the worker's transport says when its timer fires.
    async fn finish<T>(
        &self,
        budget: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(budget, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.map_status(status)),
            Err(_) => Err(Error::DeadlineExceeded(self.worker.clone())),
        }
    }

    /// Transport failures (nothing listening, connection reset, a keep-alive ping unanswered,
    /// a stream broken mid-call) carry no heist reason; they mean the worker is unreachable:
    /// UNAVAILABLE, never UNKNOWN. A worker whose own server timer fired reports CANCELLED
    /// "Timeout expired": that is the deadline. Everything else is the worker's own answer.
    fn map_status(&self, status: Status) -> Error {
        let no_reason = errors::reason_of(&status).is_none();
        if status.code() == Code::Cancelled && no_reason && status.message() == "Timeout expired" {
            return Error::DeadlineExceeded(self.worker.clone());
        }
        if no_reason
            && matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            )
        {
            warn!(worker_id = %self.worker, address = %self.address, code = ?status.code(), error = %status.message(), "worker unreachable");
            return Error::WorkerUnavailable(self.worker.clone());
        }
        Error::Status(status)
    }
}

/// When a call forwarded on behalf of a caller must be answered: the caller's remaining
/// deadline (or `cap` if it sent none, capped by `cap` otherwise), minus a small margin so our
/// answer reaches the caller before its own deadline fires. Compute it when the request arrives.
pub fn call_deadline(incoming: &MetadataMap, cap: Duration) -> Instant {
    let budget = metadata::remaining_deadline(incoming).map_or(cap, |d| d.min(cap));
    let margin = (budget / 20).min(MAX_DEADLINE_MARGIN);
    Instant::now() + (budget - margin)
}

/// Mints the coordinator credentials for one worker: per-call credentials with the call key
/// agreed at its registration, turn grants signed with the coordinator's key.
struct Credentials {
    keys: Arc<SigningKeys>,
    /// `kid` of the coordinator key the worker verifies with (from its Accepted, then its
    /// heartbeats): its grants are signed with that key while the coordinator holds it.
    worker_kid: Mutex<String>,
    issuer: String,
    audience: String,
    ttl: Duration,
    /// The call key of the worker's latest registration (none before the first).
    call_key: RwLock<Option<Arc<CallKey>>>,
}

impl Credentials {
    /// The key the worker can check: the one it reported, or else the current one.
    fn signer(&self) -> Arc<TokenSigner> {
        let kid = self
            .worker_kid
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.keys
            .signer(&kid)
            .unwrap_or_else(|| self.keys.current())
    }

    /// The `authorization` value for one call: a fresh credential (new id, which the worker
    /// accepts once) for the call whose [`call_digest`] is `digest`. Marked sensitive: HPACK
    /// sends it as never indexed, so it neither sits in the connection's header table nor
    /// pushes out the headers that repeat on every call.
    fn header(&self, worker: &WorkerId, digest: &str) -> Result<AsciiMetadataValue, Error> {
        let key = self
            .call_key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Error::WorkerUnavailable(worker.clone()))?;
        let credential = key.mint(digest, self.ttl).map_err(|e| {
            Error::Status(Status::internal(format!("cannot make a credential: {e}")))
        })?;
        let mut value =
            AsciiMetadataValue::try_from(format!("Bearer {credential}")).map_err(|e| {
                Error::Status(Status::internal(format!("credential is not ASCII: {e}")))
            })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use heist_proto::{
        credential::{Credential, KeyShare},
        token::TokenVerifier,
    };

    use super::*;

    fn tuning() -> ChannelTuning {
        ChannelTuning {
            max_message_bytes: 1 << 20,
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(2),
            tls: None,
        }
    }

    fn signer() -> Arc<SigningKeys> {
        SigningKeys::for_tests()
    }

    #[tokio::test]
    async fn credentials_are_per_call_and_grants_follow_the_workers_key() {
        let keys = signer();
        let s = keys.current();
        let id = WorkerId::parse("w1").expect("id");
        let client = WorkerClient::new(
            id.clone(),
            "127.0.0.1:1",
            keys.clone(),
            "heist",
            Duration::from_secs(30),
            &tuning(),
        )
        .expect("client");
        assert_eq!(client.address(), "http://127.0.0.1:1");
        // No call key before the worker registered.
        assert!(matches!(
            client.credentials.header(&id, "d1"),
            Err(Error::WorkerUnavailable(_))
        ));

        let worker_share = KeyShare::generate().expect("share");
        let ours = KeyShare::generate().expect("share");
        let (worker_public, our_public) = (worker_share.public(), ours.public());
        client.set_call_key(
            ours.agree_as_coordinator(&worker_public, "w1")
                .expect("agree"),
        );
        let worker_key = worker_share
            .agree_as_worker(&our_public, "w1")
            .expect("agree");
        let first = client.credentials.header(&id, "d1").expect("header");
        let second = client.credentials.header(&id, "d1").expect("header");
        assert_ne!(first, second, "every call gets its own credential");
        assert!(first.is_sensitive(), "never indexed by HPACK");
        let text = first
            .to_str()
            .expect("ascii")
            .strip_prefix("Bearer ")
            .expect("bearer");
        let credential = Credential::parse(text).expect("parse");
        worker_key
            .verify(&credential, "d1")
            .expect("the worker's copy of the key");
        assert!(worker_key.verify(&credential, "d2").is_err());

        // Grants: after a rotation they stay on the key the worker has until it reports the
        // new one (heartbeat), then use that.
        let kid_of = |grant: String| {
            jsonwebtoken::decode_header(&grant)
                .expect("header")
                .kid
                .expect("kid")
        };
        let verifier = TokenVerifier::new(&s.public_key(), "heist", &credential_audience(&id));
        let grant = client
            .grant("alice", "turn:t-1", Duration::from_secs(30))
            .expect("grant");
        assert_eq!(verifier.verify(&grant).expect("valid").sub, "alice");
        client.worker_has_key(s.kid());
        keys.rotate().await.expect("rotate");
        let grant = client
            .grant("alice", "turn:t-1", Duration::from_secs(30))
            .expect("grant");
        assert_eq!(kid_of(grant), s.kid());
        client.worker_has_key(keys.current().kid());
        let grant = client
            .grant("alice", "turn:t-1", Duration::from_secs(30))
            .expect("grant");
        assert_eq!(kid_of(grant), keys.current().kid());
    }

    #[tokio::test]
    async fn unreachable_worker_is_worker_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let client = WorkerClient::new(
            WorkerId::parse("w1").expect("id"),
            &format!("http://{addr}"),
            signer(),
            "heist",
            Duration::from_secs(30),
            &tuning(),
        )
        .expect("client");
        let err = client
            .open_session(
                "alice",
                call_deadline(&MetadataMap::new(), Duration::from_secs(5)),
                OpenSessionRequest::default(),
            )
            .await
            .expect_err("nothing listens");
        assert!(matches!(err, Error::WorkerUnavailable(_)), "{err:?}");
    }

    #[test]
    fn call_deadline_follows_the_caller_with_a_margin_and_a_cap() {
        let cap = Duration::from_secs(10);
        let mut md = MetadataMap::new();
        let now = Instant::now();
        let d = call_deadline(&md, cap);
        assert!(d >= now + Duration::from_millis(9_980) && d <= Instant::now() + cap);
        md.insert(metadata::GRPC_TIMEOUT, "300m".parse().expect("ascii"));
        let d = call_deadline(&md, cap);
        let left = d.saturating_duration_since(now);
        assert!(
            left >= Duration::from_millis(280) && left < Duration::from_millis(300),
            "{left:?}"
        );
        md.insert(metadata::GRPC_TIMEOUT, "1H".parse().expect("ascii"));
        assert!(call_deadline(&md, cap) <= Instant::now() + cap);
    }

    #[test]
    fn bad_addresses_are_invalid_argument() {
        let err = WorkerClient::new(
            WorkerId::parse("w1").expect("id"),
            "http://bad host:1",
            signer(),
            "heist",
            Duration::from_secs(30),
            &tuning(),
        )
        .err()
        .expect("refused");
        assert_eq!(Status::from(err).code(), Code::InvalidArgument);
    }
}
