//! The served surface: every gRPC method the coordinator's descriptor sets describe is either on
//! the explicit allow-list or refuses a call without a token, and the HTTP probes answer.

use std::collections::BTreeSet;

use heist_proto::{FILE_DESCRIPTOR_SET, errors::reason, scopes};
use prost::Message as _;
use tonic::{Code, codegen::http::uri::PathAndQuery};

use crate::harness::*;

/// The methods served without a token. Changing the allow-list must change this list too.
const EXPECTED_PUBLIC: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/heist.v1.AuthService/IssueToken",
    "/heist.v1.BlobService/FindMissingBlobs",
    "/heist.v1.BlobService/GetBlobs",
    "/heist.v1.BlobService/PutBlobs",
    "/heist.v1.WorkerControl/Join",
];

/// Services in the descriptor set that the coordinator does not serve (the worker does, and
/// checks the coordinator's per-call credential itself).
const NOT_SERVED_HERE: &[&str] = &["heist.v1.WorkerService"];

/// Every method path (`/package.Service/Method`) in the descriptor sets the coordinator serves.
fn served_methods() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for bytes in [FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        let set = prost_types::FileDescriptorSet::decode(bytes).expect("descriptor set");
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = format!("{package}.{}", service.name.unwrap_or_default());
                for method in service.method {
                    let method = method.name.unwrap_or_default();
                    out.push((name.clone(), format!("/{name}/{method}")));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn every_method_off_the_allow_list_refuses_a_missing_token() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let methods = served_methods();
    assert!(
        methods.len() > 20,
        "descriptor sets look empty: {methods:?}"
    );

    let public: BTreeSet<&str> = methods
        .iter()
        .map(|(_, path)| path.as_str())
        .filter(|path| scopes::access(path) == scopes::Access::Public)
        .collect();
    assert_eq!(
        public,
        EXPECTED_PUBLIC.iter().copied().collect(),
        "the allow-list changed: update EXPECTED_PUBLIC only if the change is intended"
    );

    let mut grpc = tonic::client::Grpc::new(channel(&coord.url()).await);
    for (service, path) in &methods {
        if public.contains(path.as_str()) {
            continue;
        }
        if !NOT_SERVED_HERE.contains(&service.as_str()) {
            assert!(
                scopes::scope_for(path).is_some(),
                "{path} has no scope: add it to heist_proto::scopes::scope_for"
            );
        }
        grpc.ready().await.expect("ready");
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let err = grpc
            .unary(
                tonic::Request::new(()),
                PathAndQuery::try_from(path.as_str()).expect("path"),
                codec,
            )
            .await
            .expect_err(path);
        assert_status(&err, Code::Unauthenticated, reason::TOKEN_MISSING);
    }
    coord.stop().await;
}

#[tokio::test]
async fn probes_answer_over_http_on_the_grpc_port_without_a_token() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;

    let (status, _) = http_get(coord.addr, "/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = http_get(coord.addr, "/readyz").await;
    assert_eq!(status, 503, "no worker yet: {body}");
    assert!(body.contains("no worker is READY"), "{body}");
    // Any other path is behind the token layer, HTTP or not.
    let (status, _) = http_get(coord.addr, "/metrics-not-yet").await;
    assert_eq!(status, 401);

    let worker = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut admin = Client::admin(&coord.url()).await;
    admin.wait_ready(&["w1"]).await;
    let (status, body) = http_get(coord.addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    // The worker answers the same probes on its own port.
    let (status, _) = http_get(worker.addr, "/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = http_get(worker.addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    worker.stop().await;
    coord.stop().await;
}
