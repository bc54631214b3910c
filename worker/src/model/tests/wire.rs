//! The real provider clients and the gateway policy against [`Server`].

use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

use super::server::{Reply, Server};
use crate::model::*;

fn openai(server: &Server, key: &str) -> ProviderConfig {
    openai_at(&server.url, key)
}

fn openai_at(url: &str, key: &str) -> ProviderConfig {
    ProviderConfig::Openai(HttpProviderConfig {
        base_url: Some(format!("{url}/v1")),
        model: Some("m1".to_owned()),
        api_key: Some(Secret::new(key)),
        api_key_env: None,
    })
}

fn anthropic(server: &Server) -> ProviderConfig {
    ProviderConfig::Anthropic(HttpProviderConfig {
        base_url: Some(server.url.clone()),
        model: Some("claude-test".to_owned()),
        api_key: Some(Secret::new("ak-test")),
        api_key_env: None,
    })
}

/// A gateway whose chain "c" runs `providers` in order, retrying fast.
fn gateway(
    providers: Vec<(&str, ProviderConfig)>,
    edit: impl FnOnce(&mut ModelsConfig),
) -> Gateway {
    let mut config = ModelsConfig::default();
    let names: Vec<&str> = providers.iter().map(|(n, _)| *n).collect();
    let mut chain = ChainConfig::of(&names);
    chain.backoff_base_ms = 1;
    chain.backoff_max_ms = 5;
    config.chains.insert("c".to_owned(), chain);
    for (name, provider) in providers {
        config.providers.insert(name.to_owned(), provider);
    }
    edit(&mut config);
    Gateway::from_config(&config).expect("gateway")
}

fn request() -> ModelRequest {
    ModelRequest {
        messages: vec![
            Message::text(Role::System, "be brief"),
            Message::text(Role::User, "hi"),
        ],
        tools: vec![ToolSpec {
            name: "db.query".to_owned(),
            description: "sql".to_owned(),
            input_schema: json!({"type": "object"}),
        }],
        temperature: 0.0,
        max_output_tokens: 64,
    }
}

async fn run(
    gw: &Gateway,
    spend: &mut Spend,
) -> (Result<Completion, GatewayError>, Vec<GatewayEvent>) {
    let mut events = Vec::new();
    let result = gw
        .complete(
            "c",
            &request(),
            spend,
            &CancellationToken::new(),
            &mut |e| events.push(e),
        )
        .await;
    (result, events)
}

fn chunk(delta: Json) -> (Option<&'static str>, String) {
    (
        None,
        json!({"choices": [{"index": 0, "delta": delta}]}).to_string(),
    )
}

fn text_reply(text: &str) -> Reply {
    Reply::Sse(vec![
        chunk(json!({"role": "assistant", "content": text})),
        (
            None,
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).to_string(),
        ),
        (
            None,
            json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2}})
                .to_string(),
        ),
        (None, "[DONE]".to_owned()),
    ])
}

#[tokio::test]
async fn openai_streams_text_usage_and_cost() {
    let server = Server::start(vec![Reply::Sse(vec![
        chunk(json!({"content": "Hel"})),
        chunk(json!({"content": "lo"})),
        (
            None,
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).to_string(),
        ),
        (
            None,
            json!({"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 500}})
                .to_string(),
        ),
        (None, "[DONE]".to_owned()),
    ])])
    .await;
    let gw = gateway(vec![("oa", openai(&server, "sk-secret-1"))], |c| {
        c.prices.insert(
            "m1".into(),
            Price {
                input_usd_per_mtok: 2.0,
                output_usd_per_mtok: 10.0,
            },
        );
    });
    let mut spend = Spend::default();
    let (result, events) = run(&gw, &mut spend).await;
    let done = result.expect("completion");
    assert_eq!(done.text, "Hello");
    assert_eq!(done.finish, FinishReason::Stop);
    assert_eq!(
        done.usage,
        Usage {
            input_tokens: 1000,
            output_tokens: 500
        }
    );
    assert_eq!(
        events[..2],
        [
            GatewayEvent::TextDelta("Hel".into()),
            GatewayEvent::TextDelta("lo".into())
        ]
    );
    let cost = 1000.0 * 2.0 / 1e6 + 500.0 * 10.0 / 1e6;
    assert!((spend.cost_usd - cost).abs() < 1e-12, "{spend:?}");
    assert_eq!(spend.input_tokens, 1000);
    server.seen(0, |seen| {
        assert_eq!(seen.body["stream"], true);
        assert_eq!(seen.body["model"], "m1");
        assert_eq!(seen.body["tools"][0]["function"]["name"], "db__query");
        assert_eq!(seen.headers["authorization"], "Bearer sk-secret-1");
    });
}

#[tokio::test]
async fn openai_tool_call_arguments_split_across_chunks_are_assembled() {
    let server = Server::start(vec![Reply::Sse(vec![
        chunk(json!({"tool_calls": [{"index": 0, "id": "call_9", "type": "function", "function": {"name": "db__query", "arguments": ""}}]})),
        chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"data"}}]})),
        chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "base\": \"s.db\", "}}]})),
        chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"sql\": \"SELECT 1\"}"}}]})),
        (None, json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}).to_string()),
        (None, "[DONE]".to_owned()),
    ])])
    .await;
    let gw = gateway(vec![("oa", openai(&server, ""))], |_| {});
    let (result, _) = run(&gw, &mut Spend::default()).await;
    let done = result.expect("completion");
    assert_eq!(done.finish, FinishReason::ToolCalls);
    assert_eq!(
        done.tool_calls,
        [ToolCall {
            id: "call_9".into(),
            name: "db.query".into(),
            arguments: json!({"database": "s.db", "sql": "SELECT 1"}),
        }]
    );
    assert!(
        done.usage.input_tokens > 0,
        "estimated when the server reports none"
    );
    server.seen(0, |seen| {
        assert!(seen.headers.get("authorization").is_none())
    });
}

#[tokio::test]
async fn anthropic_streams_text_and_tool_use() {
    let ev = |event: &'static str, data: Json| (Some(event), data.to_string());
    let server = Server::start(vec![Reply::Sse(vec![
        ev("message_start", json!({"type": "message_start", "message": {"usage": {"input_tokens": 42, "output_tokens": 1}}})),
        ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking"}})),
        ev("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        ev("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "db__query", "input": {}}})),
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"sql\": \"SEL"}})),
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "ECT 2\"}"}})),
        ev("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
        ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 17}})),
        ev("message_stop", json!({"type": "message_stop"})),
    ])])
    .await;
    let gw = gateway(vec![("an", anthropic(&server))], |_| {});
    let mut req = request();
    let call = ToolCall {
        id: "toolu_0".into(),
        name: "db.query".into(),
        arguments: json!({"sql": "SELECT 1"}),
    };
    req.messages
        .push(Message::assistant("", vec![call.clone()]));
    req.messages
        .push(Message::tool_result(&call, "{\"rows\": [[1]]}", false));
    let mut events = Vec::new();
    let done = gw
        .complete(
            "c",
            &req,
            &mut Spend::default(),
            &CancellationToken::new(),
            &mut |e| events.push(e),
        )
        .await
        .expect("completion");
    assert_eq!(done.text, "Checking");
    assert_eq!(done.finish, FinishReason::ToolCalls);
    assert_eq!(
        done.usage,
        Usage {
            input_tokens: 42,
            output_tokens: 17
        }
    );
    assert_eq!(done.tool_calls[0].name, "db.query");
    assert_eq!(done.tool_calls[0].arguments, json!({"sql": "SELECT 2"}));
    server.seen(0, |seen| {
        assert_eq!(seen.body["system"], "be brief");
        assert_eq!(seen.body["messages"][1]["content"][0]["type"], "tool_use");
        assert_eq!(
            seen.body["messages"][2]["content"][0]["type"],
            "tool_result"
        );
        assert_eq!(
            seen.body["messages"][2]["content"][0]["tool_use_id"],
            "toolu_0"
        );
        assert_eq!(seen.headers["x-api-key"], "ak-test");
        assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    });
}

#[tokio::test]
async fn a_429_is_retried_after_the_servers_retry_after() {
    let server = Server::start(vec![Reply::Status(429, Some("1")), text_reply("ok")]).await;
    let gw = gateway(vec![("oa", openai(&server, "k"))], |_| {});
    let (result, events) = run(&gw, &mut Spend::default()).await;
    assert_eq!(result.expect("completion").text, "ok");
    assert_eq!(
        events[0],
        GatewayEvent::Retrying {
            provider: "oa".into(),
            attempt: 1,
            delay_ms: 1000,
            reason: "http_429".into()
        }
    );
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn a_500_then_success_is_retried() {
    let server = Server::start(vec![Reply::Status(500, None), text_reply("fine")]).await;
    let gw = gateway(vec![("oa", openai(&server, "k"))], |_| {});
    let (result, events) = run(&gw, &mut Spend::default()).await;
    assert_eq!(result.expect("completion").text, "fine");
    assert!(matches!(&events[0], GatewayEvent::Retrying { reason, .. } if reason == "http_500"));
}

#[tokio::test]
async fn a_stream_cut_midway_is_discarded_and_the_next_provider_answers() {
    let first = super::server::cut_after(chunk(json!({"content": "partial "})).1).await;
    let second = Server::start(vec![text_reply("whole")]).await;
    let gw = gateway(
        vec![("a", openai_at(&first, "k")), ("b", openai(&second, "k"))],
        |c| c.chains.get_mut("c").expect("chain").max_retries = 0,
    );
    let (result, events) = run(&gw, &mut Spend::default()).await;
    let done = result.expect("completion");
    assert_eq!(
        done.text, "whole",
        "the partial output is not part of the answer"
    );
    assert_eq!(done.provider, "b");
    assert_eq!(events[0], GatewayEvent::TextDelta("partial ".into()));
    assert!(
        matches!(&events[1], GatewayEvent::Discarded { provider, .. } if provider == "a"),
        "{events:?}"
    );
    assert!(
        matches!(&events[2], GatewayEvent::FallingBack { from, to, .. } if from == "a" && to == "b")
    );
}

#[tokio::test]
async fn malformed_json_goes_to_the_next_provider_without_retrying() {
    let first = Server::start(vec![Reply::Sse(vec![(None, "{not json".to_owned())])]).await;
    let second = Server::start(vec![text_reply("sane")]).await;
    let gw = gateway(
        vec![("a", openai(&first, "k")), ("b", openai(&second, "k"))],
        |_| {},
    );
    let (result, events) = run(&gw, &mut Spend::default()).await;
    assert_eq!(result.expect("completion").text, "sane");
    assert_eq!(first.requests(), 1, "a protocol error is not retried");
    assert!(
        matches!(&events[0], GatewayEvent::FallingBack { reason, .. } if reason == "protocol"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_slow_server_hits_the_timeout() {
    let server = Server::start(vec![Reply::Hang]).await;
    let gw = gateway(vec![("oa", openai(&server, "k"))], |c| {
        let chain = c.chains.get_mut("c").expect("chain");
        chain.timeout_ms = 200;
        chain.max_retries = 0;
    });
    let (result, _) = run(&gw, &mut Spend::default()).await;
    let err = result.expect_err("timeout");
    assert!(
        err.to_string().contains("no complete response within"),
        "{err}"
    );
}

#[tokio::test]
async fn an_always_failing_provider_falls_back_and_its_breaker_opens() {
    let bad = Server::start(vec![]).await;
    let good = Server::start(vec![text_reply("one"), text_reply("two")]).await;
    let gw = gateway(
        vec![("bad", openai(&bad, "k")), ("good", openai(&good, "k"))],
        |c| {
            c.chains.get_mut("c").expect("chain").max_retries = 1;
            c.breaker = BreakerConfig {
                failures: 2,
                cooldown_ms: 3_600_000,
            };
        },
    );
    let (result, _) = run(&gw, &mut Spend::default()).await;
    assert_eq!(result.expect("completion").text, "one");
    assert_eq!(bad.requests(), 2);
    let (result, events) = run(&gw, &mut Spend::default()).await;
    assert_eq!(result.expect("completion").text, "two");
    assert_eq!(
        events[0],
        GatewayEvent::BreakerOpen {
            provider: "bad".into()
        }
    );
    assert_eq!(bad.requests(), 2, "an open breaker sends nothing");
}

#[tokio::test]
async fn a_spent_budget_ends_the_call_and_names_the_budget() {
    let server = Server::start(vec![text_reply("first")]).await;
    let gw = gateway(vec![("oa", openai(&server, "k"))], |c| {
        c.prices.insert(
            "m1".into(),
            Price {
                input_usd_per_mtok: 1_000.0,
                output_usd_per_mtok: 0.0,
            },
        );
        c.budget.max_cost_usd_per_session = 0.01;
    });
    let mut spend = Spend::default();
    run(&gw, &mut spend).await.0.expect("first call fits");
    let (result, _) = run(&gw, &mut spend).await;
    let err = result.expect_err("over budget");
    assert!(
        matches!(
            err,
            GatewayError::Budget {
                budget: "max_cost_usd_per_session",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("max_cost_usd_per_session"),
        "{err}"
    );
    assert_eq!(server.requests(), 1);

    let gw = gateway(vec![("oa", openai(&server, "k"))], |c| {
        c.budget.max_tokens_per_session = 10
    });
    let mut spend = Spend {
        input_tokens: 6,
        output_tokens: 4,
        cost_usd: 0.0,
    };
    let err = run(&gw, &mut spend).await.0.expect_err("over budget");
    assert!(err.to_string().contains("max_tokens_per_session"), "{err}");
}

#[test]
fn keys_never_show_in_debug_output() {
    let config = HttpProviderConfig {
        api_key: Some(Secret::new("sk-very-secret")),
        ..Default::default()
    };
    let text = format!("{config:?} {}", Secret::new("sk-very-secret"));
    assert!(!text.contains("sk-very-secret"), "{text}");
    assert!(text.contains("<redacted>"));
}

#[test]
fn the_models_section_parses_with_defaults_and_rejects_typos() {
    let config: ModelsConfig = serde_json::from_value(json!({
        "providers": {"local": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "q"}},
        "chains": {"main": {"providers": ["local", "scripted"]}},
    }))
    .expect("parse");
    let gw = Gateway::from_config(&config).expect("gateway");
    assert_eq!(gw.chain("main").expect("chain").max_retries, 2);
    assert!(gw.is_scripted("default"));
    assert!(!gw.is_scripted("main"));
    let typo = serde_json::from_value::<ModelsConfig>(
        json!({"chains": {"x": {"providers": [], "timeout": 1}}}),
    );
    assert!(typo.is_err());
    let missing = ModelsConfig {
        chains: [("x".to_owned(), ChainConfig::of(&["nope"]))].into(),
        ..Default::default()
    };
    let err = Gateway::from_config(&missing)
        .err()
        .expect("unknown provider");
    assert!(err.to_string().contains("\"nope\""), "{err}");
}

#[tokio::test]
async fn whole_tool_calls_without_index_and_no_done_marker_are_accepted() {
    // Older Ollama: complete calls in one chunk, no `index`, and a body that ends after the
    // finish_reason without `[DONE]`.
    let server = Server::start(vec![Reply::Sse(vec![
        chunk(json!({"tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "db__query", "arguments": "{\"sql\": \"SELECT 1\"}"}},
            {"id": "b", "type": "function", "function": {"name": "db__query", "arguments": "{\"sql\": \"SELECT 2\"}"}}
        ]})),
        (None, json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}).to_string()),
    ])])
    .await;
    let gw = gateway(vec![("oa", openai(&server, ""))], |_| {});
    let done = run(&gw, &mut Spend::default()).await.0.expect("completion");
    let ids: Vec<&str> = done.tool_calls.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(done.tool_calls[1].arguments, json!({"sql": "SELECT 2"}));
}

#[tokio::test]
async fn a_body_that_ends_before_finishing_is_a_broken_stream() {
    let server = Server::start(vec![
        Reply::Sse(vec![chunk(json!({"content": "half an ans"}))]),
        text_reply("whole answer"),
    ])
    .await;
    let gw = gateway(vec![("oa", openai(&server, ""))], |_| {});
    let (result, events) = run(&gw, &mut Spend::default()).await;
    assert_eq!(result.expect("completion").text, "whole answer");
    assert!(
        matches!(&events[1], GatewayEvent::Discarded { .. }),
        "{events:?}"
    );
    assert!(matches!(&events[2], GatewayEvent::Retrying { reason, .. } if reason == "stream_cut"));
}

#[tokio::test]
async fn an_anthropic_error_event_midway_is_discarded_and_retried() {
    let ev = |event: &'static str, data: Json| (Some(event), data.to_string());
    let start = || {
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 5}}}),
        )
    };
    let delta = |text: &str| {
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        )
    };
    let server = Server::start(vec![
        Reply::Sse(vec![
            start(),
            delta("The va"),
            ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        ]),
        Reply::Sse(vec![
            start(),
            delta("The van is blue."),
            ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}})),
            ev("message_stop", json!({"type": "message_stop"})),
        ]),
    ])
    .await;
    let gw = gateway(vec![("an", anthropic(&server))], |_| {});
    let (result, events) = run(&gw, &mut Spend::default()).await;
    assert_eq!(result.expect("completion").text, "The van is blue.");
    assert!(
        matches!(&events[1], GatewayEvent::Discarded { reason, .. } if reason.contains("overloaded_error")),
        "{events:?}"
    );
    assert!(matches!(&events[2], GatewayEvent::Retrying { reason, .. } if reason == "stream_cut"));
}
