//! Workers join, heartbeat, leave and come back.

use heist_proto::{errors::reason, v1};
use tonic::Code;

use crate::harness::*;

#[tokio::test]
async fn workers_register_with_their_catalogue_and_reregister_cleanly() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w1 = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("w1").label("zone", "a"),
    )
    .await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;

    let workers = client.workers().await;
    assert_eq!(workers.len(), 1);
    let w = &workers[0];
    assert_eq!(w.id, "w1");
    assert_eq!(w.address, w1.url());
    assert_eq!(w.capacity, 16);
    assert_eq!(w.labels.get("zone").map(String::as_str), Some("a"));
    for tool in [
        "echo",
        "calc",
        "fs.read",
        "fs.write",
        "fs.list",
        "fs.stat",
        "fs.delete",
    ] {
        assert!(
            w.tools.iter().any(|t| t == tool),
            "missing {tool} in {:?}",
            w.tools
        );
    }

    // A broken stream makes it suspect at once (no goodbye).
    w1.crash();
    let mut c2 = Client::admin(&coord.url()).await;
    c2.wait_worker_state("w1", v1::WorkerState::Suspect).await;

    // Re-registering with the same id replaces the entry: one worker, READY, new address.
    let w1b = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("w1").label("zone", "b"),
    )
    .await;
    c2.wait_ready(&["w1"]).await;
    let workers = c2.workers().await;
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0].address, w1b.url());
    assert_eq!(workers[0].labels.get("zone").map(String::as_str), Some("b"));

    // Graceful stop says GoingAway: the worker ends GONE.
    w1b.stop().await;
    c2.wait_worker_state("w1", v1::WorkerState::Gone).await;
    coord.stop().await;
}

#[tokio::test]
async fn a_worker_that_does_not_come_back_is_lost_when_its_lease_expires() {
    let dir = crate::harness::tempdir();
    let mut config = coordinator_config(&dir.path().join("c"));
    config.lease_ttl = std::time::Duration::from_millis(600);
    let coord = Coordinator::start(config).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    w.crash();
    client.wait_worker_state("w1", v1::WorkerState::Lost).await;
    coord.stop().await;
}

#[tokio::test]
async fn a_worker_with_a_wrong_join_token_is_refused() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;

    // Directly on the wire: the stream is refused before anything is registered.
    let mut control =
        v1::worker_control_client::WorkerControlClient::new(channel(&coord.url()).await);
    let register = v1::WorkerMessage {
        msg: Some(v1::worker_message::Msg::Register(v1::Register {
            worker_id: "intruder".into(),
            advertise_addr: "http://127.0.0.1:1".into(),
            capacity: 4,
            ..Default::default()
        })),
    };
    let mut req = tonic::Request::new(tokio_stream::iter(vec![register]));
    req.metadata_mut()
        .insert("x-heist-join-token", "wrong".parse().expect("ascii"));
    let result = match control.join(req).await {
        Ok(resp) => {
            let mut stream = resp.into_inner();
            stream.message().await.map(|_| ())
        }
        Err(status) => Err(status),
    };
    let err = result.expect_err("a wrong join token must be refused");
    assert_status(&err, Code::Unauthenticated, reason::JOIN_TOKEN_INVALID);

    // A real worker with the wrong token never shows up, and never reports SERVING.
    let mut opts = WorkerOpts::new("w-bad");
    opts.join_token = "not-the-token".into();
    let w = Worker::start(&coord.url(), dir.path(), opts).await;
    let good = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w-good")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w-good"]).await;
    let ids: Vec<String> = client.workers().await.into_iter().map(|w| w.id).collect();
    assert_eq!(ids, vec!["w-good".to_owned()]);
    assert!(!health_serving(&w.url()).await);
    w.crash();
    good.stop().await;
    coord.stop().await;
}
