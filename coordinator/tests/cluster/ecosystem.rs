//! gRPC ecosystem: health, reflection, deadlines.

use std::time::Duration;

use heist_proto::v1;
use serde_json::json;
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::harness::*;

async fn reflected_services(url: &str) -> Vec<String> {
    let mut client = ServerReflectionClient::new(channel(url).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream.next().await.expect("one response").expect("ok");
    match resp.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_every_service_on_both_binaries() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;

    let services = reflected_services(&coord.url()).await;
    for svc in [
        "heist.v1.AuthService",
        "heist.v1.ClusterService",
        "heist.v1.SessionService",
        "heist.v1.ToolService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|s| s == svc),
            "{svc} missing from {services:?}"
        );
    }
    let services = reflected_services(&w.url()).await;
    assert!(
        services.iter().any(|s| s == "heist.v1.WorkerService"),
        "{services:?}"
    );
    assert!(health_serving(&w.url()).await);
    w.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn the_callers_deadline_reaches_the_worker() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let s = client.create_session(&[]).await.expect("session");

    let mut req = authed(
        &client.token,
        v1::CallToolRequest {
            session_id: s.id.clone(),
            tool: "echo".into(),
            arguments: heist_proto::json::json_to_struct(&json!({"delay_ms": 30_000})),
            request_id: String::new(),
        },
    );
    req.set_timeout(Duration::from_millis(300));
    let err = client.tools.call_tool(req).await.expect_err("deadline");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    // The worker gave up too: nothing stays in flight there.
    wait_for("worker in-flight back to zero", || {
        let mut c = client.clone();
        async move {
            let w = c.workers().await.into_iter().find(|w| w.id == "w1")?;
            (w.in_flight_calls == 0).then_some(())
        }
    })
    .await;
    w.stop().await;
    coord.stop().await;
}
