//! Bearer tokens on every public RPC; workers trust only the coordinator.

use std::time::Duration;

use heist_proto::{
    errors::reason,
    token::{TokenSigner, unix_now},
    v1,
};
use tonic::Code;

use crate::harness::*;

/// The coordinator's own signing key, read from its data dir (32-byte Ed25519 seed).
fn coordinator_signer(data_dir: &std::path::Path) -> TokenSigner {
    let seed = std::fs::read(data_dir.join("signing.key")).expect("signing key");
    let seed: [u8; 32] = seed.as_slice().try_into().expect("32-byte seed");
    TokenSigner::from_seed(&seed).expect("signer")
}

async fn list_workers_with(url: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut cluster = v1::cluster_service_client::ClusterServiceClient::new(channel(url).await);
    let req = match token {
        Some(t) => authed(t, v1::ListWorkersRequest {}),
        None => tonic::Request::new(v1::ListWorkersRequest {}),
    };
    cluster.list_workers(req).await.map(|_| ())
}

#[tokio::test]
async fn public_rpcs_need_a_valid_token() {
    let dir = crate::harness::tempdir();
    let data = dir.path().join("c");
    let coord = Coordinator::start(coordinator_config(&data)).await;
    let url = coord.url();

    let err = list_workers_with(&url, None).await.expect_err("no token");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_MISSING);
    assert!(
        err.message().contains("login"),
        "say how to log in: {}",
        err.message()
    );

    let err = list_workers_with(&url, Some("not-a-jwt"))
        .await
        .expect_err("garbage");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_INVALID);

    let real = coordinator_signer(&data);
    let good =
        |aud: &str| TokenSigner::claims("heist", aud, ADMIN_ID, "admin", Duration::from_secs(60));

    // Same claims, signed by another key.
    let other = TokenSigner::from_seed(&[7u8; 32]).expect("signer");
    let forged = other.sign(&good("heist")).expect("sign");
    let err = list_workers_with(&url, Some(&forged))
        .await
        .expect_err("forged");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_INVALID);

    // Signed by the real key but expired.
    let mut claims = good("heist");
    claims.iat = unix_now() - 7200;
    claims.nbf = claims.iat;
    claims.exp = unix_now() - 3600;
    let expired = real.sign(&claims).expect("sign");
    let err = list_workers_with(&url, Some(&expired))
        .await
        .expect_err("expired");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_EXPIRED);

    // Signed by the real key for another audience (e.g. a worker credential).
    let wrong_aud = real.sign(&good("heist-worker:w1")).expect("sign");
    let err = list_workers_with(&url, Some(&wrong_aud))
        .await
        .expect_err("audience");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_INVALID);

    // alg: none with otherwise perfect claims.
    let body = serde_json::to_vec(&good("heist")).expect("json");
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", b64url(&body));
    let err = list_workers_with(&url, Some(&none))
        .await
        .expect_err("alg none");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_INVALID);

    // The real thing works.
    let token = issue_token(&url, ADMIN_ID, ADMIN_SECRET)
        .await
        .expect("token");
    list_workers_with(&url, Some(&token))
        .await
        .expect("valid token");
    let minted = real.sign(&good("heist")).expect("sign");
    list_workers_with(&url, Some(&minted))
        .await
        .expect("token signed by the coordinator key");
    coord.stop().await;
}

#[tokio::test]
async fn wrong_client_credentials_are_refused_without_saying_which_part() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let wrong_secret = issue_token(&coord.url(), ADMIN_ID, "wrong-secret-wrong-secret")
        .await
        .expect_err("secret");
    let wrong_id = issue_token(&coord.url(), "nobody", ADMIN_SECRET)
        .await
        .expect_err("id");
    assert_status(
        &wrong_secret,
        Code::Unauthenticated,
        reason::BAD_CLIENT_CREDENTIALS,
    );
    assert_status(
        &wrong_id,
        Code::Unauthenticated,
        reason::BAD_CLIENT_CREDENTIALS,
    );
    assert_eq!(wrong_secret.message(), wrong_id.message());
    coord.stop().await;
}

#[tokio::test]
async fn a_down_scoped_token_cannot_call_what_it_lacks() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let mut auth = v1::auth_service_client::AuthServiceClient::new(channel(&coord.url()).await);
    let resp = auth
        .issue_token(v1::IssueTokenRequest {
            client_id: ADMIN_ID.into(),
            client_secret: ADMIN_SECRET.into(),
            scopes: vec!["cluster:read".into()],
        })
        .await
        .expect("token")
        .into_inner();
    assert_eq!(resp.scopes, vec!["cluster:read".to_owned()]);
    let mut c = Client::with_token(&coord.url(), resp.access_token).await;
    c.workers().await;
    let err = c.create_session(&[]).await.expect_err("no sessions:write");
    assert_status(&err, Code::PermissionDenied, reason::SCOPE_MISSING);
    coord.stop().await;
}

#[tokio::test]
async fn clients_cannot_call_workers_directly() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("session");

    let mut direct = v1::worker_service_client::WorkerServiceClient::new(channel(&w.url()).await);
    let call = |token: Option<&str>| {
        let msg = v1::CallToolRequest {
            session_id: session.id.clone(),
            tool: "echo".into(),
            arguments: Some(Default::default()),
            request_id: String::new(),
        };
        match token {
            Some(t) => authed(t, msg),
            None => tonic::Request::new(msg),
        }
    };
    let err = direct
        .call_tool(call(None))
        .await
        .expect_err("no credential");
    assert_eq!(err.code(), Code::Unauthenticated);
    // A perfectly valid client token is not a worker credential.
    let err = direct
        .call_tool(call(Some(&client.token)))
        .await
        .expect_err("client token");
    assert_eq!(err.code(), Code::Unauthenticated);
    // Through the coordinator it works.
    client
        .call(&session.id, "echo", serde_json::json!({}))
        .await
        .expect("routed");
    w.stop().await;
    coord.stop().await;
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}
