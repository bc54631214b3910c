//! Agents: their specs ([`AgentSpec`], with a built-in set), the turn loop ([`Turn::run`]) that
//! goes context → model → tool calls → results → … until a final message or the step limit,
//! the numbered [`TurnEvent`]s it emits, the gate every tool call passes, and the per-session
//! [`AgentState`] that checkpoints carry.

mod context;
mod events;
mod runner;
mod spec;
mod state;
mod turn;

#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use events::{TurnEvent, TurnEventKind};
pub use runner::{RegistryRunner, ToolResult, ToolRunner};
pub use spec::{AgentSpec, MAX_STEP_LIMIT, SpecError, agents_with, builtin_agents};
pub use state::{
    AgentState, AgentStates, Conversation, InProgressTurn, MemoryNote, STATE_VERSION,
    SharedAgentState, StateError, lock,
};
pub use turn::{Turn, TurnError};

/// A turn's id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TurnId(String);

impl TurnId {
    /// A fresh id (`t-` and a time-ordered UUID).
    pub fn new() -> Self {
        Self(format!("t-{}", uuid::Uuid::now_v7()))
    }

    /// An id from its text (as a client sent it back).
    pub fn from_text(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TurnId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TurnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
