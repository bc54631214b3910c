//! Gateway overhead: a streamed chat completion through the `openai` provider with its chain
//! policy (timeout, retry bookkeeping, breaker, usage and cost accounting), against the same
//! HTTP request made directly with reqwest and read to the end, both to one local protocol
//! server, interleaved in the same run. Prints p50 and p99 of each and what the gateway adds.
//!
//! `cargo bench -p heist-worker --bench gateway` (iterations: `HEIST_BENCH_ITERS`, default
//! 5000 after 500 warm-up rounds).

use std::time::Instant;

use axum::{Router, body::Body, http::header, response::Response, routing::post};
use hdrhistogram::Histogram;
use heist_worker::model::{
    ChainConfig, Gateway, HttpProviderConfig, Message, ModelRequest, ModelsConfig, ProviderConfig,
    Role, Spend,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const SSE: &str = concat!(
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"The vault \"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"opens at 22:00.\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":6}}\n\n",
    "data: [DONE]\n\n",
);

async fn reply() -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from(SSE))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let iterations: u64 = std::env::var("HEIST_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    let app = Router::new().route("/v1/chat/completions", post(reply));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut config = ModelsConfig::default();
    config.providers.insert(
        "local".into(),
        ProviderConfig::Openai(HttpProviderConfig {
            base_url: Some(url.clone()),
            model: Some("bench".into()),
            ..Default::default()
        }),
    );
    config
        .chains
        .insert("c".into(), ChainConfig::of(&["local"]));
    let gateway = Gateway::from_config(&config)?;
    let request = ModelRequest {
        messages: vec![
            Message::text(Role::System, "You are intel."),
            Message::text(Role::User, "When does the vault open?"),
        ],
        tools: Vec::new(),
        temperature: 0.0,
        max_output_tokens: 64,
    };
    let body = json!({
        "model": "bench",
        "messages": [{"role": "system", "content": "You are intel."},
                     {"role": "user", "content": "When does the vault open?"}],
        "temperature": 0.0, "max_tokens": 64, "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let direct = reqwest::Client::new();
    let cancel = CancellationToken::new();

    let mut h_direct = Histogram::<u64>::new(3)?;
    let mut h_gateway = Histogram::<u64>::new(3)?;
    for round in 0..iterations + 500 {
        let start = Instant::now();
        let bytes = direct
            .post(format!("{url}/chat/completions"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await?
            .bytes()
            .await?;
        let t_direct = start.elapsed();
        anyhow::ensure!(bytes.len() == SSE.len(), "short direct response");

        let start = Instant::now();
        let mut spend = Spend::default();
        let done = gateway
            .complete("c", &request, &mut spend, &cancel, &mut |_| {})
            .await?;
        let t_gateway = start.elapsed();
        anyhow::ensure!(done.text == "The vault opens at 22:00.", "wrong answer");

        if round >= 500 {
            h_direct.record(u64::try_from(t_direct.as_nanos())?)?;
            h_gateway.record(u64::try_from(t_gateway.as_nanos())?)?;
        }
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    println!("gateway overhead, {iterations} streamed completions each, interleaved");
    println!("{:<10} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    for (name, h) in [("direct", &h_direct), ("gateway", &h_gateway)] {
        println!(
            "{name:<10} {:>10.3} {:>10.3}",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99))
        );
    }
    let added = |q| ms(h_gateway.value_at_quantile(q)) - ms(h_direct.value_at_quantile(q));
    println!(
        "{:<10} {:>10.3} {:>10.3}   (target: < 0.5 ms p50, < 1 ms p99)",
        "added",
        added(0.5),
        added(0.99)
    );
    println!(
        "ratio      {:>10.2}x {:>9.2}x",
        h_gateway.value_at_quantile(0.5) as f64 / h_direct.value_at_quantile(0.5) as f64,
        h_gateway.value_at_quantile(0.99) as f64 / h_direct.value_at_quantile(0.99) as f64
    );
    Ok(())
}
