//! Coordinator configuration: typed fields with documented defaults, checked by
//! [`Config::validate`] before anything is opened or bound.

use std::{fmt, path::PathBuf, time::Duration};

use crate::{error::Error, limits::LimitsConfig, mcp::McpConfig};

/// Shortest admin client secret accepted, in characters.
pub const MIN_ADMIN_SECRET_CHARS: usize = 16;
/// Default free-space reserve of the data directory (HEIST_STORE_MIN_FREE_BYTES).
pub const DEFAULT_STORE_MIN_FREE_BYTES: u64 = 64 << 20;
/// Smallest reserve accepted: room for the writes sled has begun.
const MIN_STORE_MIN_FREE_BYTES: u64 = 1 << 20;

/// Everything [`crate::serve`] needs besides the listener. `main` fills it from flags and
/// environment variables; tests build it directly.
#[derive(Clone)]
pub struct Config {
    /// Where the sled database (`db/`) and the token signing key (`signing.key`) live.
    /// HEIST_DATA_DIR, default `./data/coordinator`.
    pub data_dir: PathBuf,
    /// Shared secret workers present in `x-heist-join-token` to join. HEIST_JOIN_TOKEN, required.
    pub join_token: String,
    /// Id of the bootstrap admin client. HEIST_ADMIN_CLIENT_ID, default `admin`.
    pub admin_client_id: String,
    /// Secret of the bootstrap admin client (stored only as an Argon2id hash).
    /// HEIST_ADMIN_CLIENT_SECRET, required, at least 16 characters.
    pub admin_client_secret: String,
    /// `iss` of every token the coordinator signs. HEIST_TOKEN_ISSUER, default `heist`.
    pub token_issuer: String,
    /// Lifetime of client access tokens. HEIST_TOKEN_TTL_S, default 3600 s.
    pub token_ttl: Duration,
    /// A worker that neither heartbeats nor reconnects within this is marked lost.
    /// HEIST_LEASE_TTL_MS, default 10000 ms.
    pub lease_ttl: Duration,
    /// How often workers are told to heartbeat. HEIST_HEARTBEAT_INTERVAL_MS, default 1000 ms.
    pub heartbeat_interval: Duration,
    /// A connected worker with no heartbeat for this long is SUSPECT: no new sessions, calls
    /// fail fast with UNAVAILABLE, until its next heartbeat. About two heartbeat intervals
    /// plus slack. HEIST_SUSPECT_AFTER_MS, default 2500 ms.
    pub suspect_after: Duration,
    /// HTTP/2 keep-alive ping interval on the coordinator's channels to workers (also while
    /// idle). HEIST_WORKER_KEEPALIVE_INTERVAL_MS, default 1000 ms.
    pub worker_keepalive_interval: Duration,
    /// A worker channel whose ping is not answered within this is closed, failing its calls
    /// in flight with UNAVAILABLE. HEIST_WORKER_KEEPALIVE_TIMEOUT_MS, default 2000 ms.
    pub worker_keepalive_timeout: Duration,
    /// Cap on the deadline forwarded to workers (and the deadline used when the caller sent none).
    /// HEIST_WORKER_CALL_TIMEOUT_S, default 300 s.
    pub worker_call_timeout: Duration,
    /// How long request-id records are kept for retries. HEIST_IDEMPOTENCY_TTL_S, default 86400 s.
    pub idempotency_ttl: Duration,
    /// At shutdown, the longest wait for client calls in flight before the workers' streams
    /// are closed. HEIST_DRAIN_TIMEOUT_S, default 30 s.
    pub drain_timeout: Duration,
    /// Largest gRPC message accepted or sent. HEIST_MAX_MESSAGE_BYTES, default 16 MiB.
    pub max_message_bytes: usize,
    /// Largest blob (one file of a checkpoint) the blob store accepts, in bytes.
    /// HEIST_MAX_BLOB_BYTES, default 1 GiB.
    pub max_blob_bytes: u64,
    /// Most hashes in one FindMissingBlobs or GetBlobs request. HEIST_MAX_BLOB_BATCH, default
    /// 100000.
    pub max_blob_batch: usize,
    /// Checkpoints kept per session; older ones are removed by retention (never a fork point or
    /// a session's restore source, and never the newest). 0 keeps all.
    /// HEIST_CHECKPOINT_MAX_PER_SESSION, default 100.
    pub checkpoint_max_per_session: u32,
    /// Checkpoints older than this are removed by retention (same exceptions). Zero keeps all.
    /// HEIST_CHECKPOINT_MAX_AGE_S, default 2592000 s (30 days).
    pub checkpoint_max_age: Duration,
    /// Longest chain of checkpoints stored as deltas against their parent before one is stored
    /// whole again (a capture whose head is this deep is sent whole); bounds the work of
    /// reading a checkpoint's tree. 0 stores every checkpoint whole.
    /// HEIST_CHECKPOINT_MAX_DELTA_CHAIN, default 32.
    pub checkpoint_max_delta_chain: u32,
    /// How often age retention and the unreferenced-blob sweep run.
    /// HEIST_CHECKPOINT_GC_INTERVAL_S, default 300 s.
    pub checkpoint_gc_interval: Duration,
    /// An unreferenced blob younger than this is left alone by the periodic sweep (an upload
    /// whose checkpoint has not been committed yet). HEIST_BLOB_ORPHAN_GRACE_S, default 600 s.
    pub blob_orphan_grace: Duration,
    /// Take a checkpoint after every successful call of a tool that is not read-only.
    /// HEIST_AUTO_CHECKPOINT, default false.
    pub auto_checkpoint: bool,
    /// How far a worker's identity proof (registration, blob call) may be from the
    /// coordinator's clock. HEIST_WORKER_PROOF_WINDOW_S, default 60 s.
    pub worker_proof_window: Duration,
    /// Most worker proof nonces remembered (replay guard) within twice the window; past it,
    /// proofs are refused until old ones age out. HEIST_WORKER_PROOF_NONCES, default 100000.
    pub worker_proof_nonces: usize,
    /// Lifetime of the per-call credential the coordinator signs for a worker.
    /// HEIST_WORKER_CREDENTIAL_TTL_S, default 30 s.
    pub worker_credential_ttl: Duration,
    /// Worker ids whose key binding is dropped at start, so a worker whose key was lost can
    /// enrol again (operator escape hatch; remove it once the worker has joined).
    /// HEIST_FORGET_WORKER_KEYS (comma-separated), default empty.
    pub forget_worker_keys: Vec<String>,
    /// Most tools one worker may advertise; more refuses its registration.
    /// HEIST_MAX_WORKER_TOOLS, default 128.
    pub max_worker_tools: usize,
    /// Largest single tool spec (name, description, schema; encoded bytes); a larger one is
    /// dropped. HEIST_MAX_TOOL_SPEC_BYTES, default 16384.
    pub max_tool_spec_bytes: usize,
    /// Largest whole catalogue of one worker (encoded bytes); more refuses its registration.
    /// HEIST_MAX_CATALOGUE_BYTES, default 262144.
    pub max_catalogue_bytes: usize,
    /// Highest capacity (sessions) a worker may claim; more is capped.
    /// HEIST_MAX_WORKER_CAPACITY, default 4096.
    pub max_worker_capacity: u32,
    /// Name prefixes under which any worker may advertise extra tools, besides its own
    /// `<worker id>.`. HEIST_ALLOWED_TOOL_PREFIXES (comma-separated), default none.
    pub allowed_tool_prefixes: Vec<String>,
    /// Failed logins in a row a (client id, address) pair gets before it backs off (an address
    /// over all client ids: four times as many). HEIST_LOGIN_FREE_FAILURES, default 5.
    pub login_free_failures: u32,
    /// First back-off after the free failures; it doubles with each further failure.
    /// HEIST_LOGIN_BACKOFF_BASE_MS, default 1000 ms.
    pub login_backoff_base: Duration,
    /// Longest back-off. HEIST_LOGIN_BACKOFF_MAX_S, default 300 s.
    pub login_backoff_max: Duration,
    /// Failed logins per second over all clients before addresses with failures on record are
    /// refused (burst: ten times this). HEIST_LOGIN_FAILURES_PER_S, default 20.
    pub login_failures_per_s: u32,
    /// Per-principal rate and concurrency limits on the public API (HEIST_PRINCIPAL_*).
    pub limits: LimitsConfig,
    /// Free space the data directory's file system keeps in reserve, in bytes: below it every
    /// mutation is refused (RESOURCE_EXHAUSTED, STORE_FULL) before anything is applied, and
    /// readiness is NOT_SERVING until space is back. HEIST_STORE_MIN_FREE_BYTES, default
    /// 64 MiB, at least 1 MiB.
    pub store_min_free_bytes: u64,
    /// The MCP endpoint's hosts, origins and limits (HEIST_MCP_*, HEIST_PUBLIC_URL).
    pub mcp: McpConfig,
    /// Serve `/metrics` to anyone who can reach the port; otherwise it needs a token with
    /// `cluster:read`. HEIST_METRICS_PUBLIC, default false.
    pub metrics_public: bool,
    /// A span per call (parented by the caller's `traceparent`) and the RPC metrics
    /// ([`heist_proto::trace::RpcLayer`]). HEIST_TELEMETRY, default true; off only to measure
    /// what it costs.
    pub telemetry: bool,
    /// Continuous checkpoints: take one after every N-th acknowledged mutating call of a
    /// session (bounding what a failover can lose to N-1 calls); 0 turns it off,
    /// `auto_checkpoint` is the strict form (N = 1). HEIST_CHECKPOINT_EVERY, default 0.
    pub checkpoint_every: u64,
    /// What happens to the sessions of a worker that is LOST (lease expired): `auto` re-places
    /// each on a healthy worker from its latest checkpoint (FAILED when it has none),
    /// `manual` leaves them for an operator. A session's `heist.failover` label overrides it.
    /// HEIST_FAILOVER, default auto.
    pub failover: Failover,
    /// Sessions failed over at once per lost worker. HEIST_FAILOVER_PARALLELISM, default 16.
    pub failover_parallelism: usize,
    /// Which routed tool calls get a `tool.executed` audit record: `all`, `mutating` (tools
    /// that are not read-only) or `off` (refusals and every other decision are still
    /// recorded). HEIST_AUDIT_CALLS, default all.
    pub audit_calls: crate::audit::AuditCalls,
    /// Closed and failed sessions (with their transcripts) are collected this long after
    /// their last change. HEIST_SESSION_RETENTION_S, default 259200 s (3 days).
    pub session_retention: Duration,
    /// TLS: with a certificate and key (HEIST_TLS_CERT, HEIST_TLS_KEY) the port serves TLS
    /// only; with the cluster CA as well (HEIST_TLS_CA), mTLS with the workers: their
    /// certificates are verified and must name their ids, and the coordinator presents its
    /// certificate to them. Default: none, plaintext.
    pub tls: heist_proto::tls::TlsFiles,
    /// How often closed sessions are collected. HEIST_SESSION_GC_INTERVAL_S, default 300 s.
    pub session_gc_interval: Duration,
}

/// Failover policy for the sessions of a lost worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Failover {
    /// Re-place each session from its latest checkpoint.
    #[default]
    Auto,
    /// Leave the sessions for an operator (fork or restore a checkpoint by hand).
    Manual,
}

impl Failover {
    /// The policy a label value names.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "auto" => Some(Self::Auto),
            "manual" => Some(Self::Manual),
            _ => None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data/coordinator"),
            join_token: String::new(),
            admin_client_id: "admin".to_owned(),
            admin_client_secret: String::new(),
            token_issuer: "heist".to_owned(),
            token_ttl: Duration::from_secs(3600),
            lease_ttl: Duration::from_millis(10_000),
            heartbeat_interval: Duration::from_millis(1_000),
            suspect_after: Duration::from_millis(2_500),
            worker_keepalive_interval: Duration::from_millis(1_000),
            worker_keepalive_timeout: Duration::from_millis(2_000),
            worker_call_timeout: Duration::from_secs(300),
            idempotency_ttl: Duration::from_secs(86_400),
            drain_timeout: Duration::from_secs(30),
            max_message_bytes: 16 * 1024 * 1024,
            max_blob_bytes: 1 << 30,
            max_blob_batch: 100_000,
            checkpoint_max_per_session: 100,
            checkpoint_max_age: Duration::from_secs(30 * 86_400),
            checkpoint_max_delta_chain: 32,
            checkpoint_gc_interval: Duration::from_secs(300),
            blob_orphan_grace: Duration::from_secs(600),
            auto_checkpoint: false,
            checkpoint_every: 0,
            failover: Failover::Auto,
            failover_parallelism: 16,
            audit_calls: crate::audit::AuditCalls::All,
            session_retention: Duration::from_secs(3 * 86_400),
            session_gc_interval: Duration::from_secs(300),
            metrics_public: false,
            telemetry: true,
            mcp: McpConfig::default(),
            worker_proof_window: Duration::from_secs(60),
            worker_proof_nonces: 100_000,
            worker_credential_ttl: Duration::from_secs(30),
            forget_worker_keys: Vec::new(),
            max_worker_tools: 128,
            max_tool_spec_bytes: 16 * 1024,
            max_catalogue_bytes: 256 * 1024,
            max_worker_capacity: 4096,
            allowed_tool_prefixes: Vec::new(),
            login_free_failures: 5,
            login_backoff_base: Duration::from_millis(1000),
            login_backoff_max: Duration::from_secs(300),
            login_failures_per_s: 20,
            limits: LimitsConfig::default(),
            store_min_free_bytes: DEFAULT_STORE_MIN_FREE_BYTES,
            tls: heist_proto::tls::TlsFiles::default(),
        }
    }
}

/// Secrets are redacted so a `?config` in a log line never leaks them.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("join_token", &"<redacted>")
            .field("admin_client_id", &self.admin_client_id)
            .field("admin_client_secret", &"<redacted>")
            .field("token_issuer", &self.token_issuer)
            .field("token_ttl", &self.token_ttl)
            .field("lease_ttl", &self.lease_ttl)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("suspect_after", &self.suspect_after)
            .field("worker_keepalive_interval", &self.worker_keepalive_interval)
            .field("worker_keepalive_timeout", &self.worker_keepalive_timeout)
            .field("worker_call_timeout", &self.worker_call_timeout)
            .field("idempotency_ttl", &self.idempotency_ttl)
            .field("drain_timeout", &self.drain_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_blob_bytes", &self.max_blob_bytes)
            .field("max_blob_batch", &self.max_blob_batch)
            .field(
                "checkpoint_max_per_session",
                &self.checkpoint_max_per_session,
            )
            .field("checkpoint_max_age", &self.checkpoint_max_age)
            .field(
                "checkpoint_max_delta_chain",
                &self.checkpoint_max_delta_chain,
            )
            .field("checkpoint_gc_interval", &self.checkpoint_gc_interval)
            .field("blob_orphan_grace", &self.blob_orphan_grace)
            .field("auto_checkpoint", &self.auto_checkpoint)
            .field("checkpoint_every", &self.checkpoint_every)
            .field("failover", &self.failover)
            .field("failover_parallelism", &self.failover_parallelism)
            .field("audit_calls", &self.audit_calls)
            .field("session_retention", &self.session_retention)
            .field("session_gc_interval", &self.session_gc_interval)
            .field("metrics_public", &self.metrics_public)
            .field("telemetry", &self.telemetry)
            .field("mcp", &self.mcp)
            .field("worker_proof_window", &self.worker_proof_window)
            .field("worker_proof_nonces", &self.worker_proof_nonces)
            .field("worker_credential_ttl", &self.worker_credential_ttl)
            .field("forget_worker_keys", &self.forget_worker_keys)
            .field("max_worker_tools", &self.max_worker_tools)
            .field("max_tool_spec_bytes", &self.max_tool_spec_bytes)
            .field("max_catalogue_bytes", &self.max_catalogue_bytes)
            .field("max_worker_capacity", &self.max_worker_capacity)
            .field("allowed_tool_prefixes", &self.allowed_tool_prefixes)
            .field("login_free_failures", &self.login_free_failures)
            .field("login_backoff_base", &self.login_backoff_base)
            .field("login_backoff_max", &self.login_backoff_max)
            .field("login_failures_per_s", &self.login_failures_per_s)
            .field("limits", &self.limits)
            .field("store_min_free_bytes", &self.store_min_free_bytes)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Config {
    /// Checks every field; the error names the variable to fix.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: &str| Err(Error::InvalidConfig(msg.to_owned()));
        if self.join_token.trim().is_empty() {
            return bad(
                "HEIST_JOIN_TOKEN is empty: set it to a shared secret workers will present",
            );
        }
        if self.admin_client_id.trim().is_empty() {
            return bad(
                "HEIST_ADMIN_CLIENT_ID is empty: set it to the bootstrap admin's client id",
            );
        }
        if self.admin_client_secret.chars().count() < MIN_ADMIN_SECRET_CHARS {
            return bad(
                "HEIST_ADMIN_CLIENT_SECRET is shorter than 16 characters: set a longer secret",
            );
        }
        if self.token_issuer.trim().is_empty() {
            return bad("HEIST_TOKEN_ISSUER is empty: leave it unset for the default `heist`");
        }
        if self.token_ttl.as_secs() == 0 {
            return bad("HEIST_TOKEN_TTL_S must be at least 1 second");
        }
        if self.heartbeat_interval.is_zero() {
            return bad("HEIST_HEARTBEAT_INTERVAL_MS must be positive");
        }
        if self.lease_ttl <= self.heartbeat_interval {
            return bad(
                "HEIST_LEASE_TTL_MS must be longer than HEIST_HEARTBEAT_INTERVAL_MS \
                 (a few heartbeats per lease)",
            );
        }
        if self.suspect_after <= self.heartbeat_interval {
            return bad(
                "HEIST_SUSPECT_AFTER_MS must be longer than HEIST_HEARTBEAT_INTERVAL_MS \
                 (about two heartbeats)",
            );
        }
        if self.worker_keepalive_interval.is_zero() || self.worker_keepalive_timeout.is_zero() {
            return bad(
                "HEIST_WORKER_KEEPALIVE_INTERVAL_MS and HEIST_WORKER_KEEPALIVE_TIMEOUT_MS must be \
                 positive",
            );
        }
        if self.session_gc_interval.is_zero() {
            return bad("HEIST_SESSION_GC_INTERVAL_S must be at least 1 second");
        }
        if self.failover_parallelism == 0 {
            return bad("HEIST_FAILOVER_PARALLELISM must be at least 1");
        }
        if self.worker_call_timeout.is_zero() {
            return bad("HEIST_WORKER_CALL_TIMEOUT_S must be at least 1 second");
        }
        if self.idempotency_ttl.is_zero() {
            return bad("HEIST_IDEMPOTENCY_TTL_S must be at least 1 second");
        }
        if self.max_message_bytes < 1024 {
            return bad("HEIST_MAX_MESSAGE_BYTES must be at least 1024");
        }
        if self.max_blob_bytes == 0 {
            return bad("HEIST_MAX_BLOB_BYTES must be at least 1");
        }
        if self.max_blob_batch == 0 {
            return bad("HEIST_MAX_BLOB_BATCH must be at least 1");
        }
        if self.max_worker_tools == 0
            || self.max_tool_spec_bytes == 0
            || self.max_catalogue_bytes == 0
            || self.max_worker_capacity == 0
        {
            return bad(
                "HEIST_MAX_WORKER_TOOLS, HEIST_MAX_TOOL_SPEC_BYTES, HEIST_MAX_CATALOGUE_BYTES and \
                 HEIST_MAX_WORKER_CAPACITY must be at least 1",
            );
        }
        if self.login_backoff_base.is_zero()
            || self.login_backoff_max < self.login_backoff_base
            || self.login_failures_per_s == 0
        {
            return bad(
                "HEIST_LOGIN_BACKOFF_BASE_MS and HEIST_LOGIN_FAILURES_PER_S must be positive and \
                 HEIST_LOGIN_BACKOFF_MAX_S at least the base",
            );
        }
        if self.store_min_free_bytes < MIN_STORE_MIN_FREE_BYTES {
            return bad(
                "HEIST_STORE_MIN_FREE_BYTES must be at least 1048576 (1 MiB): the store needs \
                 room to finish the writes it has begun",
            );
        }
        if self.worker_proof_window.is_zero() {
            return bad("HEIST_WORKER_PROOF_WINDOW_S must be at least 1 second");
        }
        if self.worker_proof_nonces == 0 {
            return bad("HEIST_WORKER_PROOF_NONCES must be at least 1");
        }
        if self.worker_credential_ttl.is_zero() {
            return bad("HEIST_WORKER_CREDENTIAL_TTL_S must be at least 1 second");
        }
        if self.checkpoint_gc_interval.is_zero() {
            return bad("HEIST_CHECKPOINT_GC_INTERVAL_S must be at least 1 second");
        }
        self.mcp.validate().map_err(Error::InvalidConfig)?;
        self.limits.validate().map_err(Error::InvalidConfig)?;
        self.tls
            .load()
            .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            join_token: "join".to_owned(),
            admin_client_secret: "0123456789abcdef".to_owned(),
            ..Config::default()
        }
    }

    #[test]
    fn default_needs_secrets() {
        assert!(Config::default().validate().is_err());
        assert!(valid().validate().is_ok());
    }

    #[test]
    fn rejects_short_secret_and_inverted_lease() {
        let short = Config {
            admin_client_secret: "short".to_owned(),
            ..valid()
        };
        assert!(short.validate().is_err());
        let inverted = Config {
            lease_ttl: Duration::from_millis(100),
            heartbeat_interval: Duration::from_millis(200),
            ..valid()
        };
        assert!(inverted.validate().is_err());
    }

    #[test]
    fn the_store_reserve_has_a_floor() {
        assert_eq!(valid().store_min_free_bytes, 64 << 20);
        let tiny = Config {
            store_min_free_bytes: 4096,
            ..valid()
        };
        let err = tiny.validate().expect_err("below 1 MiB");
        assert!(
            err.to_string().contains("HEIST_STORE_MIN_FREE_BYTES"),
            "{err}"
        );
    }

    #[test]
    fn debug_redacts_secrets() {
        let shown = format!("{:?}", valid());
        assert!(!shown.contains("0123456789abcdef"));
        assert!(!shown.contains("\"join\""));
    }
}
