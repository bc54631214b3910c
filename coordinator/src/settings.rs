//! Layered configuration for the `coordinator` binary: defaults ([`Config::default`], written
//! once) → an optional TOML file (`--config` / `HEIST_CONFIG`; unknown keys refused) →
//! environment variables → flags → [`Config::validate`].
//!
//! The file has one top-level table per concern: `[coordinator]` (where to listen, logging, and the
//! [`Config`] fields, named like the flags, with their units). The next
//! concerns (`[agents.*]`, `[models.*]`) get their own tables. Every key is optional; a key
//! left out keeps the layer below. See docs/OPERATIONS.md for an example.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::builder::BoolishValueParser;
pub use heist_proto::settings::Listen;
use heist_proto::settings::set;
use serde::Deserialize;

use crate::{
    config::{Config, Failover},
    error::Error,
};

/// The coordinator's settings (`[coordinator]` in the file); defaults in [`Config`].
#[derive(Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Port serving gRPC and HTTP [default: 50051].
    #[arg(long, env = "GRPC_PORT")]
    pub grpc_port: Option<u16>,
    /// Address to bind [default: 0.0.0.0].
    #[arg(long, env = "HEIST_BIND_ADDR")]
    pub bind_addr: Option<IpAddr>,
    /// Log filter, e.g. `info` or `heist_coordinator=debug,info` [default: info].
    #[arg(long, env = "LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Directory for the state database and the token signing key [default: ./data/coordinator].
    #[arg(long, env = "HEIST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Shared secret workers must present to join (required).
    #[arg(long, env = "HEIST_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Client id of the bootstrap admin [default: admin].
    #[arg(long, env = "HEIST_ADMIN_CLIENT_ID")]
    pub admin_client_id: Option<String>,
    /// Secret of the bootstrap admin, at least 16 characters (required; stored hashed).
    #[arg(long, env = "HEIST_ADMIN_CLIENT_SECRET", hide_env_values = true)]
    pub admin_client_secret: Option<String>,
    /// Issuer (`iss`) of the tokens the coordinator signs [default: heist].
    #[arg(long, env = "HEIST_TOKEN_ISSUER")]
    pub token_issuer: Option<String>,
    /// Lifetime of client access tokens, in seconds [default: 3600].
    #[arg(long, env = "HEIST_TOKEN_TTL_S")]
    pub token_ttl_s: Option<u64>,
    /// A worker silent for this long is marked lost, in milliseconds [default: 10000].
    #[arg(long, env = "HEIST_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// How often workers heartbeat, in milliseconds [default: 1000].
    #[arg(long, env = "HEIST_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// A connected worker silent this long is SUSPECT, in milliseconds [default: 2500].
    #[arg(long, env = "HEIST_SUSPECT_AFTER_MS")]
    pub suspect_after_ms: Option<u64>,
    /// HTTP/2 keep-alive ping interval to workers, in milliseconds [default: 1000].
    #[arg(long, env = "HEIST_WORKER_KEEPALIVE_INTERVAL_MS")]
    pub worker_keepalive_interval_ms: Option<u64>,
    /// Unanswered-ping timeout that closes a worker channel, in milliseconds [default: 2000].
    #[arg(long, env = "HEIST_WORKER_KEEPALIVE_TIMEOUT_MS")]
    pub worker_keepalive_timeout_ms: Option<u64>,
    /// Cap on the deadline forwarded to workers, in seconds [default: 300].
    #[arg(long, env = "HEIST_WORKER_CALL_TIMEOUT_S")]
    pub worker_call_timeout_s: Option<u64>,
    /// How long request ids are remembered, in seconds [default: 86400].
    #[arg(long, env = "HEIST_IDEMPOTENCY_TTL_S")]
    pub idempotency_ttl_s: Option<u64>,
    /// Longest wait at shutdown for client calls in flight before the worker streams are
    /// closed, in seconds [default: 30].
    #[arg(long, env = "HEIST_DRAIN_TIMEOUT_S")]
    pub drain_timeout_s: Option<u64>,
    /// Largest gRPC message, in bytes [default: 16777216].
    #[arg(long, env = "HEIST_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest blob (one checkpointed file) the blob store accepts, in bytes [default: 1 GiB].
    #[arg(long, env = "HEIST_MAX_BLOB_BYTES")]
    pub max_blob_bytes: Option<u64>,
    /// Most hashes in one FindMissingBlobs or GetBlobs request [default: 100000].
    #[arg(long, env = "HEIST_MAX_BLOB_BATCH")]
    pub max_blob_batch: Option<usize>,
    /// Checkpoints kept per session, 0 for all [default: 100].
    #[arg(long, env = "HEIST_CHECKPOINT_MAX_PER_SESSION")]
    pub checkpoint_max_per_session: Option<u32>,
    /// Checkpoints older than this are removed, in seconds, 0 for never [default: 2592000].
    #[arg(long, env = "HEIST_CHECKPOINT_MAX_AGE_S")]
    pub checkpoint_max_age_s: Option<u64>,
    /// Checkpoints stored as deltas in a row before one is stored whole, 0 for always whole
    /// [default: 32].
    #[arg(long, env = "HEIST_CHECKPOINT_MAX_DELTA_CHAIN")]
    pub checkpoint_max_delta_chain: Option<u32>,
    /// How often checkpoint age retention and the blob sweep run, in seconds [default: 300].
    #[arg(long, env = "HEIST_CHECKPOINT_GC_INTERVAL_S")]
    pub checkpoint_gc_interval_s: Option<u64>,
    /// Unreferenced blobs younger than this survive the periodic sweep, in seconds
    /// [default: 600].
    #[arg(long, env = "HEIST_BLOB_ORPHAN_GRACE_S")]
    pub blob_orphan_grace_s: Option<u64>,
    /// Checkpoint after every successful call of a tool that is not read-only [default: false].
    #[arg(long, env = "HEIST_AUTO_CHECKPOINT", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub auto_checkpoint: Option<bool>,
    /// Checkpoint every N acknowledged mutating calls of a session, 0 for off [default: 0].
    #[arg(long, env = "HEIST_CHECKPOINT_EVERY")]
    pub checkpoint_every: Option<u64>,
    /// Sessions of a lost worker: auto (re-place from the latest checkpoint) or manual
    /// [default: auto].
    #[arg(long, env = "HEIST_FAILOVER", value_enum)]
    pub failover: Option<Failover>,
    /// Sessions failed over at once per lost worker [default: 16].
    #[arg(long, env = "HEIST_FAILOVER_PARALLELISM")]
    pub failover_parallelism: Option<usize>,
    /// Routed tool calls recorded in the audit log: all, mutating or off [default: all].
    #[arg(long, env = "HEIST_AUDIT_CALLS", value_enum)]
    pub audit_calls: Option<crate::audit::AuditCalls>,
    /// Closed sessions and their transcripts are collected after this, in seconds
    /// [default: 259200].
    #[arg(long, env = "HEIST_SESSION_RETENTION_S")]
    pub session_retention_s: Option<u64>,
    /// How often closed sessions are collected, in seconds [default: 300].
    #[arg(long, env = "HEIST_SESSION_GC_INTERVAL_S")]
    pub session_gc_interval_s: Option<u64>,
    /// Serve /metrics without a token (otherwise it needs one with cluster:read) [default: false].
    #[arg(long, env = "HEIST_METRICS_PUBLIC", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub metrics_public: Option<bool>,
    /// Per-call spans (with W3C trace context) and RPC metrics; off only to measure their
    /// cost [default: true].
    #[arg(long, env = "HEIST_TELEMETRY", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub telemetry: Option<bool>,
    /// Host names /mcp answers, comma-separated, `*` for any
    /// [default: localhost,127.0.0.1,::1,coordinator].
    #[arg(long, env = "HEIST_MCP_ALLOWED_HOSTS", value_delimiter = ',')]
    pub mcp_allowed_hosts: Option<Vec<String>>,
    /// Browser origins allowed to call /mcp, comma-separated (`http://localhost:*`)
    /// [default: none: requests with an Origin header are refused].
    #[arg(long, env = "HEIST_MCP_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub mcp_allowed_origins: Option<Vec<String>>,
    /// Largest MCP request body, in bytes [default: 4194304].
    #[arg(long, env = "HEIST_MCP_MAX_REQUEST_BYTES")]
    pub mcp_max_request_bytes: Option<usize>,
    /// Largest MCP tool result, in bytes of JSON [default: 4194304].
    #[arg(long, env = "HEIST_MCP_MAX_RESULT_BYTES")]
    pub mcp_max_result_bytes: Option<usize>,
    /// Public base URL named in the OAuth documents [default: http:// + the request's Host].
    #[arg(long, env = "HEIST_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// How far a worker identity proof may be from this clock, in seconds [default: 60].
    #[arg(long, env = "HEIST_WORKER_PROOF_WINDOW_S")]
    pub worker_proof_window_s: Option<u64>,
    /// Most worker proof nonces remembered against replay [default: 100000].
    #[arg(long, env = "HEIST_WORKER_PROOF_NONCES")]
    pub worker_proof_nonces: Option<usize>,
    /// Lifetime of a per-call worker credential, in seconds [default: 30].
    #[arg(long, env = "HEIST_WORKER_CREDENTIAL_TTL_S")]
    pub worker_credential_ttl_s: Option<u64>,
    /// Worker ids whose key binding is dropped at start so they can enrol again
    /// (comma-separated) [default: none].
    #[arg(long, env = "HEIST_FORGET_WORKER_KEYS", value_delimiter = ',')]
    pub forget_worker_keys: Option<Vec<String>>,
    /// Most tools one worker may advertise [default: 128].
    #[arg(long, env = "HEIST_MAX_WORKER_TOOLS")]
    pub max_worker_tools: Option<usize>,
    /// Largest single tool spec a worker may advertise, in bytes [default: 16384].
    #[arg(long, env = "HEIST_MAX_TOOL_SPEC_BYTES")]
    pub max_tool_spec_bytes: Option<usize>,
    /// Largest catalogue one worker may advertise, in bytes [default: 262144].
    #[arg(long, env = "HEIST_MAX_CATALOGUE_BYTES")]
    pub max_catalogue_bytes: Option<usize>,
    /// Highest capacity a worker may claim; more is capped [default: 4096].
    #[arg(long, env = "HEIST_MAX_WORKER_CAPACITY")]
    pub max_worker_capacity: Option<u32>,
    /// Prefixes under which workers may advertise extra tools (comma-separated)
    /// [default: none].
    #[arg(long, env = "HEIST_ALLOWED_TOOL_PREFIXES", value_delimiter = ',')]
    pub allowed_tool_prefixes: Option<Vec<String>>,
    /// Failed logins a (client, address) pair gets before backing off [default: 5].
    #[arg(long, env = "HEIST_LOGIN_FREE_FAILURES")]
    pub login_free_failures: Option<u32>,
    /// First failed-login back-off, in milliseconds; doubles per failure [default: 1000].
    #[arg(long, env = "HEIST_LOGIN_BACKOFF_BASE_MS")]
    pub login_backoff_base_ms: Option<u64>,
    /// Longest failed-login back-off, in seconds [default: 300].
    #[arg(long, env = "HEIST_LOGIN_BACKOFF_MAX_S")]
    pub login_backoff_max_s: Option<u64>,
    /// Failed logins per second, all clients, before failing addresses wait [default: 20].
    #[arg(long, env = "HEIST_LOGIN_FAILURES_PER_S")]
    pub login_failures_per_s: Option<u32>,
    /// Calls per second one client may make, sustained [default: 50000].
    #[arg(long, env = "HEIST_PRINCIPAL_CALLS_PER_S")]
    pub principal_calls_per_s: Option<u32>,
    /// Calls one client may make at once above its sustained rate [default: 100000].
    #[arg(long, env = "HEIST_PRINCIPAL_CALL_BURST")]
    pub principal_call_burst: Option<u32>,
    /// Calls one client may have in flight, streams not counted [default: 512].
    #[arg(long, env = "HEIST_PRINCIPAL_MAX_CONCURRENT_CALLS")]
    pub principal_max_concurrent_calls: Option<u32>,
    /// Server-streaming calls (turns, tails) one client may have open [default: 256].
    #[arg(long, env = "HEIST_PRINCIPAL_MAX_OPEN_STREAMS")]
    pub principal_max_open_streams: Option<u32>,
    /// Free space kept in reserve on the data directory's file system; below it mutations are
    /// refused and readiness is NOT_SERVING, in bytes [default: 67108864 (64 MiB)].
    #[arg(long, env = "HEIST_STORE_MIN_FREE_BYTES")]
    pub store_min_free_bytes: Option<u64>,
    /// PEM certificate chain: with --tls-key, serve TLS only [default: none, plaintext].
    #[arg(long, env = "HEIST_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [default: none].
    #[arg(long, env = "HEIST_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM cluster CA: mTLS with workers (their certificates must name their ids)
    /// [default: none].
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
    data_dir,
    join_token,
    admin_client_id,
    admin_client_secret,
    token_issuer,
    token_ttl_s,
    lease_ttl_ms,
    heartbeat_interval_ms,
    suspect_after_ms,
    worker_keepalive_interval_ms,
    worker_keepalive_timeout_ms,
    worker_call_timeout_s,
    idempotency_ttl_s,
    drain_timeout_s,
    max_message_bytes,
    max_blob_bytes,
    max_blob_batch,
    checkpoint_max_per_session,
    checkpoint_max_age_s,
    checkpoint_max_delta_chain,
    checkpoint_gc_interval_s,
    blob_orphan_grace_s,
    auto_checkpoint,
    checkpoint_every,
    failover,
    failover_parallelism,
    audit_calls,
    session_retention_s,
    session_gc_interval_s,
    metrics_public,
    telemetry,
    mcp_allowed_hosts,
    mcp_allowed_origins,
    mcp_max_request_bytes,
    mcp_max_result_bytes,
    public_url,
    worker_proof_window_s,
    worker_proof_nonces,
    worker_credential_ttl_s,
    forget_worker_keys,
    max_worker_tools,
    max_tool_spec_bytes,
    max_catalogue_bytes,
    max_worker_capacity,
    allowed_tool_prefixes,
    login_free_failures,
    login_backoff_base_ms,
    login_backoff_max_s,
    login_failures_per_s,
    principal_calls_per_s,
    principal_call_burst,
    principal_max_concurrent_calls,
    principal_max_open_streams,
    store_min_free_bytes,
    tls_cert,
    tls_key,
    tls_ca,
    tls_handshake_timeout_s,
});

impl Settings {
    /// `base` with every field that is set here applied.
    pub fn apply(self, mut c: Config) -> Config {
        let secs = Duration::from_secs;
        let millis = Duration::from_millis;
        set(&mut c.data_dir, self.data_dir, |v| v);
        set(&mut c.join_token, self.join_token, |v| v);
        set(&mut c.admin_client_id, self.admin_client_id, |v| v);
        set(&mut c.admin_client_secret, self.admin_client_secret, |v| v);
        set(&mut c.token_issuer, self.token_issuer, |v| v);
        set(&mut c.token_ttl, self.token_ttl_s, secs);
        set(&mut c.lease_ttl, self.lease_ttl_ms, millis);
        set(
            &mut c.heartbeat_interval,
            self.heartbeat_interval_ms,
            millis,
        );
        set(&mut c.suspect_after, self.suspect_after_ms, millis);
        set(
            &mut c.worker_keepalive_interval,
            self.worker_keepalive_interval_ms,
            millis,
        );
        set(
            &mut c.worker_keepalive_timeout,
            self.worker_keepalive_timeout_ms,
            millis,
        );
        set(&mut c.worker_call_timeout, self.worker_call_timeout_s, secs);
        set(&mut c.idempotency_ttl, self.idempotency_ttl_s, secs);
        set(&mut c.drain_timeout, self.drain_timeout_s, secs);
        set(&mut c.max_message_bytes, self.max_message_bytes, |v| v);
        set(&mut c.max_blob_bytes, self.max_blob_bytes, |v| v);
        set(&mut c.max_blob_batch, self.max_blob_batch, |v| v);
        set(
            &mut c.checkpoint_max_per_session,
            self.checkpoint_max_per_session,
            |v| v,
        );
        set(&mut c.checkpoint_max_age, self.checkpoint_max_age_s, secs);
        set(
            &mut c.checkpoint_max_delta_chain,
            self.checkpoint_max_delta_chain,
            |v| v,
        );
        set(
            &mut c.checkpoint_gc_interval,
            self.checkpoint_gc_interval_s,
            secs,
        );
        set(&mut c.blob_orphan_grace, self.blob_orphan_grace_s, secs);
        set(&mut c.auto_checkpoint, self.auto_checkpoint, |v| v);
        set(&mut c.checkpoint_every, self.checkpoint_every, |v| v);
        set(&mut c.failover, self.failover, |v| v);
        set(
            &mut c.failover_parallelism,
            self.failover_parallelism,
            |v| v,
        );
        set(&mut c.audit_calls, self.audit_calls, |v| v);
        set(&mut c.session_retention, self.session_retention_s, secs);
        set(&mut c.session_gc_interval, self.session_gc_interval_s, secs);
        set(&mut c.metrics_public, self.metrics_public, |v| v);
        set(&mut c.telemetry, self.telemetry, |v| v);
        set(&mut c.mcp.allowed_hosts, self.mcp_allowed_hosts, |v| v);
        set(&mut c.mcp.allowed_origins, self.mcp_allowed_origins, |v| v);
        set(
            &mut c.mcp.max_request_bytes,
            self.mcp_max_request_bytes,
            |v| v,
        );
        set(
            &mut c.mcp.max_result_bytes,
            self.mcp_max_result_bytes,
            |v| v,
        );
        c.mcp.public_url = self.public_url.or(c.mcp.public_url);
        set(&mut c.worker_proof_window, self.worker_proof_window_s, secs);
        set(&mut c.worker_proof_nonces, self.worker_proof_nonces, |v| v);
        set(
            &mut c.worker_credential_ttl,
            self.worker_credential_ttl_s,
            secs,
        );
        set(
            &mut c.forget_worker_keys,
            self.forget_worker_keys,
            non_empty,
        );
        set(&mut c.max_worker_tools, self.max_worker_tools, |v| v);
        set(&mut c.max_tool_spec_bytes, self.max_tool_spec_bytes, |v| v);
        set(&mut c.max_catalogue_bytes, self.max_catalogue_bytes, |v| v);
        set(&mut c.max_worker_capacity, self.max_worker_capacity, |v| v);
        set(
            &mut c.allowed_tool_prefixes,
            self.allowed_tool_prefixes,
            non_empty,
        );
        set(&mut c.login_free_failures, self.login_free_failures, |v| v);
        set(
            &mut c.login_backoff_base,
            self.login_backoff_base_ms,
            millis,
        );
        set(&mut c.login_backoff_max, self.login_backoff_max_s, secs);
        set(
            &mut c.login_failures_per_s,
            self.login_failures_per_s,
            |v| v,
        );
        set(&mut c.limits.calls_per_s, self.principal_calls_per_s, |v| v);
        set(&mut c.limits.burst, self.principal_call_burst, |v| v);
        set(
            &mut c.limits.max_concurrent_calls,
            self.principal_max_concurrent_calls,
            |v| v,
        );
        set(
            &mut c.limits.max_open_streams,
            self.principal_max_open_streams,
            |v| v,
        );
        set(
            &mut c.store_min_free_bytes,
            self.store_min_free_bytes,
            |v| v,
        );
        set(&mut c.tls.cert, self.tls_cert, non_empty_path);
        set(&mut c.tls.key, self.tls_key, non_empty_path);
        set(&mut c.tls.ca, self.tls_ca, non_empty_path);
        set(
            &mut c.tls.handshake_timeout,
            self.tls_handshake_timeout_s,
            secs,
        );
        c
    }
}

/// A path, or none for an empty value (`HEIST_TLS_CA=` turns a file's setting off).
fn non_empty_path(path: PathBuf) -> Option<PathBuf> {
    Some(path).filter(|p| !p.as_os_str().is_empty())
}

/// A comma-separated list's items, trimmed, without empty ones.
fn non_empty(items: Vec<String>) -> Vec<String> {
    items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect()
}

impl Settings {
    /// Where to listen and how to log; the rest of the settings stay for [`Settings::apply`].
    fn listen(&mut self) -> Listen {
        Listen::resolve(
            self.bind_addr.take(),
            self.grpc_port.take(),
            50051,
            self.log_level.take(),
            self.log_format.take(),
        )
    }
}

/// The config file: one table per concern. One file can serve a whole cluster: each binary
/// reads its own table and leaves the other's to it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[coordinator]`.
    #[serde(default)]
    pub coordinator: Settings,
    /// `[worker]`, read by the worker.
    #[serde(default)]
    pub worker: Option<toml::Table>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Settings { .. }")
    }
}

impl File {
    /// Reads and parses a config file; the error names the file and the bad key.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io("cannot read the config file", path, e))?;
        Self::parse(&text)
            .map_err(|why| Error::InvalidConfig(format!("config file {}: {why}", path.display())))
    }

    /// Parses a config file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// Puts the layers together: `cli` (flags over environment) over the file at `config_file`
/// (if any) over the defaults, then validates.
pub fn load(config_file: Option<&Path>, settings: Settings) -> Result<(Listen, Config), Error> {
    let file = match config_file {
        Some(path) => File::read(path)?,
        None => File::default(),
    };
    let mut settings = settings.over(file.coordinator);
    let listen = settings.listen();
    let config = settings.apply(Config::default());
    config.validate()?;
    Ok((listen, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_refused() {
        let file = File::parse(
            "[coordinator]\ngrpc_port = 6000\njoin_token = \"from-file\"\n\
             lease_ttl_ms = 5000\nauto_checkpoint = true\n",
        )
        .expect("parse");
        assert_eq!(file.coordinator.grpc_port, Some(6000));
        assert!(
            File::parse("[worker]\nanything = 1\n").is_ok(),
            "the worker's table is its own"
        );
        let cli = Settings {
            join_token: Some("from-cli".to_owned()),
            ..Settings::default()
        };
        let config = cli.over(file.coordinator).apply(Config::default());
        assert_eq!(config.join_token, "from-cli", "flags and env beat the file");
        assert_eq!(
            config.lease_ttl,
            Duration::from_millis(5000),
            "the file beats defaults"
        );
        assert!(config.auto_checkpoint);
        assert_eq!(config.token_issuer, "heist", "defaults fill the rest");

        let err = File::parse("[coordinator]\nlease_ttl = 5\n").expect_err("unknown key");
        assert!(err.contains("lease_ttl"), "{err}");
        let err = File::parse("[agentz]\n").expect_err("unknown table");
        assert!(err.contains("agentz"), "{err}");
    }
}
