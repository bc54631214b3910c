//! [`serve`]: opens the state, serves every gRPC service and the HTTP routes ([`crate::web`])
//! on one listener, and shuts down cleanly.

use std::{future::Future, sync::Arc};

use heist_proto::{
    FILE_DESCRIPTOR_SET,
    space::Writability,
    tls::ClientAuth,
    v1::{
        agent_service_server::AgentServiceServer, audit_service_server::AuditServiceServer,
        auth_service_server::AuthServiceServer, blob_service_server::BlobServiceServer,
        checkpoint_service_server::CheckpointServiceServer,
        client_service_server::ClientServiceServer, cluster_service_server::ClusterServiceServer,
        heist_service_server::HeistServiceServer, session_service_server::SessionServiceServer,
        tool_service_server::ToolServiceServer, worker_control_server::WorkerControlServer,
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    service::Routes,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::{
    api::{
        agent::AgentApi, audit::AuditApi, auth::AuthApi, blob::BlobApi, checkpoint::CheckpointApi,
        client::ClientApi, cluster::ClusterApi, heist::HeistApi, session::SessionApi,
        tool::ToolApi,
    },
    app::App,
    auth_layer::AuthLayer,
    config::Config,
    control::ControlApi,
    drain::{Calls, DrainLayer},
    error::Error,
    limits::LimitLayer,
    web,
};

/// Services whose health is reported by name (plus "" for the whole server).
const SERVICES: &[&str] = &[
    "",
    "heist.v1.AuthService",
    "heist.v1.ClientService",
    "heist.v1.ClusterService",
    "heist.v1.SessionService",
    "heist.v1.ToolService",
    "heist.v1.WorkerControl",
    "heist.v1.CheckpointService",
    "heist.v1.BlobService",
    "heist.v1.AgentService",
    "heist.v1.HeistService",
];

/// Runs the coordinator on `listener` until `shutdown` resolves.
///
/// Opens the store under `config.data_dir`, serves every heist.v1 service plus grpc.health.v1
/// and server reflection, and on shutdown reports NOT_SERVING, stops accepting, drains
/// in-flight calls, then closes worker streams, waits for its tasks and flushes the store
/// before returning. The data
/// directory can be served again once this returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the address of", "the listener", e))?;
    let app = App::open(config).await?;
    let result = run(&app, listener, local_addr, shutdown).await;
    app.shutdown.cancel();
    app.tasks.close();
    app.tasks.wait().await;
    app.audit.settle().await;
    if let Err(err) = app.store.flush().await {
        // Every write acknowledged to a client was flushed before its answer, so what this
        // flush loses was never acknowledged (worker records, sweeps): a full disk must not
        // turn a clean stop into a failed one.
        error!(
            %err,
            path = %app.store.reserve.path().display(),
            "the final flush of the store failed: unacknowledged background writes are lost"
        );
    }
    drop(app);
    result?;
    info!("coordinator stopped");
    Ok(())
}

async fn run(
    app: &Arc<App>,
    listener: TcpListener,
    local_addr: std::net::SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let verifier = app.keys.client_verifier();
    let max = app.config.max_message_bytes;
    let calls = Calls::default();
    // One router for the gRPC services and the HTTP routes: the one place routes are listed.
    let grpc = Routes::new(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            AuthServiceServer::new(AuthApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AuditServiceServer::new(AuditApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ClientServiceServer::new(ClientApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ClusterServiceServer::new(ClusterApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            SessionServiceServer::new(SessionApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ToolServiceServer::new(ToolApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            CheckpointServiceServer::new(CheckpointApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AgentServiceServer::new(AgentApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            HeistServiceServer::new(HeistApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            BlobServiceServer::new(BlobApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            WorkerControlServer::new(ControlApi::new(app.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        );
    let routes = Routes::from(grpc.into_axum_router().merge(web::routes(app.clone())));
    let router = Server::builder()
        // gRPC needs HTTP/2; the HTTP routes are also served to HTTP/1.1 clients (probes, curl).
        .accept_http1(true)
        // Larger HTTP/2 windows: blob uploads stream megabytes per call.
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .layer(tower::util::option_layer(app.config.telemetry.then(|| {
            heist_proto::trace::RpcLayer::new(app.metrics.rpc.clone())
        })))
        .layer(DrainLayer::new(calls.clone()))
        .layer(AuthLayer::new(verifier, app.auth.states()).with_mcp(app.config.mcp.clone()))
        // Inside the auth layer: limits key on the principal it verified.
        .layer(LimitLayer::new(
            app.config.limits,
            app.metrics.limited_calls.clone(),
        ))
        .layer(crate::decode_status::DecodeStatusLayer)
        .add_routes(routes);

    app.spawn_background();
    let stopping = CancellationToken::new();
    // Held while health is written, so the store follower never writes after shutdown did.
    let health_lock = Arc::new(tokio::sync::Mutex::new(()));
    let signal = {
        let (app, health, stopping) = (app.clone(), health.clone(), stopping.clone());
        let health_lock = Arc::clone(&health_lock);
        async move {
            shutdown.await;
            stopping.cancel();
            info!(
                in_flight = calls.count(),
                "shutting down: draining in-flight calls"
            );
            let writing = health_lock.lock().await;
            set_health(&health, ServingStatus::NotServing).await;
            drop(writing);
            // The server stops accepting once this future returns; the worker streams (and
            // background tasks) end only after the calls in flight, which need them, are done.
            let drain_timeout = app.config.drain_timeout;
            tokio::spawn(
                async move {
                    if tokio::time::timeout(drain_timeout, calls.wait_idle())
                        .await
                        .is_err()
                    {
                        warn!(
                            in_flight = calls.count(),
                            "drain timeout reached: closing worker streams under running calls"
                        );
                    }
                    app.shutdown.cancel();
                }
                .instrument(info_span!("drain")),
            );
        }
    };
    // Built before health says SERVING: a TLS setting rustls refuses fails the start.
    let tls = match &app.tls {
        Some(tls) => Some((
            tls.server_config(ClientAuth::Optional)
                .map_err(|e| Error::InvalidConfig(e.to_string()))?,
            tls.handshake_timeout(),
        )),
        None => None,
    };
    set_health(&health, ServingStatus::Serving).await;
    app.tasks.spawn(
        follow_store(app.clone(), health.clone(), health_lock, stopping)
            .instrument(info_span!("store-health")),
    );
    let mtls = app.tls.as_ref().is_some_and(|t| t.has_ca());
    info!(addr = %local_addr, tls = tls.is_some(), mtls, "coordinator listening");
    let served = match tls {
        // With a certificate, TLS only; clients may present a certificate, which must be
        // signed by the cluster CA (workers do; the worker RPCs check it).
        Some((config, handshake_timeout)) => {
            router
                .serve_with_incoming_shutdown(
                    heist_proto::tls::incoming(listener, config, handshake_timeout),
                    signal,
                )
                .await
        }
        None => {
            heist_proto::tls::warn_if_plaintext_exposed(local_addr);
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
    };
    served.map_err(Error::from)
}

/// Health follows whether the store takes writes: NOT_SERVING while it cannot (disk below the
/// reserve, a failed write), SERVING again once the reserve's monitor finds it writable. Ends
/// when shutdown begins (which owns health from then on).
async fn follow_store(
    app: Arc<App>,
    health: HealthReporter,
    lock: Arc<tokio::sync::Mutex<()>>,
    stopping: CancellationToken,
) {
    let mut states = app.store.reserve.subscribe();
    loop {
        let writable = *states.borrow_and_update() == Writability::Writable;
        let status = if writable {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        {
            let _writing = lock.lock().await;
            if stopping.is_cancelled() {
                return;
            }
            set_health(&health, status).await;
        }
        tokio::select! {
            () = stopping.cancelled() => return,
            () = app.shutdown.cancelled() => return,
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use heist_proto::{
        errors::{reason, reason_of},
        v1::{
            self, CoordinatorMessage, WorkerMessage, WorkerState,
            auth_service_client::AuthServiceClient, cluster_service_client::ClusterServiceClient,
            coordinator_message, worker_control_client::WorkerControlClient, worker_message,
        },
    };
    use tokio::{sync::mpsc, task::JoinHandle};
    use tokio_stream::wrappers::ReceiverStream;
    use tokio_util::sync::CancellationToken;
    use tonic::{Code, Request, Streaming, transport::Channel};

    use super::*;

    const JOIN: &str = "join-token-for-tests";
    const SECRET: &str = "admin-secret-for-tests";

    struct Running {
        url: String,
        stop: CancellationToken,
        task: JoinHandle<Result<(), Error>>,
    }

    impl Running {
        async fn start(data_dir: &std::path::Path) -> Self {
            let config = Config {
                data_dir: data_dir.to_path_buf(),
                join_token: JOIN.to_owned(),
                admin_client_secret: SECRET.to_owned(),
                lease_ttl: Duration::from_millis(400),
                heartbeat_interval: Duration::from_millis(100),
                ..Config::default()
            };
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            let stop = CancellationToken::new();
            let task = tokio::spawn(serve(listener, config, stop.clone().cancelled_owned()));
            Self { url, stop, task }
        }

        async fn channel(&self) -> Channel {
            Channel::from_shared(self.url.clone())
                .expect("url")
                .connect()
                .await
                .expect("connect")
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.expect("join").expect("serve");
        }
    }

    /// Polls `check` every few milliseconds until it holds, for at most ten seconds.
    async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut check: F) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn worker_state(ch: Channel, token: &str, id: &str) -> Option<WorkerState> {
        let mut req = Request::new(v1::ListWorkersRequest {});
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        let workers = ClusterServiceClient::new(ch)
            .list_workers(req)
            .await
            .ok()?
            .into_inner();
        workers
            .workers
            .iter()
            .find(|w| w.id == id)
            .and_then(|w| WorkerState::try_from(w.state).ok())
    }

    async fn token(ch: Channel) -> String {
        AuthServiceClient::new(ch)
            .issue_token(v1::IssueTokenRequest {
                client_id: "admin".to_owned(),
                client_secret: SECRET.to_owned(),
                scopes: vec![],
            })
            .await
            .expect("token")
            .into_inner()
            .access_token
    }

    /// Opens a control stream for `id` and returns the sender of worker messages and the replies.
    async fn join(
        ch: Channel,
        id: &str,
        first: Option<worker_message::Msg>,
    ) -> Result<(mpsc::Sender<WorkerMessage>, Streaming<CoordinatorMessage>), tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        let first = first.unwrap_or_else(|| {
            let mut register = v1::Register {
                worker_id: id.to_owned(),
                advertise_addr: "http://127.0.0.1:1".to_owned(),
                capacity: 2,
                open_session_ids: vec!["s-stale".to_owned()],
                credential_key_share: heist_proto::credential::KeyShare::generate()
                    .expect("share")
                    .public()
                    .to_vec(),
                ..v1::Register::default()
            };
            heist_proto::identity::WorkerKey::from_seed(&[5; 32]).sign_register(&mut register);
            worker_message::Msg::Register(register)
        });
        tx.send(WorkerMessage { msg: Some(first) })
            .await
            .expect("queue");
        let mut req = Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("x-heist-join-token", JOIN.parse().expect("ascii"));
        let replies = WorkerControlClient::new(ch).join(req).await?.into_inner();
        Ok((tx, replies))
    }

    #[tokio::test]
    async fn control_stream_lifecycle_and_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = Running::start(dir.path()).await;
        let ch = server.channel().await;
        let token = token(ch.clone()).await;

        // Accepted first, then an eviction of the session the coordinator does not know.
        let (tx, mut replies) = join(ch.clone(), "w1", None).await.expect("join");
        let first = replies.message().await.expect("reply").expect("accepted");
        let Some(coordinator_message::Msg::Accepted(acc)) = first.msg else {
            panic!("first reply must be accepted: {first:?}");
        };
        assert_eq!(acc.credential_audience, "heist-worker:w1");
        assert_eq!(acc.lease_ttl_ms, 400);
        assert_eq!(acc.coordinator_public_key.len(), 32);
        let second = replies.message().await.expect("reply").expect("evict");
        let Some(coordinator_message::Msg::Evict(evict)) = second.msg else {
            panic!("expected evict: {second:?}");
        };
        assert_eq!(evict.session_ids, vec!["s-stale".to_owned()]);
        // JOINING until the first heartbeat says the worker can verify credentials.
        assert_eq!(
            worker_state(ch.clone(), &token, "w1").await,
            Some(WorkerState::Joining)
        );
        tx.send(WorkerMessage {
            msg: Some(worker_message::Msg::Heartbeat(v1::Heartbeat::default())),
        })
        .await
        .expect("send");
        eventually("w1 ready after its first heartbeat", async || {
            worker_state(ch.clone(), &token, "w1").await == Some(WorkerState::Ready)
        })
        .await;

        // The stream breaks: SUSPECT at once, LOST when the lease runs out.
        drop(tx);
        drop(replies);
        eventually("w1 suspect or lost", async || {
            matches!(
                worker_state(ch.clone(), &token, "w1").await,
                Some(WorkerState::Suspect | WorkerState::Lost)
            )
        })
        .await;
        eventually("w1 lost", async || {
            worker_state(ch.clone(), &token, "w1").await == Some(WorkerState::Lost)
        })
        .await;

        // GoingAway then a closed stream: GONE.
        let (tx, mut replies) = join(ch.clone(), "w2", None).await.expect("join");
        replies.message().await.expect("reply").expect("accepted");
        tx.send(WorkerMessage {
            msg: Some(worker_message::Msg::GoingAway(v1::GoingAway {
                reason: "test".to_owned(),
            })),
        })
        .await
        .expect("send");
        eventually("w2 draining", async || {
            worker_state(ch.clone(), &token, "w2").await == Some(WorkerState::Draining)
        })
        .await;
        drop(tx);
        eventually("w2 gone", async || {
            worker_state(ch.clone(), &token, "w2").await == Some(WorkerState::Gone)
        })
        .await;

        // A stream that does not start with register is refused.
        let heartbeat = worker_message::Msg::Heartbeat(v1::Heartbeat::default());
        let err = match join(ch.clone(), "w3", Some(heartbeat)).await {
            Ok((_tx, mut replies)) => replies.message().await.expect_err("refused"),
            Err(status) => status,
        };
        assert_eq!(err.code(), Code::InvalidArgument);

        // A live worker stream does not hold up shutdown; the data dir reopens afterwards and
        // the token signing key survived.
        let (_tx, mut replies) = join(ch.clone(), "w4", None).await.expect("join");
        replies.message().await.expect("reply").expect("accepted");
        replies.message().await.expect("reply").expect("evict");
        server.stop().await;
        let err = replies
            .message()
            .await
            .expect_err("stream ends with the server");
        assert_eq!(reason_of(&err).as_deref(), Some(reason::NOT_SERVING));

        let server = Running::start(dir.path()).await;
        let ch = server.channel().await;
        eventually("restarted server answers", async || {
            worker_state(ch.clone(), &token, "w4").await.is_some()
        })
        .await;
        assert_eq!(
            worker_state(ch.clone(), &token, "w2").await,
            Some(WorkerState::Gone)
        );
        eventually("w4 lost after the restart", async || {
            worker_state(ch.clone(), &token, "w4").await == Some(WorkerState::Lost)
        })
        .await;
        server.stop().await;
    }
}
