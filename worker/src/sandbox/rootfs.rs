//! The command's minimal root (in the helper's new mount namespace), built the way bubblewrap
//! does: a tmpfs becomes the root of the namespace with the host's root beneath it at
//! `/oldroot`, and the command's root is assembled at `/newroot` from read-only binds of the
//! system paths, a small `/etc` written here, the device nodes, a private `/tmp` and the
//! workspace at [`WORKSPACE`]. The helper builds it ([`build`]); the command's first process,
//! inside the new pid namespace, mounts a fresh `/proc`, pivots into `/newroot` and detaches
//! everything else ([`enter`]): host sockets, `/run`, `/var`, `/home`, other sessions and the
//! worker's data are then not in its view at all.

use std::{
    os::fd::OwnedFd,
    path::{Component, Path, PathBuf},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::statvfs::{FsFlags, statvfs},
    unistd::{chdir, pivot_root},
};
use rustix::{
    fs::CWD,
    mount::{MoveMountFlags, move_mount},
};

use super::{
    confine::StepError,
    protocol::{Confinement, WORKSPACE},
};

/// Where the command's root is assembled (in the staging tmpfs).
const NEW_ROOT: &str = "/newroot";
/// Where the host's root stays while the command's root is assembled.
const OLD_ROOT: &str = "/oldroot";
/// Size of the command's root tmpfs, which holds only directories, symlinks and `/etc`.
const ROOT_BYTES: u64 = 1 << 20;
/// Device symlinks into /proc that programs expect.
const DEV_LINKS: [(&str, &str); 4] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];
/// `/etc/passwd` of the command: it is uid 0 of its namespace, named `sandbox`.
const PASSWD: &str = "sandbox:x:0:0:sandbox:/workspace:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
/// `/etc/group` of the command.
const GROUP: &str = "sandbox:x:0:\nnogroup:x:65534:\n";
/// `/etc/hosts` of the command (its loopback interface is down; names still resolve).
const HOSTS: &str = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost\n";

/// Where a system path or device comes from.
#[derive(Debug)]
pub enum Source {
    /// A symlink on the host (e.g. a merged-/usr `/bin`): recreated as the same symlink.
    Link(PathBuf),
    /// A clone of the host's mount, taken while the helper was still host root (before its
    /// namespaces existed), so it can reach paths the sandbox user cannot (a Python beneath
    /// `/root`).
    Tree {
        /// The detached mount.
        fd: OwnedFd,
        /// Whether it is a directory.
        dir: bool,
    },
    /// Bound by path from beneath [`OLD_ROOT`] (a helper that never was root).
    Path,
}

/// The system paths and devices with their sources; missing paths are left out.
#[derive(Debug, Default)]
pub struct Sources {
    system: Vec<(PathBuf, Source)>,
    devices: Vec<(PathBuf, Source)>,
}

/// Collects the sources, before the helper leaves the host's namespaces: a root helper clones
/// each mount (`open_tree`), another helper binds by path later.
pub fn sources(confine: &Confinement) -> Result<Sources, StepError> {
    let root = nix::unistd::geteuid().is_root();
    let source = |path: &PathBuf| -> Result<Option<(PathBuf, Source)>, StepError> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("rootfs", "cannot look at", path, e)),
        };
        let source = if meta.file_type().is_symlink() {
            Source::Link(
                std::fs::read_link(path).map_err(|e| io("rootfs", "cannot read", path, e))?,
            )
        } else if root {
            let fd = rustix::mount::open_tree(
                CWD,
                path,
                rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
                    | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC
                    | rustix::mount::OpenTreeFlags::AT_RECURSIVE,
            )
            .map_err(|e| io("rootfs", "cannot clone the mount of", path, e))?;
            Source::Tree {
                fd,
                dir: meta.is_dir(),
            }
        } else {
            Source::Path
        };
        Ok(Some((path.clone(), source)))
    };
    let collect = |paths: &[PathBuf]| -> Result<Vec<_>, StepError> {
        Ok(paths
            .iter()
            .map(source)
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect())
    };
    Ok(Sources {
        system: collect(&confine.system)?,
        devices: collect(&confine.devices)?,
    })
}

fn failed(stage: &'static str, error: impl Into<String>) -> StepError {
    StepError {
        stage,
        error: error.into(),
    }
}

/// `path` beneath `base` (`path` is absolute).
fn under(base: &str, path: &Path) -> PathBuf {
    let rel: PathBuf = path
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    Path::new(base).join(rel)
}

fn io(stage: &'static str, what: &str, path: &Path, e: impl std::fmt::Display) -> StepError {
    failed(stage, format!("{what} {}: {e}", path.display()))
}

fn mount_tmpfs(target: &Path, bytes: u64, mode: &str) -> Result<(), StepError> {
    let data = format!("size={bytes},mode={mode}");
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| io("rootfs", "cannot mount a tmpfs on", target, e))
}

/// Builds the command's root: called by the helper after it settled into its namespaces.
/// `mounts` are the worker's id-mapped mounts of the workspace and the extra paths (empty
/// when those are bound by path).
pub fn build(
    confine: &Confinement,
    sources: Sources,
    mounts: Vec<OwnedFd>,
) -> Result<(), StepError> {
    // The staging root: a tmpfs over /tmp of this (private) mount namespace.
    let staging = Path::new("/tmp");
    mount_tmpfs(staging, ROOT_BYTES, "0755")?;
    for dir in [NEW_ROOT, OLD_ROOT] {
        let dir = under("/tmp", Path::new(dir));
        std::fs::create_dir(&dir).map_err(|e| io("rootfs", "cannot create", &dir, e))?;
    }
    pivot_root(staging, &under("/tmp", Path::new(OLD_ROOT))).map_err(|e| {
        failed(
            "pivot_root",
            format!("cannot pivot into the staging root: {e}"),
        )
    })?;
    chdir("/").map_err(|e| failed("rootfs", format!("cannot enter the staging root: {e}")))?;
    mount_tmpfs(Path::new(NEW_ROOT), ROOT_BYTES, "0755")?;

    for (path, source) in sources.system {
        bind_host(&path, source, true)?;
    }
    let etc = under(NEW_ROOT, Path::new("/etc"));
    std::fs::create_dir_all(&etc).map_err(|e| io("rootfs", "cannot create", &etc, e))?;
    for (name, text) in [
        ("passwd", PASSWD),
        ("group", GROUP),
        ("hosts", HOSTS),
        ("hostname", "sandbox\n"),
    ] {
        let file = etc.join(name);
        std::fs::write(&file, text).map_err(|e| io("rootfs", "cannot write", &file, e))?;
    }
    let dev = under(NEW_ROOT, Path::new("/dev"));
    std::fs::create_dir_all(&dev).map_err(|e| io("rootfs", "cannot create", &dev, e))?;
    for (path, source) in sources.devices {
        bind_host(&path, source, false)?;
    }
    for (name, target) in DEV_LINKS {
        let link = dev.join(name);
        std::os::unix::fs::symlink(target, &link)
            .map_err(|e| io("rootfs", "cannot create", &link, e))?;
    }
    for dir in ["/proc", "/tmp", WORKSPACE] {
        let dir = under(NEW_ROOT, Path::new(dir));
        std::fs::create_dir_all(&dir).map_err(|e| io("rootfs", "cannot create", &dir, e))?;
    }
    mount_tmpfs(
        &under(NEW_ROOT, Path::new("/tmp")),
        confine.tmp_bytes,
        "1777",
    )?;

    // The workspace, then the extra paths (which may lie under the private /tmp).
    let targets = std::iter::once((confine.workspace.as_path(), Path::new(WORKSPACE), false))
        .chain(
            confine
                .extra
                .iter()
                .map(|p| (p.as_path(), p.as_path(), true)),
        );
    if confine.idmapped {
        if mounts.len() != 1 + confine.extra.len() {
            return Err(failed(
                "rootfs",
                format!(
                    "the worker sent {} mounts for {} paths",
                    mounts.len(),
                    1 + confine.extra.len()
                ),
            ));
        }
        for ((_, inside, read_only), fd) in targets.zip(mounts) {
            let target = under(NEW_ROOT, inside);
            make_mount_point(&target, true)?;
            move_mount(
                &fd,
                "",
                CWD,
                &target,
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            )
            .map_err(|e| io("rootfs", "cannot attach the id-mapped mount at", inside, e))?;
            if read_only {
                remount_read_only(&target, &target)?;
            }
        }
    } else {
        for (host, inside, read_only) in targets {
            let source = under(OLD_ROOT, host);
            let target = under(NEW_ROOT, inside);
            make_mount_point(&target, source.is_dir())?;
            bind(&source, &target)?;
            if read_only {
                remount_read_only(&source, &target)?;
            }
        }
    }
    remount_read_only(Path::new(NEW_ROOT), Path::new(NEW_ROOT))
}

/// Puts host `path` at the same place in the new root (read-only when `read_only`).
fn bind_host(path: &Path, source: Source, read_only: bool) -> Result<(), StepError> {
    let target = under(NEW_ROOT, path);
    if target.symlink_metadata().is_ok() {
        // Already there through a parent (e.g. /usr/lib64 when /lib64 is a link into /usr).
        return Ok(());
    }
    match source {
        Source::Link(link) => {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| io("rootfs", "cannot create", parent, e))?;
            }
            std::os::unix::fs::symlink(&link, &target)
                .map_err(|e| io("rootfs", "cannot create", &target, e))
        }
        Source::Tree { fd, dir } => {
            make_mount_point(&target, dir)?;
            move_mount(
                &fd,
                "",
                CWD,
                &target,
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            )
            .map_err(|e| io("rootfs", "cannot attach the mount of", path, e))?;
            if read_only {
                remount_read_only(&target, &target)?;
            }
            Ok(())
        }
        Source::Path => {
            let source = under(OLD_ROOT, path);
            make_mount_point(&target, source.is_dir())?;
            bind(&source, &target)?;
            if read_only {
                remount_read_only(&source, &target)?;
            }
            Ok(())
        }
    }
}

fn make_mount_point(target: &Path, dir: bool) -> Result<(), StepError> {
    if dir {
        std::fs::create_dir_all(target).map_err(|e| io("rootfs", "cannot create", target, e))
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| io("rootfs", "cannot create", parent, e))?;
        }
        std::fs::File::create(target)
            .map(drop)
            .map_err(|e| io("rootfs", "cannot create", target, e))
    }
}

fn bind(source: &Path, target: &Path) -> Result<(), StepError> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        failed(
            "rootfs",
            format!(
                "cannot bind {} at {}: {e}",
                source.display(),
                target.display()
            ),
        )
    })
}

/// Remounts the bind at `target` read-only, nosuid and nodev, keeping the flags of `source`'s
/// mount that a user namespace may not clear (noexec, atime).
fn remount_read_only(source: &Path, target: &Path) -> Result<(), StepError> {
    let have = statvfs(source)
        .map_err(|e| io("rootfs", "cannot stat the mount of", source, e))?
        .flags();
    let mut flags = MsFlags::MS_REMOUNT
        | MsFlags::MS_BIND
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    for (fs, ms) in [
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.contains(fs) {
            flags |= ms;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| io("rootfs", "cannot make read-only", target, e))
}

/// In the command's first process (PID 1 of the new pid namespace): mounts a fresh /proc,
/// pivots into the new root and detaches the staging root with the host's beneath it.
pub fn enter() -> Result<(), StepError> {
    let proc = under(NEW_ROOT, Path::new("/proc"));
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| {
        failed(
            "proc",
            format!("cannot mount /proc for the pid namespace: {e}"),
        )
    })?;
    chdir(NEW_ROOT).map_err(|e| failed("pivot_root", format!("cannot enter the new root: {e}")))?;
    pivot_root(".", ".")
        .map_err(|e| failed("pivot_root", format!("cannot pivot into the new root: {e}")))?;
    umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| failed("pivot_root", format!("cannot detach the host's root: {e}")))?;
    chdir("/").map_err(|e| failed("pivot_root", format!("cannot enter the new root: {e}")))
}

/// A host path as the command sees it: beneath the workspace it moves to [`WORKSPACE`]; other
/// paths (system paths, extra paths) are where they were.
pub fn inside(workspace: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix(workspace) {
        Ok(rest) if rest.as_os_str().is_empty() => PathBuf::from(WORKSPACE),
        Ok(rest) => Path::new(WORKSPACE).join(rest),
        Err(_) => path.to_path_buf(),
    }
}

/// A string (an argv entry, an environment value) as the command sees it: a host path beneath
/// the workspace is translated by [`inside`]; anything else is unchanged.
pub fn translate(workspace: &Path, text: &str) -> String {
    let path = Path::new(text);
    if text.starts_with('/') && path.starts_with(workspace) {
        inside(workspace, path).display().to_string()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_paths_move_to_the_fixed_path_and_others_stay() {
        let ws = Path::new("/var/lib/heist/ws/s-1");
        assert_eq!(inside(ws, ws), PathBuf::from("/workspace"));
        assert_eq!(
            inside(ws, &ws.join("src/a.py")),
            PathBuf::from("/workspace/src/a.py")
        );
        assert_eq!(
            inside(ws, Path::new("/tmp/heist-run-x/main.py")),
            PathBuf::from("/tmp/heist-run-x/main.py")
        );
        assert_eq!(translate(ws, "/var/lib/heist/ws/s-1/x"), "/workspace/x");
        assert_eq!(
            translate(ws, "/var/lib/heist/ws/s-10"),
            "/var/lib/heist/ws/s-10"
        );
        assert_eq!(translate(ws, "-c"), "-c");
        assert_eq!(
            under("/newroot", Path::new("/usr/lib")),
            PathBuf::from("/newroot/usr/lib")
        );
    }
}
