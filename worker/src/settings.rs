//! Layered configuration for the `worker` binary: defaults ([`Config::default`], written once)
//! → an optional TOML file (`--config` / `HEIST_CONFIG`; unknown keys refused) → environment
//! variables → flags → [`Config::validate`].
//!
//! The file has one top-level table per concern: `[worker]` (where to listen, logging, and the
//! [`Config`] fields, named like the flags, with their units). The sandbox and
//! quota settings are flags and environment variables for now; agents and model providers get
//! their own tables next. Every key is optional. See docs/OPERATIONS.md for an example.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

pub use heist_proto::settings::Listen;
use heist_proto::settings::set;
use serde::Deserialize;

use crate::{Error, config::Config, parse_labels};

/// The worker's settings (`[worker]` in the file); defaults in [`Config`].
#[derive(Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Port serving gRPC and HTTP [default: 50052].
    #[arg(long, env = "GRPC_PORT")]
    pub grpc_port: Option<u16>,
    /// Address to bind [default: 0.0.0.0].
    #[arg(long, env = "HEIST_BIND_ADDR")]
    pub bind_addr: Option<IpAddr>,
    /// Log filter, e.g. `info` or `heist_worker=debug,info` [default: info].
    #[arg(long, env = "LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Stable worker id [default: the host name, or worker-1].
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Coordinator address for the control stream [default: http://127.0.0.1:50051].
    #[arg(long, env = "COORDINATOR_ADDR")]
    pub coordinator_addr: Option<String>,
    /// Address the coordinator dials for session calls [default: http://ADDR:PORT of the
    /// listener, with loopback for ADDR when bound to 0.0.0.0]. `{hostname}` is replaced by
    /// this host's name (one setting for scaled replicas).
    #[arg(long, env = "HEIST_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Maximum concurrent sessions [default: 64].
    #[arg(long, env = "MAX_SESSIONS")]
    pub max_sessions: Option<u32>,
    /// Directory holding one workspace per session [default: ./data/workspaces]. `{worker_id}`
    /// and `{hostname}` are replaced (replicas sharing a volume keep their workspaces apart).
    #[arg(long, env = "BASE_WORKSPACE")]
    pub base_workspace: Option<PathBuf>,
    /// Placement labels, `k=v,k2=v2` [default: none].
    #[arg(long, env = "HEIST_LABELS")]
    pub labels: Option<String>,
    /// Join token the coordinator expects (required).
    #[arg(long, env = "HEIST_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// First reconnect delay, in milliseconds [default: 100].
    #[arg(long, env = "HEIST_RECONNECT_MIN_MS")]
    pub reconnect_min_ms: Option<u64>,
    /// Largest reconnect delay, in milliseconds [default: 5000].
    #[arg(long, env = "HEIST_RECONNECT_MAX_MS")]
    pub reconnect_max_ms: Option<u64>,
    /// How long shutdown waits for in-flight calls, in seconds [default: 30].
    #[arg(long, env = "HEIST_DRAIN_TIMEOUT_S")]
    pub drain_timeout_s: Option<u64>,
    /// Largest file fs.read returns and fs.write produces, in bytes [default: 8388608].
    #[arg(long, env = "HEIST_MAX_FILE_BYTES")]
    pub max_file_bytes: Option<u64>,
    /// Most entries fs.list returns [default: 10000].
    #[arg(long, env = "HEIST_MAX_LIST_ENTRIES")]
    pub max_list_entries: Option<usize>,
    /// Largest gRPC message, in bytes [default: 16777216].
    #[arg(long, env = "HEIST_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Local checkpoint blob cache [default: BASE_WORKSPACE/../blobs].
    #[arg(long, env = "HEIST_BLOB_CACHE_DIR")]
    pub blob_cache_dir: Option<PathBuf>,
    /// The worker's own small store (request ids it applied, with their results)
    /// [default: BASE_WORKSPACE.state, next to the workspaces].
    #[arg(long, env = "HEIST_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Size bound of the blob cache, in bytes, 0 to disable it [default: 2 GiB].
    #[arg(long, env = "HEIST_BLOB_CACHE_BYTES")]
    pub blob_cache_bytes: Option<u64>,
    /// Most entries a captured workspace may have [default: 100000].
    #[arg(long, env = "HEIST_CHECKPOINT_MAX_ENTRIES")]
    pub checkpoint_max_entries: Option<usize>,
    /// Captures examine only what the workspace's change journal names, where the workspace is
    /// a file system of its own; false makes every capture walk the tree [default: true].
    #[arg(long, env = "HEIST_CHECKPOINT_JOURNAL", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub checkpoint_journal: Option<bool>,
    /// Hashes per FindMissingBlobs / GetBlobs call, at most the coordinator's
    /// HEIST_MAX_BLOB_BATCH [default: 10000].
    #[arg(long, env = "HEIST_BLOB_BATCH")]
    pub blob_batch: Option<usize>,
    /// Seconds a finished turn's events stay on the worker for re-attaching [default: 600].
    #[arg(long, env = "HEIST_TURN_RETENTION_S")]
    pub turn_retention_s: Option<u64>,
    /// Most finished turns kept on the worker [default: 256].
    #[arg(long, env = "HEIST_MAX_FINISHED_TURNS")]
    pub max_finished_turns: Option<usize>,
    /// Serve /metrics without a token (otherwise it needs a coordinator-signed client token with
    /// cluster:read, the same one that scrapes the coordinator) [default: false].
    #[arg(long, env = "HEIST_METRICS_PUBLIC", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_public: Option<bool>,
    /// Per-call spans (with W3C trace context) and RPC metrics; off only to measure their
    /// cost [default: true].
    #[arg(long, env = "HEIST_TELEMETRY", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub telemetry: Option<bool>,
    /// Docker engine address for `--sandbox docker`, e.g. `unix:///var/run/docker.sock` or
    /// `tcp://socket-proxy:2375` [default: DOCKER_HOST, else the local socket].
    #[arg(long, env = "HEIST_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Image the docker backend runs sessions in [default: heist-sandbox:latest].
    #[arg(long, env = "HEIST_SANDBOX_IMAGE")]
    pub sandbox_image: Option<String>,
    /// Network mode of the docker backend's session containers [default: none].
    #[arg(long, env = "HEIST_DOCKER_NETWORK")]
    pub docker_network: Option<String>,
    /// How long a docker command killed by SIGKILL (not by the worker) waits for the engine's
    /// `oom` event before it is answered as killed, not out of memory, in ms [default: 1000].
    #[arg(long, env = "HEIST_DOCKER_OOM_WAIT_MS")]
    pub docker_oom_wait_ms: Option<u64>,
    /// This worker's identity key file [default: BASE_WORKSPACE/../worker-<id>.key].
    #[arg(long, env = "HEIST_WORKER_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Most coordinator credential ids remembered against replay [default: 100000].
    #[arg(long, env = "HEIST_MAX_SEEN_CREDENTIALS")]
    pub max_seen_credentials: Option<usize>,
    /// Free space kept in reserve on the state store's and blob cache's file systems; below
    /// it mutating calls are refused and health is NOT_SERVING, in bytes
    /// [default: 67108864 (64 MiB)].
    #[arg(long, env = "HEIST_WORKER_MIN_FREE_BYTES")]
    pub min_free_bytes: Option<u64>,
    /// PEM certificate chain naming WORKER_ID: with --tls-key and --tls-ca, mTLS with the
    /// coordinator [default: none, plaintext].
    #[arg(long, env = "HEIST_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [default: none].
    #[arg(long, env = "HEIST_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM cluster CA: verifies the coordinator and its client certificate [default: none].
    #[arg(long, env = "HEIST_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Longest TLS handshake, in seconds [default: 10].
    #[arg(long, env = "HEIST_TLS_HANDSHAKE_TIMEOUT_S")]
    pub tls_handshake_timeout_s: Option<u64>,
}
heist_proto::layer_over!(Settings {
    grpc_port,
    bind_addr,
    log_level,
    log_format,
    worker_id,
    coordinator_addr,
    advertise_addr,
    max_sessions,
    base_workspace,
    labels,
    join_token,
    reconnect_min_ms,
    reconnect_max_ms,
    drain_timeout_s,
    max_file_bytes,
    max_list_entries,
    max_message_bytes,
    blob_cache_dir,
    state_dir,
    blob_cache_bytes,
    checkpoint_max_entries,
    checkpoint_journal,
    blob_batch,
    turn_retention_s,
    max_finished_turns,
    metrics_public,
    telemetry,
    docker_host,
    sandbox_image,
    docker_network,
    docker_oom_wait_ms,
    key_file,
    max_seen_credentials,
    min_free_bytes,
    tls_cert,
    tls_key,
    tls_ca,
    tls_handshake_timeout_s,
});

impl Settings {
    /// `c` with every field that is set here applied.
    pub fn apply(self, mut c: Config) -> Result<Config, Error> {
        let millis = Duration::from_millis;
        set(&mut c.worker_id, self.worker_id, |v| v);
        set(&mut c.coordinator_addr, self.coordinator_addr, |v| v);
        set(&mut c.advertise_addr, self.advertise_addr, |v| {
            Some(v).filter(|a| !a.is_empty())
        });
        set(&mut c.max_sessions, self.max_sessions, |v| v);
        set(&mut c.base_workspace, self.base_workspace, |v| v);
        if let Some(raw) = self.labels {
            c.labels = parse_labels(&raw)?;
        }
        set(&mut c.join_token, self.join_token, |v| v);
        set(&mut c.reconnect_min, self.reconnect_min_ms, millis);
        set(&mut c.reconnect_max, self.reconnect_max_ms, millis);
        set(
            &mut c.drain_timeout,
            self.drain_timeout_s,
            Duration::from_secs,
        );
        set(&mut c.max_file_bytes, self.max_file_bytes, |v| v);
        set(&mut c.max_list_entries, self.max_list_entries, |v| v);
        set(&mut c.max_message_bytes, self.max_message_bytes, |v| v);
        set(&mut c.blob_cache_dir, self.blob_cache_dir, |p| {
            Some(p).filter(|p| !p.as_os_str().is_empty())
        });
        set(&mut c.state_dir, self.state_dir, |p| {
            Some(p).filter(|p| !p.as_os_str().is_empty())
        });
        set(&mut c.blob_cache_bytes, self.blob_cache_bytes, |v| v);
        set(
            &mut c.checkpoint_max_entries,
            self.checkpoint_max_entries,
            |v| v,
        );
        set(&mut c.blob_batch, self.blob_batch, |v| v);
        set(&mut c.metrics_public, self.metrics_public, |v| v);
        set(&mut c.telemetry, self.telemetry, |v| v);
        set(&mut c.checkpoint_journal, self.checkpoint_journal, |v| v);
        set(&mut c.key_file, self.key_file, |p| {
            Some(p).filter(|p| !p.as_os_str().is_empty())
        });
        set(
            &mut c.max_seen_credentials,
            self.max_seen_credentials,
            |v| v,
        );
        set(&mut c.min_free_bytes, self.min_free_bytes, |v| v);
        let path = |p: PathBuf| Some(p).filter(|p| !p.as_os_str().is_empty());
        set(&mut c.tls.cert, self.tls_cert, path);
        set(&mut c.tls.key, self.tls_key, path);
        set(&mut c.tls.ca, self.tls_ca, path);
        set(
            &mut c.tls.handshake_timeout,
            self.tls_handshake_timeout_s,
            Duration::from_secs,
        );
        set(
            &mut c.turn_retention,
            self.turn_retention_s,
            Duration::from_secs,
        );
        set(&mut c.max_finished_turns, self.max_finished_turns, |v| v);
        set(&mut c.docker_host, self.docker_host, |v| {
            Some(v).filter(|h| !h.is_empty())
        });
        set(&mut c.sandbox_image, self.sandbox_image, |v| v);
        set(&mut c.docker_network, self.docker_network, |v| v);
        set(&mut c.docker_oom_wait, self.docker_oom_wait_ms, millis);
        Ok(c)
    }
}

impl Settings {
    /// Where to listen and how to log; the rest of the settings stay for [`Settings::apply`].
    fn listen(&mut self) -> Listen {
        Listen::resolve(
            self.bind_addr.take(),
            self.grpc_port.take(),
            50052,
            self.log_level.take(),
            self.log_format.take(),
        )
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Settings { .. }")
    }
}

/// The config file: one table per concern. One file can serve a whole cluster: each binary
/// reads its own table and leaves the other's to it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[worker]`.
    #[serde(default)]
    pub worker: Settings,
    /// `[coordinator]`, read by the coordinator.
    #[serde(default)]
    pub coordinator: Option<toml::Table>,
    /// `[models]`: providers, chains, prices, budget (see [`crate::model::ModelsConfig`]).
    #[serde(default)]
    pub models: Option<crate::model::ModelsConfig>,
    /// `[[agents]]`: agent specs added to (or replacing) the built-in set.
    #[serde(default)]
    pub agents: Vec<crate::agent::AgentSpec>,
}

impl File {
    /// Reads and parses a config file; the error names the file and the bad key.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the config file {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text)
            .map_err(|why| Error::Config(format!("config file {}: {why}", path.display())))
    }

    /// Parses a config file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// Puts the layers together: `cli` (flags over environment) over the file at `config_file`
/// (if any) over the defaults. The caller applies the sandbox flags and validates.
pub fn load(config_file: Option<&Path>, settings: Settings) -> Result<(Listen, Config), Error> {
    let file = match config_file {
        Some(path) => File::read(path)?,
        None => File::default(),
    };
    let mut settings = settings.over(file.worker);
    let listen = settings.listen();
    let mut config = settings.apply(Config::default())?;
    if let Some(models) = file.models {
        config.models = models;
    }
    config.agents = file.agents;
    config.expand_placeholders();
    Ok((listen, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_refused() {
        let file = File::parse(
            "[worker]\ngrpc_port = 6001\nworker_id = \"from-file\"\n\
             max_sessions = 3\nlabels = \"zone=a\"\n",
        )
        .expect("parse");
        assert_eq!(file.worker.grpc_port, Some(6001));
        let cli = Settings {
            worker_id: Some("from-cli".to_owned()),
            ..Settings::default()
        };
        let config = cli
            .over(file.worker)
            .apply(Config::default())
            .expect("apply");
        assert_eq!(config.worker_id, "from-cli", "flags and env beat the file");
        assert_eq!(config.max_sessions, 3, "the file beats defaults");
        assert_eq!(config.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(config.blob_batch, 10_000, "defaults fill the rest");

        let err = File::parse("[worker]\nmax_session = 5\n").expect_err("unknown key");
        assert!(err.contains("max_session"), "{err}");
    }
}
