//! Transport security: a coordinator serving TLS with a cluster CA (mTLS with its workers), a
//! worker serving mTLS, and what happens to clients and workers that do not hold the right
//! certificates. Certificates are made here with rcgen.

use std::path::{Path, PathBuf};

use heist_proto::{
    errors::reason,
    identity::{PURPOSE_BLOB, WorkerKey},
    metadata,
    tls::TlsFiles,
    v1::{
        self, audit_service_client::AuditServiceClient, blob_service_client::BlobServiceClient,
        cluster_service_client::ClusterServiceClient, session_service_client::SessionServiceClient,
        tool_service_client::ToolServiceClient, worker_control_client::WorkerControlClient,
    },
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::harness::*;

/// A CA and the certificates it issued, as PEM files in a directory.
struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("ca cert");
        let ca_pem = cert.pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).expect("write ca");
        Self {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
            ca_pem,
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A server-and-client certificate for `names`, written as `<file>.pem` / `<file>.key`.
    fn issue(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// TLS settings of a process holding the certificate `file` for `names`.
    fn files(&self, file: &str, names: &[&str]) -> TlsFiles {
        let (cert, key) = self.issue(file, names);
        TlsFiles {
            cert: Some(cert),
            key: Some(key),
            ca: Some(self.ca()),
            ..TlsFiles::default()
        }
    }

    /// The client identity of the certificate `file` for `names`.
    fn identity(&self, file: &str, names: &[&str]) -> Identity {
        let (cert, key) = self.issue(file, names);
        Identity::from_pem(
            std::fs::read(cert).expect("cert"),
            std::fs::read(key).expect("key"),
        )
    }
}

/// A coordinator serving TLS (mTLS with workers) in this process.
struct TlsCoordinator {
    addr: std::net::SocketAddr,
    tls: heist_proto::tls::Tls,
    ca_pem: String,
    stop: CancellationToken,
    task: JoinHandle<Result<(), heist_coordinator::Error>>,
}

impl TlsCoordinator {
    async fn start(data: &Path, pki: &Pki) -> Self {
        let files = pki.files("coordinator", &["localhost", "127.0.0.1"]);
        let tls = files.load().expect("load").expect("tls");
        let config = heist_coordinator::Config {
            tls: files,
            ..coordinator_config(data)
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(heist_coordinator::serve(
            listener,
            config,
            stop.clone().cancelled_owned(),
        ));
        let c = Self {
            addr,
            tls,
            ca_pem: pki.ca_pem.clone(),
            stop,
            task,
        };
        wait_for("the TLS coordinator to serve", || {
            let c = &c;
            async move {
                let ch = c.channel(None).await.ok()?;
                let status = tonic_health::pb::health_client::HealthClient::new(ch)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .status;
                let serving = tonic_health::pb::health_check_response::ServingStatus::Serving;
                (status == serving as i32).then_some(())
            }
        })
        .await;
        c
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A channel verifying the coordinator against the CA, presenting `identity` if given.
    async fn channel(
        &self,
        identity: Option<Identity>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        Channel::from_shared(self.url())
            .expect("url")
            .tls_config(tls)?
            .connect()
            .await
    }

    async fn admin(&self) -> Client {
        let ch = self.channel(None).await.expect("connect");
        let token = v1::auth_service_client::AuthServiceClient::new(ch.clone())
            .issue_token(v1::IssueTokenRequest {
                client_id: ADMIN_ID.into(),
                client_secret: ADMIN_SECRET.into(),
                scopes: vec![],
            })
            .await
            .expect("admin token")
            .into_inner()
            .access_token;
        Client {
            token,
            cluster: ClusterServiceClient::new(ch.clone()),
            sessions: SessionServiceClient::new(ch.clone()),
            tools: ToolServiceClient::new(ch),
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("task").expect("serve");
    }
}

/// A worker of `pki` serving mTLS and joining `coord` with the certificate of `id`.
async fn tls_worker(coord: &TlsCoordinator, pki: &Pki, base: &Path, id: &str) -> Worker {
    let files = pki.files(id, &[id]);
    Worker::start(
        &coord.url(),
        base,
        WorkerOpts::new(id).configure(move |c| c.tls = files),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_and_mtls_cluster_routes_calls_and_plaintext_clients_fail_cleanly() {
    let dir = crate::harness::tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let coord = TlsCoordinator::start(&dir.path().join("c"), &pki).await;
    let worker = tls_worker(&coord, &pki, dir.path(), "w-1").await;
    let mut client = coord.admin().await;
    client.wait_ready(&["w-1"]).await;

    // The coordinator dials the worker over mTLS at its https:// address; the call is routed.
    let workers = client.workers().await;
    assert_eq!(workers[0].address, format!("https://{}", worker.addr));
    let session = client.create_session(&[]).await.expect("session");
    let resp = client
        .call(&session.id, "echo", json!({"msg": "over mTLS"}))
        .await
        .expect("echo over mTLS");
    assert_eq!(structured(&resp), json!({"msg": "over mTLS"}));

    // A plaintext gRPC client gets an error, not a hang or an answer.
    let plaintext = async {
        let ch = Channel::from_shared(format!("http://{}", coord.addr))
            .expect("url")
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map_err(|s| s.to_string())
    }
    .await;
    assert!(plaintext.is_err(), "plaintext answered: {plaintext:?}");
    // So does a plaintext HTTP probe; the same probe over TLS (HTTP/1.1) is answered.
    let timeout = std::time::Duration::from_secs(5);
    assert!(heist_proto::health::check(coord.addr, "/healthz", timeout, None).is_err());
    heist_proto::health::check(coord.addr, "/healthz", timeout, Some(&coord.tls))
        .expect("/healthz over TLS");
    // A TLS client that does not trust the cluster CA is refused by its own check.
    let untrusted = Channel::from_shared(coord.url())
        .expect("url")
        .tls_config(ClientTlsConfig::new().with_enabled_roots())
        .expect("tls")
        .connect()
        .await;
    assert!(untrusted.is_err(), "a client without the CA connected");

    // The worker's own port: only a client holding a CA-signed certificate gets through.
    let worker_url = format!("https://{}", worker.addr);
    let no_cert = async {
        let ch = Channel::from_shared(worker_url.clone())
            .expect("url")
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&pki.ca_pem))
                    .domain_name("w-1"),
            )
            .expect("tls")
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map_err(|s| s.to_string())
    }
    .await;
    assert!(
        no_cert.is_err(),
        "the worker answered a client without a certificate"
    );

    // Still serving TLS clients after all that.
    assert_eq!(client.workers().await.len(), 1);
    worker.stop().await;
    coord.stop().await;
}

/// A registration for `id`, proved by `key`.
fn register(id: &str, key: &WorkerKey) -> v1::WorkerMessage {
    signed_register(id, "https://127.0.0.1:1", key)
}

/// Joins over `channel` as `id` with the right join token and a valid key proof; the first
/// reply, or the status the join failed with. The stream stays open while the sender lives.
async fn join(
    channel: Result<Channel, tonic::transport::Error>,
    id: &str,
    key: &WorkerKey,
) -> Result<
    (
        v1::CoordinatorMessage,
        tokio::sync::mpsc::Sender<v1::WorkerMessage>,
    ),
    tonic::Status,
> {
    let channel = channel.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(register(id, key)).await.expect("queue");
    let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert(metadata::JOIN_TOKEN, JOIN_TOKEN.parse().expect("ascii"));
    let mut stream = WorkerControlClient::new(channel)
        .join(req)
        .await?
        .into_inner();
    match stream.message().await? {
        Some(reply) => Ok((reply, tx)),
        None => Err(tonic::Status::unavailable("stream closed before a reply")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_a_certificate_for_their_id_from_the_cluster_ca_cannot_join() {
    let dir = crate::harness::tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let other_ca = Pki::new(&dir.path().join("other"));
    let coord = TlsCoordinator::start(&dir.path().join("c"), &pki).await;
    let key = WorkerKey::from_seed(&[7; 32]);

    // No client certificate: the join token and the key proof are not enough.
    let err = join(coord.channel(None).await, "w-2", &key)
        .await
        .expect_err("no certificate");
    assert_status(&err, Code::Unauthenticated, reason::WORKER_IDENTITY_INVALID);
    assert!(err.message().contains("no client certificate"), "{err:?}");

    // A certificate for w-2 from another CA: refused in the handshake.
    let foreign = other_ca.identity("w-2-foreign", &["w-2"]);
    let err = join(coord.channel(Some(foreign)).await, "w-2", &key)
        .await
        .expect_err("another CA");
    assert_ne!(err.code(), Code::Ok);

    // The cluster CA's certificate of another worker id.
    let w1 = pki.identity("w-1", &["w-1"]);
    let err = join(coord.channel(Some(w1)).await, "w-2", &key)
        .await
        .expect_err("w-1's certificate");
    assert_status(&err, Code::Unauthenticated, reason::WORKER_IDENTITY_INVALID);
    assert!(err.message().contains("w-2"), "{err:?}");

    // None of them enrolled a key: w-2 joins with its own certificate, and the key it proves.
    let w2 = pki.identity("w-2", &["w-2"]);
    let (accepted, _stream) = join(coord.channel(Some(w2.clone())).await, "w-2", &key)
        .await
        .expect("w-2 with its own certificate");
    assert!(
        matches!(
            accepted.msg,
            Some(v1::coordinator_message::Msg::Accepted(_))
        ),
        "{accepted:?}"
    );

    // The blob store wants the certificate as well as the key proof.
    let path = "/heist.v1.BlobService/FindMissingBlobs";
    let request = || {
        let mut req = Request::new(v1::FindMissingBlobsRequest {
            hashes: vec![vec![0; 32]],
        });
        let md = req.metadata_mut();
        md.insert(metadata::JOIN_TOKEN, JOIN_TOKEN.parse().expect("ascii"));
        md.insert(metadata::WORKER_ID, "w-2".parse().expect("ascii"));
        let proof = key.prove(PURPOSE_BLOB, "w-2", path.as_bytes()).to_header();
        md.insert(metadata::WORKER_PROOF, proof.parse().expect("ascii"));
        req
    };
    let err = BlobServiceClient::new(coord.channel(None).await.expect("connect"))
        .find_missing_blobs(request())
        .await
        .expect_err("no certificate");
    assert_status(&err, Code::Unauthenticated, reason::WORKER_IDENTITY_INVALID);
    BlobServiceClient::new(coord.channel(Some(w2)).await.expect("connect"))
        .find_missing_blobs(request())
        .await
        .expect("w-2's certificate and proof");

    // The refusals are on the audit record, like other refused registrations.
    let admin = coord.admin().await;
    let listed = AuditServiceClient::new(coord.channel(None).await.expect("connect"))
        .list_audit(authed(
            &admin.token,
            v1::ListAuditRequest {
                filter: Some(v1::AuditFilter {
                    kind: "worker.refused".into(),
                    subject: "w-2".into(),
                }),
                ..Default::default()
            },
        ))
        .await
        .expect("audit")
        .into_inner();
    let details: Vec<&str> = listed.entries.iter().map(|e| e.detail.as_str()).collect();
    assert!(
        details.iter().any(|d| d.contains("no client certificate")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("not issued for")),
        "{details:?}"
    );
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heistctl_talks_to_a_tls_coordinator_with_its_ca_certificate() {
    let dir = crate::harness::tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let coord = TlsCoordinator::start(&dir.path().join("c"), &pki).await;
    let worker = tls_worker(&coord, &pki, dir.path(), "w-1").await;
    let mut admin = coord.admin().await;
    admin.wait_ready(&["w-1"]).await;
    let ctl = |url: &str, args: &[&str]| heistctl(dir.path(), url, &admin.token, args);
    let ca = pki.ca();
    let ca = ca.to_str().expect("utf-8 path");

    let out = ctl(
        &coord.url(),
        &["--ca-cert", ca, "-o", "json", "workers", "ls"],
    );
    assert!(out.status.success(), "{out:?}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(listed.to_string().contains("w-1"), "{listed}");

    // Without the CA the coordinator's certificate is not trusted: unreachable. Over http://
    // the TLS port gives no answer a plaintext client can read. Both say what to use.
    let out = ctl(&coord.url(), &["workers", "ls"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--ca-cert"), "{said}");
    let out = ctl(&format!("http://{}", coord.addr), &["workers", "ls"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--ca-cert"), "{said}");
    // --ca-cert with a plaintext URL is a usage error.
    let out = ctl(
        &format!("http://{}", coord.addr),
        &["--ca-cert", ca, "workers", "ls"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    worker.stop().await;
    coord.stop().await;
}
