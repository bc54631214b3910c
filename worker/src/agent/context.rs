//! What the model sees each step, and compression when it grows past the chain's context
//! budget: the recent turns stay verbatim, older ones become a summary (extractive on the
//! scripted chain, written by the model on real ones).

use crate::model::{Message, ModelRequest, Role, estimate_tokens, scripted};

use super::{AgentSpec, Conversation};

/// System prompt, summary and conversation as the model's messages. The agent's own prompt is
/// the first system message; the summary and notes (text that came from models and tools)
/// follow in a second, so they can never pose as the agent's directives.
pub(crate) fn messages(
    agent: &AgentSpec,
    conversation: &Conversation,
    memory: &str,
) -> Vec<Message> {
    let mut out = vec![Message::text(Role::System, agent.system_prompt.clone())];
    let mut context = String::new();
    if let Some(summary) = &conversation.summary {
        context.push_str("Summary of the earlier conversation:\n");
        context.push_str(summary);
    }
    if !memory.is_empty() {
        if !context.is_empty() {
            context.push_str("\n\n");
        }
        context.push_str("Notes in memory:\n");
        context.push_str(memory);
    }
    if !context.is_empty() {
        out.push(Message::text(Role::System, context));
    }
    out.extend(conversation.messages.iter().cloned());
    out
}

/// Estimated tokens of a conversation as sent.
pub(crate) fn tokens(conversation: &Conversation) -> u64 {
    conversation.summary.as_deref().map_or(0, estimate_tokens)
        + conversation
            .messages
            .iter()
            .map(|m| {
                estimate_tokens(&m.content)
                    + m.tool_calls
                        .iter()
                        .map(|c| estimate_tokens(&c.arguments.to_string()))
                        .sum::<u64>()
            })
            .sum::<u64>()
}

/// Where to cut when `conversation` is over `budget`: the index of the first message to keep,
/// always a user message, never after the current turn's. `None` when nothing needs cutting.
pub(crate) fn cut_point(conversation: &Conversation, budget: u64) -> Option<usize> {
    if tokens(conversation) <= budget {
        return None;
    }
    let users: Vec<usize> = conversation
        .messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == Role::User)
        .map(|(i, _)| i)
        .collect();
    let current = *users.last()?;
    // Keep the most recent turns that fit in half the budget, and at least the current one.
    let keep_from = users
        .iter()
        .copied()
        .find(|&i| {
            conversation.messages[i..]
                .iter()
                .map(|m| estimate_tokens(&m.content))
                .sum::<u64>()
                <= budget / 2
        })
        .unwrap_or(current)
        .min(current);
    (keep_from > 0).then_some(keep_from)
}

/// The extractive summary of `older` appended to the previous one.
pub(crate) fn extractive(previous: Option<&str>, older: &[Message]) -> String {
    let fresh = scripted::summarise(older);
    match previous {
        Some(previous) => format!("{previous}\n{fresh}"),
        None => fresh,
    }
}

/// The request asking a real model to summarise `older` (with the previous summary).
pub(crate) fn summary_request(
    agent: &AgentSpec,
    previous: Option<&str>,
    older: &[Message],
) -> ModelRequest {
    let mut transcript = String::new();
    if let Some(previous) = previous {
        transcript.push_str("Earlier summary: ");
        transcript.push_str(previous);
        transcript.push('\n');
    }
    for m in older {
        let who = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::System => "system",
        };
        transcript.push_str(&format!("{who}: {}\n", m.content));
        for call in &m.tool_calls {
            transcript.push_str(&format!(
                "assistant called {} {}\n",
                call.name, call.arguments
            ));
        }
    }
    ModelRequest {
        messages: vec![
            Message::text(
                Role::System,
                "Summarise this conversation in under 200 words. Keep every fact, number, time, \
                 name and decision; drop pleasantries.",
            ),
            Message::text(Role::User, transcript),
        ],
        tools: Vec::new(),
        temperature: 0.0,
        max_output_tokens: agent.max_output_tokens.min(512),
    }
}
