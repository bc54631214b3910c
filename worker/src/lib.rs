//! heist worker: session workspaces and the tools that run in them.
//!
//! A worker serves `heist.v1.WorkerService` (plus grpc.health.v1, reflection, and `/healthz` and
//! `/readyz` over HTTP on the same port: `web`) for the coordinator, and keeps one control stream open to it. The map:
//!
//! - [`config`]: [`Config`] with its defaults and `validate()`.
//! - `control`: the control stream (register, heartbeat, Drain/Evict, GoingAway, reconnect with
//!   `backoff`); its `Connector` seam makes it testable without a coordinator.
//! - `service` / `state`: thin gRPC handlers and the operations behind them.
//! - `auth`: verifying the coordinator-signed credential on every call.
//! - [`sessions`]: `BASE_WORKSPACE/<session id>/` directories, adopted again after a restart.
//! - [`tools`]: the tool trait, schema validation, and echo, calc, fs.*, exec and run.python.
//! - [`sandbox`]: running commands isolated (the `heist-sandbox` helper and its backend);
//!   [`quota`]: per-session quotas and workspace usage; `streaming`: CallToolStream.
//! - [`checkpoint`]: workspace capture (stat cache, BLAKE3, upload of missing blobs) and
//!   restore (staging tree, atomic swap), with a local blob cache.
//! - `inflight`: counting calls so shutdown can drain them.
//! - `applied`: the request ids this worker applied, with their results, in its own small sled
//!   store (`HEIST_STATE_DIR`), so a retried call replays instead of applying twice.
//! - [`metrics`]: the Prometheus metrics on `/metrics`; every call gets a span (parented by the
//!   coordinator's `traceparent`) and RPC metrics from [`heist_proto::trace::RpcLayer`].
//! - [`agent`] / [`model`]: the turn loop and the model gateway; `turns`: RunTurn and
//!   CancelTurn (the registry of turns, grants, agent state files).
//!
//! Shutdown: when the shutdown future fires the worker stops taking sessions, tells the
//! coordinator GoingAway, keeps serving until no call is in flight (or `drain_timeout`), then
//! closes the control stream and stops the server.

pub mod agent;
mod applied;
mod auth;
mod backoff;
pub mod checkpoint;
pub mod config;
mod control;
pub mod diskfs;
pub mod engine_gate;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod inflight;
mod lifecycle;
pub mod metrics;
pub mod model;
pub mod quota;
pub mod sandbox;
mod service;
pub mod sessions;
pub mod settings;
mod state;
mod streaming;
pub mod tools;
mod turns;
mod web;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use heist_proto::{
    identity::WorkerKey, ids::WorkerId, v1::worker_service_server::WorkerServiceServer,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic::{
    service::Routes,
    transport::{Server, server::TcpIncoming},
};
use tracing::{Instrument as _, info, info_span, warn};

pub use config::{Config, parse_labels};
pub use error::Error;

use crate::{
    backoff::Backoff,
    control::{Control, ControlSettings, GrpcConnector},
    service::WorkerApi,
    sessions::Sessions,
    state::State,
    tools::{Limits, Registry},
};

/// Reason sent in GoingAway when the shutdown future fires.
const SHUTDOWN_REASON: &str = "shutdown requested";
/// How long connections may stay open after the drain before they are dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Runs a worker on `listener` until `shutdown` resolves, then drains and returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the listener's address", e))?;
    let tls = config
        .tls
        .load()
        .map_err(|e| Error::Config(e.to_string()))?;
    let advertise_addr = config
        .advertise_addr
        .clone()
        .unwrap_or_else(|| default_advertise_addr(local_addr, tls.is_some()));
    let worker_id = WorkerId::parse(config.worker_id.as_str())
        .map_err(|s| Error::Config(format!("WORKER_ID: {}", s.message())))?;

    checkpoint::clean_leftovers(&config.base_workspace);
    // Before the sessions are adopted: a pool a killed worker left is deleted.
    let disk = diskfs::DiskFs::start(
        config.disk_quota,
        &diskfs::image_dir(&config),
        &config.quotas,
    )?
    .map(|disk| {
        disk.with_pool(diskfs::PoolSettings {
            size: config.disk_pool,
            dir: diskfs::pool_dir(&config),
            min_free: config.min_free_bytes,
        })
    })
    .transpose()?
    .map(Arc::new);
    let disk_fs = disk.is_some();
    let sessions =
        Sessions::load_with_disk(&config.base_workspace, config.max_sessions, disk.clone()).await?;
    let key = Arc::new(
        WorkerKey::load_or_create(&config.key_path())
            .map_err(|e| Error::Config(format!("HEIST_WORKER_KEY_FILE: {e}")))?,
    );
    let checkpoints = checkpoint::Checkpointer::new(&config, CancellationToken::new())?
        .with_identity(worker_id.clone(), Arc::clone(&key));
    let agent_states = Arc::new(agent::AgentStates::new());
    let tools = Registry::new(tools::builtin_tools(
        &agent_states,
        tools::AgentToolLimits::default(),
    ))?;
    let sandbox = Arc::new(
        sandbox::Sandbox::start(sandbox_settings(&config, sessions.base(), disk_fs)).await,
    );
    let limits = Limits {
        max_file_bytes: config.max_file_bytes,
        max_list_entries: config.max_list_entries,
    };
    let agents = agent_host(&config, &agent_states, sessions.base())?;
    let applied = applied::Applied::open(&applied::state_dir(&config))?;
    let metrics = metrics::WorkerMetrics::new(sandbox.metrics(), Some(agents.gateway.metrics()));
    let (health, health_service) = tonic_health::server::health_reporter();
    let state = Arc::new(
        State::new(worker_id.clone(), sessions, tools, limits, health)
            .with_sandbox(sandbox)
            .with_checkpoints(checkpoints)
            .with_agents(agents)
            .with_applied(applied)
            .with_metrics(metrics, config.metrics_public)
            .with_reserves(reserves(&config)),
    );
    state.auth.set_replay_capacity(config.max_seen_credentials);
    state.adopt_sessions().await;
    state.set_registered(false).await;

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(heist_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("cannot build the reflection service: {e}")))?;

    let stop = CancellationToken::new();
    let (going_away_tx, going_away_rx) = watch::channel(None);
    let control = Control::new(
        Arc::clone(&state),
        Box::new(GrpcConnector::new(&config)?),
        Backoff::new(
            config.reconnect_min,
            config.reconnect_max,
            fastrand::Rng::new(),
        ),
        ControlSettings {
            advertise_addr: advertise_addr.clone(),
            capacity: config.max_sessions,
            labels: advertised_labels(&config, &state),
            key,
        },
        going_away_rx,
        stop.clone(),
    );
    for reserve in state.reserves.clone() {
        let span = info_span!("disk-space", path = %reserve.path().display());
        let (watcher, stop) = (Arc::clone(&state), stop.clone());
        state
            .tasks
            .spawn(async move { watcher.watch_space(reserve, stop).await }.instrument(span));
    }
    if let Some(disk) = disk {
        state.tasks.spawn(
            disk.refill(stop.clone())
                .instrument(info_span!("disk-pool")),
        );
    }
    let control_task = state.tasks.spawn(
        control
            .run()
            .instrument(info_span!("control", worker_id = %worker_id)),
    );

    let drain = {
        let state = Arc::clone(&state);
        let stop = stop.clone();
        let drain_timeout = config.drain_timeout;
        async move {
            shutdown.await;
            info!(
                in_flight = state.inflight.count(),
                "shutdown requested: draining"
            );
            state.drain().await;
            let _ = going_away_tx.send(Some(SHUTDOWN_REASON.to_owned()));
            if tokio::time::timeout(drain_timeout, state.inflight.wait_idle())
                .await
                .is_err()
            {
                warn!(
                    in_flight = state.inflight.count(),
                    "drain timeout reached: stopping the calls still running"
                );
            }
            state.hard_stop.cancel();
            stop.cancel();
        }
    };

    info!(addr = %local_addr, worker_id = %worker_id, advertise = %advertise_addr, "worker listening");
    let api = WorkerServiceServer::new(WorkerApi::new(Arc::clone(&state)))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    // One router for the gRPC services and the HTTP routes ([`web`]).
    let grpc = Routes::new(health_service)
        .add_service(reflection)
        .add_service(api);
    let routes = Routes::from(
        grpc.into_axum_router()
            .merge(web::routes(Arc::clone(&state))),
    );
    let server = Server::builder()
        // gRPC needs HTTP/2; the HTTP routes are also served to HTTP/1.1 clients (probes, curl).
        .accept_http1(true)
        .layer(tower::util::option_layer(config.telemetry.then(|| {
            heist_proto::trace::RpcLayer::new(state.metrics.rpc.clone()).without_trace_id_header()
        })))
        .add_routes(routes);
    let server = async move {
        match tls {
            // Only the coordinator calls a worker: every connection must present a
            // certificate the cluster CA signed (health probes and scrapers too).
            Some(tls) => {
                let config = tls
                    .server_config(heist_proto::tls::ClientAuth::Required)
                    .map_err(|e| Error::Config(e.to_string()))?;
                let incoming =
                    heist_proto::tls::incoming(listener, config, tls.handshake_timeout());
                server.serve_with_incoming_shutdown(incoming, drain).await?;
            }
            None => {
                heist_proto::tls::warn_if_plaintext_exposed(local_addr);
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                server.serve_with_incoming_shutdown(incoming, drain).await?;
            }
        }
        Ok::<(), Error>(())
    };
    // After the drain, tonic waits for every connection to close; a client holding a stream
    // open (a health Watch) must not keep the worker alive forever.
    let lingering = async {
        stop.cancelled().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    let served = tokio::select! {
        served = server => served,
        () = lingering => {
            warn!("connections still open after the drain; closing them");
            Ok(())
        }
    };

    // The server may also have failed on its own: stop the control loop either way.
    state.hard_stop.cancel();
    if let Some(checkpoints) = &state.checkpoints {
        checkpoints.shutdown();
    }
    stop.cancel();
    if let Err(err) = control_task.await {
        warn!(error = %err, "control task ended abnormally");
    }
    state.tasks.close();
    if tokio::time::timeout(CLOSE_GRACE, state.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = state.tasks.len(),
            "background tasks still running at shutdown"
        );
    }
    // The sessions' file systems are unmounted (their images stay: the next start mounts them
    // again) and the pool's are deleted, so a stopped worker leaves no mounts behind.
    state.sessions.unmount_all().await;
    info!(worker_id = %worker_id, "worker stopped");
    served
}

/// Agent specs, gateway and agent state directory from the configuration.
/// The reserves of the worker's own disks: its state store and its blob cache (one per file
/// system).
fn reserves(config: &Config) -> Vec<heist_proto::space::Reserve> {
    use std::os::unix::fs::MetadataExt as _;
    let dirs = [
        ("the worker's state store", applied::state_dir(config)),
        ("the worker's blob cache", checkpoint::cache_dir(config)),
    ];
    let mut devices = Vec::new();
    let mut reserves = Vec::new();
    for (what, dir) in dirs {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue; // not created (e.g. no blob cache): nothing is written there
        };
        if devices.contains(&meta.dev()) {
            continue;
        }
        devices.push(meta.dev());
        reserves.push(heist_proto::space::Reserve::new(
            what,
            "HEIST_WORKER_MIN_FREE_BYTES",
            &dir,
            config.min_free_bytes,
        ));
    }
    reserves
}

fn agent_host(
    config: &Config,
    states: &Arc<agent::AgentStates>,
    base: &std::path::Path,
) -> Result<turns::AgentHost, Error> {
    let gateway = model::Gateway::from_config(&config.models)
        .map_err(|e| Error::Config(format!("[models]: {e}")))?;
    let specs = agent::agents_with(config.agents.clone())
        .map_err(|e| Error::Config(format!("[[agents]]: {e}")))?
        .into_iter()
        .map(|a| (a.name.clone(), a))
        .collect();
    let dir = turns::state_dir(base);
    heist_proto::files::private_dir(&dir).map_err(|e| {
        Error::io(
            format!("cannot create the agent state directory {}", dir.display()),
            e,
        )
    })?;
    Ok(turns::AgentHost {
        specs,
        gateway,
        states: Arc::clone(states),
        dir,
        turns: turns::Turns::new(config.turn_retention, config.max_finished_turns),
    })
}

/// The sandbox part of the configuration.
fn sandbox_settings(config: &Config, base: &std::path::Path, disk_fs: bool) -> sandbox::Settings {
    sandbox::Settings {
        mode: config.sandbox,
        helper: config.sandbox_helper.clone(),
        uid: config.sandbox_uid,
        gid: config.sandbox_gid,
        python: config.python.clone(),
        kill_grace: config.kill_grace,
        poll_interval: config.quota_poll_interval,
        nice: config.sandbox_nice,
        quotas: config.quotas.clone(),
        cgroup_root: config.cgroup_root.clone(),
        cgroup_name: sandbox::cgroup_name(&config.worker_id, base),
        fs_pool: config.fs_pool,
        disk_fs,
        docker: sandbox::DockerSettings {
            host: config.docker_host.clone(),
            image: config.sandbox_image.clone(),
            network: config.docker_network.clone(),
            oom_wait: config.docker_oom_wait,
            inbox_dir: base
                .parent()
                .unwrap_or(base)
                .join("docker-inbox")
                .join(sandbox::cgroup_name(&config.worker_id, base)),
        },
    }
}

/// The configured labels, plus `sandbox=docker` on a worker whose docker backend works, so
/// that sessions asking for that label are only placed where it holds.
fn advertised_labels(config: &Config, state: &State) -> std::collections::BTreeMap<String, String> {
    let mut labels = config.labels.clone();
    if config.sandbox == sandbox::Mode::Docker && state.sandbox.backend_name() == "docker" {
        labels
            .entry("sandbox".to_owned())
            .or_insert_with(|| "docker".to_owned());
    }
    labels
}

/// `http://<addr>` (`https://` under TLS), with an unspecified bind address (0.0.0.0, ::)
/// replaced by loopback: a coordinator cannot dial 0.0.0.0, so multi-host setups must set
/// HEIST_ADVERTISE_ADDR.
fn default_advertise_addr(local: SocketAddr, tls: bool) -> String {
    let ip = local.ip();
    let ip = if ip.is_unspecified() {
        if ip.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        }
    } else {
        ip
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", SocketAddr::new(ip, local.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_a_dialable_address() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            default_advertise_addr(addr("0.0.0.0:50052"), false),
            "http://127.0.0.1:50052"
        );
        assert_eq!(
            default_advertise_addr(addr("10.1.2.3:7"), true),
            "https://10.1.2.3:7"
        );
        assert_eq!(
            default_advertise_addr(addr("[::]:9"), false),
            "http://[::1]:9"
        );
    }
}
