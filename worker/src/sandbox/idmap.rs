//! Id-mapped workspace mounts (worker side). A worker running as root maps only the sandbox
//! user into a command's user namespace, so host root is not part of it; the root-owned
//! workspace would then be read-only to the command. Instead the worker clones the workspace
//! mount (`open_tree`), attaches the command's user namespace to the clone as its id mapping
//! (`mount_setattr(MOUNT_ATTR_IDMAP)`, which needs CAP_SYS_ADMIN on the host: only the worker
//! has it), and hands the clone to the helper over its socket (SCM_RIGHTS). Through that mount
//! files owned by host root appear owned by the command, and files it creates are stored as
//! owned by host root; nowhere else does the command hold any host identity.

use std::{
    fs::File,
    io::IoSlice,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use rustix::{
    fs::CWD,
    mount::{OpenTreeFlags, open_tree},
    net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg},
};
use tokio::io::Interest;

use super::protocol::MAX_EXTRA;
use crate::Error;

/// Clones of `paths` (each one mount), id-mapped through the user namespace of process `pid`.
pub fn clones(pid: u32, paths: &[&Path]) -> Result<Vec<OwnedFd>, Error> {
    if paths.len() > MAX_EXTRA + 1 {
        return Err(Error::Internal(format!(
            "a command may be given at most {MAX_EXTRA} read-only paths, not {}",
            paths.len() - 1
        )));
    }
    let userns = File::open(PathBuf::from(format!("/proc/{pid}/ns/user"))).map_err(|e| {
        Error::Internal(format!(
            "cannot open the sandbox's user namespace (/proc/{pid}/ns/user): {e}"
        ))
    })?;
    paths
        .iter()
        .map(|path| {
            let tree = open_tree(
                CWD,
                *path,
                OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
            )
            .map_err(|e| {
                Error::Internal(format!("cannot clone the mount of {}: {e}", path.display()))
            })?;
            composefs_ioctls::mount::mount_setattr_idmap(&tree, &userns).map_err(|e| {
                Error::Internal(format!(
                    "cannot id-map the mount of {} (idmapped mounts need Linux 5.12+ and a \
                     filesystem that supports them, e.g. ext4, xfs, btrfs, tmpfs 6.3+): {e}",
                    path.display()
                ))
            })?;
            Ok(tree)
        })
        .collect()
}

/// Writes `line` on the helper's socket with `fds` attached (SCM_RIGHTS).
pub async fn send(
    socket: &tokio::net::UnixStream,
    line: &[u8],
    fds: &[OwnedFd],
) -> Result<(), Error> {
    let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
    let failed = |e: std::io::Error| {
        Error::Internal(format!(
            "cannot hand the workspace mount to the sandbox helper: {e}"
        ))
    };
    loop {
        socket.writable().await.map_err(failed)?;
        let sent = socket.try_io(Interest::WRITABLE, || {
            let mut space =
                [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_EXTRA + 1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
                return Err(std::io::Error::other("too many descriptors"));
            }
            sendmsg(
                socket,
                &[IoSlice::new(line)],
                &mut control,
                SendFlags::empty(),
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) if n == line.len() => return Ok(()),
            Ok(n) => {
                return Err(Error::Internal(format!(
                    "short write to the sandbox helper ({n} of {} bytes)",
                    line.len()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(failed(e)),
        }
    }
}
