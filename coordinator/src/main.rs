//! `coordinator`: reads the layered configuration ([`heist_coordinator::settings`]: defaults →
//! `--config` file → environment → flags), sets up logging, binds and runs
//! [`heist_coordinator::serve`]. SIGTERM or SIGINT drains gracefully; a second signal exits at
//! once.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use heist_coordinator::settings::{self, Settings};

/// heist coordinator: auth, worker registry, placement and routing, durable state.
#[derive(Parser)]
#[command(version = heist_proto::VERSION, about)]
struct Flags {
    /// TOML config file (table `[coordinator]`; see docs/OPERATIONS.md).
    /// Environment variables and flags override it.
    #[arg(long, env = "HEIST_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    /// `healthcheck`: exit 0 if this configuration's running process answers /readyz with 200
    /// (for container HEALTHCHECKs), 1 otherwise.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Asks the running process's /readyz (same configuration: port from GRPC_PORT, --config)
    /// and exits 0 when it is ready.
    Healthcheck {
        /// Ask /healthz instead: the process is up and serving, ready or not (what a service
        /// that must start before the others, like the coordinator in compose, waits for).
        #[arg(long)]
        live: bool,
    },
}

/// The allocator: a gRPC server makes many small allocations per call, which mimalloc serves
/// with less work than the system's (docs/BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    if let Some(Command::Healthcheck { live }) = flags.command {
        return healthcheck(flags, if live { "/healthz" } else { "/readyz" });
    }
    let (listen, config) = settings::load(flags.config.as_deref(), flags.settings)?;
    let otlp =
        heist_proto::logging::Otlp::from_env("heist-coordinator").map_err(anyhow::Error::msg)?;
    let telemetry = heist_proto::logging::init_with(&listen.log_level, &listen.log_format, otlp)
        .map_err(anyhow::Error::msg)?;
    let addr = listen.addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}: is another process using the port?"))?;
    let shutdown =
        heist_proto::shutdown::on_signal().context("cannot install the SIGTERM/SIGINT handlers")?;
    let served = heist_coordinator::serve(listener, config, shutdown).await;
    // Spans still queued are sent before the process exits.
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    served?;
    Ok(())
}

fn healthcheck(flags: Flags, path: &str) -> anyhow::Result<()> {
    let (listen, config) = settings::load(flags.config.as_deref(), flags.settings)?;
    let tls = config.tls.load()?;
    let timeout = std::time::Duration::from_secs(2);
    match heist_proto::health::check(listen.addr, path, timeout, tls.as_ref()) {
        Ok(()) => Ok(()),
        Err(why) => {
            eprintln!("not ready: {why}");
            std::process::exit(1)
        }
    }
}
