//! `coordinator`: parses flags (each with an environment variable), sets up logging, binds and
//! runs [`heist_coordinator::serve`]. SIGTERM or SIGINT drains gracefully; a second signal exits
//! at once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use heist_coordinator::Config;

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
    /// Largest blob (one checkpointed file) the blob store accepts, in bytes.
    #[arg(long, env = "HEIST_MAX_BLOB_BYTES", default_value_t = 1 << 30)]
    max_blob_bytes: u64,
    /// Most hashes in one FindMissingBlobs or GetBlobs request.
    #[arg(long, env = "HEIST_MAX_BLOB_BATCH", default_value_t = 100_000)]
    max_blob_batch: usize,
    /// Checkpoints kept per session (0: all).
    #[arg(long, env = "HEIST_CHECKPOINT_MAX_PER_SESSION", default_value_t = 100)]
    checkpoint_max_per_session: u32,
    /// Checkpoints older than this are removed, in seconds (0: never).
    #[arg(long, env = "HEIST_CHECKPOINT_MAX_AGE_S", default_value_t = 30 * 86_400)]
    checkpoint_max_age_s: u64,
    /// How often checkpoint age retention and the blob sweep run, in seconds.
    #[arg(long, env = "HEIST_CHECKPOINT_GC_INTERVAL_S", default_value_t = 300)]
    checkpoint_gc_interval_s: u64,
    /// Unreferenced blobs younger than this survive the periodic sweep, in seconds.
    #[arg(long, env = "HEIST_BLOB_ORPHAN_GRACE_S", default_value_t = 600)]
    blob_orphan_grace_s: u64,
    /// Checkpoint after every successful call of a tool that is not read-only.
    #[arg(long, env = "HEIST_AUTO_CHECKPOINT", default_value_t = false)]
    auto_checkpoint: bool,
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
            max_blob_bytes: self.max_blob_bytes,
            max_blob_batch: self.max_blob_batch,
            checkpoint_max_per_session: self.checkpoint_max_per_session,
            checkpoint_max_age: Duration::from_secs(self.checkpoint_max_age_s),
            checkpoint_gc_interval: Duration::from_secs(self.checkpoint_gc_interval_s),
            blob_orphan_grace: Duration::from_secs(self.blob_orphan_grace_s),
            auto_checkpoint: self.auto_checkpoint,
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
    let shutdown =
        heist_proto::shutdown::on_signal().context("cannot install the SIGTERM/SIGINT handlers")?;
    heist_coordinator::serve(listener, config, shutdown).await?;
    Ok(())
}
