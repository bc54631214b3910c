//! Worker configuration: defaults, the `HEIST_LABELS` parser and `validate()`.
//!
//! `main` fills a [`Config`] from flags and environment variables (every field has one, named in
//! its doc comment); tests build one with `Config { join_token: .., ..Config::default() }`.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use heist_proto::ids::WorkerId;

use crate::{Error, quota::Quotas, sandbox::Mode};

/// Everything a worker needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Stable id of this worker (WORKER_ID). Default: the host name, or "worker-1".
    pub worker_id: String,
    /// Coordinator control-plane address (COORDINATOR_ADDR). Default "http://127.0.0.1:50051".
    pub coordinator_addr: String,
    /// Address the coordinator dials for session calls (HEIST_ADVERTISE_ADDR). `None` means
    /// `http://<listener local addr>` (an unspecified bind address is advertised as loopback).
    pub advertise_addr: Option<String>,
    /// Maximum concurrent sessions (MAX_SESSIONS). Default 64.
    pub max_sessions: u32,
    /// Directory holding one workspace per session (BASE_WORKSPACE). Default "./data/workspaces".
    pub base_workspace: PathBuf,
    /// Placement labels (HEIST_LABELS, "k=v,k2=v2"). Default none.
    pub labels: BTreeMap<String, String>,
    /// Join token presented to the coordinator (HEIST_JOIN_TOKEN). Required.
    pub join_token: String,
    /// First reconnect delay (HEIST_RECONNECT_MIN_MS). Default 100 ms.
    pub reconnect_min: Duration,
    /// Largest reconnect delay (HEIST_RECONNECT_MAX_MS). Default 5000 ms.
    pub reconnect_max: Duration,
    /// How long shutdown waits for in-flight calls (HEIST_DRAIN_TIMEOUT_S). Default 30 s.
    pub drain_timeout: Duration,
    /// Serve `/metrics` without a token (HEIST_METRICS_PUBLIC). Default false: it then needs a
    /// client token with `cluster:read` signed by this worker's coordinator.
    pub metrics_public: bool,
    /// A span per call (parented by the coordinator's `traceparent`) and the RPC metrics
    /// (HEIST_TELEMETRY). Default true; off only to measure what it costs.
    pub telemetry: bool,
    /// Largest file fs.read returns and fs.write produces, in bytes (HEIST_MAX_FILE_BYTES).
    /// Default 8 MiB.
    pub max_file_bytes: u64,
    /// Most entries fs.list returns before it says it truncated (HEIST_MAX_LIST_ENTRIES).
    /// Default 10000.
    pub max_list_entries: usize,
    /// Largest gRPC message accepted or sent, in bytes (HEIST_MAX_MESSAGE_BYTES). Default 16 MiB.
    pub max_message_bytes: usize,
    /// How commands are isolated (HEIST_SANDBOX: process, unconfined or docker). Default process.
    pub sandbox: Mode,
    /// Engine address for the docker backend (HEIST_DOCKER_HOST). `None`: DOCKER_HOST, else
    /// the local socket.
    pub docker_host: Option<String>,
    /// Image of the docker backend's session containers (HEIST_SANDBOX_IMAGE). Default
    /// `heist-sandbox:latest`.
    pub sandbox_image: String,
    /// Network mode of the docker backend's session containers (HEIST_DOCKER_NETWORK).
    /// Default `none`.
    pub docker_network: String,
    /// How long a docker command killed by SIGKILL (not by the worker), whose container went
    /// down with it, waits for the engine's `oom` event (HEIST_DOCKER_OOM_WAIT_MS). Default 1 s.
    pub docker_oom_wait: Duration,
    /// The `heist-sandbox` helper binary (HEIST_SANDBOX_HELPER). `None` means `heist-sandbox`
    /// next to the running executable.
    pub sandbox_helper: Option<PathBuf>,
    /// uid commands run as (outside their user namespace) when the worker runs as root
    /// (HEIST_SANDBOX_UID). Default 65534 (nobody). Must not be 0.
    pub sandbox_uid: u32,
    /// gid commands run as when the worker runs as root (HEIST_SANDBOX_GID). Default 65534.
    pub sandbox_gid: u32,
    /// Niceness commands run at, 0-19 (HEIST_SANDBOX_NICE): above the worker's, so a busy or
    /// hostile command cannot starve the worker's own threads. Default 19 (the lowest priority).
    pub sandbox_nice: i32,
    /// Python interpreter for run.python (HEIST_PYTHON). `None` means `python3` on PATH.
    pub python: Option<PathBuf>,
    /// Time a timed-out command gets between SIGTERM and SIGKILL (HEIST_SANDBOX_KILL_GRACE_MS).
    /// Default 500 ms.
    pub kill_grace: Duration,
    /// How often a running command's workspace is measured against the disk and file quotas
    /// (HEIST_QUOTA_POLL_MS). Default 500 ms.
    pub quota_poll_interval: Duration,
    /// Per-session quotas (HEIST_QUOTA_*; see [`Quotas`]).
    pub quotas: Quotas,
    /// Where the cgroup file system is mounted (HEIST_CGROUP_ROOT); `None`: no cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// How the disk quota is enforced (HEIST_DISK_QUOTA): a file system per session (`fs`),
    /// polling, or `auto` (the file system where the host allows it). Default `auto`.
    pub disk_quota: crate::diskfs::DiskQuotaMode,
    /// Where the sessions' disk images live under the `fs` disk quota (HEIST_DISK_IMAGE_DIR).
    /// `None` means `BASE_WORKSPACE/../disk-images`.
    pub disk_image_dir: Option<PathBuf>,
    /// File systems the `fs` disk quota keeps formatted and mounted ahead of time, so that
    /// opening a session does not wait for mkfs (HEIST_DISK_POOL); 0 disables the pool.
    /// Default 4, at most [`MAX_DISK_POOL`].
    pub disk_pool: usize,
    /// The fs tools' bounded pool (HEIST_FS_POOL_THREADS, HEIST_FS_POOL_PER_SESSION,
    /// HEIST_FS_OP_TIMEOUT_S).
    pub fs_pool: crate::tools::PoolLimits,
    /// Local blob cache for checkpoints (HEIST_BLOB_CACHE_DIR). `None` means
    /// `BASE_WORKSPACE/../blobs`.
    pub blob_cache_dir: Option<PathBuf>,
    /// The worker's own small store: the request ids it applied and their results, so a
    /// retried call replays instead of applying twice (HEIST_STATE_DIR). `None` means
    /// `BASE_WORKSPACE.state` (a sibling of the workspaces, one per worker).
    pub state_dir: Option<PathBuf>,
    /// Size bound of the local blob cache, in bytes; least recently used blobs are evicted
    /// (HEIST_BLOB_CACHE_BYTES). 0 disables the cache. Default 2 GiB.
    pub blob_cache_bytes: u64,
    /// Most entries (files, directories, symlinks) a captured workspace may have
    /// (HEIST_CHECKPOINT_MAX_ENTRIES). Default 100000.
    pub checkpoint_max_entries: usize,
    /// Let captures examine only what a workspace's change journal names (fanotify, where
    /// the workspace is a file system of its own) instead of walking it (HEIST_CHECKPOINT_JOURNAL).
    /// Default true.
    pub checkpoint_journal: bool,
    /// Hashes per FindMissingBlobs / GetBlobs call to the coordinator (HEIST_BLOB_BATCH); keep
    /// it at most the coordinator's HEIST_MAX_BLOB_BATCH. Default 10000.
    pub blob_batch: usize,
    /// Model providers, chains, prices and budget (`[models]` in the config file). Default:
    /// the built-in `scripted` provider and the `default` chain over it, so agents run offline.
    pub models: crate::model::ModelsConfig,
    /// Agents configured on top of the built-in set (`[[agents]]` in the config file; one with
    /// a built-in name replaces it). Default none.
    pub agents: Vec<crate::agent::AgentSpec>,
    /// How long a finished turn's events stay on the worker for re-attaching
    /// (HEIST_TURN_RETENTION_S). The coordinator keeps every event for good; this only covers
    /// its relay reconnecting. Default 600 s.
    pub turn_retention: Duration,
    /// Most finished turns kept on the worker (HEIST_MAX_FINISHED_TURNS); the oldest are
    /// forgotten first. Default 256.
    pub max_finished_turns: usize,
    /// This worker's identity key (HEIST_WORKER_KEY_FILE; `{worker_id}` expands): created
    /// `0600` on first start, it proves every registration and blob call, and the coordinator
    /// binds the worker id to it at first join. Default `BASE_WORKSPACE/../worker-<id>.key`.
    pub key_file: Option<PathBuf>,
    /// Most coordinator credential ids remembered against replay (HEIST_MAX_SEEN_CREDENTIALS);
    /// each is kept until its credential expires (about 40 bytes each). Past it, calls are
    /// refused until some expire. Default 1000000.
    pub max_seen_credentials: usize,
    /// Free space the worker's state store (HEIST_STATE_DIR) and blob cache keep in reserve on
    /// their file systems, in bytes (HEIST_WORKER_MIN_FREE_BYTES): below it mutating calls are
    /// refused (RESOURCE_EXHAUSTED, STORE_FULL) before they are applied and health is
    /// NOT_SERVING until space is back. Default 64 MiB, at least 1 MiB.
    pub min_free_bytes: u64,
    /// mTLS with the coordinator (HEIST_TLS_CERT, HEIST_TLS_KEY, HEIST_TLS_CA, all three or
    /// none): the port serves TLS only and requires a client certificate signed by the CA
    /// (the coordinator's); the control stream and blob calls verify the coordinator against
    /// the CA and present this certificate, which must name WORKER_ID as a DNS name.
    /// Default: none, plaintext.
    pub tls: heist_proto::tls::TlsFiles,
}

/// Largest [`Config::disk_pool`] (each ready file system holds a loop device and a mount).
pub const MAX_DISK_POOL: usize = 64;

/// Default of [`Config::min_free_bytes`].
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 << 20;

impl Default for Config {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            coordinator_addr: "http://127.0.0.1:50051".to_owned(),
            advertise_addr: None,
            max_sessions: 64,
            base_workspace: PathBuf::from("./data/workspaces"),
            labels: BTreeMap::new(),
            join_token: String::new(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_millis(5000),
            drain_timeout: Duration::from_secs(30),
            metrics_public: false,
            telemetry: true,
            max_file_bytes: 8 * 1024 * 1024,
            max_list_entries: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
            sandbox: Mode::Process,
            docker_host: None,
            sandbox_image: "heist-sandbox:latest".to_owned(),
            docker_network: "none".to_owned(),
            docker_oom_wait: Duration::from_secs(1),
            sandbox_helper: None,
            sandbox_uid: 65_534,
            sandbox_gid: 65_534,
            sandbox_nice: 19,
            python: None,
            kill_grace: Duration::from_millis(500),
            quota_poll_interval: Duration::from_millis(500),
            quotas: Quotas::default(),
            cgroup_root: Some(PathBuf::from("/sys/fs/cgroup")),
            disk_quota: crate::diskfs::DiskQuotaMode::Auto,
            disk_image_dir: None,
            disk_pool: 4,
            fs_pool: crate::tools::PoolLimits::default(),
            blob_cache_dir: None,
            state_dir: None,
            blob_cache_bytes: 2 << 30,
            checkpoint_max_entries: 100_000,
            checkpoint_journal: true,
            blob_batch: 10_000,
            models: crate::model::ModelsConfig::default(),
            agents: Vec::new(),
            turn_retention: Duration::from_secs(600),
            key_file: None,
            max_seen_credentials: crate::auth::DEFAULT_REPLAY_CAPACITY,
            max_finished_turns: 256,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            tls: heist_proto::tls::TlsFiles::default(),
        }
    }
}

impl Config {
    /// Checks the configuration; the error names the setting to fix.
    pub fn validate(&self) -> Result<(), Error> {
        WorkerId::parse(self.worker_id.as_str())
            .map_err(|status| Error::Config(format!("WORKER_ID: {}", status.message())))?;
        check_url("COORDINATOR_ADDR", &self.coordinator_addr)?;
        self.validate_tls()?;
        if self.max_seen_credentials == 0 {
            return Err(Error::Config(
                "HEIST_MAX_SEEN_CREDENTIALS must be at least 1".to_owned(),
            ));
        }
        if self.disk_pool > MAX_DISK_POOL {
            return Err(Error::Config(format!(
                "HEIST_DISK_POOL must be at most {MAX_DISK_POOL}"
            )));
        }
        if self.min_free_bytes < 1 << 20 {
            return Err(Error::Config(
                "HEIST_WORKER_MIN_FREE_BYTES must be at least 1048576 (1 MiB)".to_owned(),
            ));
        }
        if let Some(addr) = &self.advertise_addr {
            check_url("HEIST_ADVERTISE_ADDR", addr)?;
        }
        if self.join_token.is_empty() {
            return Err(Error::Config(
                "HEIST_JOIN_TOKEN is required: set it to the coordinator's join token".to_owned(),
            ));
        }
        if tonic::metadata::MetadataValue::try_from(self.join_token.as_str()).is_err() {
            return Err(Error::Config(
                "HEIST_JOIN_TOKEN must be printable ASCII (it travels as gRPC metadata)".to_owned(),
            ));
        }
        crate::model::Gateway::from_config(&self.models)
            .map_err(|e| Error::Config(format!("[models]: {e}")))?;
        let agents = crate::agent::agents_with(self.agents.clone())
            .map_err(|e| Error::Config(format!("[[agents]]: {e}")))?;
        for agent in &agents {
            if !self.models.chains.contains_key(&agent.model) && agent.model != "default" {
                return Err(Error::Config(format!(
                    "[[agents]]: agent {:?} uses model chain {:?}, which [models.chains] does not \
                     define",
                    agent.name, agent.model
                )));
            }
        }
        if self.max_sessions == 0 {
            return Err(Error::Config("MAX_SESSIONS must be at least 1".to_owned()));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(Error::Config(
                "HEIST_RECONNECT_MIN_MS must be above 0 and at most HEIST_RECONNECT_MAX_MS"
                    .to_owned(),
            ));
        }
        if self.max_file_bytes == 0 || self.max_list_entries == 0 || self.max_message_bytes == 0 {
            return Err(Error::Config(
                "HEIST_MAX_FILE_BYTES, HEIST_MAX_LIST_ENTRIES and HEIST_MAX_MESSAGE_BYTES must be \
                 above 0"
                    .to_owned(),
            ));
        }
        if self.checkpoint_max_entries == 0 || self.blob_batch == 0 {
            return Err(Error::Config(
                "HEIST_CHECKPOINT_MAX_ENTRIES and HEIST_BLOB_BATCH must be above 0".to_owned(),
            ));
        }
        self.quotas.validate(self.max_message_bytes)?;
        self.fs_pool.validate()?;
        if self.sandbox_uid == 0 || self.sandbox_gid == 0 {
            return Err(Error::Config(
                "HEIST_SANDBOX_UID and HEIST_SANDBOX_GID must not be 0: commands never run as root"
                    .to_owned(),
            ));
        }
        if !(0..=19).contains(&self.sandbox_nice) {
            return Err(Error::Config(
                "HEIST_SANDBOX_NICE must be between 0 and 19".to_owned(),
            ));
        }
        if self.kill_grace.is_zero() || self.quota_poll_interval.is_zero() {
            return Err(Error::Config(
                "HEIST_SANDBOX_KILL_GRACE_MS and HEIST_QUOTA_POLL_MS must be above 0".to_owned(),
            ));
        }
        if self.base_workspace.as_os_str().is_empty() {
            return Err(Error::Config("BASE_WORKSPACE must not be empty".to_owned()));
        }
        Ok(())
    }
}

/// Parses `HEIST_LABELS`: comma-separated `key=value` pairs; an empty string means no labels.
pub fn parse_labels(raw: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut labels = BTreeMap::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(Error::Config(format!(
                "HEIST_LABELS entry {pair:?} is not key=value (example: zone=a,gpu=none)"
            )));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(Error::Config(format!(
                "HEIST_LABELS entry {pair:?} has an empty key"
            )));
        }
        labels.insert(key.to_owned(), value.trim().to_owned());
    }
    Ok(labels)
}

impl Config {
    /// TLS is all or nothing on a worker: certificate, key and CA, https:// addresses, and a
    /// worker id its certificate can name.
    fn validate_tls(&self) -> Result<(), Error> {
        if !self.tls.is_set() {
            return Ok(());
        }
        let tls = self.tls.load().map_err(|e| Error::Config(e.to_string()))?;
        let Some(tls) = tls.filter(|t| t.has_ca()) else {
            return Err(Error::Config(
                "HEIST_TLS_CA is not set: a worker under TLS needs the cluster CA too (it \
                 verifies the coordinator and the coordinator's client certificate)"
                    .to_owned(),
            ));
        };
        if !heist_proto::tls::is_dns_name(&self.worker_id) {
            return Err(Error::Config(format!(
                "WORKER_ID {:?} is not a DNS name, which a worker's certificate must name under \
                 TLS: use letters, digits, '-' and '.'",
                self.worker_id
            )));
        }
        let own = [tls.certificate().clone()];
        if heist_proto::tls::check_peer_name(Some(&own), &self.worker_id).is_err() {
            return Err(Error::Config(format!(
                "HEIST_TLS_CERT does not name WORKER_ID {:?} (as a DNS subject alternative \
                 name): the coordinator accepts a worker only with a certificate for its id",
                self.worker_id
            )));
        }
        if !self.coordinator_addr.starts_with("https://") {
            return Err(Error::Config(format!(
                "COORDINATOR_ADDR {:?} is plaintext but TLS is configured: use https://",
                self.coordinator_addr
            )));
        }
        if let Some(addr) = &self.advertise_addr
            && !addr.starts_with("https://")
        {
            return Err(Error::Config(format!(
                "HEIST_ADVERTISE_ADDR {addr:?} is plaintext but this worker serves TLS: use \
                 https://"
            )));
        }
        Ok(())
    }

    /// The coordinator as a tonic endpoint: over mTLS (verified against the CA, presenting
    /// this worker's certificate) when TLS is configured.
    pub fn coordinator_endpoint(&self) -> Result<tonic::transport::Endpoint, Error> {
        let endpoint = tonic::transport::Endpoint::from_shared(self.coordinator_addr.clone())
            .map_err(|e| Error::Config(format!("COORDINATOR_ADDR: {e}")))?;
        let tls = self.tls.load().map_err(|e| Error::Config(e.to_string()))?;
        match tls.and_then(|t| t.cluster_client(None)) {
            None => Ok(endpoint),
            Some(client) => endpoint
                .tls_config(client)
                .map_err(|e| Error::Config(format!("COORDINATOR_ADDR: cannot set up TLS: {e}"))),
        }
    }
}

fn check_url(name: &str, raw: &str) -> Result<(), Error> {
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| Error::Config(format!("{name} {raw:?} is not a URL: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(Error::Config(format!(
            "{name} {raw:?} must look like http://host:port"
        ))),
    }
}

/// The host name if it is a valid worker id, else "worker-1".
fn default_worker_id() -> String {
    host_name()
        .filter(|h| WorkerId::parse(h.as_str()).is_ok())
        .unwrap_or_else(|| "worker-1".to_owned())
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

impl Config {
    /// Replaces `{hostname}` and `{worker_id}` in the advertised address and the workspace base,
    /// so replicas sharing one configuration (e.g. `docker compose --scale worker=3`) each
    /// advertise their own name and keep their workspaces apart.
    pub fn expand_placeholders(&mut self) {
        let host = host_name().unwrap_or_else(|| "localhost".to_owned());
        let expand = |text: &str| {
            text.replace("{hostname}", &host)
                .replace("{worker_id}", &self.worker_id)
        };
        if let Some(addr) = &self.advertise_addr {
            self.advertise_addr = Some(expand(addr));
        }
        if let Some(base) = self.base_workspace.to_str().filter(|b| b.contains('{')) {
            self.base_workspace = PathBuf::from(expand(base));
        }
        if let Some(dir) = self
            .blob_cache_dir
            .as_ref()
            .and_then(|d| d.to_str())
            .filter(|d| d.contains('{'))
        {
            self.blob_cache_dir = Some(PathBuf::from(expand(dir)));
        }
        if let Some(dir) = self
            .state_dir
            .as_ref()
            .and_then(|d| d.to_str())
            .filter(|d| d.contains('{'))
        {
            self.state_dir = Some(PathBuf::from(expand(dir)));
        }
        if let Some(file) = self
            .key_file
            .as_ref()
            .and_then(|d| d.to_str())
            .filter(|d| d.contains('{'))
        {
            self.key_file = Some(PathBuf::from(expand(file)));
        }
    }

    /// Where this worker's identity key lives (see [`Config::key_file`]).
    pub fn key_path(&self) -> PathBuf {
        self.key_file.clone().unwrap_or_else(|| {
            let base = std::path::absolute(&self.base_workspace)
                .unwrap_or_else(|_| self.base_workspace.clone());
            let name = format!("worker-{}.key", self.worker_id);
            base.parent()
                .map_or_else(|| base.join(&name), |p| p.join(&name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            join_token: "secret".to_owned(),
            ..Config::default()
        }
    }

    #[test]
    fn defaults_validate_once_a_join_token_is_set() {
        assert!(Config::default().validate().is_err());
        valid().validate().expect("valid");
    }

    #[test]
    fn validate_names_the_bad_setting() {
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    worker_id: "a/b".into(),
                    ..valid()
                },
                "WORKER_ID",
            ),
            (
                Config {
                    min_free_bytes: 1024,
                    ..valid()
                },
                "HEIST_WORKER_MIN_FREE_BYTES",
            ),
            (
                Config {
                    disk_pool: MAX_DISK_POOL + 1,
                    ..valid()
                },
                "HEIST_DISK_POOL",
            ),
            (
                Config {
                    coordinator_addr: "localhost".into(),
                    ..valid()
                },
                "COORDINATOR_ADDR",
            ),
            (
                Config {
                    max_sessions: 0,
                    ..valid()
                },
                "MAX_SESSIONS",
            ),
            (
                Config {
                    reconnect_min: Duration::from_secs(10),
                    ..valid()
                },
                "HEIST_RECONNECT_MIN_MS",
            ),
            (
                Config {
                    join_token: "bad\ntoken".into(),
                    ..valid()
                },
                "HEIST_JOIN_TOKEN",
            ),
        ];
        for (config, needle) in cases {
            let err = config.validate().expect_err(needle).to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn placeholders_name_this_replica() {
        let mut config = Config {
            worker_id: "w7".to_owned(),
            advertise_addr: Some("http://{hostname}:50052".to_owned()),
            base_workspace: PathBuf::from("/data/ws/{worker_id}"),
            ..valid()
        };
        config.expand_placeholders();
        let host = host_name().unwrap_or_else(|| "localhost".to_owned());
        assert_eq!(config.advertise_addr, Some(format!("http://{host}:50052")));
        assert_eq!(config.base_workspace, PathBuf::from("/data/ws/w7"));
        config.validate().expect("valid after expansion");
    }

    #[test]
    fn parses_labels() {
        let labels = parse_labels("zone=a, gpu = none,,empty=").expect("labels");
        assert_eq!(labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(labels.get("gpu").map(String::as_str), Some("none"));
        assert_eq!(labels.get("empty").map(String::as_str), Some(""));
        assert!(parse_labels("").expect("empty").is_empty());
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("=x").is_err());
    }
}
