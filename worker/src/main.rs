//! `worker`: parses flags (each with an environment variable), sets up logging, binds and runs
//! [`heist_worker::serve`]. SIGTERM or SIGINT drains gracefully; a second signal exits at once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use heist_worker::{Config, parse_labels, sandbox::SandboxFlags};

/// heist worker: hosts session workspaces and runs tools for the coordinator.
#[derive(Debug, Parser)]
#[command(version = heist_proto::VERSION, about)]
struct Flags {
    /// Port to serve gRPC on.
    #[arg(long, env = "GRPC_PORT", default_value_t = 50052)]
    grpc_port: u16,
    /// Address to bind.
    #[arg(long, env = "HEIST_BIND_ADDR", default_value = "0.0.0.0")]
    bind_addr: std::net::IpAddr,
    /// Log filter (e.g. `info`, `heist_worker=debug,info`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Stable worker id (default: the host name, or worker-1).
    #[arg(long, env = "WORKER_ID")]
    worker_id: Option<String>,
    /// Coordinator address for the control stream.
    #[arg(
        long,
        env = "COORDINATOR_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator_addr: String,
    /// Address the coordinator dials for session calls (default: http://ADDR:PORT of the
    /// listener, with loopback for ADDR when bound to 0.0.0.0).
    #[arg(long, env = "HEIST_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Maximum concurrent sessions.
    #[arg(long, env = "MAX_SESSIONS", default_value_t = 64)]
    max_sessions: u32,
    /// Directory holding one workspace per session.
    #[arg(long, env = "BASE_WORKSPACE", default_value = "./data/workspaces")]
    base_workspace: PathBuf,
    /// Placement labels, `k=v,k2=v2`.
    #[arg(long, env = "HEIST_LABELS", default_value = "")]
    labels: String,
    /// Join token the coordinator expects (required).
    #[arg(long, env = "HEIST_JOIN_TOKEN", hide_env_values = true)]
    join_token: String,
    /// First reconnect delay, in milliseconds.
    #[arg(long, env = "HEIST_RECONNECT_MIN_MS", default_value_t = 100)]
    reconnect_min_ms: u64,
    /// Largest reconnect delay, in milliseconds.
    #[arg(long, env = "HEIST_RECONNECT_MAX_MS", default_value_t = 5000)]
    reconnect_max_ms: u64,
    /// How long shutdown waits for in-flight calls, in seconds.
    #[arg(long, env = "HEIST_DRAIN_TIMEOUT_S", default_value_t = 30)]
    drain_timeout_s: u64,
    /// Largest file fs.read returns and fs.write produces, in bytes.
    #[arg(long, env = "HEIST_MAX_FILE_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_file_bytes: u64,
    /// Most entries fs.list returns.
    #[arg(long, env = "HEIST_MAX_LIST_ENTRIES", default_value_t = 10_000)]
    max_list_entries: usize,
    /// Largest gRPC message, in bytes.
    #[arg(long, env = "HEIST_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Local checkpoint blob cache (default: BASE_WORKSPACE/../blobs).
    #[arg(long, env = "HEIST_BLOB_CACHE_DIR")]
    blob_cache_dir: Option<PathBuf>,
    /// Size bound of the blob cache, in bytes (0 disables it).
    #[arg(long, env = "HEIST_BLOB_CACHE_BYTES", default_value_t = 2 << 30)]
    blob_cache_bytes: u64,
    /// Most entries a captured workspace may have.
    #[arg(long, env = "HEIST_CHECKPOINT_MAX_ENTRIES", default_value_t = 100_000)]
    checkpoint_max_entries: usize,
    /// Hashes per FindMissingBlobs / GetBlobs call (at most the coordinator's HEIST_MAX_BLOB_BATCH).
    #[arg(long, env = "HEIST_BLOB_BATCH", default_value_t = 10_000)]
    blob_batch: usize,
    /// Sandbox and per-session quota flags.
    #[command(flatten)]
    sandbox: SandboxFlags,
}

impl Flags {
    fn into_config(self) -> anyhow::Result<Config> {
        let defaults = Config::default();
        let mut config = Config {
            worker_id: self.worker_id.unwrap_or(defaults.worker_id),
            coordinator_addr: self.coordinator_addr,
            advertise_addr: self.advertise_addr.filter(|a| !a.is_empty()),
            max_sessions: self.max_sessions,
            base_workspace: self.base_workspace,
            labels: parse_labels(&self.labels)?,
            join_token: self.join_token,
            reconnect_min: Duration::from_millis(self.reconnect_min_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms),
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
            max_file_bytes: self.max_file_bytes,
            max_list_entries: self.max_list_entries,
            max_message_bytes: self.max_message_bytes,
            blob_cache_dir: self.blob_cache_dir.filter(|p| !p.as_os_str().is_empty()),
            blob_cache_bytes: self.blob_cache_bytes,
            checkpoint_max_entries: self.checkpoint_max_entries,
            blob_batch: self.blob_batch,
            ..defaults
        };
        self.sandbox.apply(&mut config);
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    heist_proto::logging::init(&flags.log_level, &flags.log_format).map_err(anyhow::Error::msg)?;
    let addr = SocketAddr::new(flags.bind_addr, flags.grpc_port);
    let config = flags.into_config()?;
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}: is another process using the port?"))?;
    let shutdown =
        heist_proto::shutdown::on_signal().context("cannot install the SIGTERM/SIGINT handlers")?;
    heist_worker::serve(listener, config, shutdown).await?;
    Ok(())
}
