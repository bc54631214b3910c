//! `coordinator`: parses flags (each with an environment variable), sets up logging, binds and
//! runs [`heist_coordinator::serve`]. SIGTERM or SIGINT drains gracefully; a second signal exits
//! at once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use heist_coordinator::Config;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// heist coordinator: auth, worker registry, placement and routing, durable state.
#[derive(Debug, Parser)]
#[command(version = heist_proto::VERSION, about)]
struct Flags {
    /// Port to serve gRPC on.
    #[arg(long, env = "GRPC_PORT", default_value_t = 50051)]
    grpc_port: u16,
    /// Address to bind.
    #[arg(long, env = "HEIST_BIND_ADDR", default_value = "0.0.0.0")]
    bind_addr: std::net::IpAddr,
    /// Log filter (e.g. `info`, `heist_coordinator=debug,info`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Directory for the state database and the token signing key.
    #[arg(long, env = "HEIST_DATA_DIR", default_value = "./data/coordinator")]
    data_dir: PathBuf,
    /// Shared secret workers must present to join (required).
    #[arg(long, env = "HEIST_JOIN_TOKEN", hide_env_values = true)]
    join_token: String,
    /// Client id of the bootstrap admin.
    #[arg(long, env = "HEIST_ADMIN_CLIENT_ID", default_value = "admin")]
    admin_client_id: String,
    /// Secret of the bootstrap admin, at least 16 characters (required; stored hashed).
    #[arg(long, env = "HEIST_ADMIN_CLIENT_SECRET", hide_env_values = true)]
    admin_client_secret: String,
    /// Issuer (`iss`) of the tokens the coordinator signs.
    #[arg(long, env = "HEIST_TOKEN_ISSUER", default_value = "heist")]
    token_issuer: String,
    /// Lifetime of client access tokens, in seconds.
    #[arg(long, env = "HEIST_TOKEN_TTL_S", default_value_t = 3600)]
    token_ttl_s: u64,
    /// A worker silent for this long is marked lost, in milliseconds.
    #[arg(long, env = "HEIST_LEASE_TTL_MS", default_value_t = 10_000)]
    lease_ttl_ms: u64,
    /// How often workers heartbeat, in milliseconds.
    #[arg(long, env = "HEIST_HEARTBEAT_INTERVAL_MS", default_value_t = 2_000)]
    heartbeat_interval_ms: u64,
    /// Cap on the deadline forwarded to workers, in seconds.
    #[arg(long, env = "HEIST_WORKER_CALL_TIMEOUT_S", default_value_t = 300)]
    worker_call_timeout_s: u64,
    /// How long request ids are remembered, in seconds.
    #[arg(long, env = "HEIST_IDEMPOTENCY_TTL_S", default_value_t = 86_400)]
    idempotency_ttl_s: u64,
    /// Largest gRPC message, in bytes.
    #[arg(long, env = "HEIST_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_message_bytes: usize,
}

impl Flags {
    fn into_config(self) -> Config {
        Config {
            data_dir: self.data_dir,
            join_token: self.join_token,
            admin_client_id: self.admin_client_id,
            admin_client_secret: self.admin_client_secret,
            token_issuer: self.token_issuer,
            token_ttl: Duration::from_secs(self.token_ttl_s),
            lease_ttl: Duration::from_millis(self.lease_ttl_ms),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            worker_call_timeout: Duration::from_secs(self.worker_call_timeout_s),
            idempotency_ttl: Duration::from_secs(self.idempotency_ttl_s),
            max_message_bytes: self.max_message_bytes,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    heist_proto::logging::init(&flags.log_level, &flags.log_format).map_err(anyhow::Error::msg)?;
    let addr = SocketAddr::new(flags.bind_addr, flags.grpc_port);
    let config = flags.into_config();
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}: is another process using the port?"))?;
    let shutdown = shutdown_signal()?;
    heist_coordinator::serve(listener, config, shutdown).await?;
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT; the second one exits the process at once.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(
            signal = name,
            "shutting down gracefully (send the signal again to exit now)"
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            warn!("second signal: exiting now");
            std::process::exit(130);
        });
    })
}
