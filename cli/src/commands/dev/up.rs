//! `heistctl dev up`: start a coordinator and N workers as child processes, log in, print where
//! everything is, and run until Ctrl-C/SIGTERM (then stop every child; a second signal kills
//! them at once). A child that exits early is reported with its log tail and fails the command.

use std::{path::PathBuf, time::Duration};

use serde::Serialize;

use super::StopSignals;
use crate::{
    cli::Context,
    cluster::{ADMIN_CLIENT_ID, LocalCluster, Options, ProcessInfo},
    credentials::CachedToken,
    error::{EXIT_OK, Error},
    output::{self, Format},
};

/// Flags of `dev up`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of workers (worker-1..N).
    #[arg(long, env = "HEIST_DEV_WORKERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Data directory (kept afterwards). Default: a new directory under the system temp dir.
    #[arg(long, env = "HEIST_DEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Coordinator port; workers use the next N ports. 0 picks free ports.
    #[arg(long, env = "HEIST_DEV_PORT", default_value_t = 50051)]
    pub port: u16,
    /// Worker labels `k=v,k2=v2`: given once, for every worker; repeated, for worker-1, worker-2, ...
    #[arg(
        long = "worker-labels",
        env = "HEIST_DEV_WORKER_LABELS",
        value_delimiter = ';'
    )]
    pub worker_labels: Vec<String>,
    /// MAX_SESSIONS of each worker (default: the worker's own default).
    #[arg(long, env = "HEIST_DEV_MAX_SESSIONS")]
    pub max_sessions: Option<u32>,
    /// Directory with the `coordinator` and `worker` binaries (default: next to heistctl, then PATH).
    #[arg(long, env = "HEIST_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// LOG_LEVEL of the cluster processes.
    #[arg(long, env = "HEIST_DEV_LOG_LEVEL", default_value = "info")]
    pub cluster_log_level: String,
    /// Seconds to wait for the cluster to become ready.
    #[arg(
        long,
        env = "HEIST_DEV_READY_TIMEOUT",
        default_value_t = 60,
        value_name = "SECONDS"
    )]
    pub ready_timeout: u64,
    /// Serve TLS, with mTLS between the coordinator and the workers: a fresh local CA and
    /// certificates are generated under `<data dir>/tls/` (the coordinator's URL is then
    /// https://; use `--ca-cert <data dir>/tls/ca.pem`, exported in dev.env).
    #[arg(long, env = "HEIST_DEV_TLS")]
    pub tls: bool,
}

impl Args {
    /// Launcher options for these flags.
    fn options(&self, call_timeout: Duration) -> Options {
        Options {
            workers: usize::from(self.workers),
            data_dir: self.data_dir.clone(),
            port: self.port,
            worker_labels: self.worker_labels.clone(),
            max_sessions: self.max_sessions,
            bin_dir: self.bin_dir.clone(),
            log_level: self.cluster_log_level.clone(),
            ready_timeout: Duration::from_secs(self.ready_timeout),
            call_timeout,
            env: Vec::new(),
            tls: self.tls,
        }
    }
}

/// What `dev up --output json` prints once the cluster is ready.
#[derive(Debug, Serialize)]
struct UpView<'a> {
    coordinator: &'a ProcessInfo,
    workers: Vec<&'a ProcessInfo>,
    data_dir: String,
    env_file: String,
    client_id: &'a str,
    export: String,
}

/// Runs `dev up`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let mut signals = StopSignals::install()?;
    eprintln!("starting a coordinator and {} worker(s)...", args.workers);
    let start = LocalCluster::start(args.options(ctx.timeout().min(Duration::from_secs(5))));
    let mut cluster = tokio::select! {
        cluster = start => cluster?,
        () = signals.recv() => return Err(Error::Interrupted),
    };
    if let Err(err) = cache_token(ctx, &cluster) {
        cluster.stop().await?;
        return Err(err);
    }
    print_summary(ctx.format(), &cluster)?;
    eprintln!("cluster is running; press Ctrl-C to stop it");

    let early_exit = tokio::select! {
        err = cluster.wait_for_early_exit() => Some(err),
        () = signals.recv() => None,
    };
    match early_exit {
        Some(err) => {
            eprintln!("a cluster process exited early; stopping the rest of the cluster...");
            cluster.stop().await?;
            Err(err)
        }
        None => {
            eprintln!("stopping the cluster (press Ctrl-C again to kill it at once)...");
            cluster.stop_or_abort(signals.recv()).await?;
            eprintln!("stopped");
            Ok(EXIT_OK)
        }
    }
}

/// Caches the admin token for the cluster's coordinator URL, as `heistctl login` would.
fn cache_token(ctx: &Context, cluster: &LocalCluster) -> Result<(), Error> {
    ctx.store()?.put(
        cluster.coordinator_url(),
        CachedToken {
            access_token: cluster.access_token().to_owned(),
            client_id: ADMIN_CLIENT_ID.to_owned(),
            expires_at: heist_proto::token::unix_now().saturating_add(cluster.token_expires_in_s()),
            scopes: cluster.token_scopes().to_vec(),
        },
    )
}

fn print_summary(format: Format, cluster: &LocalCluster) -> Result<(), Error> {
    let mut export = format!("export HEIST_COORDINATOR={}", cluster.coordinator_url());
    if let Some(ca) = cluster.ca_cert() {
        export.push_str(&format!(" HEIST_CA_CERT={}", ca.display()));
    }
    let mut out = std::io::stdout().lock();
    if format == Format::Json {
        return output::write_json(
            &mut out,
            &UpView {
                coordinator: cluster.coordinator(),
                workers: cluster.workers(),
                data_dir: cluster.data_dir().display().to_string(),
                env_file: cluster.env_file().display().to_string(),
                client_id: ADMIN_CLIENT_ID,
                export,
            },
        );
    }
    let mut table = output::Table::new(&["PROCESS", "URL", "LOG"]);
    for p in std::iter::once(cluster.coordinator()).chain(cluster.workers()) {
        table.row(vec![
            p.name.clone(),
            p.url.clone(),
            p.log.display().to_string(),
        ]);
    }
    let text = format!(
        "heist local cluster is up\n\n{table}\n\
         data dir:  {data}\n\
         secrets:   {env} (join token, admin client secret; mode 0600)\n\
         logged in: as {ADMIN_CLIENT_ID}; token cached for {url}\n\n\
         In another shell:\n  {export}\n  heistctl workers ls\n",
        table = table.render(),
        data = cluster.data_dir().display(),
        env = cluster.env_file().display(),
        url = cluster.coordinator_url(),
    );
    output::write_text(&mut out, &text)
}
