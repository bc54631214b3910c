//! API client management (ClientService): clients created through the API own their sessions
//! and get only their scopes; a rotation refuses the old secret and the old tokens at once; a
//! revocation refuses the client's tokens on the very next call, gRPC and HTTP alike, and
//! survives a restart; every change is in the audit log; heistctl drives it all.

use std::net::SocketAddr;

use heist_proto::{
    errors::reason,
    v1::{self, client_service_client::ClientServiceClient},
};
use tonic::{Code, transport::Channel};

use crate::harness::*;

const SESSIONS: &[&str] = &["sessions:read", "sessions:write"];

fn clients(ch: Channel) -> ClientServiceClient<Channel> {
    ClientServiceClient::new(ch)
}

async fn create(
    url: &str,
    token: &str,
    id: &str,
    scopes: &[&str],
) -> Result<v1::CreateClientResponse, tonic::Status> {
    clients(channel(url).await)
        .create_client(authed(
            token,
            v1::CreateClientRequest {
                client_id: id.to_owned(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn rotate(
    url: &str,
    token: &str,
    id: &str,
) -> Result<v1::RotateClientSecretResponse, tonic::Status> {
    clients(channel(url).await)
        .rotate_client_secret(authed(
            token,
            v1::RotateClientSecretRequest {
                client_id: id.to_owned(),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn revoke(
    url: &str,
    token: &str,
    id: &str,
) -> Result<v1::RevokeClientResponse, tonic::Status> {
    clients(channel(url).await)
        .revoke_client(authed(
            token,
            v1::RevokeClientRequest {
                client_id: id.to_owned(),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn list(url: &str, token: &str) -> Result<v1::ListClientsResponse, tonic::Status> {
    clients(channel(url).await)
        .list_clients(authed(token, v1::ListClientsRequest {}))
        .await
        .map(tonic::Response::into_inner)
}

/// ListSessions with `token`: a cheap call that needs a valid, current token (sessions:read).
async fn list_sessions(url: &str, token: &str) -> Result<Vec<v1::Session>, tonic::Status> {
    v1::session_service_client::SessionServiceClient::new(channel(url).await)
        .list_sessions(authed(token, v1::ListSessionsRequest::default()))
        .await
        .map(|r| r.into_inner().sessions)
}

/// `method path` with a bearer token and a JSON body (as an MCP client sends): the status.
async fn http_status(addr: SocketAddr, method: &str, path: &str, token: &str, body: &str) -> u16 {
    let headers = format!(
        "Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\n"
    );
    http(addr, method, path, &headers, body).await.0
}

/// The OAuth token endpoint's answer to a client-credentials grant (ids and secrets here need
/// no URL encoding).
async fn oauth_token(addr: SocketAddr, id: &str, secret: &str) -> (u16, String) {
    let body = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
    let headers = "Content-Type: application/x-www-form-urlencoded\r\n";
    http(addr, "POST", "/oauth/token", headers, &body).await
}

const MCP_INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"test","version":"1"}}}"#;

/// Audit records of kind `client.*`, as (kind, subject, detail).
async fn client_audit(url: &str, token: &str) -> Vec<(String, String, String)> {
    v1::audit_service_client::AuditServiceClient::new(channel(url).await)
        .list_audit(authed(
            token,
            v1::ListAuditRequest {
                after_seq: 0,
                limit: 1000,
                filter: Some(v1::AuditFilter {
                    kind: "client.".to_owned(),
                    subject: String::new(),
                }),
            },
        ))
        .await
        .expect("list audit")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| (e.kind, e.subject, e.detail))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_clients_own_their_sessions_and_get_only_their_scopes() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let url = coord.url();
    let w = Worker::start(&url, dir.path(), WorkerOpts::new("w1")).await;
    let mut admin = Client::admin(&url).await;
    admin.wait_ready(&["w1"]).await;

    // Two clients created through the API, each with its own secret.
    let alice = create(&url, &admin.token, "alice", SESSIONS)
        .await
        .expect("alice");
    let bob = create(&url, &admin.token, "bob", SESSIONS)
        .await
        .expect("bob");
    assert_eq!(alice.client_secret.len(), 64, "256 random bits as hex");
    assert_ne!(alice.client_secret, bob.client_secret);
    let a = alice.client.as_ref().expect("client");
    assert_eq!(
        (a.id.as_str(), a.revoked, a.bootstrap),
        ("alice", false, false)
    );
    assert_eq!(a.scopes, SESSIONS);
    assert!(a.created_at.is_some());

    // Bad input: clear errors, nothing created.
    let err = create(&url, &admin.token, "alice", SESSIONS)
        .await
        .expect_err("exists");
    assert_status(&err, Code::AlreadyExists, reason::CLIENT_EXISTS);
    let err = create(&url, &admin.token, "no spaces!", SESSIONS)
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("A-Z a-z 0-9"), "{}", err.message());
    let err = create(&url, &admin.token, "carol", &["sessions:read", "root"])
        .await
        .expect_err("unknown scope");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("\"root\"") && err.message().contains("sessions:write, tools:read"),
        "names the bad scope and lists the valid ones: {}",
        err.message()
    );
    let err = create(&url, &admin.token, "carol", &[])
        .await
        .expect_err("no scope");
    assert_eq!(err.code(), Code::InvalidArgument);
    let listed = list(&url, &admin.token).await.expect("ls");
    assert!(!listed.clients.iter().any(|c| c.id == "carol"));

    // Each gets a token and sees only its own sessions.
    let alice_token = issue_token(&url, "alice", &alice.client_secret)
        .await
        .expect("token");
    let bob_token = issue_token(&url, "bob", &bob.client_secret)
        .await
        .expect("token");
    let mut as_alice = Client::with_token(&url, alice_token.clone()).await;
    let mut as_bob = Client::with_token(&url, bob_token.clone()).await;
    let sa = as_alice.create_session(&[]).await.expect("alice's session");
    let sb = as_bob.create_session(&[]).await.expect("bob's session");
    assert_eq!(sa.owner, "alice");
    assert_eq!(sb.owner, "bob");
    let err = as_alice.get_session(&sb.id).await.expect_err("bob's");
    assert_status(&err, Code::NotFound, reason::SESSION_NOT_FOUND);
    let err = as_bob.close_session(&sa.id).await.expect_err("alice's");
    assert_status(&err, Code::NotFound, reason::SESSION_NOT_FOUND);
    let mine: Vec<String> = list_sessions(&url, &alice_token)
        .await
        .expect("ls")
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(mine, vec![sa.id.clone()]);

    // Without tools:call a tool call is refused; without admin the service is too.
    let err = as_alice
        .call(&sa.id, "echo", serde_json::json!({"text": "hi"}))
        .await
        .expect_err("no tools:call");
    assert_status(&err, Code::PermissionDenied, reason::SCOPE_MISSING);
    for result in [
        list(&url, &alice_token).await.map(|_| ()),
        create(&url, &alice_token, "mallory", &["admin"])
            .await
            .map(|_| ()),
        rotate(&url, &alice_token, "bob").await.map(|_| ()),
        revoke(&url, &alice_token, "bob").await.map(|_| ()),
    ] {
        let err = result.expect_err("needs admin");
        assert_status(&err, Code::PermissionDenied, reason::SCOPE_MISSING);
    }

    // The listing never carries a secret or its hash.
    let listed = list(&url, &admin.token).await.expect("ls");
    let ids: Vec<&str> = listed.clients.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["admin", "alice", "bob"]);
    assert!(listed.clients[0].bootstrap);
    let dump = format!("{listed:?}");
    for secret in [&alice.client_secret, &bob.client_secret] {
        assert!(!dump.contains(secret.as_str()));
    }
    assert!(!dump.contains("argon2"), "{dump}");

    // heistctl: create prints the secret once, ls shows none, revoke wants --yes.
    let ctl = |args: &[&str]| heistctl(dir.path(), &url, &admin.token, args);
    let out = ctl(&[
        "-o",
        "json",
        "admin",
        "client",
        "create",
        "carol",
        "--scope",
        "tools:read",
    ]);
    assert!(out.status.success(), "{out:?}");
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let carol_secret = created["client_secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    assert_eq!(created["id"], "carol");
    assert_eq!(created["scopes"], serde_json::json!(["tools:read"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not shown again"));
    issue_token(&url, "carol", &carol_secret)
        .await
        .expect("carol logs in");
    let out = ctl(&["-o", "json", "admin", "client", "ls"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains(&carol_secret) && !text.contains("secret"),
        "{text}"
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed.as_array().expect("array").len(), 4);
    let out = ctl(&["admin", "client", "rotate", "carol"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not shown again"), "{text}");
    let new_secret = text
        .lines()
        .find_map(|l| l.strip_prefix("client secret: "))
        .expect("secret line")
        .to_owned();
    issue_token(&url, "carol", &new_secret)
        .await
        .expect("new secret works");
    let err = issue_token(&url, "carol", &carol_secret)
        .await
        .expect_err("old secret");
    assert_status(&err, Code::Unauthenticated, reason::BAD_CLIENT_CREDENTIALS);
    let out = ctl(&["admin", "client", "revoke", "carol"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = ctl(&["admin", "client", "revoke", "carol", "--yes"]);
    assert!(out.status.success(), "{out:?}");
    let out = ctl(&["admin", "client", "revoke", "admin", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bootstrap"),
        "{out:?}"
    );
    let err = issue_token(&url, "carol", &new_secret)
        .await
        .expect_err("revoked");
    assert_status(&err, Code::Unauthenticated, reason::CLIENT_REVOKED);

    w.stop().await;
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_revocation_refuse_old_tokens_at_once_and_survive_a_restart() {
    let dir = crate::harness::tempdir();
    let data = dir.path().join("c");
    let coord = Coordinator::start(coordinator_config(&data)).await;
    let url = coord.url();
    let admin = issue_token(&url, ADMIN_ID, ADMIN_SECRET)
        .await
        .expect("admin");
    let scopes = ["sessions:read", "cluster:read"];
    let alice = create(&url, &admin, "alice", &scopes).await.expect("alice");
    let bob = create(&url, &admin, "bob", &scopes).await.expect("bob");

    // Rotation: a token issued just before it (most likely in the same second) is refused on
    // the next call, the old secret is refused, and a token of the new secret works.
    let old_token = issue_token(&url, "alice", &alice.client_secret)
        .await
        .expect("token");
    list_sessions(&url, &old_token)
        .await
        .expect("valid before the rotation");
    let rotated = rotate(&url, &admin, "alice").await.expect("rotate");
    assert_ne!(rotated.client_secret, alice.client_secret);
    let err = list_sessions(&url, &old_token)
        .await
        .expect_err("old token");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_REVOKED);
    assert!(err.message().contains("rotated"), "{}", err.message());
    let err = issue_token(&url, "alice", &alice.client_secret)
        .await
        .expect_err("old secret");
    assert_status(&err, Code::Unauthenticated, reason::BAD_CLIENT_CREDENTIALS);
    let new_token = issue_token(&url, "alice", &rotated.client_secret)
        .await
        .expect("new");
    list_sessions(&url, &new_token)
        .await
        .expect("a token issued right after the rotation");

    // Revocation: bob's token works on gRPC, /metrics and /mcp, then is refused on the very
    // next call of each; he gets no new token.
    let (status, body) = oauth_token(coord.addr, "bob", &bob.client_secret).await;
    assert_eq!(status, 200, "{body}");
    let bob_token = issue_token(&url, "bob", &bob.client_secret)
        .await
        .expect("token");
    list_sessions(&url, &bob_token)
        .await
        .expect("valid before the revocation");
    assert_eq!(
        http_status(coord.addr, "GET", "/metrics", &bob_token, "").await,
        200
    );
    assert_ne!(
        http_status(coord.addr, "POST", "/mcp", &bob_token, MCP_INIT).await,
        401
    );
    let revoked = revoke(&url, &admin, "bob").await.expect("revoke");
    assert!(!revoked.already_revoked);
    let b = revoked.client.expect("client");
    assert!(b.revoked && b.revoked_at.is_some());
    let err = list_sessions(&url, &bob_token)
        .await
        .expect_err("revoked token");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_REVOKED);
    assert!(err.message().contains("revoked"), "{}", err.message());
    assert_eq!(
        http_status(coord.addr, "GET", "/metrics", &bob_token, "").await,
        401
    );
    assert_eq!(
        http_status(coord.addr, "POST", "/mcp", &bob_token, MCP_INIT).await,
        401
    );
    let (status, body) = oauth_token(coord.addr, "bob", &bob.client_secret).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("invalid_client") && body.contains("revoked"),
        "{body}"
    );
    let err = issue_token(&url, "bob", &bob.client_secret)
        .await
        .expect_err("revoked");
    assert_status(&err, Code::Unauthenticated, reason::CLIENT_REVOKED);
    let err = issue_token(&url, "bob", "not-his-secret-0123456789")
        .await
        .expect_err("wrong");
    assert_status(&err, Code::Unauthenticated, reason::BAD_CLIENT_CREDENTIALS);

    // A revoked client stays revoked: no rotation, no re-creation; revoking again is a no-op.
    let err = rotate(&url, &admin, "bob").await.expect_err("revoked");
    assert_status(&err, Code::FailedPrecondition, reason::CLIENT_REVOKED);
    let err = create(&url, &admin, "bob", &scopes)
        .await
        .expect_err("id kept");
    assert_status(&err, Code::AlreadyExists, reason::CLIENT_EXISTS);
    assert!(
        revoke(&url, &admin, "bob")
            .await
            .expect("again")
            .already_revoked
    );
    let err = rotate(&url, &admin, "nobody").await.expect_err("unknown");
    assert_status(&err, Code::NotFound, reason::CLIENT_NOT_FOUND);

    // The bootstrap admin cannot be locked out through the API.
    for err in [
        rotate(&url, &admin, ADMIN_ID)
            .await
            .map(|_| ())
            .expect_err("bootstrap"),
        revoke(&url, &admin, ADMIN_ID)
            .await
            .map(|_| ())
            .expect_err("bootstrap"),
    ] {
        assert_status(&err, Code::FailedPrecondition, reason::BOOTSTRAP_CLIENT);
        assert!(
            err.message().contains("HEIST_ADMIN_CLIENT_SECRET"),
            "{}",
            err.message()
        );
    }
    list(&url, &admin)
        .await
        .expect("the admin token still works");

    // Every change is in the audit log, with who made it.
    let records = client_audit(&url, &admin).await;
    let got: Vec<(&str, &str)> = records
        .iter()
        .map(|(k, s, _)| (k.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("client.created", "alice"),
            ("client.created", "bob"),
            ("client.rotated", "alice"),
            ("client.revoked", "bob"),
        ]
    );
    for (_, _, detail) in &records {
        assert!(detail.contains("by=admin"), "{detail}");
        assert!(detail.contains("sessions:read cluster:read"), "{detail}");
        assert!(!detail.contains(&rotated.client_secret), "{detail}");
    }

    // After a restart, the states are loaded from the store: the same answers.
    coord.stop().await;
    let coord = Coordinator::start(coordinator_config(&data)).await;
    let url = coord.url();
    let err = list_sessions(&url, &bob_token)
        .await
        .expect_err("still revoked");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_REVOKED);
    let err = list_sessions(&url, &old_token)
        .await
        .expect_err("still rotated");
    assert_status(&err, Code::Unauthenticated, reason::TOKEN_REVOKED);
    list_sessions(&url, &new_token)
        .await
        .expect("the new token still works");
    coord.stop().await;
}

/// The `kid` in a token's header.
fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("header")
        .kid
        .expect("tokens name their key")
}

/// Checks `token` against the JWK named by its `kid` in the coordinator's JWKS, with
/// jsonwebtoken (EdDSA, audience `heist`), and checks that no other key of the set verifies it.
fn verify_with_jwks(jwks: &jsonwebtoken::jwk::JwkSet, token: &str) {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&["heist"]);
    let kid = kid_of(token);
    for jwk in &jwks.keys {
        let key = DecodingKey::from_jwk(jwk).expect("an Ed25519 JWK");
        let verified = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation);
        if jwk.common.key_id.as_deref() == Some(kid.as_str()) {
            let claims = verified.expect("verified by its JWK");
            assert_eq!(claims.claims["sub"], "admin");
        } else {
            assert!(verified.is_err(), "another key verified it");
        }
    }
}

async fn jwks(addr: SocketAddr) -> jsonwebtoken::jwk::JwkSet {
    let (status, body) = http(addr, "GET", "/.well-known/jwks.json", "", "").await;
    assert_eq!(status, 200, "{body}");
    let raw: serde_json::Value = serde_json::from_str(&body).expect("json");
    for key in raw["keys"].as_array().expect("keys") {
        assert_eq!(key["kty"], "OKP");
        assert_eq!(key["crv"], "Ed25519");
        assert_eq!(key["use"], "sig");
        assert_eq!(key["alg"], "EdDSA");
    }
    serde_json::from_value(raw).expect("a JWK set")
}

fn kids(jwks: &jsonwebtoken::jwk::JwkSet) -> Vec<String> {
    jwks.keys
        .iter()
        .map(|k| k.common.key_id.clone().expect("kid"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_key_rotation_keeps_old_tokens_reaches_workers_and_survives_a_restart() {
    let dir = crate::harness::tempdir();
    let data = dir.path().join("c");
    let coord = Coordinator::start(coordinator_config(&data)).await;
    let url = coord.url();
    let w = Worker::start(&url, dir.path(), WorkerOpts::new("w1")).await;
    let mut admin = Client::admin(&url).await;
    admin.wait_ready(&["w1"]).await;
    let session = admin.create_session(&[]).await.expect("session");
    let old_token = admin.token.clone();
    let old_kid = kid_of(&old_token);
    assert_eq!(kids(&jwks(coord.addr).await), [old_kid.as_str()]);

    // /oauth/token: a scope the client does not hold is 400 invalid_scope (RFC 6749 5.2).
    let reader = create(&url, &admin.token, "reader", &["sessions:read"])
        .await
        .expect("reader");
    let body = format!(
        "grant_type=client_credentials&client_id=reader&client_secret={}&scope=admin",
        reader.client_secret
    );
    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    let (status, body) = http(coord.addr, "POST", "/oauth/token", form, &body).await;
    assert_eq!(status, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(error["error"], "invalid_scope", "{body}");
    assert!(
        error["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("admin")),
        "{body}"
    );
    let (_, metadata) = http(
        coord.addr,
        "GET",
        "/.well-known/oauth-authorization-server",
        "",
        "",
    )
    .await;
    let metadata: serde_json::Value = serde_json::from_str(&metadata).expect("json");
    assert!(
        metadata["jwks_uri"]
            .as_str()
            .is_some_and(|u| u.ends_with("/.well-known/jwks.json")),
        "{metadata}"
    );

    // Rotation needs the admin scope.
    let reader_token = issue_token(&url, "reader", &reader.client_secret)
        .await
        .expect("reader token");
    let refused = clients(channel(&url).await)
        .rotate_signing_key(authed(&reader_token, v1::RotateSigningKeyRequest {}))
        .await
        .expect_err("not an admin");
    assert_eq!(refused.code(), Code::PermissionDenied);

    // The operator's way: `heistctl admin keys rotate`.
    let home = tempfile::tempdir().expect("home");
    let out = heistctl(
        home.path(),
        &url,
        &old_token,
        &["-o", "json", "admin", "keys", "rotate"],
    );
    assert!(out.status.success(), "{out:?}");
    let rotation: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rotation["retired_key_id"], old_kid.as_str(), "{rotation}");
    let new_kid = rotation["key_id"].as_str().expect("key_id").to_owned();
    assert_ne!(new_kid, old_kid);
    assert!(
        rotation["retired_accepted_until"].is_string(),
        "the retired key's tokens stay accepted until a named time: {rotation}"
    );

    // Right after the rotation a routed call works (the old token too).
    admin
        .call(
            &session.id,
            "echo",
            serde_json::json!({"text": "right after"}),
        )
        .await
        .expect("a call right after the rotation");
    // The worker gets the new key on its control stream and says so; calls are then signed
    // with the new key, and they work.
    wait_for("w1 to verify with the new key", || {
        let (url, token, kid) = (url.clone(), old_token.clone(), new_kid.clone());
        async move {
            let workers = Client::with_token(&url, token).await.workers().await;
            workers
                .iter()
                .any(|w| w.id == "w1" && w.coordinator_key_id == kid)
                .then_some(())
        }
    })
    .await;
    admin
        .call(&session.id, "echo", serde_json::json!({"text": "new key"}))
        .await
        .expect("a call signed with the new key");

    // New tokens name the new key; both tokens work; the JWKS lists both keys and each
    // verifies its own token.
    let new_token = issue_token(&url, ADMIN_ID, ADMIN_SECRET)
        .await
        .expect("new token");
    assert_eq!(kid_of(&new_token), new_kid);
    for token in [&old_token, &new_token] {
        list_sessions(&url, token).await.expect("token accepted");
    }
    let set = jwks(coord.addr).await;
    assert_eq!(kids(&set), [new_kid.clone(), old_kid.clone()]);
    verify_with_jwks(&set, &old_token);
    verify_with_jwks(&set, &new_token);

    let audit = v1::audit_service_client::AuditServiceClient::new(channel(&url).await)
        .list_audit(authed(
            &new_token,
            v1::ListAuditRequest {
                after_seq: 0,
                limit: 1000,
                filter: Some(v1::AuditFilter {
                    kind: "signing_key.".to_owned(),
                    subject: String::new(),
                }),
            },
        ))
        .await
        .expect("audit")
        .into_inner()
        .entries;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].kind, "signing_key.rotated");
    assert_eq!(audit[0].subject, new_kid);
    assert!(
        audit[0].detail.contains(&format!("retired={old_kid}")),
        "{}",
        audit[0].detail
    );

    // After a restart: the same keys, both tokens still accepted, new tokens on the new key.
    w.stop().await;
    coord.stop().await;
    let coord = Coordinator::start(coordinator_config(&data)).await;
    let url = coord.url();
    for token in [&old_token, &new_token] {
        list_sessions(&url, token)
            .await
            .expect("token accepted after restart");
    }
    assert_eq!(kids(&jwks(coord.addr).await), [new_kid.clone(), old_kid]);
    let after = issue_token(&url, ADMIN_ID, ADMIN_SECRET)
        .await
        .expect("token");
    assert_eq!(kid_of(&after), new_kid);
    coord.stop().await;
}
