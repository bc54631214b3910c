//! The policy around providers: chains, retries, fallback, breakers, usage, cost and budget.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info_span, warn};

use super::{
    BreakerConfig, BudgetConfig, ChainConfig, FinishReason, ModelError, ModelEvent, ModelProvider,
    ModelRequest, ModelsConfig, Price, ProviderConfig, ToolCall, Usage, anthropic, openai,
    scripted,
};
use crate::metrics::ModelMetrics;

/// What a session has spent so far (kept in its agent state, so checkpoints carry it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spend {
    /// Input tokens over all calls.
    pub input_tokens: u64,
    /// Output tokens over all calls.
    pub output_tokens: u64,
    /// Money over all calls, in US dollars.
    pub cost_usd: f64,
}

/// Something the gateway did that a turn reports.
#[derive(Clone, Debug, PartialEq)]
pub enum GatewayEvent {
    /// More answer text from the provider currently answering.
    TextDelta(String),
    /// The text streamed so far is void: the stream failed midway and another attempt follows.
    Discarded {
        /// The provider whose output is discarded.
        provider: String,
        /// Why.
        reason: String,
    },
    /// The same provider is tried again after a wait.
    Retrying {
        /// Provider name.
        provider: String,
        /// Retry number (1 = first retry).
        attempt: u32,
        /// The wait, in milliseconds (from `Retry-After` when the server sent one).
        delay_ms: u64,
        /// The failure ("http_429", "timeout", ...).
        reason: String,
    },
    /// The chain moves to its next provider.
    FallingBack {
        /// The provider given up on.
        from: String,
        /// The next one.
        to: String,
        /// The last failure.
        reason: String,
    },
    /// A provider was skipped because its circuit breaker is open.
    BreakerOpen {
        /// Provider name.
        provider: String,
    },
    /// A call completed: its tokens and price.
    Usage {
        /// Provider name.
        provider: String,
        /// Model name.
        model: String,
        /// Tokens.
        usage: Usage,
        /// Price of this call, in US dollars.
        cost_usd: f64,
    },
}

/// A complete model response.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The answer text.
    pub text: String,
    /// Tool calls requested.
    pub tool_calls: Vec<ToolCall>,
    /// Tokens of this call.
    pub usage: Usage,
    /// Why it stopped.
    pub finish: FinishReason,
    /// The provider that answered.
    pub provider: String,
}

/// Why the gateway gave up.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No chain by that name.
    #[error("model chain {name:?} does not exist: configured chains are {available}")]
    UnknownChain {
        /// Requested.
        name: String,
        /// Comma-separated names.
        available: String,
    },
    /// The session's budget is spent.
    #[error(
        "the session's {budget} budget is spent ({used} of {limit}): raise models.budget.{budget} \
         in the worker config or start a new session"
    )]
    Budget {
        /// `max_tokens_per_session` or `max_cost_usd_per_session`.
        budget: &'static str,
        /// The cap.
        limit: String,
        /// What was spent.
        used: String,
    },
    /// Every provider of the chain failed.
    #[error("every provider of chain {chain:?} failed; last: {last}")]
    Exhausted {
        /// Chain name.
        chain: String,
        /// The last failure.
        last: String,
    },
    /// The call was cancelled.
    #[error("the model call was cancelled")]
    Cancelled,
    /// The configuration is invalid.
    #[error("models config: {0}")]
    Config(String),
}

struct Slot {
    provider: Arc<dyn ModelProvider>,
    scripted: bool,
    breaker: Mutex<Breaker>,
}

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// Providers and chains, built once from [`ModelsConfig`] and shared by all turns.
pub struct Gateway {
    providers: BTreeMap<String, Slot>,
    chains: BTreeMap<String, ChainConfig>,
    prices: BTreeMap<String, Price>,
    budget: BudgetConfig,
    breaker: BreakerConfig,
    metrics: Arc<ModelMetrics>,
}

impl Gateway {
    /// Builds every provider and checks every chain names known providers.
    pub fn from_config(config: &ModelsConfig) -> Result<Self, GatewayError> {
        let mut providers = BTreeMap::new();
        let mut all = config.providers.clone();
        all.entry("scripted".to_owned())
            .or_insert_with(|| ProviderConfig::Scripted(Default::default()));
        for (name, provider) in &all {
            let (provider, scripted): (Arc<dyn ModelProvider>, bool) = match provider {
                ProviderConfig::Scripted(c) => (Arc::new(scripted::Scripted::new(c.seed)), true),
                ProviderConfig::Openai(c) => (Arc::new(openai::OpenAi::new(c)?), false),
                ProviderConfig::Anthropic(c) => (Arc::new(anthropic::Anthropic::new(c)?), false),
            };
            providers.insert(
                name.clone(),
                Slot {
                    provider,
                    scripted,
                    breaker: Mutex::default(),
                },
            );
        }
        let mut chains = config.chains.clone();
        chains
            .entry("default".to_owned())
            .or_insert_with(|| ChainConfig::of(&["scripted"]));
        for (name, chain) in &chains {
            if chain.timeout_ms == 0 || chain.backoff_base_ms > chain.backoff_max_ms {
                return Err(GatewayError::Config(format!(
                    "chain {name:?}: timeout_ms must be above 0 and backoff_base_ms at most \
                     backoff_max_ms"
                )));
            }
            if chain.providers.is_empty() {
                return Err(GatewayError::Config(format!(
                    "chain {name:?} lists no providers: give it at least one"
                )));
            }
            if let Some(missing) = chain.providers.iter().find(|p| !providers.contains_key(*p)) {
                return Err(GatewayError::Config(format!(
                    "chain {name:?} names provider {missing:?}, which is not configured; \
                     providers are {}",
                    providers.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let dollars = |v: f64| v.is_finite() && v >= 0.0;
        if let Some((model, _)) = config
            .prices
            .iter()
            .find(|(_, p)| !dollars(p.input_usd_per_mtok) || !dollars(p.output_usd_per_mtok))
        {
            return Err(GatewayError::Config(format!(
                "the price of model {model:?} must be a non-negative number of dollars"
            )));
        }
        if !dollars(config.budget.max_cost_usd_per_session) {
            return Err(GatewayError::Config(
                "budget.max_cost_usd_per_session must be a non-negative number of dollars"
                    .to_owned(),
            ));
        }
        Ok(Self {
            providers,
            chains,
            prices: config.prices.clone(),
            budget: config.budget,
            breaker: config.breaker,
            metrics: Arc::default(),
        })
    }

    /// The gateway's metrics (calls, tokens, cost, retries, fallbacks, turns).
    pub fn metrics(&self) -> &Arc<ModelMetrics> {
        &self.metrics
    }

    /// The chain's policy.
    pub fn chain(&self, name: &str) -> Result<&ChainConfig, GatewayError> {
        self.chains
            .get(name)
            .ok_or_else(|| GatewayError::UnknownChain {
                name: name.to_owned(),
                available: self.chains.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// Whether the chain's first provider is the scripted model (its context is summarised
    /// extractively rather than by a model call).
    pub fn is_scripted(&self, chain: &str) -> bool {
        self.chain(chain)
            .ok()
            .and_then(|c| c.providers.first())
            .and_then(|p| self.providers.get(p))
            .is_some_and(|s| s.scripted)
    }

    /// Runs `request` on `chain`: streams text through `on_event` as it arrives and returns the
    /// whole response, adding its usage to `spend`. Refuses to start when `spend` is over the
    /// session budget.
    #[tracing::instrument(skip_all, fields(chain = %chain_name))]
    pub async fn complete(
        &self,
        chain_name: &str,
        request: &ModelRequest,
        spend: &mut Spend,
        cancel: &CancellationToken,
        caller_on_event: &mut (dyn FnMut(GatewayEvent) + Send),
    ) -> Result<Completion, GatewayError> {
        // Every event also goes to the metrics (and retries/fallbacks onto the span).
        let metrics = Arc::clone(&self.metrics);
        let on_event: &mut (dyn FnMut(GatewayEvent) + Send) = &mut |event: GatewayEvent| {
            metrics.event(&event);
            caller_on_event(event);
        };
        let chain = self.chain(chain_name)?;
        self.check_budget(spend)?;
        let mut last = String::new();
        for (index, name) in chain.providers.iter().enumerate() {
            let Some(slot) = self.providers.get(name) else {
                continue;
            };
            if !self.breaker_allows(slot) {
                on_event(GatewayEvent::BreakerOpen {
                    provider: name.clone(),
                });
                last = format!("{name}: circuit breaker open");
                continue;
            }
            let failure = match self
                .retrying(name, slot, chain, request, cancel, on_event)
                .await?
            {
                Ok(mut completion) => {
                    completion.provider = name.clone();
                    self.account(name, slot, &completion, spend, on_event);
                    return Ok(completion);
                }
                Err(failure) => failure,
            };
            last = format!("{name}: {failure}");
            if let Some(next) = chain.providers.get(index + 1) {
                on_event(GatewayEvent::FallingBack {
                    from: name.clone(),
                    to: next.clone(),
                    reason: failure.kind(),
                });
            }
        }
        Err(GatewayError::Exhausted {
            chain: chain_name.to_owned(),
            last,
        })
    }

    /// Calls one provider, retrying while its failures are retryable, its retries last and its
    /// breaker stays closed. The outer error is cancellation; the inner one the last failure.
    async fn retrying(
        &self,
        name: &str,
        slot: &Slot,
        chain: &ChainConfig,
        request: &ModelRequest,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(GatewayEvent) + Send),
    ) -> Result<Result<Completion, ModelError>, GatewayError> {
        let timeout = Duration::from_millis(chain.timeout_ms);
        let mut attempt = 0u32;
        loop {
            let span = info_span!("model_call", provider = %name, attempt);
            let started = Instant::now();
            let mut streamed = false;
            let call = attempt_once(slot, request, &mut streamed, on_event);
            let result = tokio::select! {
                () = cancel.cancelled() => return Err(GatewayError::Cancelled),
                r = tokio::time::timeout(timeout, call).instrument(span) => {
                    r.unwrap_or(Err(ModelError::Timeout(timeout)))
                }
            };
            let failure = result.as_ref().err().map(ModelError::kind);
            self.metrics
                .call(name, slot.provider.model(), failure, started.elapsed());
            let err = match result {
                Ok(completion) => {
                    self.record(slot, true);
                    return Ok(Ok(completion));
                }
                Err(err) => err,
            };
            self.record(slot, false);
            warn!(provider = %name, error = %err, attempt, "model call failed");
            if streamed {
                on_event(GatewayEvent::Discarded {
                    provider: name.to_owned(),
                    reason: err.to_string(),
                });
            }
            let Some(delay) = self.retry_delay(chain, attempt, &err) else {
                return Ok(Err(err));
            };
            attempt += 1;
            on_event(GatewayEvent::Retrying {
                provider: name.to_owned(),
                attempt,
                delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                reason: err.kind(),
            });
            tokio::select! {
                () = cancel.cancelled() => return Err(GatewayError::Cancelled),
                () = tokio::time::sleep(delay) => {}
            }
            if !self.breaker_allows(slot) {
                return Ok(Err(err));
            }
        }
    }

    fn check_budget(&self, spend: &Spend) -> Result<(), GatewayError> {
        let tokens = spend.input_tokens + spend.output_tokens;
        if tokens >= self.budget.max_tokens_per_session {
            return Err(GatewayError::Budget {
                budget: "max_tokens_per_session",
                limit: format!("{} tokens", self.budget.max_tokens_per_session),
                used: format!("{tokens} tokens"),
            });
        }
        if spend.cost_usd >= self.budget.max_cost_usd_per_session {
            return Err(GatewayError::Budget {
                budget: "max_cost_usd_per_session",
                limit: format!("${:.4}", self.budget.max_cost_usd_per_session),
                used: format!("${:.4}", spend.cost_usd),
            });
        }
        Ok(())
    }

    /// The wait before retrying, or `None` to move on.
    fn retry_delay(&self, chain: &ChainConfig, attempt: u32, err: &ModelError) -> Option<Duration> {
        if !err.is_retryable() || attempt >= chain.max_retries {
            return None;
        }
        if let ModelError::Http {
            retry_after: Some(after),
            ..
        } = err
        {
            return (*after <= Duration::from_millis(chain.max_retry_after_ms)).then_some(*after);
        }
        let ceiling = chain
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.min(20))
            .min(chain.backoff_max_ms);
        Some(Duration::from_millis(fastrand::u64(0..=ceiling)))
    }

    fn breaker_allows(&self, slot: &Slot) -> bool {
        let breaker = slot.breaker.lock().unwrap_or_else(PoisonError::into_inner);
        breaker
            .open_until
            .is_none_or(|until| Instant::now() >= until)
    }

    fn record(&self, slot: &Slot, ok: bool) {
        let mut breaker = slot.breaker.lock().unwrap_or_else(PoisonError::into_inner);
        if ok {
            *breaker = Breaker::default();
            return;
        }
        breaker.failures += 1;
        if breaker.failures >= self.breaker.failures {
            breaker.open_until =
                Some(Instant::now() + Duration::from_millis(self.breaker.cooldown_ms));
        }
    }

    fn account(
        &self,
        name: &str,
        slot: &Slot,
        completion: &Completion,
        spend: &mut Spend,
        on_event: &mut (dyn FnMut(GatewayEvent) + Send),
    ) {
        let model = slot.provider.model().to_owned();
        let usage = completion.usage;
        let cost_usd = self.prices.get(&model).map_or(0.0, |p| {
            (usage.input_tokens as f64 * p.input_usd_per_mtok
                + usage.output_tokens as f64 * p.output_usd_per_mtok)
                / 1_000_000.0
        });
        spend.input_tokens += usage.input_tokens;
        spend.output_tokens += usage.output_tokens;
        spend.cost_usd += cost_usd;
        on_event(GatewayEvent::Usage {
            provider: name.to_owned(),
            model,
            usage,
            cost_usd,
        });
    }
}

/// One call to one provider, read to its end.
async fn attempt_once(
    slot: &Slot,
    request: &ModelRequest,
    streamed: &mut bool,
    on_event: &mut (dyn FnMut(GatewayEvent) + Send),
) -> Result<Completion, ModelError> {
    let mut stream = slot.provider.stream(request.clone()).await?;
    let mut completion = Completion {
        text: String::new(),
        tool_calls: Vec::new(),
        usage: Usage::default(),
        finish: FinishReason::Other,
        provider: String::new(),
    };
    let mut finished = false;
    while let Some(event) = stream.next().await {
        match event? {
            ModelEvent::TextDelta(text) => {
                *streamed = true;
                completion.text.push_str(&text);
                on_event(GatewayEvent::TextDelta(text));
            }
            ModelEvent::ToolCall(call) => completion.tool_calls.push(call),
            ModelEvent::Usage(usage) => completion.usage = usage,
            ModelEvent::Finish(reason) => {
                completion.finish = reason;
                finished = true;
            }
        }
    }
    if !finished {
        return Err(ModelError::StreamCut(
            "the stream ended before the response was finished".to_owned(),
        ));
    }
    if completion.usage == Usage::default() {
        let input: u64 = request
            .messages
            .iter()
            .map(|m| super::estimate_tokens(&m.content))
            .sum();
        completion.usage = Usage {
            input_tokens: input,
            output_tokens: super::estimate_tokens(&completion.text),
        };
    }
    Ok(completion)
}
