//! What `tools/list` shows: the coordinator's own tools (sessions, checkpoints, agents) with
//! input and output schemas, and every worker tool with `session_id` added to its schema. Each
//! coordinator tool names the gRPC method whose scope it needs
//! ([`heist_proto::scopes::scope_for`]) and each worker tool passes the gate's token check
//! ([`gate::token_allows`]: `tools:call` or its category scope), so a token sees and calls over
//! MCP exactly what it may call over gRPC. `tools/list` has no session (MCP is stateless here):
//! a session's tool policy applies when a tool is called in it.

use std::sync::Arc;

use heist_proto::{json::struct_to_map, scopes, v1::ToolSpec};
use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use serde_json::{Value, json};

use crate::{auth_layer::Principal, calls::gate};

/// A coordinator tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// Open a session.
    SessionCreate,
    /// The caller's sessions.
    SessionList,
    /// Close a session.
    SessionClose,
    /// Checkpoint a session.
    CheckpointCreate,
    /// The caller's checkpoints.
    CheckpointList,
    /// Restore a checkpoint.
    CheckpointRestore,
    /// A new session from a checkpoint.
    SessionFork,
    /// The agents the caller can run.
    AgentList,
    /// Run one agent turn.
    AgentTurn,
}

/// Every coordinator tool, in listing order.
pub const BUILTINS: &[Builtin] = &[
    Builtin::SessionCreate,
    Builtin::SessionList,
    Builtin::SessionClose,
    Builtin::CheckpointCreate,
    Builtin::CheckpointList,
    Builtin::CheckpointRestore,
    Builtin::SessionFork,
    Builtin::AgentList,
    Builtin::AgentTurn,
];

impl Builtin {
    /// The MCP name.
    pub fn name(self) -> &'static str {
        match self {
            Self::SessionCreate => "session_create",
            Self::SessionList => "session_list",
            Self::SessionClose => "session_close",
            Self::CheckpointCreate => "checkpoint_create",
            Self::CheckpointList => "checkpoint_list",
            Self::CheckpointRestore => "checkpoint_restore",
            Self::SessionFork => "session_fork",
            Self::AgentList => "agent_list",
            Self::AgentTurn => "agent_turn",
        }
    }

    /// The tool called `name`, if it is one of these.
    pub fn by_name(name: &str) -> Option<Self> {
        BUILTINS.iter().copied().find(|b| b.name() == name)
    }

    /// The gRPC method this tool stands for (its scope is the tool's scope).
    fn method(self) -> &'static str {
        match self {
            Self::SessionCreate => "/heist.v1.SessionService/CreateSession",
            Self::SessionList => "/heist.v1.SessionService/ListSessions",
            Self::SessionClose => "/heist.v1.SessionService/CloseSession",
            Self::CheckpointCreate => "/heist.v1.CheckpointService/CreateCheckpoint",
            Self::CheckpointList => "/heist.v1.CheckpointService/ListCheckpoints",
            Self::CheckpointRestore => "/heist.v1.CheckpointService/RestoreCheckpoint",
            Self::SessionFork => "/heist.v1.CheckpointService/ForkSession",
            Self::AgentList => "/heist.v1.AgentService/ListAgents",
            Self::AgentTurn => "/heist.v1.AgentService/RunTurn",
        }
    }

    /// The scope a caller needs for this tool.
    pub fn scope(self) -> &'static str {
        scopes::scope_for(self.method()).unwrap_or(scopes::ADMIN)
    }

    fn read_only(self) -> bool {
        matches!(
            self,
            Self::SessionList | Self::CheckpointList | Self::AgentList
        )
    }

    fn description(self) -> &'static str {
        match self {
            Self::SessionCreate => {
                "Open a sandboxed session (a private workspace on a worker). Pass its session_id \
                 to every other tool. Optional labels select the worker; optional \
                 allowed_tools (names or globs like fs.*) narrow the tools callable in it."
            }
            Self::SessionList => "List your open sessions (with include_closed, closed ones too).",
            Self::SessionClose => "Close a session: its sandbox and workspace are removed.",
            Self::CheckpointCreate => {
                "Checkpoint a session: its workspace files and agent state, restorable later."
            }
            Self::CheckpointList => "List your checkpoints, of one session or of all.",
            Self::CheckpointRestore => {
                "Restore a checkpoint into its session (or into session_id): the workspace \
                 becomes the checkpoint's."
            }
            Self::SessionFork => "Open a new session that starts from a checkpoint.",
            Self::AgentList => "List the agents you can run (of one session's worker, or all).",
            Self::AgentTurn => {
                "Run one agent turn in a session: the agent reads the message, calls tools in \
                 the session and answers. Progress notifications carry the turn's events."
            }
        }
    }

    fn input_schema(self) -> Value {
        let labels = json!({
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "key=value labels"
        });
        let session = json!({"type": "string", "description": "a session id from session_create"});
        let checkpoint = json!({"type": "string", "description": "a checkpoint id"});
        match self {
            Self::SessionCreate => object(
                json!({
                    "labels": labels,
                    "allowed_tools": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "only these tools may be called in the session: tool \
                                        names or globs such as fs.*; empty for no narrowing"
                    }
                }),
                &[],
            ),
            Self::SessionList => object(
                json!({"include_closed": {"type": "boolean", "default": false}}),
                &[],
            ),
            Self::SessionClose => object(json!({"session_id": session}), &["session_id"]),
            Self::CheckpointCreate => object(
                json!({"session_id": session, "labels": labels}),
                &["session_id"],
            ),
            Self::CheckpointList => object(json!({"session_id": session}), &[]),
            Self::CheckpointRestore => object(
                json!({"checkpoint_id": checkpoint, "session_id": session}),
                &["checkpoint_id"],
            ),
            Self::SessionFork => object(
                json!({"checkpoint_id": checkpoint, "labels": labels}),
                &["checkpoint_id"],
            ),
            Self::AgentList => object(json!({"session_id": session}), &[]),
            Self::AgentTurn => object(
                json!({
                    "session_id": session,
                    "agent": {"type": "string", "description": "an agent name from agent_list"},
                    "message": {"type": "string", "description": "what to ask the agent"}
                }),
                &["session_id", "agent", "message"],
            ),
        }
    }

    fn output_schema(self) -> Value {
        let session = session_schema();
        match self {
            Self::SessionCreate
            | Self::SessionClose
            | Self::CheckpointRestore
            | Self::SessionFork => session,
            Self::SessionList => object(
                json!({"sessions": {"type": "array", "items": session}}),
                &["sessions"],
            ),
            Self::CheckpointCreate => checkpoint_schema(),
            Self::CheckpointList => object(
                json!({"checkpoints": {"type": "array", "items": checkpoint_schema()}}),
                &["checkpoints"],
            ),
            Self::AgentList => object(
                json!({"agents": {"type": "array", "items": object(json!({
                    "name": {"type": "string"},
                    "role": {"type": "string"},
                    "model": {"type": "string"},
                    "tools": {"type": "array", "items": {"type": "string"}},
                    "step_limit": {"type": "integer"}
                }), &["name"])}}),
                &["agents"],
            ),
            Self::AgentTurn => object(
                json!({
                    "turn_id": {"type": "string"},
                    "state": {"type": "string"},
                    "final_message": {"type": "string"},
                    "events": {"type": "integer"}
                }),
                &["turn_id", "state"],
            ),
        }
    }

    /// The MCP tool description.
    fn tool(self) -> Tool {
        let annotations = ToolAnnotations::default()
            .read_only(self.read_only())
            .destructive(matches!(self, Self::SessionClose | Self::CheckpointRestore));
        Tool::new_with_raw(
            self.name(),
            Some(self.description().into()),
            as_object(self.input_schema()),
        )
        .with_raw_output_schema(as_object(self.output_schema()))
        .with_annotations(annotations)
    }
}

fn session_schema() -> Value {
    object(
        json!({
            "session_id": {"type": "string"},
            "state": {"type": "string"},
            "worker_id": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "failure_reason": {"type": "string"},
            "allowed_tools": {"type": "array", "items": {"type": "string"}}
        }),
        &["session_id", "state"],
    )
}

fn checkpoint_schema() -> Value {
    object(
        json!({
            "checkpoint_id": {"type": "string"},
            "session_id": {"type": "string"},
            "parent_id": {"type": "string"},
            "file_count": {"type": "integer"},
            "total_bytes": {"type": "integer"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}
        }),
        &["checkpoint_id", "session_id"],
    )
}

fn object(properties: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": properties, "required": required})
}

fn as_object(value: Value) -> Arc<JsonObject> {
    match value {
        Value::Object(map) => Arc::new(map),
        _ => Arc::new(JsonObject::new()),
    }
}

/// A worker tool's MCP name: dots become underscores (`fs.read` → `fs_read`), the portable
/// subset of names every client accepts.
pub fn mcp_name(worker_tool: &str) -> String {
    worker_tool.replace('.', "_")
}

/// Whether a caller with `principal` may call the worker tool `spec` by its token (the same
/// decision gRPC's CallTool takes before the session's policy: [`gate::token_allows`]).
pub fn worker_tool_allowed(principal: &Principal, spec: &ToolSpec) -> bool {
    gate::token_allows(principal, &spec.name).is_ok()
}

/// The worker tool's MCP description: its schema with a required `session_id`.
fn worker_tool(spec: &ToolSpec) -> Tool {
    let mut schema = spec
        .input_schema
        .as_ref()
        .map(struct_to_map)
        .unwrap_or_default();
    schema
        .entry("type")
        .or_insert_with(|| Value::String("object".to_owned()));
    let properties = schema
        .entry("properties")
        .or_insert_with(|| Value::Object(JsonObject::new()));
    if let Value::Object(properties) = properties {
        properties.insert(
            "session_id".to_owned(),
            json!({"type": "string", "description": "a session id from session_create"}),
        );
    }
    let required = schema
        .entry("required")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(required) = required {
        required.insert(0, Value::String("session_id".to_owned()));
    }
    let annotations = ToolAnnotations::default().read_only(spec.read_only);
    Tool::new_with_raw(
        mcp_name(&spec.name),
        Some(spec.description.clone().into()),
        Arc::new(schema),
    )
    .with_annotations(annotations)
}

/// The tools `principal` may call: the coordinator's whose scope it holds, then the worker
/// tools (`catalogue`, merged across workers) the gate allows.
pub fn visible(principal: &Principal, catalogue: &[ToolSpec]) -> Vec<Tool> {
    let mut tools: Vec<Tool> = BUILTINS
        .iter()
        .filter(|b| principal.has(b.scope()))
        .map(|b| b.tool())
        .collect();
    tools.extend(
        catalogue
            .iter()
            .filter(|spec| worker_tool_allowed(principal, spec))
            .map(worker_tool),
    );
    tools
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(scopes: &[&str]) -> Principal {
        Principal {
            id: "alice".to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn fs_read() -> ToolSpec {
        ToolSpec {
            name: "fs.read".to_owned(),
            description: "read a file".to_owned(),
            input_schema: None,
            read_only: true,
        }
    }

    #[test]
    fn the_list_follows_the_token_scopes() {
        let names = |p: &Principal| -> Vec<String> {
            visible(p, &[fs_read()])
                .into_iter()
                .map(|t| t.name.into_owned())
                .collect()
        };
        let all = names(&principal(&["admin"]));
        assert!(all.contains(&"session_create".to_owned()));
        assert!(all.contains(&"fs_read".to_owned()));
        assert_eq!(all.len(), BUILTINS.len() + 1);

        let reader = names(&principal(&["sessions:read", "tools:read"]));
        assert_eq!(reader, vec!["session_list", "agent_list"]);

        let files = names(&principal(&["tools:fs"]));
        assert_eq!(files, vec!["fs_read"]);
        let exec = names(&principal(&["tools:exec"]));
        assert!(exec.is_empty(), "{exec:?}");
    }

    #[test]
    fn worker_tools_require_a_session_id() {
        let tool = worker_tool(&fs_read());
        assert_eq!(tool.name, "fs_read");
        assert_eq!(tool.input_schema["required"][0], "session_id");
        assert_eq!(tool.input_schema["type"], "object");
    }
}
