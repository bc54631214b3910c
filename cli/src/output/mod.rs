//! What heistctl prints: the stable JSON views (`--output json`) and plain tables.
//!
//! JSON is the contract for scripts. Every object names its own id `id`; a reference to a worker
//! is `worker_id`; states are lowercase words; times are RFC 3339 strings (or null); keys are
//! always present. Tables are for people and may change.

use std::{collections::BTreeMap, io::Write};

use heist_proto::{
    json::{struct_to_json, value_to_json},
    v1::{self, content_block::Block},
};
use serde::Serialize;
use serde_json::Value as Json;

use crate::error::Error;

mod tables;

pub use tables::{
    Table, labels_text, session_details, sessions_table, tools_table, worker_details, workers_table,
};

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// Stable JSON for programs.
    Json,
}

/// A session as printed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SessionView {
    /// Session id.
    pub id: String,
    /// Owning principal.
    pub owner: String,
    /// Worker it is placed on.
    pub worker_id: String,
    /// creating | ready | closing | closed | failed | recovering.
    pub state: String,
    /// Session labels.
    pub labels: BTreeMap<String, String>,
    /// The only tools callable in it (names or globs); empty: whatever the token allows.
    pub allowed_tools: Vec<String>,
    /// Whether its worker is connected now.
    pub worker_connected: bool,
    /// Creation time (RFC 3339).
    pub created_at: Option<String>,
    /// Last state change (RFC 3339).
    pub updated_at: Option<String>,
    /// Why it failed, when state is `failed`.
    pub failure_reason: Option<String>,
    /// Mutating tool calls acknowledged so far.
    pub acked_mutations: u64,
    /// The latest failover: the checkpoint it was recovered from and what was lost.
    pub recovered_from: Option<RecoveredView>,
}

/// A session's latest failover as printed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecoveredView {
    /// The checkpoint its workspace and agent state came back from.
    pub checkpoint_id: String,
    /// When that checkpoint was taken (RFC 3339).
    pub checkpoint_created_at: Option<String>,
    /// When it was ready again on its new worker (RFC 3339).
    pub recovered_at: Option<String>,
    /// The worker that was lost.
    pub lost_worker_id: String,
    /// Mutating calls acknowledged after that checkpoint: their effects are gone.
    pub lost_calls: u64,
}

impl From<&v1::Session> for SessionView {
    fn from(s: &v1::Session) -> Self {
        Self {
            id: s.id.clone(),
            owner: s.owner.clone(),
            worker_id: s.worker_id.clone(),
            state: session_state(s.state),
            labels: sorted(&s.labels),
            allowed_tools: s.allowed_tools.clone(),
            worker_connected: s.worker_connected,
            created_at: s.created_at.map(|t| t.to_string()),
            updated_at: s.updated_at.map(|t| t.to_string()),
            failure_reason: non_empty(&s.failure_reason),
            acked_mutations: s.acked_mutations,
            recovered_from: s.recovered_from.as_ref().map(|r| RecoveredView {
                checkpoint_id: r.checkpoint_id.clone(),
                checkpoint_created_at: r.checkpoint_created_at.map(|t| t.to_string()),
                recovered_at: r.recovered_at.map(|t| t.to_string()),
                lost_worker_id: r.lost_worker_id.clone(),
                lost_calls: r.lost_calls,
            }),
        }
    }
}

/// A worker as printed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerView {
    /// Worker id.
    pub id: String,
    /// Data-plane address.
    pub address: String,
    /// joining | ready | draining | suspect | lost | gone.
    pub state: String,
    /// Maximum sessions.
    pub capacity: u32,
    /// Sessions placed on it.
    pub active_sessions: u32,
    /// Calls in flight at its last heartbeat.
    pub in_flight_calls: u32,
    /// Placement labels.
    pub labels: BTreeMap<String, String>,
    /// Build version.
    pub version: String,
    /// Tool names.
    pub tools: Vec<String>,
    /// Sandbox backend.
    pub sandbox_backend: String,
    /// Isolation its sandbox really has (`userns`, `landlock:v6`, `rlimits`, ...).
    pub isolation: Vec<String>,
    /// When its registration was accepted (RFC 3339).
    pub registered_at: Option<String>,
    /// Last heartbeat (RFC 3339).
    pub last_seen_at: Option<String>,
}

impl From<&v1::Worker> for WorkerView {
    fn from(w: &v1::Worker) -> Self {
        Self {
            id: w.id.clone(),
            address: w.address.clone(),
            state: worker_state(w.state),
            capacity: w.capacity,
            active_sessions: w.active_sessions,
            in_flight_calls: w.in_flight_calls,
            labels: sorted(&w.labels),
            version: w.version.clone(),
            tools: w.tools.clone(),
            sandbox_backend: w.sandbox_backend.clone(),
            isolation: w.isolation.clone(),
            registered_at: w.registered_at.map(|t| t.to_string()),
            last_seen_at: w.last_seen_at.map(|t| t.to_string()),
        }
    }
}

/// A tool as printed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolView {
    /// Tool name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// Never changes the workspace.
    pub read_only: bool,
    /// JSON Schema of its arguments.
    pub input_schema: Json,
}

impl From<&v1::ToolSpec> for ToolView {
    fn from(t: &v1::ToolSpec) -> Self {
        Self {
            name: t.name.clone(),
            description: t.description.clone(),
            read_only: t.read_only,
            input_schema: t.input_schema.as_ref().map_or(Json::Null, struct_to_json),
        }
    }
}

/// One content block of a tool result (MCP shape).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentView {
    /// `{"type": "text", "text": "..."}`
    Text {
        /// The text.
        text: String,
    },
    /// `{"type": "json", "json": <value>}`
    Json {
        /// The value.
        json: Json,
    },
}

/// A tool call result as printed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CallResultView {
    /// Output blocks.
    pub content: Vec<ContentView>,
    /// The tool ran and failed.
    pub is_error: bool,
    /// Machine-readable result (null when the tool has none).
    pub structured_content: Json,
    /// Worker that ran it.
    pub worker_id: String,
    /// Time on the worker, microseconds.
    pub duration_us: u64,
    /// Replayed from an earlier call with the same request id.
    pub replayed: bool,
}

impl From<&v1::CallToolResponse> for CallResultView {
    fn from(r: &v1::CallToolResponse) -> Self {
        Self {
            content: r
                .content
                .iter()
                .filter_map(|b| match &b.block {
                    Some(Block::Text(text)) => Some(ContentView::Text { text: text.clone() }),
                    Some(Block::Json(value)) => Some(ContentView::Json {
                        json: value_to_json(value),
                    }),
                    None => None,
                })
                .collect(),
            is_error: r.is_error,
            structured_content: r
                .structured_content
                .as_ref()
                .map_or(Json::Null, struct_to_json),
            worker_id: r.worker_id.clone(),
            duration_us: r.duration_us,
            replayed: r.replayed,
        }
    }
}

impl CallResultView {
    /// The text of every block: text as-is, JSON pretty-printed, one block per line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for block in &self.content {
            match block {
                ContentView::Text { text } => out.push_str(text),
                ContentView::Json { json } => {
                    out.push_str(&serde_json::to_string_pretty(json).unwrap_or_default());
                }
            }
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }
}

/// Lowercase name of a session state ("ready").
pub fn session_state(raw: i32) -> String {
    v1::SessionState::try_from(raw).map_or_else(
        |_| "unknown".to_owned(),
        |s| enum_word(s.as_str_name(), "SESSION_STATE_"),
    )
}

/// Lowercase name of a worker state ("ready").
pub fn worker_state(raw: i32) -> String {
    v1::WorkerState::try_from(raw).map_or_else(
        |_| "unknown".to_owned(),
        |s| enum_word(s.as_str_name(), "WORKER_STATE_"),
    )
}

fn enum_word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

fn sorted(map: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// Writes a value as pretty JSON and a newline.
pub fn write_json(out: &mut dyn Write, value: &impl Serialize) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::io("cannot encode JSON", std::io::Error::other(e)))?;
    write_text(out, &format!("{text}\n"))
}

/// Writes a value as one line of JSON (a stream of records, one per line).
pub fn write_json_line(out: &mut dyn Write, value: &impl Serialize) -> Result<(), Error> {
    let text = serde_json::to_string(value)
        .map_err(|e| Error::io("cannot encode JSON", std::io::Error::other(e)))?;
    write_text(out, &format!("{text}\n"))
}

/// Writes text. A reader that went away (`heistctl session ls | head -1`) is not an error.
pub fn write_text(out: &mut dyn Write, text: &str) -> Result<(), Error> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("cannot write to stdout", e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn session_json_is_stable() {
        let s = v1::Session {
            id: "s-1".into(),
            owner: "admin".into(),
            worker_id: "worker-1".into(),
            state: v1::SessionState::Ready as i32,
            labels: [("team".to_owned(), "red".to_owned())].into(),
            created_at: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            updated_at: None,
            failure_reason: String::new(),
            worker_connected: true,
            ..v1::Session::default()
        };
        let j = serde_json::to_value(SessionView::from(&s)).expect("json");
        assert_eq!(
            j,
            json!({
                "id": "s-1", "owner": "admin", "worker_id": "worker-1", "state": "ready",
                "labels": {"team": "red"}, "allowed_tools": [], "worker_connected": true,
                "created_at": "1970-01-01T00:00:00Z", "updated_at": null, "failure_reason": null,
                "acked_mutations": 0, "recovered_from": null
            })
        );
        let recovered = v1::Session {
            recovered_from: Some(v1::RecoveredFrom {
                checkpoint_id: "c-1".into(),
                checkpoint_created_at: None,
                recovered_at: Some(prost_types::Timestamp {
                    seconds: 60,
                    nanos: 0,
                }),
                lost_worker_id: "worker-2".into(),
                lost_calls: 3,
            }),
            ..s
        };
        let view = SessionView::from(&recovered);
        assert_eq!(
            serde_json::to_value(&view).expect("json")["recovered_from"],
            json!({"checkpoint_id": "c-1", "checkpoint_created_at": null,
                   "recovered_at": "1970-01-01T00:01:00Z", "lost_worker_id": "worker-2",
                   "lost_calls": 3})
        );
        let text = tables::session_details(&view);
        assert!(
            text.contains("c-1 (worker-2 lost; 3 calls after the checkpoint lost)"),
            "{text}"
        );
    }

    #[test]
    fn states_are_lowercase_words() {
        assert_eq!(session_state(v1::SessionState::Closing as i32), "closing");
        assert_eq!(worker_state(v1::WorkerState::Suspect as i32), "suspect");
        assert_eq!(session_state(99), "unknown");
    }

    #[test]
    fn call_results_print_text_as_is_and_json_pretty() {
        let r = v1::CallToolResponse {
            content: vec![
                v1::ContentBlock {
                    block: Some(Block::Text("hello".into())),
                },
                v1::ContentBlock {
                    block: Some(Block::Json(heist_proto::json::json_to_value(
                        &json!({"a": 1}),
                    ))),
                },
            ],
            is_error: false,
            structured_content: None,
            worker_id: "worker-1".into(),
            duration_us: 7,
            replayed: false,
        };
        let view = CallResultView::from(&r);
        assert_eq!(view.text(), "hello\n{\n  \"a\": 1\n}\n");
        let j = serde_json::to_value(&view).expect("json");
        assert_eq!(j["content"][0], json!({"type": "text", "text": "hello"}));
        assert_eq!(j["content"][1], json!({"type": "json", "json": {"a": 1}}));
        assert_eq!(j["structured_content"], Json::Null);
    }
}
