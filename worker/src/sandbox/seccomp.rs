//! The command's seccomp filter, built with `seccompiler` (no hand-written BPF). It denies
//! system calls a command has no use for and that widen the kernel's attack surface or undo
//! the other layers: io_uring, bpf, perf events, userfaultfd, the keyring, the whole mount
//! family, ptrace, kernel modules, kexec, reboot, swap, `setns`, new namespaces through
//! `unshare`/`clone`, and sockets other than AF_UNIX (the command has no network). A denied
//! call fails with EPERM, so programs get a clean error instead of dying; `clone3` fails with
//! ENOSYS (its flags are in memory where a filter cannot read them), so libc falls back to
//! `clone`, whose flags are checked. The filter is installed last, right before exec.

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::confine::StepError;

/// Calls denied whatever their arguments.
const DENIED: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_open_by_handle_at,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_setns,
];

/// Namespace flags `clone` and `unshare` may not carry (CLONE_NEWTIME shares its bit with the
/// exit signal in `clone`, so it is checked for `unshare` only).
const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];
/// CLONE_NEWTIME (not in every libc).
const CLONE_NEWTIME: u64 = 0x80;

fn failed(e: impl std::fmt::Display) -> StepError {
    StepError {
        stage: "seccomp",
        error: format!("cannot build the seccomp filter: {e}"),
    }
}

fn arch() -> Result<TargetArch, StepError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|_| {
        failed(format!(
            "no seccomp filter for {} (x86_64, aarch64 and riscv64 are supported)",
            std::env::consts::ARCH
        ))
    })
}

/// A rule matching when `(arg & flag) == flag`.
fn has_flag(arg: u8, flag: u64) -> Result<SeccompRule, StepError> {
    let cond = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(flag),
        flag,
    )
    .map_err(failed)?;
    SeccompRule::new(vec![cond]).map_err(failed)
}

/// The two programs: the EPERM filter and the one that makes `clone3` ENOSYS.
pub fn programs() -> Result<[BpfProgram; 2], StepError> {
    let arch = arch()?;
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|nr| (*nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| has_flag(0, *flag))
        .collect::<Result<Vec<_>, _>>()?;
    let mut unshare_rules = clone_rules.clone();
    unshare_rules.push(has_flag(0, CLONE_NEWTIME)?);
    deny.insert(libc::SYS_clone, clone_rules);
    deny.insert(libc::SYS_unshare, unshare_rules);
    let not_unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Ne,
        libc::AF_UNIX as u64,
    )
    .map_err(failed)?;
    deny.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![not_unix]).map_err(failed)?],
    );
    let eperm = SeccompFilter::new(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(failed)?;
    let enosys = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(failed)?;
    Ok([
        eperm.try_into().map_err(failed)?,
        enosys.try_into().map_err(failed)?,
    ])
}

/// Installs the filters on this thread (and what it executes); sets no_new_privs first.
pub fn install(programs: &[BpfProgram; 2]) -> Result<(), StepError> {
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| StepError {
            stage: "seccomp",
            error: format!("cannot install the seccomp filter (Linux 3.5+ with seccomp): {e}"),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_machine() {
        let [eperm, enosys] = programs().expect("filters");
        assert!(eperm.len() > DENIED.len());
        assert!(!enosys.is_empty());
    }
}
