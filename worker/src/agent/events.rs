//! What a turn reports, in order: numbered [`TurnEvent`]s.

use heist_proto::{json, v1, v1::turn_event::Event};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::TurnId;

/// One step of a turn. `seq` starts at 1 and has no gaps, so a re-attaching client can ask for
/// "everything after N".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnEvent {
    /// The turn.
    pub turn_id: TurnId,
    /// Position in the turn, from 1.
    pub seq: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: TurnEventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TurnEventKind {
    /// The turn began.
    Started {
        /// Agent name.
        agent: String,
        /// The user's message.
        message: String,
    },
    /// More text from the model.
    TextDelta {
        /// The text.
        text: String,
    },
    /// The text streamed since the last model call began is void (its stream failed midway;
    /// another attempt follows).
    TextDiscarded {
        /// Provider whose output is void.
        provider: String,
        /// Why.
        reason: String,
    },
    /// The gateway retries a provider.
    ModelRetry {
        /// Provider.
        provider: String,
        /// Retry number.
        attempt: u32,
        /// Wait before it, in milliseconds.
        delay_ms: u64,
        /// The failure.
        reason: String,
    },
    /// The gateway moves to the next provider of the chain.
    ModelFallback {
        /// Given up on.
        from: String,
        /// Next.
        to: String,
        /// The failure.
        reason: String,
    },
    /// A provider was skipped: its circuit breaker is open.
    ModelBreakerOpen {
        /// Provider.
        provider: String,
    },
    /// A model call's tokens and cost.
    ModelUsage {
        /// Provider.
        provider: String,
        /// Model.
        model: String,
        /// Input tokens.
        input_tokens: u64,
        /// Output tokens.
        output_tokens: u64,
        /// Cost in US dollars.
        cost_usd: f64,
    },
    /// The model asked for a tool call.
    ToolCallRequested {
        /// Call id.
        call_id: String,
        /// Tool.
        tool: String,
        /// Arguments.
        arguments: Json,
    },
    /// The gate refused the call (the model gets a tool error saying so).
    ToolCallDenied {
        /// Call id.
        call_id: String,
        /// Tool.
        tool: String,
        /// Why.
        reason: String,
    },
    /// The tool started.
    ToolCallStarted {
        /// Call id.
        call_id: String,
        /// Tool.
        tool: String,
    },
    /// The tool finished.
    ToolCallFinished {
        /// Call id.
        call_id: String,
        /// Tool.
        tool: String,
        /// Result as text (what the model reads).
        result: String,
        /// Structured result, when the tool has one.
        structured: Option<Json>,
        /// The tool failed.
        is_error: bool,
    },
    /// Older messages were compressed into a summary.
    ContextSummarised {
        /// The summary now standing for them.
        summary: String,
        /// How many messages it replaced in this step.
        messages: u64,
    },
    /// The agent's answer; the turn is over.
    FinalMessage {
        /// The answer.
        text: String,
    },
    /// The turn ended without an answer.
    Error {
        /// "budget", "step_limit", "model", "cancelled", "unknown_chain".
        kind: String,
        /// What happened and what to do.
        message: String,
    },
}

impl TurnEventKind {
    /// The event as the wire says it. Gateway notices without a wire variant of their own
    /// (a retry, an open circuit breaker, discarded partial output) are `fallback` lines, so
    /// the numbering stays gap-free.
    pub fn into_wire(self) -> Event {
        let kind = self;
        let call = |call_id: String, tool: String| v1::ToolCallEvent {
            call_id,
            tool,
            ..Default::default()
        };
        match kind {
            TurnEventKind::Started { message, .. } => Event::Started(message),
            TurnEventKind::TextDelta { text } => Event::TextDelta(text),
            TurnEventKind::TextDiscarded { provider, reason } => Event::Fallback(format!(
                "{provider} failed midway ({reason}): its partial output is discarded"
            )),
            TurnEventKind::ModelRetry {
                provider,
                attempt,
                delay_ms,
                reason,
            } => Event::Fallback(format!(
                "{provider}: retry {attempt} in {delay_ms} ms ({reason})"
            )),
            TurnEventKind::ModelFallback { from, to, reason } => {
                Event::Fallback(format!("{from} failed ({reason}): falling back to {to}"))
            }
            TurnEventKind::ModelBreakerOpen { provider } => {
                Event::Fallback(format!("{provider} skipped: its circuit breaker is open"))
            }
            TurnEventKind::ModelUsage {
                provider,
                model,
                input_tokens,
                output_tokens,
                cost_usd,
            } => Event::Usage(v1::ModelUsage {
                provider,
                model,
                input_tokens,
                output_tokens,
                // Saturating float-to-int conversion of a non-negative amount.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                cost_micros: (cost_usd * 1e6).round() as u64,
            }),
            TurnEventKind::ToolCallRequested {
                call_id,
                tool,
                arguments,
            } => Event::ToolCallRequested(v1::ToolCallEvent {
                arguments: json::json_to_struct(&arguments),
                ..call(call_id, tool)
            }),
            TurnEventKind::ToolCallDenied {
                call_id,
                tool,
                reason,
            } => Event::ToolCallFinished(v1::ToolCallEvent {
                result: Some(text_result(format!("denied: {reason}"), None, true)),
                ..call(call_id, tool)
            }),
            TurnEventKind::ToolCallStarted { call_id, tool } => {
                Event::ToolCallStarted(call(call_id, tool))
            }
            TurnEventKind::ToolCallFinished {
                call_id,
                tool,
                result,
                structured,
                is_error,
            } => Event::ToolCallFinished(v1::ToolCallEvent {
                result: Some(text_result(result, structured.as_ref(), is_error)),
                ..call(call_id, tool)
            }),
            TurnEventKind::ContextSummarised { summary, .. } => Event::Summary(summary),
            TurnEventKind::FinalMessage { text } => Event::FinalMessage(text),
            TurnEventKind::Error { message, .. } => Event::Error(message),
        }
    }
}

fn text_result(
    text: String,
    structured: Option<&serde_json::Value>,
    is_error: bool,
) -> v1::CallToolResponse {
    v1::CallToolResponse {
        content: vec![v1::ContentBlock {
            block: Some(v1::content_block::Block::Text(text)),
        }],
        is_error,
        structured_content: structured.and_then(json::json_to_struct),
        ..Default::default()
    }
}
