//! Agent state per session: each agent's conversation (with the summary of its compressed
//! past), the session's memory notes, what the session has spent on models, and the marker of
//! a turn in progress. It is one serde value, saved atomically to a file (temp file + fsync +
//! rename + directory fsync) so a checkpoint can carry it and a restore brings it back whole.

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use heist_proto::ids::SessionId;
use serde::{Deserialize, Serialize};

use super::TurnId;
use crate::model::{Message, Role, Spend};

/// The format version written by this build.
pub const STATE_VERSION: u32 = 1;

/// Everything agents remember in one session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Conversations by agent name.
    pub conversations: BTreeMap<String, Conversation>,
    /// Notes from `memory.store`, shared by the session's agents, oldest first.
    pub memory: Vec<MemoryNote>,
    /// Next note id.
    pub next_note_id: u64,
    /// Model usage and cost of the session so far (the budget is checked against it).
    pub spend: Spend,
    /// The turn running now, if any (a restored state with one set was saved mid-turn).
    pub in_progress: Option<InProgressTurn>,
}

impl Default for AgentState {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            conversations: BTreeMap::new(),
            memory: Vec::new(),
            next_note_id: 1,
            spend: Spend::default(),
            in_progress: None,
        }
    }
}

/// One agent's conversation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversation {
    /// Summary of the messages compressed away, if any.
    pub summary: Option<String>,
    /// How many messages the summary stands for.
    pub summarised_messages: u64,
    /// The recent messages, verbatim (no system message: that comes from the agent spec).
    pub messages: Vec<Message>,
}

/// A memory note.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryNote {
    /// Id, unique within the session.
    pub id: u64,
    /// The note.
    pub text: String,
    /// Tags for filtering.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A turn that has started and not ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InProgressTurn {
    /// The turn.
    pub turn_id: TurnId,
    /// The agent running it.
    pub agent: String,
    /// The message that started it.
    pub message: String,
}

/// Why a state file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("agent state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file is not an agent state.
    #[error("agent state file {path} is corrupt or from another version: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl AgentState {
    /// Writes the state to `path` atomically: a reader sees the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let io_err = |source| StateError::Io {
            path: path.to_owned(),
            source,
        };
        let bytes = serde_json::to_vec(self).map_err(|e| StateError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err)?;
        tmp.write_all(&bytes).map_err(io_err)?;
        tmp.as_file().sync_all().map_err(io_err)?;
        tmp.persist(path).map_err(|e| io_err(e.error))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
        Ok(())
    }

    /// The state as it is saved and checkpointed (JSON).
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(self).map_err(|e| StateError::Corrupt {
            path: PathBuf::from("<agent state>"),
            message: e.to_string(),
        })
    }

    /// A state from [`AgentState::to_bytes`] (a checkpoint's blob), version checked.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let corrupt = |message: String| StateError::Corrupt {
            path: PathBuf::from("<checkpoint blob>"),
            message,
        };
        let state: Self = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(corrupt(format!(
                "version {} (this worker reads version {STATE_VERSION})",
                state.version
            )));
        }
        Ok(state)
    }

    /// Reads a state written by [`AgentState::save`].
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let bytes = fs::read(path).map_err(|source| StateError::Io {
            path: path.to_owned(),
            source,
        })?;
        let state: Self = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path: path.to_owned(),
                message: format!(
                    "version {} (this worker reads version {STATE_VERSION})",
                    state.version
                ),
            });
        }
        Ok(state)
    }

    /// The agent's conversation, created empty on first use.
    pub fn conversation(&mut self, agent: &str) -> &mut Conversation {
        self.conversations.entry(agent.to_owned()).or_default()
    }

    /// After a restore or fork of a state saved mid-turn: takes the in-progress marker and
    /// answers the tool calls that turn left open, so the conversation is valid for any
    /// provider again. Returns the interrupted turn.
    pub fn recover_interrupted(&mut self) -> Option<InProgressTurn> {
        let turn = self.in_progress.take()?;
        self.conversation(&turn.agent)
            .answer_open_calls("the turn was interrupted (the session was restored or forked)");
        Some(turn)
    }
}

impl Conversation {
    /// Appends an error result for every tool call of the last assistant message that has
    /// none (providers refuse a conversation with unanswered calls). Returns how many.
    pub fn answer_open_calls(&mut self, reason: &str) -> usize {
        let Some(at) = self
            .messages
            .iter()
            .rposition(|m| m.role == Role::Assistant)
        else {
            return 0;
        };
        let answered: Vec<String> = self.messages[at + 1..]
            .iter()
            .filter_map(|m| m.tool_call_id.clone())
            .collect();
        let open: Vec<_> = self.messages[at]
            .tool_calls
            .iter()
            .filter(|c| !answered.contains(&c.id))
            .cloned()
            .collect();
        for call in &open {
            self.messages.push(Message::tool_result(
                call,
                format!("not run: {reason}"),
                true,
            ));
        }
        open.len()
    }
}

/// A session's agent state, shared by its turns and its memory tools.
pub type SharedAgentState = Arc<Mutex<AgentState>>;

/// Locks a shared state (a panic elsewhere does not make the state unusable: every update is
/// a whole step).
pub fn lock(state: &SharedAgentState) -> std::sync::MutexGuard<'_, AgentState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The agent states of the sessions on this worker.
#[derive(Default)]
pub struct AgentStates {
    states: Mutex<HashMap<SessionId, SharedAgentState>>,
}

impl AgentStates {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The session's state, created empty on first use.
    pub fn get(&self, session: &SessionId) -> SharedAgentState {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(states.entry(session.clone()).or_default())
    }

    /// Puts a state in place (after a restore or a fork), replacing any other.
    pub fn insert(&self, session: SessionId, state: AgentState) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        states.insert(session, Arc::new(Mutex::new(state)));
    }

    /// Forgets a session's state (when the session closes).
    pub fn remove(&self, session: &SessionId) -> Option<SharedAgentState> {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        states.remove(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ToolCall;

    #[test]
    fn a_state_saved_mid_turn_recovers_with_its_open_calls_answered() {
        let mut state = AgentState::default();
        let call = |id: &str| ToolCall {
            id: id.into(),
            name: "calc".into(),
            arguments: serde_json::json!({}),
        };
        let conversation = state.conversation("driver");
        conversation
            .messages
            .push(Message::text(Role::User, "route?"));
        conversation
            .messages
            .push(Message::assistant("", vec![call("a"), call("b")]));
        conversation
            .messages
            .push(Message::tool_result(&call("a"), "1", false));
        state.in_progress = Some(InProgressTurn {
            turn_id: TurnId::from_text("t-1"),
            agent: "driver".into(),
            message: "route?".into(),
        });
        let turn = state.recover_interrupted().expect("was mid-turn");
        assert_eq!(turn.turn_id.as_str(), "t-1");
        let last = state.conversations["driver"].messages.last().cloned();
        let last = last.expect("message");
        assert_eq!(last.tool_call_id.as_deref(), Some("b"));
        assert!(last.is_error && last.content.starts_with("not run:"));
        assert!(state.in_progress.is_none());
        assert!(state.recover_interrupted().is_none());
    }

    #[test]
    fn save_then_load_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agents.json");
        let mut state = AgentState::default();
        state
            .conversation("intel")
            .messages
            .push(Message::text(Role::User, "who guards the vault?"));
        state.memory.push(MemoryNote {
            id: 1,
            text: "vault shift 22:00".into(),
            tags: vec!["vault".into()],
        });
        state.save(&path).expect("save");
        assert_eq!(AgentState::load(&path).expect("load"), state);

        state.conversation("intel").summary = Some("asked about the vault".into());
        state.save(&path).expect("save again");
        assert_eq!(AgentState::load(&path).expect("load"), state);
        let leftovers = fs::read_dir(dir.path()).expect("ls").count();
        assert_eq!(leftovers, 1, "no temp files remain");
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agents.json");
        fs::write(&path, b"{\"version\": 1, \"conversations\": 3}").expect("write");
        let err = AgentState::load(&path).expect_err("corrupt");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
