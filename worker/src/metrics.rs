//! The worker's Prometheus metrics, served on `/metrics` (`web`).
//!
//! | metric | labels |
//! |---|---|
//! | `heist_rpc_requests_total`, `heist_rpc_duration_seconds`, `heist_auth_refusals_total` | see [`heist_proto::metrics::RpcMetrics`] |
//! | `heist_worker_tool_calls_total`, `heist_worker_tool_duration_seconds` | `tool`, `outcome` (`ok`, `tool_error`, `error`) |
//! | `heist_sandbox_commands_total`, `heist_sandbox_command_duration_seconds` | `exit` (`ok`, `nonzero`, `signal`, `timeout`, `error`) |
//! | `heist_sandbox_quota_rejections_total` | `quota` |
//! | `heist_model_calls_total`, `heist_model_call_duration_seconds` | `provider`, `model`, `outcome` |
//! | `heist_model_tokens_total` | `provider`, `model`, `kind` (`input`, `output`) |
//! | `heist_model_cost_usd_total` | `provider`, `model` |
//! | `heist_model_retries_total`, `heist_model_fallbacks_total` | `provider` |
//! | `heist_turns_total`, `heist_turn_duration_seconds` | `agent`, `state` |
//!
//! The sandbox and the model gateway own their parts ([`SandboxMetrics`], [`ModelMetrics`]);
//! [`WorkerMetrics::new`] registers them with the rest.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use heist_proto::metrics::{Histograms, RpcMetrics, latency_family, render};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tracing::info;

use crate::{Error, model::GatewayEvent, sandbox::Finished};

/// Labels: a tool and how its call ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolOutcome {
    /// The tool's catalogue name (`other` for a name the catalogue lacks).
    pub tool: String,
    /// `ok`, `tool_error` or `error`.
    pub outcome: String,
}

/// Labels: how a command ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Exit {
    /// `ok`, `nonzero`, `signal`, `timeout` or `error`.
    pub exit: String,
}

/// Labels: a quota.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Quota {
    /// The quota's name (`concurrent_commands`, `session_disk_bytes`, ...).
    pub quota: String,
}

/// Labels: a provider and its model, with an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcome {
    /// Provider name from the configuration.
    pub provider: String,
    /// Model name from the configuration.
    pub model: String,
    /// `ok` or the failure kind (`timeout`, `http_429`, ...).
    pub outcome: String,
}

/// Labels: a provider and its model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Model {
    /// Provider name.
    pub provider: String,
    /// Model name.
    pub model: String,
}

/// Labels: tokens of a model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Tokens {
    /// Provider name.
    pub provider: String,
    /// Model name.
    pub model: String,
    /// `input` or `output`.
    pub kind: String,
}

/// Labels: a provider.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Provider {
    /// Provider name.
    pub provider: String,
}

/// Labels: an agent and how its turn ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TurnEnd {
    /// Agent name from the configuration.
    pub agent: String,
    /// `completed`, `step_limit`, `cancelled` or `failed`.
    pub state: String,
}

/// Commands the sandbox ran or refused.
pub struct SandboxMetrics {
    commands: Family<Exit, Counter>,
    duration: Histograms<Exit>,
    rejections: Family<Quota, Counter>,
}

impl Default for SandboxMetrics {
    fn default() -> Self {
        Self {
            commands: Family::default(),
            duration: latency_family(),
            rejections: Family::default(),
        }
    }
}

impl SandboxMetrics {
    /// Records one command's end (or refusal) after `elapsed`.
    pub fn record(&self, result: &Result<Finished, Error>, elapsed: Duration) {
        let exit = match result {
            Ok(f) if f.timed_out => "timeout",
            Ok(f) if f.signal.is_some() => "signal",
            Ok(f) if f.exit_code == Some(0) => "ok",
            Ok(_) => "nonzero",
            Err(Error::LimitExceeded { limit, .. }) => {
                self.rejections
                    .get_or_create(&Quota {
                        quota: (*limit).to_owned(),
                    })
                    .inc();
                "error"
            }
            Err(_) => "error",
        };
        let label = Exit {
            exit: exit.to_owned(),
        };
        self.commands.get_or_create(&label).inc();
        self.duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "heist_sandbox_commands",
            "Sandboxed commands, by how they ended",
            self.commands.clone(),
        );
        registry.register(
            "heist_sandbox_command_duration_seconds",
            "Wall-clock time of sandboxed commands, by how they ended",
            self.duration.clone(),
        );
        registry.register(
            "heist_sandbox_quota_rejections",
            "Commands refused or stopped by a quota, by quota",
            self.rejections.clone(),
        );
    }
}

/// Model calls, tokens, cost, retries, fallbacks and turns.
pub struct ModelMetrics {
    calls: Family<ModelOutcome, Counter>,
    duration: Histograms<ModelOutcome>,
    tokens: Family<Tokens, Counter>,
    cost: Family<Model, Counter<f64, AtomicU64>>,
    retries: Family<Provider, Counter>,
    fallbacks: Family<Provider, Counter>,
    turns: Family<TurnEnd, Counter>,
    turn_duration: Histograms<TurnEnd>,
}

impl Default for ModelMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            duration: latency_family(),
            tokens: Family::default(),
            cost: Family::default(),
            retries: Family::default(),
            fallbacks: Family::default(),
            turns: Family::default(),
            turn_duration: latency_family(),
        }
    }
}

impl ModelMetrics {
    /// Records one attempt of a model call: `failure` is the error kind, `None` on success.
    pub fn call(&self, provider: &str, model: &str, failure: Option<String>, elapsed: Duration) {
        let label = ModelOutcome {
            provider: provider.to_owned(),
            model: model.to_owned(),
            outcome: failure.unwrap_or_else(|| "ok".to_owned()),
        };
        self.calls.get_or_create(&label).inc();
        self.duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
    }

    /// Records what a gateway event says (usage, retries, fallbacks), and puts retries and
    /// fallbacks on the current span as events.
    pub fn event(&self, event: &GatewayEvent) {
        match event {
            GatewayEvent::Usage {
                provider,
                model,
                usage,
                cost_usd,
            } => {
                for (kind, n) in [
                    ("input", usage.input_tokens),
                    ("output", usage.output_tokens),
                ] {
                    self.tokens
                        .get_or_create(&Tokens {
                            provider: provider.clone(),
                            model: model.clone(),
                            kind: kind.to_owned(),
                        })
                        .inc_by(n);
                }
                self.cost
                    .get_or_create(&Model {
                        provider: provider.clone(),
                        model: model.clone(),
                    })
                    .inc_by(*cost_usd);
            }
            GatewayEvent::Retrying {
                provider,
                attempt,
                delay_ms,
                reason,
            } => {
                info!(provider = %provider, attempt, delay_ms, reason = %reason, "model call retried");
                self.retries
                    .get_or_create(&Provider {
                        provider: provider.clone(),
                    })
                    .inc();
            }
            GatewayEvent::FallingBack { from, to, reason } => {
                info!(from = %from, to = %to, reason = %reason, "model chain fell back");
                self.fallbacks
                    .get_or_create(&Provider {
                        provider: from.clone(),
                    })
                    .inc();
            }
            GatewayEvent::BreakerOpen { provider } => {
                info!(provider = %provider, "model provider skipped: circuit breaker open");
            }
            GatewayEvent::TextDelta(_) | GatewayEvent::Discarded { .. } => {}
        }
    }

    /// Records a finished turn.
    pub fn turn(&self, agent: &str, state: &str, elapsed: Duration) {
        let label = TurnEnd {
            agent: agent.to_owned(),
            state: state.to_owned(),
        };
        self.turns.get_or_create(&label).inc();
        self.turn_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "heist_model_calls",
            "Model call attempts, by provider, model and outcome",
            self.calls.clone(),
        );
        registry.register(
            "heist_model_call_duration_seconds",
            "Time of model call attempts, by provider, model and outcome",
            self.duration.clone(),
        );
        registry.register(
            "heist_model_tokens",
            "Tokens used, by provider, model and kind",
            self.tokens.clone(),
        );
        registry.register(
            "heist_model_cost_usd",
            "Money spent on models in US dollars (from the configured prices)",
            self.cost.clone(),
        );
        registry.register(
            "heist_model_retries",
            "Model calls retried, by provider",
            self.retries.clone(),
        );
        registry.register(
            "heist_model_fallbacks",
            "Model chains that moved past a provider, by the provider given up on",
            self.fallbacks.clone(),
        );
        registry.register(
            "heist_turns",
            "Agent turns finished, by agent and end state",
            self.turns.clone(),
        );
        registry.register(
            "heist_turn_duration_seconds",
            "Time of agent turns, by agent and end state",
            self.turn_duration.clone(),
        );
    }
}

/// Every worker metric and the registry they are encoded from.
pub struct WorkerMetrics {
    registry: Registry,
    /// Calls answered by the server (recorded by [`heist_proto::trace::RpcLayer`]).
    pub rpc: Arc<RpcMetrics>,
    tool_calls: Family<ToolOutcome, Counter>,
    tool_duration: Histograms<ToolOutcome>,
}

impl WorkerMetrics {
    /// A registry with the RPC and tool metrics and those of `sandbox` and `models`.
    pub fn new(sandbox: &SandboxMetrics, models: Option<&ModelMetrics>) -> Self {
        let mut registry = Registry::default();
        let rpc = Arc::new(RpcMetrics::register(&mut registry));
        let tool_calls = Family::default();
        let tool_duration = latency_family();
        registry.register(
            "heist_worker_tool_calls",
            "Tool calls run by this worker, by tool and outcome",
            tool_calls.clone(),
        );
        registry.register(
            "heist_worker_tool_duration_seconds",
            "Time of tool calls on this worker, by tool and outcome",
            tool_duration.clone(),
        );
        sandbox.register(&mut registry);
        models
            .unwrap_or(&ModelMetrics::default())
            .register(&mut registry);
        Self {
            registry,
            rpc,
            tool_calls,
            tool_duration,
        }
    }

    /// Records one tool call: `outcome` is `Some(is_error)` when it answered, `None` when it
    /// failed; `known` is whether the catalogue has the tool.
    pub fn tool_call(&self, tool: &str, known: bool, outcome: Option<bool>, elapsed: Duration) {
        let label = ToolOutcome {
            tool: if known { tool } else { "other" }.to_owned(),
            outcome: match outcome {
                Some(false) => "ok",
                Some(true) => "tool_error",
                None => "error",
            }
            .to_owned(),
        };
        self.tool_calls.get_or_create(&label).inc();
        self.tool_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new(&SandboxMetrics::default(), None)
    }
}
