//! The MCP endpoint driven by a real third-party client: the official Python `mcp` SDK
//! (pinned in coordinator/tests/mcp/requirements.txt, installed by `make test-deps` into
//! `.venv-test`) runs the scenarios in coordinator/tests/mcp/scenarios.py against a cluster
//! started here. What only the host can see (a cancelled command killed on the worker) is
//! checked here.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use heist_proto::{token::TokenSigner, v1};

use crate::harness::*;

/// The interpreter with the SDK: HEIST_TEST_PYTHON, else the workspace's `.venv-test`.
fn python() -> PathBuf {
    if let Ok(python) = std::env::var("HEIST_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-test/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `make test-deps` (it creates the venv with the pinned MCP SDK) or set \
         HEIST_TEST_PYTHON to a python that has it",
        venv.display()
    );
    venv
}

fn scenarios() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/scenarios.py")
}

/// A coordinator and one worker, ready for calls.
pub(crate) struct Cluster {
    dir: crate::harness::Scratch,
    coord: Coordinator,
    worker: Worker,
    token: String,
}

impl Cluster {
    pub(crate) async fn start() -> Self {
        let dir = crate::harness::tempdir();
        let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
        let worker = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
        let mut client = Client::admin(&coord.url()).await;
        client.wait_ready(&["w1"]).await;
        let url = worker.url();
        wait_for("the worker's health SERVING", || {
            let url = url.clone();
            async move { health_serving(&url).await.then_some(()) }
        })
        .await;
        let token = client.token.clone();
        Self {
            dir,
            coord,
            worker,
            token,
        }
    }

    /// A token signed by the coordinator's own key for `subject` with `scope` and `audience`.
    fn signed(&self, subject: &str, scope: &str, audience: &str) -> String {
        let seed = std::fs::read(self.dir.path().join("c/signing.key")).expect("signing key");
        let seed: [u8; 32] = seed.as_slice().try_into().expect("32-byte seed");
        let signer = TokenSigner::from_seed(&seed).expect("signer");
        let claims =
            TokenSigner::claims("heist", audience, subject, scope, Duration::from_secs(600));
        signer.sign(&claims).expect("sign")
    }

    /// A token for the admin client narrowed to `scopes` (AuthService.IssueToken).
    async fn scoped(&self, scopes: &[&str]) -> String {
        let mut auth =
            v1::auth_service_client::AuthServiceClient::new(channel(&self.coord.url()).await);
        auth.issue_token(v1::IssueTokenRequest {
            client_id: ADMIN_ID.to_owned(),
            client_secret: ADMIN_SECRET.to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        })
        .await
        .expect("token")
        .into_inner()
        .access_token
    }

    /// Runs one scenario with `env` (plus HEIST_URL and HEIST_TOKEN); returns its `key=value`
    /// report. Fails the test with the script's output when it fails.
    pub(crate) async fn run(
        &self,
        scenario: &str,
        env: &[(&str, String)],
    ) -> BTreeMap<String, String> {
        let mut cmd = tokio::process::Command::new(python());
        cmd.arg(scenarios())
            .arg(scenario)
            .env("HEIST_URL", self.coord.url())
            .env("HEIST_TOKEN", &self.token)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("scenario {scenario} did not finish in 240 s"))
            .expect("run python");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scenario {scenario} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    pub(crate) async fn stop(self) {
        self.worker.stop().await;
        self.coord.stop().await;
    }
}

/// Pids of processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

#[tokio::test]
async fn mcp_sdk_lists_tools_and_runs_calls_over_streamable_http() {
    let c = Cluster::start().await;
    let modern = c.run("basics", &[]).await;
    assert_eq!(
        modern["protocol"], "2026-07-28",
        "the SDK negotiates the current revision"
    );
    let legacy = c.run("basics-legacy", &[]).await;
    assert_ne!(
        legacy["protocol"], "2026-07-28",
        "the initialize handshake still works"
    );
    c.stop().await;
}

#[tokio::test]
async fn mcp_cancelled_call_kills_the_command_on_the_worker() {
    let c = Cluster::start().await;
    let mark = format!("heist-mcp-{}", uuid::Uuid::new_v4().simple());
    let report = c.run("cancel", &[("HEIST_MARK", mark.clone())]).await;
    assert_eq!(report["started"], "yes");
    wait_for(&format!("no process with {mark}"), || async {
        processes_with(&mark).is_empty().then_some(())
    })
    .await;
    c.stop().await;
}

#[tokio::test]
async fn mcp_oauth_discovery_token_endpoint_and_audience() {
    let c = Cluster::start().await;
    let foreign = c.signed(ADMIN_ID, "admin", "heist-worker:w1");
    c.run(
        "auth",
        &[
            ("HEIST_CLIENT_ID", ADMIN_ID.to_owned()),
            ("HEIST_CLIENT_SECRET", ADMIN_SECRET.to_owned()),
            ("HEIST_FOREIGN_TOKEN", foreign),
        ],
    )
    .await;
    c.stop().await;
}

#[tokio::test]
async fn mcp_tools_follow_the_token_scopes() {
    let c = Cluster::start().await;
    let limited = c
        .scoped(&["sessions:read", "sessions:write", "tools:read"])
        .await;
    let files = c
        .scoped(&["sessions:read", "sessions:write", "tools:read", "tools:fs"])
        .await;
    let report = c
        .run(
            "scopes",
            &[("HEIST_LIMITED_TOKEN", limited), ("HEIST_FS_TOKEN", files)],
        )
        .await;
    // Without any tool scope, the tool's category is named, and tools:call as the wider one.
    assert!(report["refused"].contains("tools:fs"), "{report:?}");
    assert!(report["refused"].contains("tools:call"), "{report:?}");
    assert!(report["refused_exec"].contains("tools:exec"), "{report:?}");
    assert!(
        report["refused_policy"].contains("allows only fs.read"),
        "{report:?}"
    );
    c.stop().await;
}

#[tokio::test]
async fn mcp_clients_see_only_their_own_sessions() {
    let c = Cluster::start().await;
    let bob = c.signed(
        "bob",
        "sessions:read sessions:write tools:read tools:call",
        "heist",
    );
    c.run("isolation", &[("HEIST_OTHER_TOKEN", bob)]).await;
    c.stop().await;
}

#[tokio::test]
async fn mcp_stdio_bridge_serves_the_sdk() {
    let c = Cluster::start().await;
    let heistctl = sibling_binary("heistctl");
    c.run(
        "stdio",
        &[("HEIST_HEISTCTL", heistctl.display().to_string())],
    )
    .await;
    c.stop().await;
}
