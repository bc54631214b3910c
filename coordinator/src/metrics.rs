//! The coordinator's Prometheus metrics, owned by [`crate::app::App`] and served on `/metrics`
//! ([`crate::web`]).
//!
//! | metric | labels |
//! |---|---|
//! | `heist_rpc_requests_total`, `heist_rpc_duration_seconds`, `heist_auth_refusals_total` | see [`heist_proto::metrics::RpcMetrics`] |
//! | `heist_tool_calls_total` | `tool`, `outcome` (`ok`, `tool_error`, `replayed`) |
//! | `heist_idempotent_replays_total` | — |
//! | `heist_sessions` (gauge, at scrape time) | `state` |
//! | `heist_workers` (gauge, at scrape time) | `state` |
//! | `heist_checkpoints_total`, `heist_checkpoint_duration_seconds` | `outcome` |
//! | `heist_checkpoint_workspace_bytes`, `heist_checkpoint_uploaded_{bytes,blobs}_total` | — |
//! | `heist_store_free_bytes`, `heist_store_writable` (gauges, at scrape time) | — |
//! | `heist_limited_calls_total` | `limit` (`rate`, `concurrent_calls`, `open_streams`) |
//!
//! Tool call metrics come from an after-hook ([`crate::calls::hooks::CallMetrics`]).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use heist_proto::{
    metrics::{Histograms, RpcMetrics, bytes_histogram, latency_family, render},
    v1::{CaptureStats, SessionState, WorkerState},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels: a tool and how its call ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolOutcome {
    /// The tool's catalogue name.
    pub tool: String,
    /// `ok`, `tool_error` (the tool answered `is_error`) or `replayed`.
    pub outcome: String,
}

/// Labels: a state name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Lower-case state name.
    pub state: String,
}

/// Labels: an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok` or `error`.
    pub outcome: String,
}

/// Labels: the per-principal limit that refused a call ([`crate::limits::Limit::name`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// `rate`, `concurrent_calls` or `open_streams`.
    pub limit: String,
}

/// Every coordinator metric and the registry they are encoded from.
pub struct Metrics {
    registry: Registry,
    /// Calls answered by the server (recorded by [`heist_proto::trace::RpcLayer`]).
    pub rpc: Arc<RpcMetrics>,
    tool_calls: Family<ToolOutcome, Counter>,
    replays: Counter,
    sessions: Family<StateLabel, Gauge>,
    workers: Family<StateLabel, Gauge>,
    checkpoints: Family<Outcome, Counter>,
    checkpoint_duration: Histograms<Outcome>,
    checkpoint_bytes: Histogram,
    uploaded_bytes: Counter,
    uploaded_blobs: Counter,
    store_free_bytes: Gauge,
    store_writable: Gauge,
    /// Calls refused by a per-principal limit ([`crate::limits::LimitLayer`]).
    pub limited_calls: Family<LimitLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rpc = Arc::new(RpcMetrics::register(&mut registry));
        let this = Self {
            rpc,
            tool_calls: Family::default(),
            replays: Counter::default(),
            sessions: Family::default(),
            workers: Family::default(),
            checkpoints: Family::default(),
            checkpoint_duration: latency_family(),
            checkpoint_bytes: bytes_histogram(),
            uploaded_bytes: Counter::default(),
            uploaded_blobs: Counter::default(),
            store_free_bytes: Gauge::default(),
            store_writable: Gauge::default(),
            limited_calls: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "heist_tool_calls",
            "Tool calls that reached a result, by tool and outcome",
            this.tool_calls.clone(),
        );
        registry.register(
            "heist_idempotent_replays",
            "Calls answered from a recorded result (a retry with a known request id)",
            this.replays.clone(),
        );
        registry.register(
            "heist_sessions",
            "Sessions known to the coordinator, by state",
            this.sessions.clone(),
        );
        registry.register(
            "heist_workers",
            "Workers known to the coordinator, by state",
            this.workers.clone(),
        );
        registry.register(
            "heist_checkpoints",
            "Checkpoints taken through the coordinator, by outcome",
            this.checkpoints.clone(),
        );
        registry.register(
            "heist_checkpoint_duration_seconds",
            "Time to take a checkpoint (capture on the worker and commit), by outcome",
            this.checkpoint_duration.clone(),
        );
        registry.register(
            "heist_checkpoint_workspace_bytes",
            "Workspace size of each committed checkpoint",
            this.checkpoint_bytes.clone(),
        );
        registry.register(
            "heist_checkpoint_uploaded_bytes",
            "Blob bytes workers uploaded for checkpoints (blobs the store lacked)",
            this.uploaded_bytes.clone(),
        );
        registry.register(
            "heist_checkpoint_uploaded_blobs",
            "Blobs workers uploaded for checkpoints",
            this.uploaded_blobs.clone(),
        );
        registry.register(
            "heist_store_free_bytes",
            "Free bytes on the file system of the coordinator's data directory",
            this.store_free_bytes.clone(),
        );
        registry.register(
            "heist_store_writable",
            "1 while the state store takes writes, 0 while mutations are refused (disk below \
             HEIST_STORE_MIN_FREE_BYTES or a failed write)",
            this.store_writable.clone(),
        );
        registry.register(
            "heist_limited_calls",
            "Calls refused because their principal was over a limit, by limit",
            this.limited_calls.clone(),
        );
        Self { registry, ..this }
    }

    /// Sets the store gauges from its reserve (measuring the free space now).
    pub fn store(&self, reserve: &heist_proto::space::Reserve) {
        let writable = reserve.check().is_ok();
        let free = i64::try_from(reserve.last_free()).unwrap_or(i64::MAX);
        self.store_free_bytes.set(free);
        self.store_writable.set(i64::from(writable));
    }

    /// Records a tool call that reached a result.
    pub fn tool_call(&self, tool: &str, is_error: bool, replayed: bool) {
        let outcome = match (replayed, is_error) {
            (true, _) => "replayed",
            (false, true) => "tool_error",
            (false, false) => "ok",
        };
        self.tool_calls
            .get_or_create(&ToolOutcome {
                tool: tool.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        if replayed {
            self.replays.inc();
        }
    }

    /// Records a checkpoint attempt: `stats` when it was committed, `None` when it failed.
    pub fn checkpoint(&self, stats: Option<&CaptureStats>, elapsed: Duration) {
        let label = Outcome {
            outcome: if stats.is_some() { "ok" } else { "error" }.to_owned(),
        };
        self.checkpoints.get_or_create(&label).inc();
        self.checkpoint_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        if let Some(stats) = stats {
            self.checkpoint_bytes.observe(stats.bytes as f64);
            self.uploaded_bytes.inc_by(stats.uploaded_bytes);
            self.uploaded_blobs.inc_by(stats.uploaded_blobs);
        }
    }

    /// The metrics in Prometheus text format, with the session and worker gauges set from
    /// `sessions` and `workers` (state number → count).
    pub fn render(&self, sessions: &BTreeMap<i32, i64>, workers: &BTreeMap<i32, i64>) -> String {
        for state in [
            SessionState::Creating,
            SessionState::Ready,
            SessionState::Closing,
            SessionState::Closed,
            SessionState::Failed,
        ] {
            let n = sessions.get(&(state as i32)).copied().unwrap_or(0);
            self.sessions
                .get_or_create(&state_label(state.as_str_name()))
                .set(n);
        }
        for state in [
            WorkerState::Joining,
            WorkerState::Ready,
            WorkerState::Draining,
            WorkerState::Suspect,
            WorkerState::Lost,
            WorkerState::Gone,
        ] {
            let n = workers.get(&(state as i32)).copied().unwrap_or(0);
            self.workers
                .get_or_create(&state_label(state.as_str_name()))
                .set(n);
        }
        render(&self.registry)
    }
}

/// `SESSION_STATE_READY` → `ready`.
fn state_label(name: &str) -> StateLabel {
    let short = name
        .strip_prefix("SESSION_STATE_")
        .or_else(|| name.strip_prefix("WORKER_STATE_"))
        .unwrap_or(name);
    StateLabel {
        state: short.to_ascii_lowercase(),
    }
}
