//! heist.v1.WorkerControl: the control stream each worker keeps open.
//!
//! The join token is checked (in constant time) before anything else. The first message must be
//! `register`, carrying a proof of the worker's key ([`crate::worker_keys`]): a registration for
//! an id bound to another key is PERMISSION_DENIED and logged with both peers; the first reply is `accepted`, followed by an `evict` when the worker holds
//! sessions the coordinator no longer has open. The catalogue and capacity pass
//! [`crate::catalogue`] first. A named task then reads heartbeats and
//! `going_away` until the stream ends or the coordinator shuts down, and finally reports the
//! disconnect to the registry under the registration's epoch.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use heist_proto::{
    credential::KeyShare,
    errors,
    ids::WorkerId,
    tls::CertificateDer,
    token::key_id,
    v1::{
        Accepted, CoordinatorMessage, Evict, Register, RetiredKey, Worker, WorkerMessage,
        WorkerState, coordinator_message, worker_control_server::WorkerControl, worker_message,
    },
};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug, info, info_span, instrument, warn};

use crate::{
    app::App,
    auth, catalogue,
    error::Error,
    registry::{Catalogue, Registration},
    store::Store,
    worker_certs,
    worker_client::{ChannelTuning, WorkerClient, credential_audience, normalise_address},
    worker_keys::Enrolment,
};

/// Buffered coordinator -> worker messages per stream.
const COMMAND_BUFFER: usize = 32;

/// WorkerControl handlers.
pub struct ControlApi {
    app: Arc<App>,
}

impl ControlApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl WorkerControl for ControlApi {
    type JoinStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    #[instrument(skip_all, fields(worker_id))]
    async fn join(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let peer = request.remote_addr();
        let certs = request.peer_certs();
        if let Err(err) = auth::check_join_token(&self.app.config.join_token, request.metadata()) {
            warn!(?peer, "worker refused: join token missing or wrong");
            let detail = format!("peer={peer:?} join token missing or wrong");
            self.app.audit.record("worker.refused", "", &detail);
            return Err(err.into());
        }
        let mut inbound = request.into_inner();
        let register = first_register(&self.app, &mut inbound).await?;
        tracing::Span::current().record("worker_id", register.worker_id.as_str());
        join(
            &self.app,
            register,
            inbound,
            peer,
            certs.as_deref().map(Vec::as_slice),
        )
        .await
        .map(Response::new)
        .map_err(Status::from)
    }
}

/// The first message, which must be `register` and must arrive within one lease.
async fn first_register(
    app: &App,
    inbound: &mut Streaming<WorkerMessage>,
) -> Result<Register, Error> {
    let first = tokio::time::timeout(app.config.lease_ttl, inbound.message())
        .await
        .map_err(|_| {
            Error::Status(Status::deadline_exceeded(
                "no register message within the lease: send register first",
            ))
        })??;
    match first.and_then(|m| m.msg) {
        Some(worker_message::Msg::Register(register)) => Ok(register),
        _ => Err(Error::Status(errors::invalid_argument(
            "register",
            "the first message on WorkerControl/Join must be register",
        ))),
    }
}

/// Registers the worker, reconciles its sessions and starts the stream task.
async fn join(
    app: &Arc<App>,
    mut reg: Register,
    inbound: Streaming<WorkerMessage>,
    peer: Option<SocketAddr>,
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<ReceiverStream<Result<CoordinatorMessage, Status>>, Error> {
    if app.shutdown.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    let id = WorkerId::parse(reg.worker_id.as_str())?;
    let enrolment = check_identity(app, &id, &reg, peer, certs)?;
    // The call key: the worker's share is proven with its identity, ours is fresh.
    let share = KeyShare::generate()
        .map_err(|e| Error::Status(Status::internal(format!("cannot make a key share: {e}"))))?;
    let share_public = share.public();
    let call_key = share
        .agree_as_coordinator(&reg.credential_key_share, id.as_str())
        .map_err(|e| {
            Error::Status(errors::invalid_argument(
                "credential_key_share",
                format!("{e}: upgrade the worker"),
            ))
        })?;
    let tools = catalogue::vet_tools(&app.config, &id, std::mem::take(&mut reg.tools))?;
    reg.capacity = catalogue::vet_capacity(&app.config, &id, reg.capacity);
    if reg.capacity == 0 {
        return Err(Error::Status(errors::invalid_argument(
            "capacity",
            "capacity must be at least 1: set MAX_SESSIONS",
        )));
    }
    let client = match app.registry.client(&id) {
        Some(client) if client.address() == normalise_address(&reg.advertise_addr) => client,
        _ => Arc::new(WorkerClient::new(
            id.clone(),
            &reg.advertise_addr,
            app.keys.clone(),
            &app.config.token_issuer,
            app.config.worker_credential_ttl,
            &ChannelTuning::from(&app.config).with_tls(app.tls.clone()),
        )?),
    };
    let now = SystemTime::now();
    // READY (or DRAINING) comes with the first heartbeat; see WORKER_STATE_JOINING.
    let state = WorkerState::Joining;
    let record = Worker {
        id: id.to_string(),
        address: client.address().to_owned(),
        capacity: reg.capacity,
        active_sessions: 0,
        labels: reg.labels,
        state: state as i32,
        version: reg.version,
        tools: tools.iter().map(|t| t.name.clone()).collect(),
        sandbox_backend: reg.sandbox_backend,
        isolation: reg.isolation,
        registered_at: Some(now.into()),
        last_seen_at: Some(now.into()),
        in_flight_calls: 0,
        coordinator_key_id: String::new(),
    };

    let (tx, rx) = mpsc::channel(COMMAND_BUFFER);
    let accepted = accepted(app, &id, Some(share_public));
    client.worker_has_key(&key_id(&accepted.coordinator_public_key));
    // Credentials made with it may reach the worker before this Accepted: it waits for it.
    client.set_call_key(call_key);
    // Queued before the registry can hand the sender to anyone else, so it is always first.
    let _ = tx.try_send(Ok(command(coordinator_message::Msg::Accepted(accepted))));

    Store::put(&app.store.workers, id.as_str().as_bytes(), &record)?;
    let epoch = app.registry.register(
        &id,
        Registration {
            record,
            draining: reg.draining,
            catalogue: Arc::new(Catalogue::new(tools).with_agents(reg.agents)),
            client,
            commands: tx.clone(),
        },
        Instant::now(),
    );
    let outcome = app.sessions.reconcile(&id, &reg.open_session_ids)?;
    // Also makes a first enrolment's key binding durable before the worker is accepted.
    app.store.flush().await?;
    if !outcome.evict.is_empty() {
        let detail = format!("sessions={}", outcome.evict.join(","));
        app.audit
            .record("worker.evicted_sessions", id.as_str(), &detail);
        let evict = Evict {
            session_ids: outcome.evict.clone(),
        };
        let _ = tx.try_send(Ok(command(coordinator_message::Msg::Evict(evict))));
    }
    info!(
        worker_id = %id,
        ?peer,
        epoch,
        ?enrolment,
        capacity = reg.capacity,
        draining = reg.draining,
        attached = outcome.attached,
        failed = outcome.failed,
        evicted = outcome.evict.len(),
        "worker registered"
    );
    let detail = format!("peer={peer:?} enrolment={enrolment:?} epoch={epoch}");
    app.audit.record("worker.joined", id.as_str(), &detail);

    let task_app = app.clone();
    app.tasks.spawn(
        async move { run_stream(&task_app, &id, epoch, inbound, tx).await }
            .instrument(info_span!("worker-stream", worker_id = %reg.worker_id, epoch)),
    );
    Ok(ReceiverStream::new(rx))
}

/// Checks the connection's client certificate under mTLS ([`worker_certs`]), then the
/// registration's identity proof against the key bound to the id (binding it on a
/// first enrolment). A registration proving another key (or another id's certificate) is
/// refused, audited and logged with both peers; one proving the same key while the id is connected is the worker reconnecting over a
/// stream the coordinator has not seen break yet: the old stream is ended with a status saying
/// why (never dropped silently) and the new one takes over.
fn check_identity(
    app: &App,
    id: &WorkerId,
    reg: &Register,
    peer: Option<SocketAddr>,
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<Enrolment, Error> {
    let live = app.registry.is_connected(id);
    let live_address = app
        .registry
        .client(id)
        .map(|c| c.address().to_owned())
        .unwrap_or_default();
    // The certificate first: a worker without its own certificate never binds a key.
    let enrolment = worker_certs::check(app, id, certs)
        .and_then(|()| app.worker_keys.check_register(id, reg))
        .inspect_err(|err| {
            warn!(
                worker_id = %id,
                ?peer,
                claimed_address = %reg.advertise_addr,
                live,
                %live_address,
                error = %err,
                "worker registration refused: identity not proven"
            );
            let detail = format!("peer={peer:?} {err}");
            app.audit.record("worker.refused", id.as_str(), &detail);
        })?;
    if live {
        warn!(
            worker_id = %id,
            ?peer,
            claimed_address = %reg.advertise_addr,
            %live_address,
            "worker re-registered with its key while its previous stream was open: the previous \
             stream is ended"
        );
        app.registry.end_stream(
            id,
            Status::already_exists(format!(
                "worker {id} registered again from {peer:?} with this worker's key: this stream \
                 is superseded"
            )),
        );
    }
    Ok(enrolment)
}

/// Reads the worker's messages until its stream ends or the coordinator shuts down.
async fn run_stream(
    app: &App,
    id: &WorkerId,
    epoch: u64,
    mut inbound: Streaming<WorkerMessage>,
    tx: mpsc::Sender<Result<CoordinatorMessage, Status>>,
) {
    loop {
        let msg = tokio::select! {
            () = app.shutdown.cancelled() => {
                let _ = tx.try_send(Err(Error::ShuttingDown.into()));
                break;
            }
            msg = inbound.message() => msg,
        };
        match msg {
            Ok(Some(WorkerMessage { msg: Some(msg) })) => handle(app, id, epoch, msg),
            Ok(Some(WorkerMessage { msg: None })) => debug!("empty worker message ignored"),
            Ok(None) => {
                debug!("worker closed its stream");
                break;
            }
            Err(status) => {
                debug!(error = %status.message(), "worker stream failed");
                break;
            }
        }
    }
    if let Some(record) = app.registry.disconnected(id, epoch) {
        warn!(
            state = ?WorkerState::try_from(record.state).unwrap_or(WorkerState::Unspecified),
            "worker disconnected"
        );
        app.persist_workers(&[record]);
    }
}

/// The Accepted for worker `id`: lease, heartbeat, the keys its grants are signed with, and
/// (at registration) our share of its call key.
fn accepted(app: &App, id: &WorkerId, share: Option<[u8; 32]>) -> Accepted {
    let mut current = Vec::new();
    let mut retired_keys = Vec::new();
    for key in app.keys.accepted() {
        match key.retired_until {
            None => current = key.public_key,
            Some(until) => retired_keys.push(RetiredKey {
                public_key: key.public_key,
                accepted_until_unix_s: until,
            }),
        }
    }
    Accepted {
        lease_ttl_ms: u64::try_from(app.config.lease_ttl.as_millis()).unwrap_or(u64::MAX),
        heartbeat_interval_ms: u64::try_from(app.config.heartbeat_interval.as_millis())
            .unwrap_or(u64::MAX),
        coordinator_public_key: current,
        credential_audience: credential_audience(id),
        credential_issuer: app.config.token_issuer.clone(),
        retired_keys,
        credential_key_share: share.map(|s| s.to_vec()).unwrap_or_default(),
        credential_ttl_ms: u64::try_from(app.config.worker_credential_ttl.as_millis())
            .unwrap_or(u64::MAX),
    }
}

/// Sends every connected worker a new Accepted with the current key set (after a key
/// rotation). A worker installs it and says so in its next heartbeat; until then its
/// credentials stay signed with the key it had ([`WorkerClient::worker_has_key`]).
pub fn announce_keys(app: &App) -> usize {
    let mut sent = 0;
    for worker in app.registry.list() {
        let Ok(id) = WorkerId::parse(worker.id.as_str()) else {
            continue;
        };
        if app.registry.is_connected(&id) {
            let msg = command(coordinator_message::Msg::Accepted(accepted(app, &id, None)));
            app.registry.send(&id, msg);
            sent += 1;
        }
    }
    sent
}

fn handle(app: &App, id: &WorkerId, epoch: u64, msg: worker_message::Msg) {
    match msg {
        worker_message::Msg::Heartbeat(hb) => {
            if !hb.coordinator_key_id.is_empty()
                && let Some(client) = app.registry.client(id)
            {
                client.worker_has_key(&hb.coordinator_key_id);
            }
            if let Some(record) = app.registry.heartbeat(id, epoch, &hb, Instant::now()) {
                let state = WorkerState::try_from(record.state).unwrap_or_default();
                info!(?state, "worker ready to serve");
                app.persist_workers(&[record]);
            }
        }
        worker_message::Msg::GoingAway(bye) => {
            info!(reason = %bye.reason, "worker going away: draining");
            if let Some(record) = app.registry.going_away(id, epoch) {
                app.persist_workers(&[record]);
            }
        }
        worker_message::Msg::Register(_) => {
            warn!("register on an open stream ignored: open a new stream to re-register");
        }
    }
}

fn command(msg: coordinator_message::Msg) -> CoordinatorMessage {
    CoordinatorMessage { msg: Some(msg) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use heist_proto::metadata;
    use tonic::metadata::MetadataMap;

    use crate::auth::check_join_token;

    #[test]
    fn join_token_must_match_exactly() {
        let mut md = MetadataMap::new();
        assert!(check_join_token("sekrit", &md).is_err());
        md.insert(metadata::JOIN_TOKEN, "sekri".parse().expect("ascii"));
        assert!(check_join_token("sekrit", &md).is_err());
        md.insert(metadata::JOIN_TOKEN, "sekrit".parse().expect("ascii"));
        assert!(check_join_token("sekrit", &md).is_ok());
        let st = Status::from(check_join_token("other", &md).expect_err("wrong"));
        assert_eq!(st.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            errors::reason_of(&st).as_deref(),
            Some(errors::reason::JOIN_TOKEN_INVALID)
        );
    }
}
