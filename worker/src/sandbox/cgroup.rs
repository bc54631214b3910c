//! Control groups for sessions and commands: memory (hard limit, no swap), pids and CPU, under
//! a subtree the worker owns, `<root>/heist/<worker id>/<session>/<command>` (per controller
//! hierarchy on cgroup v1, one tree on cgroup v2).
//!
//! - The session cgroup carries the session's limits (HEIST_QUOTA_SESSION_*), so the sum of
//!   everything a session runs at once is bounded, whatever each process does.
//! - Each command gets its own cgroup inside it with the per-command limits. The worker moves
//!   the `heist-sandbox` helper into it before sending the command's spec (the helper waits for
//!   the spec before doing anything), so every process of the command starts inside it.
//! - After the command, its memory events tell whether the kernel OOM-killed something in it,
//!   and which limit was hit; the group is then emptied (SIGKILL) and removed.
//! - At start-up the worker removes what a crashed predecessor with the same id left behind.
//!
//! Both layouts are supported: cgroup v2 (`cgroup.controllers` at the root; the controllers are
//! enabled down the subtree) and cgroup v1 (`memory`, `pids` and `cpu` hierarchies mounted
//! under the root). What could be set up is reported in the worker's isolation list.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tracing::{debug, warn};

/// How long removing a cgroup waits for its killed processes to leave it.
const REMOVE_WAIT: Duration = Duration::from_secs(5);
/// CFS period used for CPU quotas, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup version the host uses for our controllers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Separate hierarchies per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// Limits written to one cgroup; `None` leaves a controller unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory hard limit in bytes (swap is limited to nothing on top).
    pub memory_bytes: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<u64>,
    /// Relative CPU weight (1-10000, 100 is the default share).
    pub cpu_weight: Option<u64>,
    /// CPU time per wall-clock time in percent of one core (100 = one core).
    pub cpu_percent: Option<u64>,
}

/// One cgroup: its directory in each controller's hierarchy (the same directory for all on v2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    version: Version,
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
}

/// The worker's cgroup subtree.
#[derive(Clone, Debug)]
pub struct Cgroups {
    base: Group,
    swap_limited: bool,
}

impl Cgroups {
    /// Finds the controllers under `root` (normally `/sys/fs/cgroup`), removes what an earlier
    /// worker with the same id left in `heist/<worker>` and creates it afresh. Fails when no
    /// controller can be used (no cgroup file system, not writable, v2 without delegation).
    pub fn setup(root: &Path, worker: &str) -> Result<Self, String> {
        let base = if root.join("cgroup.controllers").is_file() {
            setup_v2(root, worker)?
        } else {
            setup_v1(root, worker)?
        };
        let swap_file = match base.version {
            Version::V1 => "memory.memsw.limit_in_bytes",
            Version::V2 => "memory.swap.max",
        };
        // The base (`heist/<worker>`) or, on v1, the hierarchy's root has it when the kernel
        // accounts swap (v2's root cgroup has no swap file).
        let swap_limited = base
            .memory
            .as_ref()
            .is_some_and(|dir| dir.ancestors().take(3).any(|d| d.join(swap_file).exists()));
        Ok(Self { base, swap_limited })
    }

    /// What is enforced, for the worker's isolation list, e.g. `cgroup-v1:memory,pids,cpu`.
    pub fn isolation(&self) -> String {
        let version = match self.base.version {
            Version::V1 => "v1",
            Version::V2 => "v2",
        };
        let mut controllers = Vec::new();
        if self.base.memory.is_some() {
            controllers.push(if self.swap_limited {
                "memory"
            } else {
                "memory(swap-unlimited)"
            });
        }
        if self.base.pids.is_some() {
            controllers.push("pids");
        }
        if self.base.cpu.is_some() {
            controllers.push("cpu");
        }
        format!("cgroup-{version}:{}", controllers.join(","))
    }

    /// Creates (or updates) the session's cgroup with `limits`.
    pub fn session(&self, session: &str, limits: &Limits) -> io::Result<Group> {
        let group = self.base.child(session);
        group.create(true)?;
        group.apply(limits)?;
        Ok(group)
    }

    /// Creates the cgroup of one command inside its session's (created if missing).
    pub fn command(
        &self,
        session: &str,
        session_limits: &Limits,
        command: &str,
        limits: &Limits,
    ) -> io::Result<Group> {
        let session_group = self.base.child(session);
        if !session_group.exists() {
            self.session(session, session_limits)?;
        }
        let group = session_group.child(command);
        group.create(false)?;
        if let Err(err) = group.apply(limits) {
            let _ = group.remove();
            return Err(err);
        }
        Ok(group)
    }

    /// Kills whatever still runs in the worker's subtree and removes it.
    pub fn remove_all(&self) -> io::Result<()> {
        self.base.remove()
    }

    /// Kills whatever still runs in the session's cgroup and removes it with its commands'.
    pub fn remove_session(&self, session: &str) -> io::Result<()> {
        self.base.child(session).remove()
    }
}

impl Group {
    fn dirs(&self) -> Vec<&PathBuf> {
        let mut dirs: Vec<&PathBuf> = Vec::new();
        for dir in [&self.memory, &self.pids, &self.cpu].into_iter().flatten() {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs
    }

    fn child(&self, name: &str) -> Self {
        let join = |dir: &Option<PathBuf>| dir.as_ref().map(|d| d.join(name));
        Self {
            version: self.version,
            memory: join(&self.memory),
            pids: join(&self.pids),
            cpu: join(&self.cpu),
        }
    }

    fn exists(&self) -> bool {
        self.dirs().iter().all(|d| d.is_dir())
    }

    /// Creates the directories; on v2 with `parent`, enables the controllers for children.
    fn create(&self, parent: bool) -> io::Result<()> {
        for dir in self.dirs() {
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(err),
            }
        }
        if parent && self.version == Version::V2 {
            self.enable_children()?;
        }
        Ok(())
    }

    fn enable_children(&self) -> io::Result<()> {
        let Some(dir) = self.dirs().first().map(|d| (*d).clone()) else {
            return Ok(());
        };
        let mut wanted = Vec::new();
        if self.memory.is_some() {
            wanted.push("+memory");
        }
        if self.pids.is_some() {
            wanted.push("+pids");
        }
        if self.cpu.is_some() {
            wanted.push("+cpu");
        }
        fs::write(dir.join("cgroup.subtree_control"), wanted.join(" "))
    }

    /// Writes `limits` into the controllers' files.
    pub fn apply(&self, limits: &Limits) -> io::Result<()> {
        if let (Some(dir), Some(bytes)) = (&self.memory, limits.memory_bytes) {
            match self.version {
                Version::V1 => {
                    // memsw (memory + swap) may never be below the memory limit: a fresh group
                    // has both unlimited, so memory first, then memsw equal to it (no swap).
                    write_lowering(
                        dir,
                        "memory.limit_in_bytes",
                        "memory.memsw.limit_in_bytes",
                        bytes,
                    )?;
                }
                Version::V2 => {
                    fs::write(dir.join("memory.max"), bytes.to_string())?;
                    write_if_present(&dir.join("memory.swap.max"), "0")?;
                    // An OOM kill takes the whole group (command), not one process of it.
                    write_if_present(&dir.join("memory.oom.group"), "1")?;
                }
            }
        }
        if let (Some(dir), Some(pids)) = (&self.pids, limits.pids) {
            fs::write(dir.join("pids.max"), pids.to_string())?;
        }
        if let Some(dir) = &self.cpu {
            if let Some(weight) = limits.cpu_weight {
                match self.version {
                    Version::V1 => fs::write(
                        dir.join("cpu.shares"),
                        (weight.saturating_mul(1024) / 100).max(2).to_string(),
                    )?,
                    Version::V2 => fs::write(dir.join("cpu.weight"), weight.to_string())?,
                }
            }
            if let Some(percent) = limits.cpu_percent {
                let quota = percent.saturating_mul(CPU_PERIOD_US) / 100;
                match self.version {
                    Version::V1 => {
                        fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                        fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
                    }
                    Version::V2 => {
                        fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (and so its future children) into this group.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        for dir in self.dirs() {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// The file listing the group's processes (`None` for a group without controllers).
    pub fn procs_file(&self) -> Option<PathBuf> {
        self.dirs().first().map(|d| d.join("cgroup.procs"))
    }

    /// Memory counters now: (OOM kills in this group, times its own limit was hit).
    pub fn memory_events(&self) -> MemoryEvents {
        let Some(dir) = &self.memory else {
            return MemoryEvents::default();
        };
        let read = |file: &str| fs::read_to_string(dir.join(file)).unwrap_or_default();
        match self.version {
            Version::V1 => MemoryEvents {
                oom_kills: keyed(&read("memory.oom_control"), "oom_kill"),
                peak_bytes: read("memory.max_usage_in_bytes").trim().parse().ok(),
                // A charge checks memory+swap first when swap is accounted: either may fail.
                limit_hits: ["memory.failcnt", "memory.memsw.failcnt"]
                    .iter()
                    .map(|f| read(f).trim().parse::<u64>().unwrap_or(0))
                    .sum(),
            },
            Version::V2 => {
                let local = read("memory.events.local");
                let events = if local.is_empty() {
                    read("memory.events")
                } else {
                    local
                };
                MemoryEvents {
                    oom_kills: keyed(&events, "oom_kill"),
                    limit_hits: keyed(&events, "max"),
                    peak_bytes: read("memory.peak").trim().parse().ok(),
                }
            }
        }
    }

    /// SIGKILLs everything in this group and its children, waits for them to leave and
    /// removes the directories (children first). A group that is already gone is fine.
    pub fn remove(&self) -> io::Result<()> {
        for dir in self.dirs() {
            remove_tree(dir, self.version)?;
        }
        Ok(())
    }
}

/// Memory event counters of one cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    /// Processes the kernel's OOM killer killed in the group.
    pub oom_kills: u64,
    /// Times an allocation hit the group's own limit (recent v1 kernels no longer count
    /// this: use `peak_bytes` there).
    pub limit_hits: u64,
    /// Highest memory use of the group so far, where the kernel reports it.
    pub peak_bytes: Option<u64>,
}

/// `value` of the `key value` line in a flat-keyed cgroup file.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Writes a v1 memory limit and the memory+swap limit equal to it (when the kernel has swap
/// accounting), in the order the kernel accepts whether the limit goes up or down.
fn write_lowering(dir: &Path, memory: &str, memsw: &str, bytes: u64) -> io::Result<()> {
    let value = bytes.to_string();
    let memsw = dir.join(memsw);
    if !memsw.exists() {
        return fs::write(dir.join(memory), value);
    }
    if fs::write(dir.join(memory), &value).is_err() {
        // Raising: memsw first.
        fs::write(&memsw, &value)?;
        return fs::write(dir.join(memory), &value);
    }
    fs::write(&memsw, value)
}

fn write_if_present(file: &Path, value: &str) -> io::Result<()> {
    match fs::write(file, value) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Kills the processes of `dir` and its sub-groups, then removes them deepest first.
fn remove_tree(dir: &Path, version: Version) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path(), version)?;
        }
    }
    let deadline = Instant::now() + REMOVE_WAIT;
    loop {
        kill_all(dir, version);
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            // EBUSY: processes are still leaving (a killed process takes a moment to exit).
            Err(err) if Instant::now() < deadline => {
                debug!(cgroup = %dir.display(), error = %err, "cgroup not empty yet");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => {
                warn!(cgroup = %dir.display(), error = %err, "cannot remove cgroup");
                return Err(err);
            }
        }
    }
}

/// SIGKILLs every process in the group `dir` (not its children).
fn kill_all(dir: &Path, version: Version) {
    if version == Version::V2 && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// cgroup v1: the `memory`, `pids` and `cpu` hierarchies that are mounted and writable.
fn setup_v1(root: &Path, worker: &str) -> Result<Group, String> {
    let usable = |controller: &str, probe: &str| {
        let dir = root.join(controller);
        dir.join(probe)
            .is_file()
            .then(|| dir.join("heist").join(worker))
    };
    let group = Group {
        version: Version::V1,
        memory: usable("memory", "memory.limit_in_bytes"),
        // The root of the pids hierarchy has no pids.* files.
        pids: usable("pids", "cgroup.procs"),
        cpu: usable("cpu", "cpu.shares"),
    };
    if group.dirs().is_empty() {
        return Err(format!(
            "no cgroup controller found under {} (neither cgroup v2 nor v1 memory, pids or cpu \
             hierarchies are mounted there)",
            root.display()
        ));
    }
    start_fresh(group)
}

/// cgroup v2: enables memory, pids and cpu down to `heist/<worker>`.
fn setup_v2(root: &Path, worker: &str) -> Result<Group, String> {
    let available = fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("cannot read {}/cgroup.controllers: {e}", root.display()))?;
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    let heist = root.join("heist");
    let base = heist.join(worker);
    let pick = |c: &str| has(c).then(|| base.clone());
    let group = Group {
        version: Version::V2,
        memory: pick("memory"),
        pids: pick("pids"),
        cpu: pick("cpu"),
    };
    if group.dirs().is_empty() {
        return Err(format!(
            "cgroup v2 at {} offers none of memory, pids, cpu",
            root.display()
        ));
    }
    let at = |dir: &Path| Group {
        version: Version::V2,
        memory: group.memory.as_ref().map(|_| dir.to_path_buf()),
        pids: group.pids.as_ref().map(|_| dir.to_path_buf()),
        cpu: group.cpu.as_ref().map(|_| dir.to_path_buf()),
    };
    let delegate = |dir: &Path| {
        at(dir).create(true).map_err(|e| {
            format!(
                "cannot enable the memory, pids and cpu controllers in {} ({e}): the worker \
                 needs a delegated cgroup v2 subtree (run it as root on the host, or give its \
                 container a writable cgroup namespace)",
                dir.display()
            )
        })
    };
    delegate(root)?;
    delegate(&heist)?;
    start_fresh(group)
}

/// Removes what a previous worker with this id left, and creates the base groups again.
fn start_fresh(group: Group) -> Result<Group, String> {
    group
        .remove()
        .map_err(|e| format!("cannot remove stale cgroups of this worker: {e}"))?;
    for dir in group.dirs() {
        fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
    }
    if group.version == Version::V2 {
        group.enable_children().map_err(|e| {
            format!(
                "cannot enable controllers in {}: {e}",
                group
                    .dirs()
                    .first()
                    .map_or_else(String::new, |d| d.display().to_string())
            )
        })?;
    }
    Ok(group)
}

#[cfg(test)]
mod tests;
