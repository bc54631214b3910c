//! The confinement steps applied before the command starts (it inherits all of them):
//! namespaces (by the helper), then rlimits, capabilities, no_new_privs and Landlock (by the
//! command's first process, see `init`).

use std::path::{Path, PathBuf};

use caps::CapSet;
use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, LandlockStatus,
    PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
    sys::resource::{Resource, setrlimit},
    unistd::{Gid, Uid, geteuid, setgroups, sethostname, setresgid, setresuid},
};

use super::protocol::{Confinement, Rlimits};

/// The Landlock rules of a command, as paths inside its own root.
#[derive(Debug)]
pub struct Rules {
    /// Read, write and execute beneath these (the workspace, /tmp).
    pub read_write: Vec<PathBuf>,
    /// Read and execute beneath these (system paths, /etc, /proc, the job's extra paths).
    pub read_only: Vec<PathBuf>,
    /// Read and write these device files.
    pub devices: Vec<PathBuf>,
}

/// The Landlock ABI whose rights the sandbox asks for (Linux 6.12: filesystem incl. truncate
/// and device ioctl, TCP bind/connect, signal and abstract-socket scoping). Older kernels get
/// the subset they support; a kernel with no Landlock at all is refused.
const LANDLOCK_ABI: ABI = ABI::V6;

/// Slack added to RLIMIT_NPROC for the helper itself, which counts in the same user namespace
/// as the command.
pub const HELPER_TASKS: u64 = 1;

/// A step that failed: which one, and why.
#[derive(Debug)]
pub struct StepError {
    /// Short name of the step.
    pub stage: &'static str,
    /// What went wrong, for the operator.
    pub error: String,
}

fn failed(stage: &'static str, error: impl Into<String>) -> StepError {
    StepError {
        stage,
        error: error.into(),
    }
}

/// New user, mount, pid, network, IPC and UTS namespaces for this (single-threaded) process.
/// A root helper first drops its supplementary groups, which would otherwise follow it in.
pub fn unshare_all() -> Result<(), StepError> {
    if geteuid().is_root() {
        setgroups(&[]).map_err(|e| failed("setgroups", format!("setgroups([]) failed: {e}")))?;
    }
    let flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    unshare(flags).map_err(|e| {
        failed(
            "unshare",
            format!(
                "cannot create user, mount, pid and network namespaces ({e}): unprivileged user \
                 namespaces may be disabled (sysctl kernel.unprivileged_userns_clone, \
                 user.max_user_namespaces, kernel.apparmor_restrict_unprivileged_userns) or \
                 blocked by a seccomp profile (a container needs --security-opt seccomp=unconfined \
                 or a profile allowing unshare)"
            ),
        )
    })
}

/// After the worker wrote the maps: become uid/gid 0 of the namespace (an unprivileged user
/// outside it), make every mount private, and set the host name.
pub fn settle_in(confine: &Confinement) -> Result<(), StepError> {
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    setresgid(root_gid, root_gid, root_gid).map_err(|e| {
        failed(
            "setresgid",
            format!("cannot switch to the sandbox group: {e}"),
        )
    })?;
    setresuid(root_uid, root_uid, root_uid).map_err(|e| {
        failed(
            "setresuid",
            format!("cannot switch to the sandbox user: {e}"),
        )
    })?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| failed("mount", format!("cannot make mounts private: {e}")))?;
    sethostname(&confine.hostname)
        .map_err(|e| failed("sethostname", format!("cannot set the host name: {e}")))?;
    Ok(())
}

/// Applies the rlimits; `nproc` is false in unconfined mode, where RLIMIT_NPROC would count
/// every process of the worker's user rather than the command's.
pub fn apply_rlimits(limits: &Rlimits, nproc: bool) -> Result<(), StepError> {
    let set = |resource, soft: u64, hard: u64, name: &str| {
        setrlimit(resource, soft, hard)
            .map_err(|e| failed("setrlimit", format!("cannot set {name}: {e}")))
    };
    set(
        Resource::RLIMIT_CPU,
        limits.cpu_seconds,
        limits.cpu_seconds.saturating_add(1),
        "RLIMIT_CPU",
    )?;
    set(
        Resource::RLIMIT_AS,
        limits.address_space,
        limits.address_space,
        "RLIMIT_AS",
    )?;
    set(
        Resource::RLIMIT_NOFILE,
        limits.open_files,
        limits.open_files,
        "RLIMIT_NOFILE",
    )?;
    set(
        Resource::RLIMIT_FSIZE,
        limits.file_size,
        limits.file_size,
        "RLIMIT_FSIZE",
    )?;
    set(Resource::RLIMIT_CORE, 0, 0, "RLIMIT_CORE")?;
    if nproc {
        let n = limits.processes.saturating_add(HELPER_TASKS);
        set(Resource::RLIMIT_NPROC, n, n, "RLIMIT_NPROC")?;
    }
    Ok(())
}

/// Empties the capability bounding set and the inheritable and ambient sets, so the command
/// (uid 0 of its namespace, which holds no host id but its own) starts with no capabilities
/// at all: exec recomputes its permitted and effective sets from the empty bounding set.
pub fn drop_capabilities() -> Result<(), StepError> {
    for cap in caps::all() {
        if caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| failed("capabilities", format!("cannot drop {cap}: {e}")))?;
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(|e| {
        failed(
            "capabilities",
            format!("cannot clear inheritable caps: {e}"),
        )
    })?;
    caps::clear(None, CapSet::Ambient)
        .map_err(|e| failed("capabilities", format!("cannot clear ambient caps: {e}")))?;
    Ok(())
}

/// Restricts this thread (and what it spawns) with Landlock: read-write beneath `read_write`,
/// read and execute beneath `read_only`, read-write on `devices`, nothing else; no TCP bind or
/// connect; no signals or abstract sockets outside the sandbox (ABI 6+). Returns the ABI in
/// force.
pub fn landlock(rules: &Rules) -> Result<i32, StepError> {
    let ll = |e: landlock::RulesetError| failed("landlock", format!("cannot set up Landlock: {e}"));
    let abi = LANDLOCK_ABI;
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    let write_all = all & !(AccessFs::MakeChar | AccessFs::MakeBlock);
    let device = AccessFs::from_file(abi) & !AccessFs::Execute;

    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(ll)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(ll)?
        .scope(Scope::from_all(abi))
        .map_err(ll)?
        .create()
        .map_err(ll)?;
    let groups: [(&[std::path::PathBuf], BitFlags<AccessFs>); 3] = [
        (&rules.read_write, write_all),
        (&rules.read_only, read),
        (&rules.devices, device),
    ];
    for (paths, access) in groups {
        for path in paths {
            let Some(rule) = rule_for(path, access, abi)? else {
                continue;
            };
            ruleset = ruleset.add_rule(rule).map_err(ll)?;
        }
    }
    let status = ruleset.restrict_self().map_err(ll)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(failed(
            "landlock",
            "Landlock is not enforced on this kernel (it needs Linux 5.13+ with landlock in the \
             lsm= boot list)",
        ));
    }
    match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => Ok(effective_abi as i32),
        _ => Err(failed(
            "landlock",
            "Landlock is not available on this kernel",
        )),
    }
}

/// A rule for `path` (files get only the file rights); `None` when the path does not exist.
fn rule_for(
    path: &Path,
    access: BitFlags<AccessFs>,
    abi: ABI,
) -> Result<Option<PathBeneath<PathFd>>, StepError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(failed(
                "landlock",
                format!("cannot open {}: {err}", path.display()),
            ));
        }
    };
    let access = if meta.is_dir() {
        access
    } else {
        access & AccessFs::from_file(abi)
    };
    let fd = PathFd::new(path).map_err(|e| {
        failed(
            "landlock",
            format!("cannot open {} for a rule: {e}", path.display()),
        )
    })?;
    Ok(Some(PathBeneath::new(fd, access)))
}
