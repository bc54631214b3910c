//! `scripted`: the built-in deterministic model. Offline, fast, and driven by what it reads:
//! a small rule-based planner ([`planner`]) looks at the agent's directives (a `[scripted]`
//! section of the system prompt, see [`directives`]), the tools on offer and the tool results
//! already in the transcript, and decides the next tool call or the final answer, which cites
//! facts from those results. The same seed and conversation always give the same output.

pub mod directives;
mod planner;

use futures::{StreamExt as _, future::BoxFuture};

use super::{
    FinishReason, Message, ModelError, ModelEvent, ModelProvider, ModelRequest, ModelStream, Role,
    Usage, estimate_tokens,
};
use directives::Directives;

/// The scripted provider.
#[derive(Debug)]
pub struct Scripted {
    seed: u64,
}

impl Scripted {
    /// A scripted model whose choices derive from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }
}

impl ModelProvider for Scripted {
    fn model(&self) -> &str {
        "scripted"
    }

    fn stream(&self, request: ModelRequest) -> BoxFuture<'_, Result<ModelStream, ModelError>> {
        // Directives come from the agent's own prompt (the first system message) only.
        let system = request
            .messages
            .iter()
            .find(|m| m.role == Role::System)
            .map_or("", |m| m.content.as_str());
        let directives = Directives::parse(system);
        let seed = directives.seed.unwrap_or(self.seed);
        // The same conversation gives the same choices; a later step gets fresh ones.
        let mut rng =
            Rng::new(seed ^ fnv(system) ^ (request.messages.len() as u64).rotate_left(17));
        let decision = planner::decide(&request, &directives, &mut rng);
        let input_tokens = request
            .messages
            .iter()
            .map(|m| estimate_tokens(&m.content))
            .sum();
        let mut events: Vec<Result<ModelEvent, ModelError>> = words(&decision.text)
            .map(|w| Ok(ModelEvent::TextDelta(w.to_owned())))
            .collect();
        let finish = if let Some(call) = decision.call {
            let output = estimate_tokens(&call.arguments.to_string());
            events.push(Ok(ModelEvent::ToolCall(call)));
            (FinishReason::ToolCalls, output)
        } else {
            (FinishReason::Stop, 0)
        };
        events.push(Ok(ModelEvent::Usage(Usage {
            input_tokens,
            output_tokens: estimate_tokens(&decision.text) + finish.1,
        })));
        events.push(Ok(ModelEvent::Finish(finish.0)));
        Box::pin(async move { Ok(futures::stream::iter(events).boxed()) })
    }
}

/// The text in word-sized pieces (each keeps its trailing space), as a real model streams.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive(' ')
}

/// The extractive summary the scripted chain uses when a context is compressed: the first
/// sentence of every assistant answer and the tools used, in order.
pub fn summarise(messages: &[Message]) -> String {
    let mut lines = Vec::new();
    for m in messages {
        match m.role {
            Role::User => lines.push(format!("User asked: {}", first_sentence(&m.content))),
            Role::Assistant if m.tool_calls.is_empty() && !m.content.is_empty() => {
                lines.push(format!("Answered: {}", first_sentence(&m.content)));
            }
            Role::Assistant => {
                for call in &m.tool_calls {
                    lines.push(format!("Called {} {}", call.name, call.arguments));
                }
            }
            _ => {}
        }
    }
    lines.join("\n")
}

fn first_sentence(text: &str) -> String {
    let end = text.find(". ").map_or(text.len(), |i| i + 1);
    text[..end].chars().take(300).collect()
}

/// A small deterministic generator (SplitMix64).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// FNV-1a of a text (stable across runs, unlike the std hasher).
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
