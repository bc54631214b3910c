//! `openai`: any OpenAI-compatible `/v1/chat/completions` server (OpenAI, LM Studio, Ollama,
//! vLLM, llama.cpp server), streamed over SSE with function calling. Tool-call arguments arrive
//! in pieces across chunks and are assembled per call index before the call is emitted.

use std::collections::BTreeMap;

use futures::{StreamExt as _, future::BoxFuture};
use serde_json::{Value as Json, json};

use super::{
    FinishReason, GatewayError, HttpProviderConfig, Message, ModelError, ModelEvent, ModelProvider,
    ModelRequest, ModelStream, Role, Secret, ToolCall, ToolSpec, Usage, http_error, send_error,
    sse, tool_name, wire_name,
};

/// The OpenAI-compatible provider.
#[derive(Debug)]
pub(crate) struct OpenAi {
    client: reqwest::Client,
    url: String,
    model: String,
    key: Secret,
}

impl OpenAi {
    /// A client for `config`, reading unset fields from the environment.
    pub(crate) fn new(config: &HttpProviderConfig) -> Result<Self, GatewayError> {
        let base = config
            .base_url
            .clone()
            .or_else(|| std::env::var("OPENAI_BASE_URL").ok())
            .unwrap_or_else(|| "https://api.openai.com/v1".to_owned());
        let model = config
            .model
            .clone()
            .or_else(|| std::env::var("OPENAI_MODEL").ok())
            .ok_or_else(|| {
                GatewayError::Config(
                    "an openai provider needs `model` (or OPENAI_MODEL in the environment)"
                        .to_owned(),
                )
            })?;
        let key = super::key(config, "OPENAI_API_KEY");
        Ok(Self {
            client: super::client()?,
            url: format!("{}/chat/completions", base.trim_end_matches('/')),
            model,
            key,
        })
    }
}

impl ModelProvider for OpenAi {
    fn model(&self) -> &str {
        &self.model
    }

    fn stream(&self, request: ModelRequest) -> BoxFuture<'_, Result<ModelStream, ModelError>> {
        Box::pin(async move {
            let body = body(&self.model, &request);
            let mut call = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
            if !self.key.is_empty() {
                call = call.bearer_auth(self.key.expose());
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
    let messages: Vec<Json> = request.messages.iter().map(message).collect();
    let mut body = json!({
        "model": model,
        "messages": messages,
        "temperature": request.temperature,
        "max_tokens": request.max_output_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": wire_name(&t.name),
                    "description": t.description,
                    "parameters": t.input_schema,
                }})
            })
            .collect();
    }
    body
}

fn message(m: &Message) -> Json {
    match m.role {
        Role::Tool => json!({
            "role": "tool",
            "tool_call_id": m.tool_call_id,
            "content": m.content,
        }),
        Role::Assistant if !m.tool_calls.is_empty() => json!({
            "role": "assistant",
            "content": if m.content.is_empty() { Json::Null } else { json!(m.content) },
            "tool_calls": m.tool_calls.iter().map(|c| json!({
                "id": c.id,
                "type": "function",
                "function": {"name": wire_name(&c.name), "arguments": c.arguments.to_string()},
            })).collect::<Vec<_>>(),
        }),
        role => json!({
            "role": match role { Role::System => "system", Role::User => "user", _ => "assistant" },
            "content": m.content,
        }),
    }
}

#[derive(Default)]
struct Partial {
    id: String,
    name: String,
    arguments: String,
}

struct State {
    calls: BTreeMap<u64, Partial>,
    finish: Option<FinishReason>,
    done: bool,
    tools: Vec<ToolSpec>,
}

/// Turns chat.completion.chunk events into model events.
fn decode(
    events: futures::stream::BoxStream<'static, Result<sse::SseEvent, ModelError>>,
    tools: Vec<ToolSpec>,
) -> ModelStream {
    let mut state = State {
        calls: BTreeMap::new(),
        finish: None,
        done: false,
        tools,
    };
    // `None` marks the end of the body: a server that closes cleanly after a finish_reason
    // without sending `[DONE]` has still finished; one that closes before it has not.
    events
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .map(move |event| -> Vec<Result<ModelEvent, ModelError>> {
            if state.done {
                return Vec::new();
            }
            let event = match event {
                Some(Ok(event)) => event,
                Some(Err(err)) => {
                    state.done = true;
                    return vec![Err(err)];
                }
                None if state.finish.is_some() => "[DONE]".into(),
                None => return Vec::new(),
            };
            match chunk(&mut state, &event.data) {
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

fn chunk(state: &mut State, data: &str) -> Result<Vec<ModelEvent>, ModelError> {
    let mut out = Vec::new();
    if data.trim() == "[DONE]" {
        state.done = true;
        out.extend(finish_calls(state)?);
        out.push(ModelEvent::Finish(
            state.finish.unwrap_or(FinishReason::Stop),
        ));
        return Ok(out);
    }
    let value: Json = serde_json::from_str(data)
        .map_err(|e| ModelError::Protocol(format!("a chunk is not JSON ({e}): {}", clip(data))))?;
    if let Some(err) = value.get("error") {
        return Err(ModelError::StreamCut(format!("the server reported: {err}")));
    }
    if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
        out.push(ModelEvent::Usage(Usage {
            input_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
            output_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
        }));
    }
    let choices = value.get("choices").and_then(Json::as_array);
    for choice in choices.into_iter().flatten() {
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            out.push(ModelEvent::TextDelta(text.to_owned()));
        }
        for (position, call) in delta["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            // Some servers (older Ollama) send whole calls without an index.
            let index = call["index"].as_u64().unwrap_or(position as u64);
            let partial = state.calls.entry(index).or_default();
            if let Some(id) = call["id"].as_str() {
                partial.id = id.to_owned();
            }
            if let Some(name) = call["function"]["name"].as_str() {
                partial.name.push_str(name);
            }
            if let Some(args) = call["function"]["arguments"].as_str() {
                partial.arguments.push_str(args);
            }
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            state.finish = Some(match reason {
                "stop" => FinishReason::Stop,
                "tool_calls" | "function_call" => FinishReason::ToolCalls,
                "length" => FinishReason::Length,
                _ => FinishReason::Other,
            });
        }
    }
    Ok(out)
}

fn finish_calls(state: &mut State) -> Result<Vec<ModelEvent>, ModelError> {
    let calls = std::mem::take(&mut state.calls);
    calls
        .into_iter()
        .map(|(index, p)| {
            let arguments = if p.arguments.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&p.arguments).map_err(|e| {
                    ModelError::Protocol(format!(
                        "the arguments of tool call {index} are not JSON ({e}): {}",
                        clip(&p.arguments)
                    ))
                })?
            };
            let id = if p.id.is_empty() {
                format!("call_{index}")
            } else {
                p.id
            };
            Ok(ModelEvent::ToolCall(ToolCall {
                id,
                name: tool_name(&p.name, &state.tools),
                arguments,
            }))
        })
        .collect()
}

pub(super) fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}
