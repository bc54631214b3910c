//! Gateway configuration: the `[models]` tables of the worker's config file.
//!
//! ```toml
//! [models.providers.local]
//! kind = "openai"
//! base_url = "http://127.0.0.1:1234/v1"
//! model = "qwen2.5-7b-instruct"
//!
//! [models.chains.default]
//! providers = ["local", "scripted"]
//!
//! [models.prices."qwen2.5-7b-instruct"]
//! input_usd_per_mtok = 0.0
//! output_usd_per_mtok = 0.0
//! ```
//!
//! With no `[models]` section at all there is one provider, `scripted`, and one chain,
//! `default` = `["scripted"]`, so agents run offline.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Secret;

/// The `[models]` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Providers by name (`[models.providers.<name>]`). A provider named `scripted` of kind
    /// scripted exists even when not listed.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Chains by name (`[models.chains.<name>]`). A chain `default` = `["scripted"]` exists
    /// even when not listed.
    #[serde(default)]
    pub chains: BTreeMap<String, ChainConfig>,
    /// Prices by model name (`[models.prices."<model>"]`); a model not listed costs nothing.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// The per-session spending cap (`[models.budget]`).
    #[serde(default)]
    pub budget: BudgetConfig,
    /// The circuit breaker every provider gets (`[models.breaker]`).
    #[serde(default)]
    pub breaker: BreakerConfig,
}

/// One provider (`kind` selects the protocol).
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProviderConfig {
    /// The built-in deterministic model.
    Scripted(ScriptedConfig),
    /// An OpenAI-compatible `/v1/chat/completions` server.
    Openai(HttpProviderConfig),
    /// The Anthropic Messages API.
    Anthropic(HttpProviderConfig),
}

/// The scripted provider.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedConfig {
    /// Seed of every choice it makes (default 0). A `seed:` directive in a system prompt
    /// overrides it for that agent.
    #[serde(default)]
    pub seed: u64,
}

/// An HTTP provider. Each field falls back to an environment variable, then a default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProviderConfig {
    /// API root, e.g. `http://127.0.0.1:1234/v1` (openai) or `https://api.anthropic.com`
    /// (anthropic). Default: `$OPENAI_BASE_URL` / `$ANTHROPIC_BASE_URL`, then the vendor's URL.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Model name sent to the server; also the key of the price table. Default: `$OPENAI_MODEL`
    /// / `$ANTHROPIC_MODEL`; one of the two is required.
    #[serde(default)]
    pub model: Option<String>,
    /// The API key itself. Prefer `api_key_env` so the key stays out of files.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Environment variable holding the key (default `OPENAI_API_KEY` / `ANTHROPIC_API_KEY`).
    /// Local servers need none: a missing key sends no auth header.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

/// A provider chain and its policy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// Provider names, tried in order (the next one when one fails for good). Required.
    pub providers: Vec<String>,
    /// Longest one attempt may take, whole stream included, in milliseconds (default 120000).
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Retries of the same provider after a retryable failure (429, 5xx, connection, timeout)
    /// before moving on (default 2).
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// First backoff ceiling, in milliseconds (default 250); it doubles per retry and the
    /// wait is drawn uniformly below it (full jitter).
    #[serde(default = "defaults::backoff_base_ms")]
    pub backoff_base_ms: u64,
    /// Largest backoff ceiling, in milliseconds (default 10000).
    #[serde(default = "defaults::backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Longest `Retry-After` honoured, in milliseconds (default 30000); a longer one moves on
    /// to the next provider instead of waiting. `Retry-After` is read in seconds; an HTTP date
    /// there is ignored (the backoff applies).
    #[serde(default = "defaults::max_retry_after_ms")]
    pub max_retry_after_ms: u64,
    /// Context budget of an agent on this chain, in (estimated) tokens (default 6000): past it,
    /// older turns are summarised.
    #[serde(default = "defaults::context_budget_tokens")]
    pub context_budget_tokens: u64,
}

impl ChainConfig {
    /// A chain over `providers` with default policy.
    pub fn of(providers: &[&str]) -> Self {
        Self {
            providers: providers.iter().map(|p| (*p).to_owned()).collect(),
            timeout_ms: defaults::timeout_ms(),
            max_retries: defaults::max_retries(),
            backoff_base_ms: defaults::backoff_base_ms(),
            backoff_max_ms: defaults::backoff_max_ms(),
            max_retry_after_ms: defaults::max_retry_after_ms(),
            context_budget_tokens: defaults::context_budget_tokens(),
        }
    }
}

/// Price of a model, in US dollars per million tokens.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million input (prompt) tokens.
    pub input_usd_per_mtok: f64,
    /// Per million output (completion) tokens.
    pub output_usd_per_mtok: f64,
}

/// The per-session spending cap, across all turns and agents of the session.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Most tokens (input + output) a session may use (default 2,000,000).
    #[serde(default = "defaults::max_tokens")]
    pub max_tokens_per_session: u64,
    /// Most money a session may spend, in US dollars (default 5.0).
    #[serde(default = "defaults::max_cost")]
    pub max_cost_usd_per_session: f64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            max_tokens_per_session: defaults::max_tokens(),
            max_cost_usd_per_session: defaults::max_cost(),
        }
    }
}

/// When a provider is taken out of its chains for a while.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failed attempts that open the breaker (default 5).
    #[serde(default = "defaults::breaker_failures")]
    pub failures: u32,
    /// How long an open breaker skips the provider, in milliseconds (default 30000). After it,
    /// calls go through again: a success closes the breaker, a failure opens it at once.
    #[serde(default = "defaults::breaker_cooldown_ms")]
    pub cooldown_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: defaults::breaker_failures(),
            cooldown_ms: defaults::breaker_cooldown_ms(),
        }
    }
}

mod defaults {
    pub fn timeout_ms() -> u64 {
        120_000
    }
    pub fn max_retries() -> u32 {
        2
    }
    pub fn backoff_base_ms() -> u64 {
        250
    }
    pub fn backoff_max_ms() -> u64 {
        10_000
    }
    pub fn max_retry_after_ms() -> u64 {
        30_000
    }
    pub fn context_budget_tokens() -> u64 {
        6_000
    }
    pub fn max_tokens() -> u64 {
        2_000_000
    }
    pub fn max_cost() -> f64 {
        5.0
    }
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_cooldown_ms() -> u64 {
        30_000
    }
}
