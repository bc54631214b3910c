//! Tools: the [`Tool`] trait, what a call gets ([`ToolContext`]) and returns ([`ToolOutput`]),
//! and the [`Registry`] that compiles each input schema once and validates arguments before a
//! tool runs.
//!
//! Two kinds of failure: a request the tool cannot accept (bad arguments, a path outside the
//! workspace, a limit) is an [`Error`] and becomes a gRPC status; a tool that ran and failed
//! (file not found, division by zero) is a normal [`ToolOutput`] with `is_error` set, so a model
//! can read what happened and try something else.

mod calc;
pub mod db;
mod echo;
mod exec;
mod fs;
pub mod memory;
mod python;
mod schema;

pub use self::fs::{FsPool, PoolLimits};
// What the fuzz targets drive ([`crate::fuzzing`]).
pub(crate) use self::{
    calc::evaluate as calc_evaluate,
    exec::{Want, resolve as resolve_path},
    fs::checked_path,
};

use std::{collections::BTreeMap, sync::Arc};

use futures::future::BoxFuture;
use heist_proto::{json, v1};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use crate::{
    Error,
    agent::AgentStates,
    sandbox::{OutputSink, Sandbox},
    sessions::Workspace,
};

/// Limits every tool call observes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest file fs.read returns and fs.write produces, in bytes.
    pub max_file_bytes: u64,
    /// Most entries fs.list returns.
    pub max_list_entries: usize,
}

/// Limits of the tools agents lean on (db.query and memory.*).
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentToolLimits {
    /// db.query's time, row and byte limits.
    pub db: db::DbLimits,
    /// The session memory's limits.
    pub memory: memory::MemoryLimits,
}

/// What a tool call runs against.
#[derive(Clone)]
pub struct ToolContext {
    /// The session's workspace (its directory, opened once as a capability).
    pub workspace: Arc<Workspace>,
    /// Size and count limits.
    pub limits: Limits,
    /// Cancelled when the caller goes away or the worker stops waiting for the call.
    pub cancel: CancellationToken,
    /// Runs commands (exec, run.python) and holds the session quotas (fs.write checks them).
    pub sandbox: Arc<Sandbox>,
    /// Live output of a streaming call (`None` for unary calls).
    pub output: Option<OutputSink>,
    /// Services shared by the worker's tools (a model gateway, a database pool), keyed by type;
    /// per-session ones live in the workspace ([`Workspace::services`]).
    pub services: Arc<http::Extensions>,
}

/// Every tool a worker offers: echo, calc, db.query, the fs.* family, memory.store/recall
/// (over `agent_states`, the same the turns use), exec and run.python. This is the one list; a
/// new tool is added here and the worker's registry, catalogue and Register message follow.
pub fn builtin_tools(
    agent_states: &Arc<AgentStates>,
    limits: AgentToolLimits,
) -> Vec<Box<dyn Tool>> {
    let mut tools: Vec<Box<dyn Tool>> = vec![
        Box::new(echo::Echo),
        Box::new(calc::Calc),
        Box::new(db::DbQuery::new(limits.db)),
        Box::new(exec::Exec),
        Box::new(python::RunPython),
    ];
    tools.extend(fs::tools());
    tools.extend(memory::tools(agent_states, limits.memory));
    tools
}

/// One piece of output.
#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// A JSON value.
    Json(Json),
}

/// What a tool returns.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolOutput {
    /// Output blocks, in order.
    pub content: Vec<Content>,
    /// Machine-readable result (a JSON object), when the tool has one.
    pub structured: Option<serde_json::Map<String, Json>>,
    /// The tool ran but failed; `content` says why.
    pub is_error: bool,
}

impl ToolOutput {
    /// A result object, sent both as a JSON block and as structured content.
    pub fn object(value: serde_json::Map<String, Json>) -> Self {
        Self {
            content: vec![Content::Json(Json::Object(value.clone()))],
            structured: Some(value),
            is_error: false,
        }
    }

    /// A failure the tool ran into, described for the caller.
    pub fn failed(text: impl Into<String>) -> Self {
        Self {
            content: vec![Content::Text(text.into())],
            structured: None,
            is_error: true,
        }
    }

    /// The output as the wire message (worker id and timing are filled in by the caller).
    pub fn into_response(self) -> v1::CallToolResponse {
        let content = self
            .content
            .into_iter()
            .map(|block| v1::ContentBlock {
                block: Some(match block {
                    Content::Text(text) => v1::content_block::Block::Text(text),
                    Content::Json(value) => {
                        v1::content_block::Block::Json(json::json_to_value(&value))
                    }
                }),
            })
            .collect();
        v1::CallToolResponse {
            content,
            is_error: self.is_error,
            structured_content: self.structured.as_ref().map(json::map_to_struct),
            ..Default::default()
        }
    }
}

/// A tool the worker offers.
pub trait Tool: Send + Sync + 'static {
    /// Unique name, e.g. "fs.read".
    fn name(&self) -> &'static str;
    /// What it does, for humans and models.
    fn description(&self) -> &'static str;
    /// JSON Schema (draft 2020-12) of the arguments object.
    fn input_schema(&self) -> Json;
    /// Whether the tool never changes the workspace.
    fn read_only(&self) -> bool;
    /// Runs the tool. `args` has already been validated against `input_schema`.
    fn call<'a>(
        &'a self,
        ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>>;
}

struct Entry {
    tool: Box<dyn Tool>,
    validator: jsonschema::Validator,
    spec: v1::ToolSpec,
}

/// The tools of this worker, each with its compiled schema.
pub struct Registry {
    tools: BTreeMap<&'static str, Entry>,
    /// Comma-separated names, for "unknown tool" messages.
    names: String,
}

impl Registry {
    /// A registry of `tools`. A schema that does not compile is an internal error (a bug).
    pub fn new(tools: Vec<Box<dyn Tool>>) -> Result<Self, Error> {
        let mut map = BTreeMap::new();
        for tool in tools {
            let schema = tool.input_schema();
            let validator = jsonschema::draft202012::new(&schema).map_err(|e| {
                Error::Internal(format!(
                    "input schema of tool {} is invalid: {e}",
                    tool.name()
                ))
            })?;
            let spec = v1::ToolSpec {
                name: tool.name().to_owned(),
                description: tool.description().to_owned(),
                input_schema: json::json_to_struct(&schema),
                read_only: tool.read_only(),
            };
            if map
                .insert(
                    tool.name(),
                    Entry {
                        tool,
                        validator,
                        spec,
                    },
                )
                .is_some()
            {
                return Err(Error::Internal("two tools share a name".to_owned()));
            }
        }
        let names = map.keys().copied().collect::<Vec<_>>().join(", ");
        Ok(Self { tools: map, names })
    }

    /// The built-in tools with default limits, memory notes kept in a set of agent states of
    /// their own (a worker passes its shared set to [`builtin_tools`]).
    pub fn builtin() -> Result<Self, Error> {
        Self::new(builtin_tools(
            &Arc::new(AgentStates::new()),
            AgentToolLimits::default(),
        ))
    }

    /// Whether the catalogue has a tool called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// Whether `name` is a read-only tool (an unknown tool is not).
    pub fn read_only(&self, name: &str) -> bool {
        self.tools.get(name).is_some_and(|e| e.spec.read_only)
    }

    /// The catalogue, ordered by name.
    pub fn specs(&self) -> Vec<v1::ToolSpec> {
        self.tools.values().map(|e| e.spec.clone()).collect()
    }

    /// Validates `args` against the tool's schema and runs it.
    pub async fn call(
        &self,
        name: &str,
        ctx: &ToolContext,
        args: Json,
    ) -> Result<ToolOutput, Error> {
        let entry = self.entry(name)?;
        schema::check(&entry.validator, &args)?;
        entry.tool.call(ctx, args).await
    }

    /// Validates `args` against the tool's schema without running it.
    pub(crate) fn check_args(&self, name: &str, args: &Json) -> Result<(), Error> {
        schema::check(&self.entry(name)?.validator, args)
    }

    fn entry(&self, name: &str) -> Result<&Entry, Error> {
        self.tools.get(name).ok_or_else(|| Error::ToolNotFound {
            name: name.to_owned(),
            available: self.names.clone(),
        })
    }
}

/// Deserializes validated arguments into a tool's typed argument struct.
pub(crate) fn parse_args<T: serde::de::DeserializeOwned>(args: Json) -> Result<T, Error> {
    serde_json::from_value(args).map_err(|e| Error::SchemaViolation {
        field: String::new(),
        message: format!("arguments: {e}"),
    })
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A workspace in a temp dir and a context around it.

    use super::*;
    use heist_proto::ids::SessionId;

    /// A context over a fresh temp workspace (kept alive by the returned guard).
    pub fn context() -> (tempfile::TempDir, ToolContext) {
        let root = tempfile::tempdir().expect("tempdir");
        let ws_path = root.path().join("ws");
        std::fs::create_dir(&ws_path).expect("mkdir ws");
        let id = SessionId::parse("s-test").expect("id");
        let workspace = Workspace::open(id, ws_path).expect("open workspace");
        let ctx = ToolContext {
            workspace: Arc::new(workspace),
            limits: Limits {
                max_file_bytes: 1024,
                max_list_entries: 100,
            },
            cancel: CancellationToken::new(),
            sandbox: Arc::new(Sandbox::disabled(
                "unit tests run no commands",
                crate::quota::Quotas::default(),
            )),
            output: None,
            services: Arc::default(),
        };
        (root, ctx)
    }

    /// Runs a tool by name through the built-in registry.
    pub async fn run(ctx: &ToolContext, name: &str, args: Json) -> Result<ToolOutput, Error> {
        Registry::builtin()
            .expect("registry")
            .call(name, ctx, args)
            .await
    }

    /// The text of the first content block.
    pub fn text(out: &ToolOutput) -> &str {
        match out.content.first() {
            Some(Content::Text(t)) => t,
            other => panic!("no text block: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};
    use heist_proto::errors;
    use serde_json::json;

    /// The coordinator's authoritative copy of this catalogue must be this catalogue.
    #[test]
    fn the_coordinators_builtin_catalogue_is_this_one() {
        let specs: Vec<Json> = Registry::builtin()
            .expect("registry")
            .specs()
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "description": s.description,
                    "input_schema": s.input_schema.as_ref().map(json::struct_to_json),
                    "read_only": s.read_only,
                })
            })
            .collect();
        let rendered = serde_json::to_string_pretty(&specs).expect("json") + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/builtin_tools.json");
        if std::env::var_os("HEIST_BLESS").is_some() {
            std::fs::write(path, &rendered).expect("write");
        }
        assert!(
            rendered == heist_proto::BUILTIN_TOOLS_JSON,
            "proto/builtin_tools.json is stale: run `HEIST_BLESS=1 cargo test -p heist-worker \
             the_coordinators_builtin_catalogue` and commit it"
        );
    }

    #[tokio::test]
    async fn unknown_tool_lists_the_catalogue() {
        let (_tmp, ctx) = context();
        let err = run(&ctx, "nope", json!({})).await.expect_err("unknown");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(
            errors::reason_of(&status).as_deref(),
            Some(errors::reason::TOOL_NOT_FOUND)
        );
        assert!(
            status
                .message()
                .contains("calc, db.query, echo, exec, fs.delete"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn catalogue_is_ordered_and_schemas_are_structs() {
        let specs = Registry::builtin().expect("registry").specs();
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "calc",
                "db.query",
                "echo",
                "exec",
                "fs.delete",
                "fs.list",
                "fs.read",
                "fs.stat",
                "fs.write",
                "memory.recall",
                "memory.store",
                "run.python"
            ]
        );
        assert!(specs.iter().all(|s| s.input_schema.is_some()));
        let read_only: Vec<_> = specs
            .iter()
            .filter(|s| !s.read_only)
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            read_only,
            [
                "exec",
                "fs.delete",
                "fs.write",
                "memory.store",
                "run.python"
            ]
        );
    }

    #[test]
    fn output_converts_to_the_wire_shape() {
        let out = ToolOutput::object(json!({"a": 1}).as_object().cloned().expect("object"));
        let resp = out.into_response();
        assert!(!resp.is_error);
        assert_eq!(resp.content.len(), 1);
        let structured = resp.structured_content.expect("structured");
        assert_eq!(json::struct_to_json(&structured), json!({"a": 1}));
    }
}
