//! `anthropic`: the Messages API with tool use, streamed (`message_start`,
//! `content_block_start/delta/stop` with `text_delta` and `input_json_delta`, `message_delta`
//! with the stop reason and output tokens, `message_stop`).

use std::collections::BTreeMap;

use futures::{StreamExt as _, future::BoxFuture};
use serde_json::{Value as Json, json};

use super::{
    FinishReason, GatewayError, HttpProviderConfig, Message, ModelError, ModelEvent, ModelProvider,
    ModelRequest, ModelStream, Role, Secret, ToolCall, ToolSpec, Usage, http_error, openai::clip,
    send_error, sse, tool_name, wire_name,
};

/// The API version header sent with every call.
const API_VERSION: &str = "2023-06-01";

/// The Anthropic provider.
#[derive(Debug)]
pub(crate) struct Anthropic {
    client: reqwest::Client,
    url: String,
    model: String,
    key: Secret,
}

impl Anthropic {
    /// A client for `config`, reading unset fields from the environment.
    pub(crate) fn new(config: &HttpProviderConfig) -> Result<Self, GatewayError> {
        let base = config
            .base_url
            .clone()
            .or_else(|| std::env::var("ANTHROPIC_BASE_URL").ok())
            .unwrap_or_else(|| "https://api.anthropic.com".to_owned());
        let model = config
            .model
            .clone()
            .or_else(|| std::env::var("ANTHROPIC_MODEL").ok())
            .ok_or_else(|| {
                GatewayError::Config(
                    "an anthropic provider needs `model` (or ANTHROPIC_MODEL in the environment)"
                        .to_owned(),
                )
            })?;
        Ok(Self {
            client: super::client()?,
            url: format!("{}/v1/messages", base.trim_end_matches('/')),
            model,
            key: super::key(config, "ANTHROPIC_API_KEY"),
        })
    }
}

impl ModelProvider for Anthropic {
    fn model(&self) -> &str {
        &self.model
    }

    fn stream(&self, request: ModelRequest) -> BoxFuture<'_, Result<ModelStream, ModelError>> {
        Box::pin(async move {
            let mut call = self
                .client
                .post(&self.url)
                .header("anthropic-version", API_VERSION)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body(&self.model, &request).to_string());
            if !self.key.is_empty() {
                call = call.header("x-api-key", self.key.expose());
            }
            let response = call.send().await.map_err(|e| send_error(&e))?;
            if !response.status().is_success() {
                return Err(http_error(response).await);
            }
            Ok(decode(sse::events(response), request.tools))
        })
    }
}

fn body(model: &str, request: &ModelRequest) -> Json {
    let system: Vec<&str> = request
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let mut messages: Vec<Json> = Vec::new();
    for m in request.messages.iter().filter(|m| m.role != Role::System) {
        let (role, blocks) = blocks(m);
        // Consecutive tool results (and a user message after them) share one user message.
        match messages.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(content) = last["content"].as_array_mut() {
                    content.extend(blocks);
                }
            }
            _ => messages.push(json!({"role": role, "content": blocks})),
        }
    }
    let mut body = json!({
        "model": model,
        "max_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "messages": messages,
        "stream": true,
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| {
                json!({"name": wire_name(&t.name), "description": t.description,
                       "input_schema": t.input_schema})
            })
            .collect();
    }
    body
}

fn blocks(m: &Message) -> (&'static str, Vec<Json>) {
    match m.role {
        Role::Tool => (
            "user",
            vec![json!({
                "type": "tool_result",
                "tool_use_id": m.tool_call_id,
                "content": m.content,
                "is_error": m.is_error,
            })],
        ),
        Role::Assistant => {
            let mut out = Vec::new();
            if !m.content.is_empty() {
                out.push(json!({"type": "text", "text": m.content}));
            }
            out.extend(m.tool_calls.iter().map(|c| {
                json!({"type": "tool_use", "id": c.id, "name": wire_name(&c.name), "input": c.arguments})
            }));
            ("assistant", out)
        }
        _ => ("user", vec![json!({"type": "text", "text": m.content})]),
    }
}

#[derive(Default)]
struct Block {
    id: String,
    name: String,
    json: String,
}

struct State {
    blocks: BTreeMap<u64, Block>,
    usage: Usage,
    finish: FinishReason,
    done: bool,
    tools: Vec<ToolSpec>,
}

fn decode(
    events: futures::stream::BoxStream<'static, Result<sse::SseEvent, ModelError>>,
    tools: Vec<ToolSpec>,
) -> ModelStream {
    let mut state = State {
        blocks: BTreeMap::new(),
        usage: Usage::default(),
        finish: FinishReason::Other,
        done: false,
        tools,
    };
    events
        .map(move |event| -> Vec<Result<ModelEvent, ModelError>> {
            if state.done {
                return Vec::new();
            }
            let result = event.and_then(|e| handle(&mut state, &e.data));
            match result {
                Ok(out) => out.into_iter().map(Ok).collect(),
                Err(err) => {
                    state.done = true;
                    vec![Err(err)]
                }
            }
        })
        .flat_map(futures::stream::iter)
        .boxed()
}

fn handle(state: &mut State, data: &str) -> Result<Vec<ModelEvent>, ModelError> {
    let value: Json = serde_json::from_str(data)
        .map_err(|e| ModelError::Protocol(format!("an event is not JSON ({e}): {}", clip(data))))?;
    let index = value["index"].as_u64().unwrap_or(0);
    let mut out = Vec::new();
    match value["type"].as_str().unwrap_or_default() {
        "message_start" => {
            let usage = &value["message"]["usage"];
            state.usage.input_tokens = usage["input_tokens"].as_u64().unwrap_or(0);
            state.usage.output_tokens = usage["output_tokens"].as_u64().unwrap_or(0);
        }
        "content_block_start" => {
            let block = &value["content_block"];
            if block["type"] == "tool_use" {
                state.blocks.insert(
                    index,
                    Block {
                        id: block["id"].as_str().unwrap_or_default().to_owned(),
                        name: block["name"].as_str().unwrap_or_default().to_owned(),
                        json: String::new(),
                    },
                );
            } else if let Some(text) = block["text"].as_str().filter(|t| !t.is_empty()) {
                out.push(ModelEvent::TextDelta(text.to_owned()));
            }
        }
        "content_block_delta" => {
            let delta = &value["delta"];
            match delta["type"].as_str().unwrap_or_default() {
                "text_delta" => {
                    if let Some(text) = delta["text"].as_str() {
                        out.push(ModelEvent::TextDelta(text.to_owned()));
                    }
                }
                "input_json_delta" => {
                    if let Some(block) = state.blocks.get_mut(&index) {
                        block
                            .json
                            .push_str(delta["partial_json"].as_str().unwrap_or_default());
                    }
                }
                _ => {}
            }
        }
        "content_block_stop" => {
            if let Some(block) = state.blocks.remove(&index) {
                let arguments = if block.json.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(&block.json).map_err(|e| {
                        ModelError::Protocol(format!(
                            "the input of tool_use {} is not JSON ({e}): {}",
                            block.id,
                            clip(&block.json)
                        ))
                    })?
                };
                out.push(ModelEvent::ToolCall(ToolCall {
                    id: block.id,
                    name: tool_name(&block.name, &state.tools),
                    arguments,
                }));
            }
        }
        "message_delta" => {
            if let Some(tokens) = value["usage"]["output_tokens"].as_u64() {
                state.usage.output_tokens = tokens;
            }
            if let Some(reason) = value["delta"]["stop_reason"].as_str() {
                state.finish = match reason {
                    "end_turn" | "stop_sequence" => FinishReason::Stop,
                    "tool_use" => FinishReason::ToolCalls,
                    "max_tokens" => FinishReason::Length,
                    _ => FinishReason::Other,
                };
            }
        }
        "message_stop" => {
            state.done = true;
            out.push(ModelEvent::Usage(state.usage));
            out.push(ModelEvent::Finish(state.finish));
        }
        "error" => {
            return Err(ModelError::StreamCut(format!(
                "the server reported: {}",
                value["error"]
            )));
        }
        _ => {}
    }
    Ok(out)
}
