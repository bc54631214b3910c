//! Escape attempts against the `process` sandbox, through the coordinator and the real worker
//! running as root (as in CI and most container deployments). Each test does what an attacker
//! would, then checks the host from outside. They need the confinement layers the worker
//! reports; a worker without them fails here with the layer it lacks.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

use heist_proto::v1;
use serde_json::json;

use crate::harness::*;

struct Lab {
    dir: crate::harness::Scratch,
    coord: Coordinator,
    worker: Worker,
    client: Client,
    session: String,
}

/// A cluster whose worker confines commands with every layer this suite relies on.
async fn lab() -> Lab {
    assert!(
        running_as_root(),
        "the escape suite runs the worker as root, as CI does (run it as root)"
    );
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
    let workers = client.workers().await;
    let isolation = &workers[0].isolation;
    for layer in [
        "userns:own-ids",
        "idmap",
        "pivot_root",
        "pidns",
        "caps:none",
        "no_new_privs",
        "seccomp",
    ] {
        assert!(
            isolation.iter().any(|f| f == layer),
            "the worker does not report `{layer}` (it reports {isolation:?}): this host lacks \
             a layer the sandbox needs; see docs/SECURITY.md for what each layer needs"
        );
    }
    let session = client.create_session(&[]).await.expect("session").id;
    Lab {
        dir,
        coord,
        worker,
        client,
        session,
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl Lab {
    async fn sh(&mut self, script: &str) -> v1::CallToolResponse {
        self.client
            .call(&self.session, "exec", json!({"command": script}))
            .await
            .expect("exec")
    }

    async fn python(&mut self, code: &str) -> v1::CallToolResponse {
        self.client
            .call(&self.session, "run.python", json!({"code": code}))
            .await
            .expect("run.python")
    }

    async fn stop(self) {
        self.worker.stop().await;
        self.coord.stop().await;
    }
}

fn out(resp: &v1::CallToolResponse, stream: &str) -> String {
    structured(resp)[stream]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn commands_hold_no_capabilities_and_no_host_identity() {
    let mut lab = lab().await;
    let resp = lab.sh("cat /proc/self/status /proc/self/uid_map").await;
    let text = out(&resp, "stdout");
    assert!(!resp.is_error, "{}", structured(&resp));
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in {text}"));
        assert!(
            line.ends_with("0000000000000000"),
            "{line}: the command holds capabilities"
        );
    }
    assert!(
        text.lines().any(|l| l == "NoNewPrivs:\t1"),
        "no_new_privs is not set: {text}"
    );
    assert!(
        text.lines().any(|l| l == "Seccomp:\t2"),
        "no seccomp filter: {text}"
    );
    // Only the sandbox's own id is mapped: one line, to the unprivileged sandbox user.
    let maps: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.split_whitespace().count() == 3)
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| f.iter().all(|x| x.parse::<u64>().is_ok()))
        .collect();
    assert_eq!(maps, [["0", "65534", "1"]], "{text}");
    lab.stop().await;
}

#[tokio::test]
async fn a_root_owned_host_socket_cannot_be_reached() {
    let mut lab = lab().await;
    // Root-owned and open to everyone: only isolation can keep a command out.
    let dir = lab.dir.path().join("sockets");
    std::fs::create_dir(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let path = dir.join("host.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");

    let code = format!(
        "import socket\nfor p in ({:?}, '/var/run/docker.sock', \
         '/var/run/docker/containerd/containerd.sock', '/run/containerd/containerd.sock'):\n    \
         s = socket.socket(socket.AF_UNIX)\n    try:\n        s.connect(p)\n        \
         print('connected', p)\n    except OSError as e:\n        print('refused', p, e)\n",
        path.display().to_string()
    );
    let resp = lab.python(&code).await;
    let text = out(&resp, "stdout");
    assert!(!text.contains("connected"), "{text}");
    assert_eq!(text.matches("refused").count(), 4, "{}", structured(&resp));
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a connection reached the host socket"
    );
    lab.stop().await;
}

#[tokio::test]
async fn host_files_keep_their_mode_times_and_xattrs() {
    let mut lab = lab().await;
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let target = lab.dir.path().join("host-file.txt");
    std::fs::write(&target, "host\n").expect("write");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let before = std::fs::metadata(&target).expect("stat");
    let p = target.display().to_string();

    let resp = lab
        .sh(&format!(
            "chmod 4777 {p}; chmod u+s {p}; touch -d 2000-01-01 {p}; echo tried"
        ))
        .await;
    assert!(
        out(&resp, "stdout").contains("tried"),
        "{}",
        structured(&resp)
    );
    let code = format!(
        "import os\np = {p:?}\nfor name, f in (('chmod', lambda: os.chmod(p, 0o4777)), \
         ('utime', lambda: os.utime(p, (0, 0))), \
         ('setxattr', lambda: os.setxattr(p, 'user.pwned', b'1')), \
         ('chown', lambda: os.chown(p, 0, 0))):\n    try:\n        f()\n        \
         print(name, 'done')\n    except OSError as e:\n        print(name, 'refused', e)\n"
    );
    let resp = lab.python(&code).await;
    let text = out(&resp, "stdout");
    assert!(!text.contains("done"), "{text}");
    assert_eq!(text.matches("refused").count(), 4, "{}", structured(&resp));

    let after = std::fs::metadata(&target).expect("stat");
    assert_eq!(after.mode(), before.mode(), "the mode changed");
    assert_eq!(after.mtime(), before.mtime(), "the mtime changed");
    assert_eq!(after.uid(), 0);
    let xattrs = std::process::Command::new("python3")
        .args(["-c", "import os, sys; print(os.listxattr(sys.argv[1]))", &p])
        .output()
        .expect("python3 on the host");
    let xattrs = String::from_utf8_lossy(&xattrs.stdout);
    assert!(!xattrs.contains("pwned"), "{xattrs}");
    assert_eq!(std::fs::read_to_string(&target).expect("read"), "host\n");
    lab.stop().await;
}

#[tokio::test]
async fn the_host_workspace_path_is_not_visible() {
    let mut lab = lab().await;
    let host_ws = lab.worker.workspace(&lab.session);
    let base = lab.worker.base_workspace.clone();
    let resp = lab
        .sh("pwd; echo \"$HOME\"; echo \"$TMPDIR\"; cat /proc/self/mountinfo")
        .await;
    assert!(!resp.is_error, "{}", structured(&resp));
    let text = out(&resp, "stdout");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("/workspace"));
    assert_eq!(lines.next(), Some("/workspace"));
    assert_eq!(lines.next(), Some("/tmp"));
    // Mount points and options do not show it. (The "root" field, the 4th, is the mounted
    // directory's path inside its filesystem: it shows the workspace's path unless the
    // workspace is a filesystem of its own; see docs/SECURITY.md.)
    let visible: String = text
        .lines()
        .map(|l| {
            let mut fields: Vec<&str> = l.split(' ').collect();
            if fields.len() > 4 && fields[0].parse::<u64>().is_ok() {
                fields.remove(3);
            }
            fields.join(" ") + "\n"
        })
        .collect();
    for secret in [
        host_ws.display().to_string(),
        base.display().to_string(),
        lab.dir.path().display().to_string(),
    ] {
        assert!(!visible.contains(&secret), "{secret} shows in:\n{text}");
    }
    // Relative paths still mean the workspace.
    let resp = lab.sh("mkdir -p d && echo x > d/f && cat ./d/f").await;
    assert_eq!(out(&resp, "stdout"), "x\n");
    assert_eq!(
        std::fs::read_to_string(host_ws.join("d/f")).expect("on the host"),
        "x\n"
    );
    lab.stop().await;
}

#[tokio::test]
async fn proc_shows_only_the_commands_own_processes() {
    let mut lab = lab().await;
    let resp = lab
        .sh("for p in /proc/[0-9]*; do echo \"${p#/proc/} $(tr '\\0' ' ' < $p/cmdline)\"; done")
        .await;
    assert!(!resp.is_error, "{}", structured(&resp));
    let text = out(&resp, "stdout");
    let pids: Vec<u32> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(pids.contains(&1), "the command is not PID 1: {text}");
    assert!(pids.len() <= 4, "more processes than the command's: {text}");
    assert!(
        !text.contains("cargo") && !text.contains("worker"),
        "{text}"
    );
    lab.stop().await;
}

#[tokio::test]
async fn host_directories_are_absent() {
    let mut lab = lab().await;
    let base = lab.worker.base_workspace.clone();
    let paths = [
        "/run".to_owned(),
        "/var".to_owned(),
        "/var/run/docker".to_owned(),
        "/home".to_owned(),
        "/boot".to_owned(),
        base.display().to_string(),
        lab.dir.path().display().to_string(),
    ];
    let script: String = paths
        .iter()
        .map(|p| format!("if [ -e {p} ] || [ -L {p} ]; then echo present {p}; fi; "))
        .collect();
    let resp = lab.sh(&format!("{script}echo checked")).await;
    let text = out(&resp, "stdout");
    assert!(text.contains("checked"), "{}", structured(&resp));
    assert!(!text.contains("present"), "{text}");
    lab.stop().await;
}

#[tokio::test]
async fn dangerous_system_calls_fail_with_eperm() {
    let mut lab = lab().await;
    let code = r#"
import ctypes, errno, platform, socket
libc = ctypes.CDLL(None, use_errno=True)
BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280}[platform.machine()]
def report(name, result):
    print(name, result, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
params = ctypes.create_string_buffer(120)
report("io_uring_setup", libc.syscall(425, 1, params))
report("bpf", libc.syscall(BPF, 0, None, 0))
report("unshare_user", libc.unshare(0x10000000))
report("unshare_net", libc.unshare(0x40000000))
report("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    print("inet_socket 0 none")
except OSError as e:
    print("inet_socket -1", errno.errorcode.get(e.errno))
"#;
    let resp = lab.python(code).await;
    let text = out(&resp, "stdout");
    for name in [
        "io_uring_setup",
        "bpf",
        "unshare_user",
        "unshare_net",
        "mount",
        "inet_socket",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} did not run: {}", structured(&resp)));
        assert_eq!(
            line,
            format!("{name} -1 EPERM"),
            "{name} is not denied with EPERM"
        );
    }
    // util-linux's unshare gets the same clean error.
    let resp = lab.sh("unshare -U true").await;
    assert!(resp.is_error);
    assert!(
        out(&resp, "stderr").contains("Operation not permitted"),
        "{}",
        structured(&resp)
    );
    lab.stop().await;
}

#[tokio::test]
async fn a_process_that_outlives_its_command_is_gone_when_it_returns() {
    let mut lab = lab().await;
    let marker = format!("heist-escape-{}", uuid::Uuid::new_v4().simple());
    let resp = lab
        .sh(&format!(
            "setsid sh -c 'sleep 300; echo {marker}' </dev/null >/dev/null 2>&1 & echo started"
        ))
        .await;
    assert_eq!(out(&resp, "stdout"), "started\n", "{}", structured(&resp));
    wait_for(&format!("no host process with {marker}"), || {
        let marker = marker.clone();
        async move { processes_with(&marker).is_empty().then_some(()) }
    })
    .await;
    lab.stop().await;
}

/// Host pids whose command line contains `marker`.
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
