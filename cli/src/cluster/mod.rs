//! A local cluster of real processes: one `coordinator` and N `worker`s on loopback, started as
//! children of heistctl. Used by `heistctl dev up`, `heistctl dev demo` and benchmarks.
//!
//! ```no_run
//! # async fn example() -> Result<(), heistctl::error::Error> {
//! use heistctl::cluster::{LocalCluster, Options};
//! let cluster = LocalCluster::start(Options { workers: 2, port: 0, ..Options::default() }).await?;
//! let client = cluster.client().await?; // logged in as the bootstrap admin
//! println!("{} workers", client.list_workers().await?.len());
//! cluster.stop().await?;
//! # Ok(()) }
//! ```
//!
//! Layout of the data directory:
//! `coordinator/` (HEIST_DATA_DIR), `worker-<i>/workspaces/` (BASE_WORKSPACE),
//! `<name>.log` for each process, and `dev.env` (mode 0600) with the join token and the admin
//! secret. Restarting on the same directory reuses the secrets in `dev.env`. With
//! [`Options::tls`], `tls/` holds a fresh CA and certificates ([`certs`]) and every link is
//! TLS (mTLS between the coordinator and the workers).

mod binaries;
pub mod certs;
mod layout;
pub(crate) mod process;
mod secrets;

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;

pub use binaries::find_binary;
pub use layout::parse_labels;
pub use process::{ProcessInfo, log_tail};
pub use secrets::DevSecrets;

use self::{
    layout::{create_dir, env, labels_per_worker, pick_ports, prepare_data_dir},
    process::ChildProcess,
};
use crate::{client::Client, error::Error};

/// Client id of the bootstrap admin in a local cluster.
pub const ADMIN_CLIENT_ID: &str = "admin";
/// How long children get to stop after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest pause between readiness polls.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How to start a local cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of workers (ids `worker-1..N`).
    pub workers: usize,
    /// Data directory; `None` creates a new one under the system temp dir (kept afterwards).
    pub data_dir: Option<PathBuf>,
    /// Coordinator port; workers use `port+1..=port+N`. 0 picks free ports for every process.
    pub port: u16,
    /// Worker labels, `k=v,k2=v2`: one entry applies to every worker; several apply to
    /// worker-1, worker-2, ... in order.
    pub worker_labels: Vec<String>,
    /// MAX_SESSIONS for each worker; `None` keeps the worker's default.
    pub max_sessions: Option<u32>,
    /// Directory holding the `coordinator` and `worker` binaries; `None` looks next to the
    /// running executable, then on PATH.
    pub bin_dir: Option<PathBuf>,
    /// LOG_LEVEL of the children.
    pub log_level: String,
    /// How long to wait for the cluster to become ready.
    pub ready_timeout: Duration,
    /// Per-call deadline of the readiness and login calls.
    pub call_timeout: Duration,
    /// Extra environment of every child (coordinator and workers), e.g. OTEL_* variables.
    pub env: Vec<(String, String)>,
    /// Serve TLS (mTLS between coordinator and workers) with certificates generated under
    /// `<data dir>/tls/`; the coordinator's URL is then `https://`.
    pub tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            workers: 2,
            data_dir: None,
            port: 50051,
            worker_labels: Vec::new(),
            max_sessions: None,
            bin_dir: None,
            log_level: "info".to_owned(),
            ready_timeout: Duration::from_secs(60),
            call_timeout: Duration::from_secs(5),
            env: Vec::new(),
            tls: false,
        }
    }
}

/// A running local cluster. Dropping it kills the children (SIGKILL); call [`LocalCluster::stop`]
/// for an orderly shutdown.
#[derive(Debug)]
pub struct LocalCluster {
    data_dir: PathBuf,
    secrets: DevSecrets,
    env_file: PathBuf,
    coordinator: ChildProcess,
    workers: Vec<ChildProcess>,
    access_token: String,
    token_expires_in_s: u64,
    token_scopes: Vec<String>,
    call_timeout: Duration,
    ready_timeout: Duration,
    tls: Option<certs::DevTls>,
}

impl LocalCluster {
    /// Starts the coordinator, waits until it serves, logs in as the bootstrap admin, starts
    /// the workers and waits until all of them are READY. Any child exiting early fails the
    /// start with its log tail (the others are stopped).
    #[tracing::instrument(skip_all, fields(workers = opts.workers, port = opts.port))]
    pub async fn start(opts: Options) -> Result<Self, Error> {
        if opts.workers == 0 {
            return Err(Error::Usage(
                "a cluster needs at least one worker".to_owned(),
            ));
        }
        let worker_labels = labels_per_worker(&opts.worker_labels, opts.workers)?;
        let coordinator_bin = find_binary("coordinator", opts.bin_dir.as_deref())?;
        let worker_bin = find_binary("worker", opts.bin_dir.as_deref())?;
        let data_dir = prepare_data_dir(opts.data_dir.as_deref())?;
        let ports = pick_ports(opts.port, opts.workers)?;
        let scheme = if opts.tls { "https" } else { "http" };
        let coordinator_url = format!("{scheme}://127.0.0.1:{}", ports[0]);
        let tls = if opts.tls {
            let ids: Vec<String> = (1..=opts.workers).map(|i| format!("worker-{i}")).collect();
            Some(certs::DevTls::generate(&data_dir.join("tls"), &ids)?)
        } else {
            None
        };
        let secrets = DevSecrets::load_or_generate(&data_dir.join("dev.env"))?;
        let env_file = secrets.write(
            &data_dir.join("dev.env"),
            &coordinator_url,
            tls.as_ref().map(|t| t.ca.as_path()),
        )?;
        let deadline = Instant::now() + opts.ready_timeout;

        let coordinator_dir = data_dir.join("coordinator");
        create_dir(&coordinator_dir)?;
        let tls_env = tls
            .as_ref()
            .map(|t| tls_env(&t.coordinator, &t.ca))
            .unwrap_or_default();
        let coordinator = ChildProcess::spawn(
            ProcessInfo {
                name: "coordinator".to_owned(),
                url: coordinator_url.clone(),
                log: data_dir.join("coordinator.log"),
            },
            &coordinator_bin,
            &[
                &[
                    env("GRPC_PORT", ports[0]),
                    env("HEIST_BIND_ADDR", "127.0.0.1"),
                    env("HEIST_DATA_DIR", coordinator_dir.display()),
                    env("HEIST_JOIN_TOKEN", &secrets.join_token),
                    env("HEIST_ADMIN_CLIENT_ID", ADMIN_CLIENT_ID),
                    env("HEIST_ADMIN_CLIENT_SECRET", &secrets.admin_secret),
                    env("LOG_LEVEL", &opts.log_level),
                    env("LOG_FORMAT", "text"),
                    env("NO_COLOR", "1"),
                ],
                tls_env.as_slice(),
                opts.env.as_slice(),
            ]
            .concat(),
        )?;
        let mut cluster = Self {
            data_dir,
            secrets,
            env_file,
            coordinator,
            workers: Vec::new(),
            access_token: String::new(),
            token_expires_in_s: 0,
            token_scopes: Vec::new(),
            call_timeout: opts.call_timeout,
            ready_timeout: opts.ready_timeout,
            tls,
        };
        match cluster
            .boot(&opts, &worker_bin, &ports, worker_labels, deadline)
            .await
        {
            Ok(()) => Ok(cluster),
            Err(err) => {
                cluster.stop().await?;
                Err(err)
            }
        }
    }

    /// Everything after the coordinator process is spawned.
    async fn boot(
        &mut self,
        opts: &Options,
        worker_bin: &Path,
        ports: &[u16],
        worker_labels: Vec<String>,
        deadline: Instant,
    ) -> Result<(), Error> {
        let client = self.wait_coordinator_serving(deadline).await?;
        let token = client
            .issue_token(ADMIN_CLIENT_ID, &self.secrets.admin_secret, Vec::new())
            .await?;
        self.access_token = token.access_token;
        self.token_expires_in_s = token.expires_in_s;
        self.token_scopes = token.scopes;
        let client = client.with_token(self.access_token.clone());

        for (i, labels) in worker_labels.into_iter().enumerate() {
            let id = format!("worker-{}", i + 1);
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://127.0.0.1:{}", ports[i + 1]);
            let workspaces = self.data_dir.join(&id).join("workspaces");
            create_dir(&workspaces)?;
            let mut vars = vec![
                env("GRPC_PORT", ports[i + 1]),
                env("HEIST_BIND_ADDR", "127.0.0.1"),
                env("WORKER_ID", &id),
                env("COORDINATOR_ADDR", self.coordinator_url()),
                env("HEIST_ADVERTISE_ADDR", &url),
                env("BASE_WORKSPACE", workspaces.display()),
                env("HEIST_LABELS", &labels),
                env("HEIST_JOIN_TOKEN", &self.secrets.join_token),
                env("LOG_LEVEL", &opts.log_level),
                env("LOG_FORMAT", "text"),
                env("NO_COLOR", "1"),
            ];
            if let Some(max) = opts.max_sessions {
                vars.push(env("MAX_SESSIONS", max));
            }
            if let Some(tls) = &self.tls {
                let (_, files) = &tls.workers[i];
                vars.extend(tls_env(files, &tls.ca));
            }
            vars.extend(opts.env.iter().cloned());
            let info = ProcessInfo {
                log: self.data_dir.join(format!("{id}.log")),
                name: id,
                url,
            };
            self.workers
                .push(ChildProcess::spawn(info, worker_bin, &vars)?);
        }
        self.wait_workers_ready(&client, deadline).await
    }

    /// Polls grpc.health.v1 until the coordinator says SERVING.
    async fn wait_coordinator_serving(&mut self, deadline: Instant) -> Result<Client, Error> {
        let url = self.coordinator_url().to_owned();
        let mut pause = Duration::from_millis(20);
        loop {
            self.check_alive()?;
            if let Ok(client) = Client::connect_with(&url, self.call_timeout, self.ca_cert()).await
                && matches!(client.health().await, Ok(ServingStatus::Serving))
            {
                return Ok(client);
            }
            pause = self
                .pause_before_retry(deadline, pause, "the coordinator")
                .await?;
        }
    }

    /// Polls ClusterService.ListWorkers until every worker of this cluster is READY.
    async fn wait_workers_ready(
        &mut self,
        client: &Client,
        deadline: Instant,
    ) -> Result<(), Error> {
        let expected: Vec<String> = self.workers.iter().map(|w| w.info.name.clone()).collect();
        let mut pause = Duration::from_millis(20);
        loop {
            self.check_alive()?;
            if let Ok(workers) = client.list_workers().await {
                let ready = expected.iter().all(|id| {
                    workers.iter().any(|w| {
                        &w.id == id && w.state == heist_proto::v1::WorkerState::Ready as i32
                    })
                });
                if ready {
                    return Ok(());
                }
            }
            pause = self
                .pause_before_retry(deadline, pause, &format!("{} workers", expected.len()))
                .await?;
        }
    }

    /// Sleeps before the next readiness poll (growing pauses), or fails past the deadline.
    async fn pause_before_retry(
        &self,
        deadline: Instant,
        pause: Duration,
        what: &str,
    ) -> Result<Duration, Error> {
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::NotReady {
                what: what.to_owned(),
                timeout_s: self.ready_timeout.as_secs(),
                data_dir: self.data_dir.clone(),
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        Ok((pause * 2).min(MAX_POLL_INTERVAL))
    }

    /// Fails with the log tail of the first child that has exited.
    fn check_alive(&mut self) -> Result<(), Error> {
        for child in std::iter::once(&mut self.coordinator).chain(self.workers.iter_mut()) {
            if let Some(status) = child.try_exited() {
                return Err(child.exited_error(status));
            }
        }
        Ok(())
    }

    /// The coordinator's URL (`http://127.0.0.1:<port>`, `https://` with TLS).
    pub fn coordinator_url(&self) -> &str {
        &self.coordinator.info.url
    }

    /// The CA certificate clients verify the coordinator with, when the cluster serves TLS.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    /// The coordinator process.
    pub fn coordinator(&self) -> &ProcessInfo {
        &self.coordinator.info
    }

    /// CPU time (user + system) the coordinator and the workers have used so far; `None` where
    /// a process's cannot be read (see `/proc/PID/stat`).
    pub fn cpu_seconds(&self) -> Option<f64> {
        std::iter::once(&self.coordinator)
            .chain(&self.workers)
            .map(ChildProcess::cpu_seconds)
            .sum()
    }

    /// The worker processes, in id order.
    pub fn workers(&self) -> Vec<&ProcessInfo> {
        self.workers.iter().map(|w| &w.info).collect()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `dev.env`: the join token and admin credentials as shell exports.
    pub fn env_file(&self) -> &Path {
        &self.env_file
    }

    /// The generated secrets.
    pub fn secrets(&self) -> &DevSecrets {
        &self.secrets
    }

    /// The bootstrap admin's access token, issued during start.
    pub fn access_token(&self) -> &str {
        &self.access_token
    }

    /// Seconds the access token was valid for when issued.
    pub fn token_expires_in_s(&self) -> u64 {
        self.token_expires_in_s
    }

    /// Scopes the access token carries.
    pub fn token_scopes(&self) -> &[String] {
        &self.token_scopes
    }

    /// A client for the coordinator, logged in as the bootstrap admin.
    pub async fn client(&self) -> Result<Client, Error> {
        Ok(
            Client::connect_with(self.coordinator_url(), self.call_timeout, self.ca_cert())
                .await?
                .with_token(self.access_token.clone()),
        )
    }

    /// Waits until any child exits and returns the error describing it (name, status, log tail).
    pub async fn wait_for_early_exit(&mut self) -> Error {
        let waits = std::iter::once(&mut self.coordinator)
            .chain(self.workers.iter_mut())
            .map(|child| {
                Box::pin(async move {
                    let status = child.wait().await;
                    (child, status)
                })
            });
        let ((child, status), _, _) = futures::future::select_all(waits).await;
        match status {
            Ok(status) => child.exited_error(status),
            Err(e) => Error::io(format!("cannot wait for {}", child.info.name), e),
        }
    }

    /// Orderly shutdown: SIGTERM the workers, then the coordinator; SIGKILL whatever is still
    /// running after [`STOP_GRACE`].
    pub async fn stop(self) -> Result<(), Error> {
        self.stop_or_abort(std::future::pending()).await
    }

    /// Like [`LocalCluster::stop`], but SIGKILLs everything at once when `abort` completes
    /// (e.g. a second Ctrl-C).
    pub async fn stop_or_abort(mut self, abort: impl Future<Output = ()>) -> Result<(), Error> {
        let finished = tokio::select! {
            () = self.graceful_stop() => true,
            () = abort => false,
        };
        if !finished {
            self.kill_all().await;
        }
        Ok(())
    }

    async fn graceful_stop(&mut self) {
        let deadline = Instant::now() + STOP_GRACE;
        for worker in &mut self.workers {
            worker.terminate();
        }
        for worker in &mut self.workers {
            if !worker.wait_until(deadline).await {
                worker.kill().await;
            }
        }
        self.coordinator.terminate();
        let deadline = deadline.max(Instant::now() + Duration::from_secs(3));
        if !self.coordinator.wait_until(deadline).await {
            self.coordinator.kill().await;
        }
    }

    async fn kill_all(&mut self) {
        for child in std::iter::once(&mut self.coordinator).chain(self.workers.iter_mut()) {
            child.kill().await;
        }
    }
}

/// HEIST_TLS_CERT, HEIST_TLS_KEY and HEIST_TLS_CA for a process.
fn tls_env(files: &certs::CertFiles, ca: &Path) -> Vec<(String, String)> {
    vec![
        env("HEIST_TLS_CERT", files.cert.display()),
        env("HEIST_TLS_KEY", files.key.display()),
        env("HEIST_TLS_CA", ca.display()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_match_the_documented_defaults() {
        let opts = Options::default();
        assert_eq!(opts.workers, 2);
        assert_eq!(opts.port, 50051);
        assert!(opts.data_dir.is_none());
    }
}
