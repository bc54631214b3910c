use super::*;

/// A directory laid out like a cgroup v1 root with memory (and swap accounting), pids and cpu.
fn fake_v1() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (controller, file) in [
        ("memory", "memory.limit_in_bytes"),
        ("memory", "memory.memsw.limit_in_bytes"),
        ("pids", "cgroup.procs"),
        ("cpu", "cpu.shares"),
    ] {
        let dir = tmp.path().join(controller);
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join(file), "max").expect("file");
    }
    tmp
}

fn read(path: PathBuf) -> String {
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn v1_limits_land_in_each_controllers_hierarchy() {
    let root = fake_v1();
    let cgroups = Cgroups::setup(root.path(), "w1").expect("setup");
    assert_eq!(cgroups.isolation(), "cgroup-v1:memory,pids,cpu");
    let limits = Limits {
        memory_bytes: Some(64 << 20),
        pids: Some(32),
        cpu_weight: Some(50),
        cpu_percent: Some(150),
    };
    let session = Limits::default();
    cgroups
        .command("s1", &session, "c1", &limits)
        .expect("command group");
    let at = |controller: &str, file: &str| {
        read(
            root.path()
                .join(controller)
                .join("heist/w1/s1/c1")
                .join(file),
        )
    };
    assert_eq!(at("memory", "memory.limit_in_bytes"), "67108864");
    assert_eq!(at("pids", "pids.max"), "32");
    assert_eq!(at("cpu", "cpu.shares"), "512");
    assert_eq!(at("cpu", "cpu.cfs_quota_us"), "150000");
    assert_eq!(at("cpu", "cpu.cfs_period_us"), "100000");
}

#[test]
fn setup_sweeps_what_a_crashed_worker_left() {
    let root = fake_v1();
    let stale = root.path().join("pids/heist/w1/old-session/cmd-7");
    fs::create_dir_all(&stale).expect("stale");
    let other = root.path().join("pids/heist/w2/theirs");
    fs::create_dir_all(&other).expect("other worker");
    Cgroups::setup(root.path(), "w1").expect("setup");
    assert!(!stale.exists(), "stale groups of this worker are removed");
    assert!(root.path().join("pids/heist/w1").is_dir(), "base recreated");
    assert!(other.is_dir(), "another worker's groups are left alone");
}

#[test]
fn without_controllers_setup_says_why() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = Cgroups::setup(tmp.path(), "w1").expect_err("nothing there");
    assert!(err.contains("no cgroup controller"), "{err}");
}

#[test]
fn memory_events_parse_both_versions() {
    assert_eq!(
        keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"),
        3
    );
    assert_eq!(
        keyed("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n", "max"),
        12
    );
    assert_eq!(keyed("", "oom_kill"), 0);
}

/// The real kernel, where the test runs as root with cgroups mounted (CI runs the worker as
/// root): a process added to a command group is in it, is killed when the group is removed,
/// and the limit is in force.
#[test]
fn real_groups_hold_processes_and_are_removed_with_them() {
    let root = Path::new("/sys/fs/cgroup");
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to create cgroups");
        return;
    }
    let worker = format!("unit-test-{}", std::process::id());
    let cgroups = match Cgroups::setup(root, &worker) {
        Ok(c) => c,
        Err(e) => panic!("root but no usable cgroups: {e}"),
    };
    let limits = Limits {
        memory_bytes: Some(32 << 20),
        pids: Some(8),
        ..Limits::default()
    };
    let isolation = cgroups.isolation();
    assert!(
        isolation.contains("memory") && isolation.contains("pids") && isolation.contains("cpu"),
        "{isolation}"
    );
    let group = cgroups
        .command("s", &Limits::default(), "c", &limits)
        .expect("group");
    if let Some(memory) = &group.memory
        && group.version == Version::V1
    {
        assert_eq!(
            read(memory.join("memory.limit_in_bytes")).trim(),
            "33554432"
        );
        let memsw = memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            assert_eq!(read(memsw).trim(), "33554432", "swap off");
        }
    }
    if let Some(pids) = &group.pids {
        assert_eq!(read(pids.join("pids.max")).trim(), "8");
    }
    let mut child = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("sleep");
    group.add(child.id()).expect("add");
    let procs_file = group.dirs()[0].join("cgroup.procs");
    assert!(read(procs_file).contains(&child.id().to_string()));
    cgroups.remove_session("s").expect("remove");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "killed with its group");
    assert!(!group.exists());
    cgroups.base.remove().expect("cleanup");
}

#[test]
fn v2_enables_the_controllers_down_the_tree_and_writes_unified_files() {
    let root = tempfile::tempdir().expect("tempdir");
    fs::write(
        root.path().join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids rdma\n",
    )
    .expect("controllers");
    let cgroups = Cgroups::setup(root.path(), "w1").expect("setup");
    assert!(
        cgroups.isolation().starts_with("cgroup-v2:memory"),
        "{}",
        cgroups.isolation()
    );
    for dir in ["", "heist", "heist/w1"] {
        assert_eq!(
            read(root.path().join(dir).join("cgroup.subtree_control")),
            "+memory +pids +cpu",
            "{dir}"
        );
    }
    let limits = Limits {
        memory_bytes: Some(1 << 30),
        pids: Some(64),
        cpu_weight: Some(200),
        cpu_percent: Some(50),
    };
    cgroups.session("s1", &limits).expect("session");
    let at = |file: &str| read(root.path().join("heist/w1/s1").join(file));
    assert_eq!(at("memory.max"), "1073741824");
    assert_eq!(at("memory.swap.max"), "0");
    assert_eq!(at("memory.oom.group"), "1");
    assert_eq!(at("pids.max"), "64");
    assert_eq!(at("cpu.weight"), "200");
    assert_eq!(at("cpu.max"), "50000 100000");
    assert_eq!(
        at("cgroup.subtree_control"),
        "+memory +pids +cpu",
        "commands nest inside"
    );
}
