//! The control stream: register with the coordinator, heartbeat, obey Drain and Evict, say
//! GoingAway on shutdown, and reconnect with capped exponential backoff when the stream breaks.
//!
//! Opening a stream goes through the [`Connector`] seam, so the loop (and its backoff sequence)
//! can be driven in tests with a fake coordinator and `tokio::time::pause()`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{StreamExt as _, future::BoxFuture, stream::BoxStream};
use heist_proto::{
    credential::KeyShare,
    errors,
    identity::WorkerKey,
    ids::SessionId,
    metadata,
    v1::{
        CoordinatorMessage, GoingAway, Heartbeat, Register, WorkerMessage, coordinator_message,
        worker_control_client::WorkerControlClient, worker_message,
    },
};
use tokio::{
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status, metadata::AsciiMetadataValue, transport::Endpoint};
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::{Config, Error, backoff::Backoff, lifecycle::Leave, state::State};

/// How long the coordinator has to answer Register with Accepted.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat period when the coordinator does not set one.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// Shortest heartbeat period honoured.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
/// How long a closing worker waits for the coordinator to end the stream.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// An open control stream.
pub struct ControlStream {
    /// Messages to the coordinator.
    pub outbound: mpsc::Sender<WorkerMessage>,
    /// Messages from the coordinator.
    pub inbound: BoxStream<'static, Result<CoordinatorMessage, Status>>,
}

/// Opens control streams to a coordinator.
pub trait Connector: Send + Sync + 'static {
    /// Opens a stream whose first outbound message is `register`.
    fn connect(&self, register: WorkerMessage) -> BoxFuture<'_, Result<ControlStream, Status>>;
}

/// The real connector: a fresh HTTP/2 connection per attempt, the join token in metadata.
pub struct GrpcConnector {
    endpoint: Endpoint,
    join_token: AsciiMetadataValue,
    max_message_bytes: usize,
}

impl GrpcConnector {
    /// A connector for `config.coordinator_addr`.
    pub fn new(config: &Config) -> Result<Self, Error> {
        let endpoint = config
            .coordinator_endpoint()?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let join_token = config
            .join_token
            .parse()
            .map_err(|_| Error::Config("HEIST_JOIN_TOKEN must be printable ASCII".to_owned()))?;
        Ok(Self {
            endpoint,
            join_token,
            max_message_bytes: config.max_message_bytes,
        })
    }
}

impl Connector for GrpcConnector {
    fn connect(&self, register: WorkerMessage) -> BoxFuture<'_, Result<ControlStream, Status>> {
        Box::pin(async move {
            let channel = self.endpoint.connect().await.map_err(|e| {
                Status::unavailable(format!("cannot connect to the coordinator: {e}"))
            })?;
            let mut client = WorkerControlClient::new(channel)
                .max_decoding_message_size(self.max_message_bytes)
                .max_encoding_message_size(self.max_message_bytes);
            let (outbound, rx) = mpsc::channel(16);
            // Register is queued before the call so it is the stream's first message.
            outbound
                .send(register)
                .await
                .map_err(|_| Status::internal("control channel closed"))?;
            let mut request = Request::new(ReceiverStream::new(rx));
            request
                .metadata_mut()
                .insert(metadata::JOIN_TOKEN, self.join_token.clone());
            let inbound = client.join(request).await?.into_inner();
            Ok(ControlStream {
                outbound,
                inbound: inbound.boxed(),
            })
        })
    }
}

/// What the control loop needs besides the shared state.
pub(crate) struct ControlSettings {
    /// Address the coordinator dials for session calls.
    pub advertise_addr: String,
    /// MAX_SESSIONS.
    pub capacity: u32,
    /// Placement labels.
    pub labels: BTreeMap<String, String>,
    /// The worker's identity key, which signs every registration.
    pub key: Arc<WorkerKey>,
}

/// The control loop.
pub(crate) struct Control {
    state: Arc<State>,
    connector: Box<dyn Connector>,
    backoff: Backoff,
    settings: ControlSettings,
    going_away: watch::Receiver<Option<String>>,
    stop: CancellationToken,
}

enum Ended {
    /// `stop` fired; the stream was closed.
    Stopped,
    /// The stream failed; `accepted` says whether it got as far as Accepted.
    Failed { status: Status, accepted: bool },
}

impl Control {
    /// A control loop that reconnects with `backoff`, says GoingAway once `going_away` holds a
    /// reason, and ends when `stop` is cancelled.
    pub fn new(
        state: Arc<State>,
        connector: Box<dyn Connector>,
        backoff: Backoff,
        settings: ControlSettings,
        going_away: watch::Receiver<Option<String>>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            state,
            connector,
            backoff,
            settings,
            going_away,
            stop,
        }
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(mut self) {
        loop {
            let (status, accepted) = match KeyShare::generate() {
                Ok(share) => {
                    let register = self.register(&share);
                    self.state.auth.set_registering(true);
                    let connected = tokio::select! {
                        () = self.stop.cancelled() => return,
                        connected = self.connector.connect(register) => connected,
                    };
                    let ended = match connected {
                        Ok(stream) => match self.serve(stream, share).await {
                            Ended::Stopped => return,
                            Ended::Failed { status, accepted } => (status, accepted),
                        },
                        Err(status) => (status, false),
                    };
                    self.state.auth.set_registering(false);
                    ended
                }
                Err(e) => (
                    Status::internal(format!("cannot make a call-key share: {e}")),
                    false,
                ),
            };
            self.state.set_registered(false).await;
            if accepted {
                self.backoff.reset();
            }
            let delay = if is_join_rejection(&status) {
                error!(
                    code = ?status.code(),
                    message = status.message(),
                    "the coordinator refused this worker: check HEIST_JOIN_TOKEN, or the \
                     worker's key (HEIST_WORKER_KEY_FILE) if the message names its identity"
                );
                self.backoff.at_max()
            } else {
                warn!(
                    code = ?status.code(),
                    message = status.message(),
                    "control stream to the coordinator failed"
                );
                self.backoff.next_delay()
            };
            debug!(delay_ms = delay.as_millis(), "reconnecting after a delay");
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The Register for this attempt, offering `share` for the call key and signed with the
    /// worker's identity key.
    fn register(&self, share: &KeyShare) -> WorkerMessage {
        let state = &self.state;
        let draining = state.sessions.is_draining() || self.going_away.borrow().is_some();
        let mut register = Register {
            identity: None,
            credential_key_share: share.public().to_vec(),
            worker_id: state.worker_id.to_string(),
            advertise_addr: self.settings.advertise_addr.clone(),
            capacity: self.settings.capacity,
            labels: self.settings.labels.clone().into_iter().collect(),
            tools: state.tools.specs(),
            version: heist_proto::VERSION.to_owned(),
            sandbox_backend: state.sandbox.backend_name().to_owned(),
            isolation: state.sandbox.isolation(),
            agent_kinds: Vec::new(),
            agents: state
                .agents
                .as_ref()
                .map(|a| a.declared())
                .unwrap_or_default(),
            open_session_ids: state.sessions.ids(),
            draining,
        };
        self.settings.key.sign_register(&mut register);
        message(worker_message::Msg::Register(register))
    }

    /// Serves one stream until it fails or `stop` fires.
    async fn serve(&mut self, stream: ControlStream, share: KeyShare) -> Ended {
        let ControlStream {
            outbound,
            mut inbound,
        } = stream;
        let stop = self.stop.clone();
        let first = tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            first = tokio::time::timeout(ACCEPT_TIMEOUT, inbound.next()) => first,
        };
        let failed = |status| Ended::Failed {
            status,
            accepted: false,
        };
        let accepted = match first {
            Ok(Some(Ok(CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Accepted(accepted)),
            }))) => accepted,
            Ok(Some(Ok(other))) => {
                return failed(Status::internal(format!(
                    "the coordinator's first message was not Accepted: {other:?}"
                )));
            }
            Ok(Some(Err(status))) => return failed(status),
            Ok(None) => {
                return failed(Status::unavailable(
                    "the coordinator closed the control stream before accepting",
                ));
            }
            Err(_) => {
                return failed(Status::deadline_exceeded(
                    "the coordinator did not accept the registration in time",
                ));
            }
        };
        if accepted.coordinator_public_key.len() != 32 {
            return failed(Status::internal(format!(
                "Accepted carries a {}-byte public key; an Ed25519 key has 32",
                accepted.coordinator_public_key.len()
            )));
        }
        let call_key = match share.agree_as_worker(
            &accepted.credential_key_share,
            self.state.worker_id.as_str(),
        ) {
            Ok(key) => key,
            Err(e) => {
                return failed(Status::internal(format!(
                    "the coordinator's Accepted gives no call key ({e}): upgrade the coordinator"
                )));
            }
        };
        let key_changed = self.state.auth.install(&accepted);
        let call_key_id = call_key.id().to_owned();
        self.state
            .auth
            .install_call_key(call_key, Duration::from_millis(accepted.credential_ttl_ms));
        self.state.set_registered(true).await;
        info!(
            lease_ttl_ms = accepted.lease_ttl_ms,
            heartbeat_interval_ms = accepted.heartbeat_interval_ms,
            key_changed,
            call_key = %call_key_id,
            sessions = self.state.sessions.len(),
            "registered with the coordinator"
        );
        let broken = |what: &str| Ended::Failed {
            status: Status::unavailable(format!("the control stream closed while {what}")),
            accepted: true,
        };

        let mut said_going_away = false;
        let pending_reason = self.going_away.borrow_and_update().clone();
        if let Some(reason) = pending_reason {
            if outbound.send(going_away(reason)).await.is_err() {
                return broken("saying GoingAway");
            }
            said_going_away = true;
        }
        let period = heartbeat_period(accepted.heartbeat_interval_ms);
        // The first tick is immediate: that heartbeat tells the coordinator the key is installed
        // and calls may come (the worker is JOINING until then).
        let mut ticker = tokio::time::interval_at(Instant::now(), period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    // Both may have fired at once: a stop must never skip the goodbye, or the
                    // coordinator would take a clean shutdown for a crash.
                    let reason = self.going_away.borrow().clone();
                    if let (false, Some(reason)) = (said_going_away, reason) {
                        let _ = outbound.send(going_away(reason)).await;
                    }
                    close(outbound, inbound).await;
                    return Ended::Stopped;
                }
                changed = self.going_away.changed(), if !said_going_away => {
                    said_going_away = true;
                    let reason = self.going_away.borrow_and_update().clone();
                    if let (Ok(()), Some(reason)) = (changed, reason) {
                        info!(reason = %reason, "telling the coordinator this worker is going away");
                        if outbound.send(going_away(reason)).await.is_err() {
                            return broken("saying GoingAway");
                        }
                    }
                }
                _ = ticker.tick() => {
                    let heartbeat = Heartbeat {
                        active_sessions: u32::try_from(self.state.sessions.len()).unwrap_or(u32::MAX),
                        in_flight_calls: self.state.inflight.count(),
                        fs_pool_saturated: self.state.sandbox.fs_pool().saturated(),
                        coordinator_key_id: self.state.auth.current_kid(),
                    };
                    if outbound.send(message(worker_message::Msg::Heartbeat(heartbeat))).await.is_err() {
                        return broken("sending a heartbeat");
                    }
                }
                received = inbound.next() => match received {
                    Some(Ok(command)) => {
                        // A new key set (a rotation): say so at once, so the coordinator can
                        // sign this worker's credentials with the new key.
                        if self.obey(command).await {
                            ticker.reset_immediately();
                        }
                    }
                    Some(Err(status)) => return Ended::Failed { status, accepted: true },
                    None => return broken("waiting for commands"),
                },
            }
        }
    }

    /// Carries out a command; returns whether it installed a new key set.
    async fn obey(&self, command: CoordinatorMessage) -> bool {
        match command.msg {
            Some(coordinator_message::Msg::Drain(_)) => {
                info!("the coordinator asked this worker to drain: taking no new sessions");
                self.state.drain().await;
            }
            Some(coordinator_message::Msg::Evict(evict)) => {
                // Removing workspaces can take a while; heartbeats must keep flowing meanwhile.
                let state = Arc::clone(&self.state);
                self.state.tasks.spawn(
                    evict_sessions(state, evict.session_ids).instrument(info_span!("evict")),
                );
            }
            Some(coordinator_message::Msg::Accepted(accepted)) => {
                if accepted.coordinator_public_key.len() != 32 {
                    warn!("ignoring an Accepted whose public key is not 32 bytes");
                    return false;
                }
                if !accepted.credential_key_share.is_empty() {
                    warn!(
                        "ignoring a call-key share on the open stream: keys are agreed at registration"
                    );
                }
                let key_changed = self.state.auth.install(&accepted);
                info!(key_changed, kid = %self.state.auth.current_kid(), "the coordinator sent its keys again");
                return key_changed;
            }
            None => debug!("ignoring an empty coordinator message"),
        }
        false
    }
}

async fn evict_sessions(state: Arc<State>, ids: Vec<String>) {
    for raw in ids {
        let Ok(id) = SessionId::parse(raw.as_str()) else {
            warn!(session_id = %raw, "the coordinator asked to evict a malformed session id");
            continue;
        };
        if let Err(err) = state.leave_session(&id, Leave::Evict).await {
            warn!(session_id = %id, error = %err, "cannot evict session");
        }
    }
}

/// Ends the stream from our side and gives the coordinator a moment to end its side.
async fn close(
    outbound: mpsc::Sender<WorkerMessage>,
    mut inbound: BoxStream<'static, Result<CoordinatorMessage, Status>>,
) {
    drop(outbound);
    let drained = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = inbound.next().await {}
    })
    .await;
    if drained.is_err() {
        debug!("the coordinator did not close the control stream; dropping it");
    }
}

fn message(msg: worker_message::Msg) -> WorkerMessage {
    WorkerMessage { msg: Some(msg) }
}

fn going_away(reason: String) -> WorkerMessage {
    message(worker_message::Msg::GoingAway(GoingAway { reason }))
}

fn heartbeat_period(interval_ms: u64) -> Duration {
    if interval_ms == 0 {
        DEFAULT_HEARTBEAT
    } else {
        Duration::from_millis(interval_ms).max(MIN_HEARTBEAT)
    }
}

/// A refusal that retrying soon will not fix: the join token is wrong.
fn is_join_rejection(status: &Status) -> bool {
    status.code() == Code::Unauthenticated
        || status.code() == Code::PermissionDenied
        || errors::reason_of(status).as_deref() == Some(errors::reason::JOIN_TOKEN_INVALID)
}

#[cfg(test)]
mod tests;
