//! The sandbox on its own: the real `heist-sandbox` helper, driven through
//! `heist_worker::sandbox::Sandbox` on a temp workspace (no coordinator).

use std::{sync::Arc, time::Duration};

use heist_proto::ids::SessionId;
use heist_worker::{
    quota::Quotas,
    sandbox::{Finished, Mode, Request, Sandbox, Settings},
    sessions::Workspace,
};

struct Lab {
    _tmp: tempfile::TempDir,
    workspace: Arc<Workspace>,
    sandbox: Sandbox,
}

async fn lab(mode: Mode, quotas: Quotas) -> Lab {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("s-test");
    std::fs::create_dir(&path).expect("mkdir");
    let workspace = Arc::new(
        Workspace::open(SessionId::parse("s-test").expect("id"), path).expect("workspace"),
    );
    let sandbox = Sandbox::start(Settings {
        mode,
        helper: Some(env!("CARGO_BIN_EXE_heist-sandbox").into()),
        uid: 65_534,
        gid: 65_534,
        python: None,
        kill_grace: Duration::from_millis(300),
        poll_interval: Duration::from_millis(100),
        nice: 19,
        quotas,
        cgroup_root: Some("/sys/fs/cgroup".into()),
        // Unique per lab: a worker sweeps its own id's cgroups at start.
        cgroup_name: heist_worker::sandbox::cgroup_name("lab", tmp.path()),
        fs_pool: heist_worker::tools::PoolLimits::default(),
        disk_fs: false,
        docker: heist_worker::sandbox::DockerSettings::default(),
    })
    .await;
    Lab {
        _tmp: tmp,
        workspace,
        sandbox,
    }
}

fn sh(script: &str) -> Request {
    Request {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Request::default()
    }
}

async fn run(lab: &Lab, request: Request) -> Finished {
    lab.sandbox
        .run(&lab.workspace, request, None)
        .await
        .expect("ran")
}

fn out(f: &Finished) -> String {
    String::from_utf8_lossy(&f.stdout.data).into_owned()
}

fn err(f: &Finished) -> String {
    String::from_utf8_lossy(&f.stderr.data).into_owned()
}

#[tokio::test]
async fn commands_run_as_pid_1_of_their_own_namespaces_with_a_scrubbed_environment() {
    let lab = lab(Mode::Process, Quotas::default()).await;
    assert_eq!(lab.sandbox.problem(), None);
    assert_eq!(lab.sandbox.backend_name(), "process");
    let iso = lab.sandbox.isolation();
    for want in [
        "userns", "mountns", "pidns", "netns", "ipcns", "utsns", "rlimits",
    ] {
        assert!(iso.iter().any(|f| f == want), "{want} in {iso:?}");
    }
    assert!(iso.iter().any(|f| f.starts_with("landlock:v")), "{iso:?}");

    let f = run(
        &lab,
        sh("echo $$; id -u; hostname; nice; ulimit -n; env | sort"),
    )
    .await;
    let text = out(&f);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("1"), "PID 1: {text}");
    assert_eq!(lines.next(), Some("0"), "uid 0 inside: {text}");
    assert_eq!(lines.next(), Some("sandbox"), "own UTS namespace: {text}");
    assert_eq!(lines.next(), Some("19"), "lower priority: {text}");
    assert_eq!(lines.next(), Some("1024"), "RLIMIT_NOFILE: {text}");
    let env: Vec<&str> = lines.collect();
    assert!(env.contains(&"HOME=/workspace"), "{env:?}");
    assert!(!env.iter().any(|l| l.starts_with("CARGO")), "{env:?}");

    // stdin, exit codes, stderr.
    let f = run(
        &lab,
        Request {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "cat; echo oops >&2; exit 3".into(),
            ],
            stdin: b"piped in".to_vec(),
            ..Request::default()
        },
    )
    .await;
    assert_eq!(out(&f), "piped in");
    assert_eq!(err(&f), "oops\n");
    assert_eq!(f.exit_code, Some(3));
    assert!(f.failed());
}

#[tokio::test]
async fn output_streams_into_the_sink_as_it_is_written() {
    let lab = lab(Mode::Process, Quotas::default()).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let running = lab.sandbox.run(
        &lab.workspace,
        sh("echo one; while [ ! -e go ]; do sleep 0.01; done; echo two"),
        Some(tx),
    );
    tokio::pin!(running);
    // The first chunk arrives while the command still waits for `go`.
    let first = tokio::select! {
        chunk = rx.recv() => chunk.expect("a chunk"),
        finished = &mut running => panic!("ended before any output: {finished:?}"),
    };
    assert_eq!(first.data, b"one\n");
    std::fs::write(lab.workspace.path().join("go"), b"").expect("go");
    let finished = running.await.expect("ran");
    assert_eq!(out(&finished), "one\ntwo\n");
    assert_eq!(rx.recv().await.expect("second chunk").data, b"two\n");
}

#[tokio::test]
async fn unconfined_mode_reports_rlimits_only() {
    let lab = lab(Mode::Unconfined, Quotas::default()).await;
    let isolation = lab.sandbox.isolation();
    assert_eq!(isolation.first().map(String::as_str), Some("rlimits"));
    assert!(
        isolation[1..]
            .iter()
            .all(|i| i.starts_with("cgroup") || i.starts_with("disk-quota:")),
        "unconfined adds only resource limits: {isolation:?}"
    );
    let f = run(&lab, sh("echo $HOME")).await;
    assert_eq!(out(&f), format!("{}\n", lab.workspace.path().display()));
}
