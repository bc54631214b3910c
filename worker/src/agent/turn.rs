//! The turn loop: context → model → tool calls (through the gate) → results → … until a final
//! message, the step limit, an error or cancellation. Every step is a numbered [`TurnEvent`].

use std::collections::BTreeSet;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info_span};

use super::{
    AgentSpec, InProgressTurn, SharedAgentState, ToolRunner, TurnEvent, TurnEventKind, TurnId,
    context, lock,
};
use crate::model::{Gateway, GatewayError, GatewayEvent, Message, ModelRequest, Role, ToolCall};

/// Most memory notes shown in the context (the rest are a `memory.recall` away).
const NOTES_IN_CONTEXT: usize = 10;

/// Why a turn ended without an answer.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// The model gateway gave up (budget, every provider failed, unknown chain).
    #[error(transparent)]
    Model(#[from] GatewayError),
    /// The agent used all its steps.
    #[error(
        "agent {agent:?} used its {limit} steps without a final answer: raise its step_limit or \
         ask for less in one turn"
    )]
    StepLimit {
        /// Agent.
        agent: String,
        /// Its limit.
        limit: u32,
    },
    /// The turn was cancelled.
    #[error("the turn was cancelled")]
    Cancelled,
}

impl TurnError {
    fn kind(&self) -> &'static str {
        match self {
            Self::Model(GatewayError::Budget { .. }) => "budget",
            Self::Model(GatewayError::UnknownChain { .. }) => "unknown_chain",
            Self::Model(GatewayError::Cancelled) | Self::Cancelled => "cancelled",
            Self::Model(_) => "model",
            Self::StepLimit { .. } => "step_limit",
        }
    }
}

/// One turn, ready to run.
pub struct Turn<'a> {
    /// The turn's id.
    pub turn_id: TurnId,
    /// The agent.
    pub agent: &'a AgentSpec,
    /// Model providers and policy.
    pub gateway: &'a Gateway,
    /// Tools.
    pub tools: &'a dyn ToolRunner,
    /// What the turn's caller may call (the gate is this ∩ the agent's allowed tools).
    pub grant: &'a BTreeSet<String>,
    /// The session's agent state (the turn appends to the agent's conversation).
    pub state: &'a SharedAgentState,
    /// Where events go. A closed receiver does not stop the turn.
    pub events: mpsc::UnboundedSender<TurnEvent>,
    /// Stops the turn (and any tool it is running).
    pub cancel: CancellationToken,
}

struct Emitter {
    turn_id: TurnId,
    seq: u64,
    tx: mpsc::UnboundedSender<TurnEvent>,
}

impl Emitter {
    fn emit(&mut self, kind: TurnEventKind) {
        self.seq += 1;
        let _ = self.tx.send(TurnEvent {
            turn_id: self.turn_id.clone(),
            seq: self.seq,
            kind,
        });
    }

    fn gateway(&mut self, event: GatewayEvent) {
        self.emit(match event {
            GatewayEvent::TextDelta(text) => TurnEventKind::TextDelta { text },
            GatewayEvent::Discarded { provider, reason } => {
                TurnEventKind::TextDiscarded { provider, reason }
            }
            GatewayEvent::Retrying {
                provider,
                attempt,
                delay_ms,
                reason,
            } => TurnEventKind::ModelRetry {
                provider,
                attempt,
                delay_ms,
                reason,
            },
            GatewayEvent::FallingBack { from, to, reason } => {
                TurnEventKind::ModelFallback { from, to, reason }
            }
            GatewayEvent::BreakerOpen { provider } => TurnEventKind::ModelBreakerOpen { provider },
            GatewayEvent::Usage {
                provider,
                model,
                usage,
                cost_usd,
            } => TurnEventKind::ModelUsage {
                provider,
                model,
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                cost_usd,
            },
        });
    }
}

impl Turn<'_> {
    /// Runs the turn on `message`; returns the final answer. Every outcome, error included, is
    /// also the last event.
    pub async fn run(self, message: String) -> Result<String, TurnError> {
        let span = info_span!("turn", turn_id = %self.turn_id, agent = %self.agent.name);
        let mut emitter = Emitter {
            turn_id: self.turn_id.clone(),
            seq: 0,
            tx: self.events.clone(),
        };
        let result = self.steps(&mut emitter, message).instrument(span).await;
        {
            let mut state = lock(self.state);
            if state
                .in_progress
                .as_ref()
                .is_some_and(|t| t.turn_id == self.turn_id)
            {
                state.in_progress = None;
            }
            if let Err(err) = &result {
                // A cancelled turn may stop between a tool call and its result.
                state
                    .conversation(&self.agent.name)
                    .answer_open_calls(&err.to_string());
            }
        }
        match &result {
            Ok(text) => emitter.emit(TurnEventKind::FinalMessage { text: text.clone() }),
            Err(err) => emitter.emit(TurnEventKind::Error {
                kind: err.kind().to_owned(),
                message: err.to_string(),
            }),
        }
        result
    }

    async fn steps(&self, emitter: &mut Emitter, message: String) -> Result<String, TurnError> {
        let agent = self.agent;
        emitter.emit(TurnEventKind::Started {
            agent: agent.name.clone(),
            message: message.clone(),
        });
        {
            let mut state = lock(self.state);
            state.in_progress = Some(InProgressTurn {
                turn_id: self.turn_id.clone(),
                agent: agent.name.clone(),
                message: message.clone(),
            });
            state
                .conversation(&agent.name)
                .messages
                .push(Message::text(Role::User, message));
        }
        let offered: Vec<_> = self
            .tools
            .specs()
            .into_iter()
            .filter(|t| self.allowed(&t.name))
            .collect();
        for _ in 0..agent.step_limit {
            if self.cancel.is_cancelled() {
                return Err(TurnError::Cancelled);
            }
            self.compress(emitter).await?;
            let (messages, mut spend) = {
                let mut state = lock(self.state);
                let notes = notes(&state.memory);
                let spend = state.spend;
                (
                    context::messages(agent, state.conversation(&agent.name), &notes),
                    spend,
                )
            };
            let request = ModelRequest {
                messages,
                tools: offered.clone(),
                temperature: agent.temperature,
                max_output_tokens: agent.max_output_tokens,
            };
            let result = self
                .gateway
                .complete(&agent.model, &request, &mut spend, &self.cancel, &mut |e| {
                    emitter.gateway(e)
                })
                .await;
            lock(self.state).spend = spend;
            let completion = result?;
            lock(self.state)
                .conversation(&agent.name)
                .messages
                .push(Message::assistant(
                    completion.text.clone(),
                    completion.tool_calls.clone(),
                ));
            if completion.tool_calls.is_empty() {
                return Ok(completion.text);
            }
            for call in &completion.tool_calls {
                let result = self.call_tool(emitter, call).await?;
                lock(self.state)
                    .conversation(&agent.name)
                    .messages
                    .push(result);
            }
        }
        Err(TurnError::StepLimit {
            agent: agent.name.clone(),
            limit: agent.step_limit,
        })
    }

    /// The gate: the agent's allowed tools ∩ the turn's grant.
    fn allowed(&self, tool: &str) -> bool {
        self.agent.allowed_tools.iter().any(|t| t == tool) && self.grant.contains(tool)
    }

    async fn call_tool(
        &self,
        emitter: &mut Emitter,
        call: &ToolCall,
    ) -> Result<Message, TurnError> {
        emitter.emit(TurnEventKind::ToolCallRequested {
            call_id: call.id.clone(),
            tool: call.name.clone(),
            arguments: call.arguments.clone(),
        });
        if !self.allowed(&call.name) {
            let reason = if self.agent.allowed_tools.contains(&call.name) {
                format!(
                    "tool {:?} is not granted to this turn (the caller's token or the \
                     session's tool policy does not allow it)",
                    call.name
                )
            } else {
                format!(
                    "tool {:?} is not among agent {:?}'s tools ({})",
                    call.name,
                    self.agent.name,
                    self.agent.allowed_tools.join(", ")
                )
            };
            emitter.emit(TurnEventKind::ToolCallDenied {
                call_id: call.id.clone(),
                tool: call.name.clone(),
                reason: reason.clone(),
            });
            return Ok(Message::tool_result(
                call,
                format!("denied: {reason}"),
                true,
            ));
        }
        emitter.emit(TurnEventKind::ToolCallStarted {
            call_id: call.id.clone(),
            tool: call.name.clone(),
        });
        // Cancellation first: a tool stopped by it must not read as the tool's own failure.
        let result = tokio::select! {
            biased;
            () = self.cancel.cancelled() => return Err(TurnError::Cancelled),
            r = self.tools.call(&call.name, call.arguments.clone(), self.cancel.child_token()) => r,
        };
        emitter.emit(TurnEventKind::ToolCallFinished {
            call_id: call.id.clone(),
            tool: call.name.clone(),
            result: result.text.clone(),
            structured: result.structured.clone(),
            is_error: result.is_error,
        });
        Ok(Message::tool_result(call, result.text, result.is_error))
    }

    /// Summarises older turns when the conversation is over the chain's context budget.
    async fn compress(&self, emitter: &mut Emitter) -> Result<(), TurnError> {
        let agent = self.agent;
        let budget = self.gateway.chain(&agent.model)?.context_budget_tokens;
        let (older, previous) = {
            let mut state = lock(self.state);
            let conversation = state.conversation(&agent.name);
            let Some(cut) = context::cut_point(conversation, budget) else {
                return Ok(());
            };
            let older: Vec<Message> = conversation.messages[..cut].to_vec();
            (older, conversation.summary.clone())
        };
        let summary = if self.gateway.is_scripted(&agent.model) {
            context::extractive(previous.as_deref(), &older)
        } else {
            let request = context::summary_request(agent, previous.as_deref(), &older);
            let mut spend = lock(self.state).spend;
            let result = self
                .gateway
                .complete(&agent.model, &request, &mut spend, &self.cancel, &mut |e| {
                    if !matches!(e, GatewayEvent::TextDelta(_)) {
                        emitter.gateway(e);
                    }
                })
                .await;
            lock(self.state).spend = spend;
            result?.text
        };
        {
            let mut state = lock(self.state);
            let conversation = state.conversation(&agent.name);
            conversation.messages.drain(..older.len());
            conversation.summary = Some(summary.clone());
            conversation.summarised_messages += older.len() as u64;
        }
        emitter.emit(TurnEventKind::ContextSummarised {
            summary,
            messages: older.len() as u64,
        });
        Ok(())
    }
}

/// The most recent notes, one a line.
fn notes(memory: &[super::MemoryNote]) -> String {
    let start = memory.len().saturating_sub(NOTES_IN_CONTEXT);
    memory[start..]
        .iter()
        .map(|n| format!("- #{} {}", n.id, n.text))
        .collect::<Vec<_>>()
        .join("\n")
}
