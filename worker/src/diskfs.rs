//! The file-system-enforced disk quota: every session's workspace is its own ext4 file system,
//! a sparse image file per session (`HEIST_DISK_IMAGE_DIR/<session>.img`, made with
//! `mkfs.ext4` from e2fsprogs) loop-mounted at `BASE_WORKSPACE/<session>` by util-linux's
//! `mount` (which sets up the loop device and frees it when the file system is unmounted).
//!
//! The kernel then refuses, with ENOSPC, any write past the file system's size: parallel
//! writers and files written after being unlinked are bounded like any other. The image holds
//! `HEIST_QUOTA_DISK_BYTES` of file content plus the file system's own metadata; the inode
//! count is `HEIST_QUOTA_FILES` (rounded up by mkfs to whole inode tables). What a session can
//! store is at most the quota plus [`slack`] (metadata estimate left over as free blocks).
//!
//! The mount is made before the workspace is opened as a directory capability (a `Dir` opened
//! before the mount would point at the covered directory): [`crate::sessions::Sessions`] mounts
//! on open and on adoption at start-up (an image whose mount is gone is mounted again) and
//! unmounts and deletes the image on close and evict. An open takes a file system made ahead
//! of time when the pool (`pool`, HEIST_DISK_POOL) has one, and formats its own otherwise.
//!
//! Mode (HEIST_DISK_QUOTA): `fs` requires this and fails start-up when the host cannot (not
//! root, no loop devices, no mkfs.ext4); `polling` never uses it; `auto` (the default) probes
//! once at start-up and falls back to the polled quota with a warning. The worker's isolation
//! list says which: `disk-quota:fs` or `disk-quota:polling`.

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use heist_proto::ids::SessionId;
use tracing::{info, warn};

use crate::{Error, quota::Quotas};

mod pool;

pub use pool::PoolSettings;

/// How the disk quota is enforced (HEIST_DISK_QUOTA / --disk-quota).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskQuotaMode {
    /// A file system per session where the host allows it, else polling (logged).
    #[default]
    Auto,
    /// A file system per session; the worker does not start without it.
    Fs,
    /// The workspace is measured while commands run (not a hard limit).
    Polling,
}

/// Bytes of inode table per file (mkfs.ext4's default inode size).
const INODE_BYTES: u64 = 256;
/// Free bytes below which a session's file system counts as full.
pub const FULL_BELOW: u64 = 1 << 20;
/// Fixed room for the superblock, group descriptors and the root directory.
const FIXED_BYTES: u64 = 8 << 20;

/// Bytes a session may store beyond HEIST_QUOTA_DISK_BYTES under the file-system quota: the
/// part of the metadata estimate the file system does not use (bitmaps are about 1/32768 of the
/// size; 1/64 of the quota plus 8 MiB is reserved for them, directories and extent blocks).
pub fn slack(disk_bytes: u64) -> u64 {
    disk_bytes / 64 + FIXED_BYTES
}

/// Size of a session's image file (sparse: only what is written takes host disk).
pub fn image_bytes(quotas: &Quotas) -> u64 {
    quotas
        .disk_bytes
        .saturating_add(slack(quotas.disk_bytes))
        .saturating_add(quotas.files.saturating_mul(INODE_BYTES))
}

/// Where the images live: HEIST_DISK_IMAGE_DIR, else `BASE_WORKSPACE/../disk-images`.
pub fn image_dir(config: &crate::Config) -> PathBuf {
    config.disk_image_dir.clone().unwrap_or_else(|| {
        let base = std::path::absolute(&config.base_workspace)
            .unwrap_or_else(|_| config.base_workspace.clone());
        base.parent()
            .map_or_else(|| base.join("disk-images"), |p| p.join("disk-images"))
    })
}

/// The directory of this worker's pool of ready file systems ([`PoolSettings::dir`]):
/// `HEIST_DISK_IMAGE_DIR/pool-<worker id>-<digest of BASE_WORKSPACE>`, so workers sharing the
/// image directory never touch each other's pool.
pub fn pool_dir(config: &crate::Config) -> PathBuf {
    let base = std::path::absolute(&config.base_workspace)
        .unwrap_or_else(|_| config.base_workspace.clone());
    image_dir(config).join(format!(
        "pool-{}",
        crate::sandbox::cgroup_name(&config.worker_id, &base)
    ))
}

/// Per-session file systems.
#[derive(Debug)]
pub struct DiskFs {
    images: PathBuf,
    image_bytes: u64,
    inodes: u64,
    /// File systems made ahead of time (none until [`DiskFs::with_pool`]).
    pool: pool::Pool,
}

impl DiskFs {
    /// Chooses the enforcement for `mode`: `Some` for per-session file systems (probed by
    /// making, mounting and removing one in `images`), `None` for polling.
    pub fn start(
        mode: DiskQuotaMode,
        images: &Path,
        quotas: &Quotas,
    ) -> Result<Option<Self>, Error> {
        if mode == DiskQuotaMode::Polling {
            return Ok(None);
        }
        let disk = Self {
            images: images.to_path_buf(),
            image_bytes: image_bytes(quotas),
            inodes: quotas.files,
            pool: pool::Pool::default(),
        };
        match disk.probe() {
            Ok(()) => {
                info!(images = %images.display(), image_bytes = disk.image_bytes, "disk quota: a file system per session");
                Ok(Some(disk))
            }
            Err(err) if mode == DiskQuotaMode::Auto => {
                warn!(error = %err, "disk quota: cannot make a file system per session here; \
                       falling back to polling the workspace (not a hard limit; set \
                       HEIST_DISK_QUOTA=polling to silence this)");
                Ok(None)
            }
            Err(err) => Err(Error::Config(format!(
                "HEIST_DISK_QUOTA=fs, but this host cannot give each session its own file \
                 system ({err}); it needs root, loop devices (/dev/loop-control), mkfs.ext4 \
                 (e2fsprogs) and mount (util-linux); or set HEIST_DISK_QUOTA=polling"
            ))),
        }
    }

    /// Makes, mounts and removes one small file system.
    fn probe(&self) -> Result<(), String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("the worker does not run as root".to_owned());
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err("no /dev/loop-control (loop devices)".to_owned());
        }
        heist_proto::files::private_dir(&self.images)
            .map_err(|e| format!("cannot create {}: {e}", self.images.display()))?;
        let probe = Self {
            images: self.images.clone(),
            image_bytes: 16 << 20,
            inodes: 128,
            pool: pool::Pool::default(),
        };
        let dir = self
            .images
            .join(format!("probe-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let image = dir.with_extension("img");
        let made = probe.make(&image).and_then(|()| mount(&image, &dir));
        let unmounted = if made.is_ok() { unmount(&dir) } else { Ok(()) };
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_dir(&dir);
        made.and(unmounted).map_err(|e| e.to_string())
    }

    fn image(&self, id: &SessionId) -> PathBuf {
        self.images.join(format!("{id}.img"))
    }

    /// Gives the (existing, empty or adopted) directory `path` of session `id` its file system:
    /// a new one (a ready one from the pool, else formatted now), or the session's image again
    /// when `path` is not mounted (a restarted worker or host). Nothing to do when it is
    /// mounted already.
    pub fn attach(&self, id: &SessionId, path: &Path) -> Result<(), Error> {
        if is_mountpoint(path).map_err(|e| Error::io("cannot read the mount table", e))? {
            return Ok(());
        }
        let image = self.image(id);
        if !image.exists() {
            let empty = std::fs::read_dir(path)
                .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?
                .next()
                .is_none();
            if !empty {
                // Files from before the quota file system (a worker that polled): keep them,
                // refuse to hide them under an empty file system.
                return Err(Error::Internal(format!(
                    "session {id}'s workspace {} holds files but has no disk image in {}: it \
                     was made without HEIST_DISK_QUOTA=fs; close the session or restart the \
                     worker with HEIST_DISK_QUOTA=polling",
                    path.display(),
                    self.images.display()
                )));
            }
            if self.attach_ready(id, path) {
                return Ok(());
            }
            heist_proto::files::private_dir(&self.images)
                .map_err(|e| Error::io(format!("cannot create {}", self.images.display()), e))?;
            return self.make_mounted(&image, path);
        }
        mount(&image, path)
    }

    /// Creates the image `image`, formats it and mounts it at the (empty) directory `path`,
    /// without mkfs's `lost+found` (it would be part of the workspace and its checkpoints).
    /// On failure nothing is left mounted and the image is deleted.
    fn make_mounted(&self, image: &Path, path: &Path) -> Result<(), Error> {
        self.make(image)?;
        let mounted = mount(image, path).and_then(|()| {
            std::fs::remove_dir(path.join("lost+found"))
                .map_err(|e| Error::io("cannot remove lost+found", e))
        });
        if let Err(err) = mounted {
            if is_mountpoint(path).unwrap_or(false) {
                let _ = unmount(path);
            }
            let _ = std::fs::remove_file(image);
            return Err(err);
        }
        Ok(())
    }

    /// Unmounts session `id`'s file system from `path` (lazily when something still holds it)
    /// and deletes its image. Idempotent.
    pub fn detach(&self, id: &SessionId, path: &Path) -> Result<(), Error> {
        if is_mountpoint(path).unwrap_or(false) {
            unmount(path)?;
        }
        match std::fs::remove_file(self.image(id)) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(Error::io("cannot delete the session's disk image", err)),
        }
    }

    /// Unmounts `path` (lazily when busy), keeping the image for the next [`DiskFs::attach`].
    pub fn release(&self, path: &Path) -> Result<(), Error> {
        if is_mountpoint(path).unwrap_or(false) {
            unmount(path)?;
        }
        Ok(())
    }

    /// Creates the sparse image and its file system.
    fn make(&self, image: &Path) -> Result<(), Error> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(image)
            .map_err(|e| Error::io(format!("cannot create {}", image.display()), e))?;
        file.set_len(self.image_bytes)
            .map_err(|e| Error::io(format!("cannot size {}", image.display()), e))?;
        drop(file);
        // No journal (nothing to replay: a crashed session's workspace is best effort, and a
        // journal would cost real writes at every session create), no reserved blocks.
        let made = run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-N"])
            .arg(self.inodes.to_string())
            .args(["-E", "nodiscard,root_owner=0:0"])
            .arg(image));
        if made.is_err() {
            let _ = std::fs::remove_file(image);
        }
        made
    }
}

/// Loop-mounts `image` at `path`.
fn mount(image: &Path, path: &Path) -> Result<(), Error> {
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nodev,nosuid,noatime"])
        .arg(image)
        .arg(path))
}

/// Unmounts `path`; lazily when it is busy (a process that outlived its command still holds a
/// file: the loop device is freed when it lets go).
fn unmount(path: &Path) -> Result<(), Error> {
    if run(Command::new("umount").arg(path)).is_ok() {
        return Ok(());
    }
    run(Command::new("umount").arg("-l").arg(path))
}

fn run(cmd: &mut Command) -> Result<(), Error> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("cannot run {shown}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether `path` is the root of a mount (a different device than its parent's).
pub fn is_mountpoint(path: &Path) -> io::Result<bool> {
    let own = std::fs::symlink_metadata(path)?.dev();
    let parent = std::fs::metadata(path.join(".."))?.dev();
    Ok(own != parent)
}

/// Whether the file system whose root is `path` is a full per-session file system: `Some(quota
/// name)` when `path` is a mountpoint with (almost) no free blocks or inodes left.
pub fn full(path: &Path) -> Option<&'static str> {
    if !is_mountpoint(path).unwrap_or(false) {
        return None;
    }
    let free = || {
        rustix::fs::statvfs(path).ok().map(|st| {
            (
                st.f_bavail.saturating_mul(st.f_frsize),
                st.f_favail,
                st.f_blocks.saturating_mul(st.f_frsize),
            )
        })
    };
    let (mut bytes, mut inodes, total) = free()?;
    // Writes not yet on disk hold worst-case reservations the free count leaves out; near
    // the end, write them out to see what is really left.
    if bytes < total / 64 + FIXED_BYTES
        && let Ok(dir) = std::fs::File::open(path)
        && rustix::fs::syncfs(&dir).is_ok()
    {
        (bytes, inodes, _) = free()?;
    }
    // Less than 1 MiB free: a writer hit the end (delayed allocation and parallel writers
    // can leave a little unused when the first ENOSPC comes).
    if bytes < FULL_BELOW {
        Some("disk_bytes")
    } else if inodes == 0 {
        Some("files")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_size_covers_quota_inodes_and_slack() {
        let q = Quotas {
            disk_bytes: 64 << 20,
            files: 1000,
            ..Quotas::default()
        };
        assert_eq!(slack(64 << 20), (1 << 20) + (8 << 20));
        assert_eq!(image_bytes(&q), (64 << 20) + (9 << 20) + 256_000);
    }

    #[test]
    fn polling_mode_makes_no_file_systems() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let disk =
            DiskFs::start(DiskQuotaMode::Polling, tmp.path(), &Quotas::default()).expect("start");
        assert!(disk.is_none());
    }

    #[test]
    fn a_session_file_system_is_made_bounded_and_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let quotas = Quotas {
            disk_bytes: 32 << 20,
            files: 200,
            ..Quotas::default()
        };
        let Some(disk) =
            DiskFs::start(DiskQuotaMode::Auto, &tmp.path().join("img"), &quotas).expect("start")
        else {
            eprintln!("skipped: this host cannot loop-mount (not root?)");
            return;
        };
        let id = SessionId::parse("s-disk").expect("id");
        let ws = tmp.path().join("s-disk");
        std::fs::create_dir(&ws).expect("dir");
        disk.attach(&id, &ws).expect("attach");
        assert!(is_mountpoint(&ws).expect("mountpoint"));
        assert_eq!(std::fs::read_dir(&ws).expect("read").count(), 0, "empty");
        disk.attach(&id, &ws).expect("attach is idempotent");
        let st = rustix::fs::statvfs(&ws).expect("statvfs");
        let free = st.f_bavail * st.f_frsize;
        assert!(
            free >= quotas.disk_bytes && free <= quotas.disk_bytes + slack(quotas.disk_bytes),
            "{free}"
        );
        let err = std::fs::write(ws.join("big"), vec![1u8; 48 << 20]).expect_err("over");
        assert_eq!(err.raw_os_error(), Some(libc_enospc()), "{err}");
        assert_eq!(full(&ws), Some("disk_bytes"));
        disk.detach(&id, &ws).expect("detach");
        assert!(!is_mountpoint(&ws).expect("mountpoint"));
        assert!(!disk.image(&id).exists());
        disk.detach(&id, &ws).expect("detach is idempotent");
    }

    fn libc_enospc() -> i32 {
        rustix::io::Errno::NOSPC.raw_os_error()
    }
}
