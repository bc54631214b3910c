//! How the turn loop calls tools: the [`ToolRunner`] trait, and [`RegistryRunner`], which runs
//! the worker's tool registry in a session's tool context.

use std::sync::Arc;

use futures::future::BoxFuture;
use heist_proto::json;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    model::ToolSpec,
    tools::{Content, Registry, ToolContext},
};

/// What a tool call gave back, as the model reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolResult {
    /// The result as text (JSON blocks as JSON text).
    pub text: String,
    /// Structured content, when the tool has it.
    pub structured: Option<Json>,
    /// The tool failed or refused; `text` says why.
    pub is_error: bool,
}

/// Runs tools for a turn.
pub trait ToolRunner: Send + Sync {
    /// The tools there are (the turn offers the model those the gate lets through).
    fn specs(&self) -> Vec<ToolSpec>;
    /// Runs one call; every failure is a result with `is_error`, for the model to read.
    fn call<'a>(
        &'a self,
        name: &'a str,
        arguments: Json,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, ToolResult>;
}

/// The worker's registry in one session's context.
pub struct RegistryRunner {
    registry: Arc<Registry>,
    context: ToolContext,
}

impl RegistryRunner {
    /// Runs `registry`'s tools against `context` (its workspace, limits and sandbox).
    pub fn new(registry: Arc<Registry>, context: ToolContext) -> Self {
        Self { registry, context }
    }
}

impl ToolRunner for RegistryRunner {
    fn specs(&self) -> Vec<ToolSpec> {
        self.registry
            .specs()
            .into_iter()
            .map(|s| ToolSpec {
                name: s.name,
                description: s.description,
                input_schema: s.input_schema.as_ref().map_or_else(
                    || serde_json::json!({"type": "object"}),
                    json::struct_to_json,
                ),
            })
            .collect()
    }

    fn call<'a>(
        &'a self,
        name: &'a str,
        arguments: Json,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, ToolResult> {
        Box::pin(async move {
            let mut context = self.context.clone();
            context.cancel = cancel;
            // Under the turn's span, which names the session.
            let span = tracing::info_span!("tool_call", tool = %name);
            match self
                .registry
                .call(name, &context, arguments)
                .instrument(span)
                .await
            {
                Ok(out) => ToolResult {
                    text: out
                        .content
                        .iter()
                        .map(|block| match block {
                            Content::Text(text) => text.clone(),
                            Content::Json(value) => value.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                    structured: out.structured.map(Json::Object),
                    is_error: out.is_error,
                },
                Err(err) => ToolResult {
                    text: err.to_string(),
                    structured: None,
                    is_error: true,
                },
            }
        })
    }
}
