//! File systems made ahead of time (HEIST_DISK_POOL), so that opening a session under the `fs`
//! disk quota does not wait for `mkfs.ext4` and a loop mount (about 20-50 ms) but takes one that
//! is ready (a rename and a bind mount, well under a millisecond).
//!
//! A ready file system is an image `<pool>/<name>.img`, made exactly like a session's
//! ([`DiskFs::make_mounted`]: the worker's quotas give its size and inode count, which are the
//! same for every session) and loop-mounted at `<pool>/<name>`, where `<pool>` is a directory
//! of this worker's own under HEIST_DISK_IMAGE_DIR. Handing one to session `s`
//! ([`DiskFs::attach_ready`]) renames the image to `s.img` (never over an existing one),
//! bind-mounts the file system's root on the workspace and unmounts the pool's mount point; from
//! then on it is the session's like one formatted for it, and its close deletes it. Nothing is
//! ever put back in the pool: a file system is handed out once, and one whose root is not empty
//! is thrown away instead.
//!
//! [`DiskFs::refill`], a background task, makes file systems until the pool holds its size, one
//! at a time, woken whenever one is taken; it makes none while the images' file system has less
//! than HEIST_WORKER_MIN_FREE_BYTES plus [`ROOM`] free. An open that finds the pool empty
//! formats its own as before.
//!
//! The pool lives only as long as the process: a stopping worker deletes it
//! ([`DiskFs::empty_pool`]) and a starting one deletes whatever a killed one left in its pool
//! directory ([`DiskFs::with_pool`]: mounts first, then images), before it adopts its sessions.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use heist_proto::ids::SessionId;
use rustix::{
    fs::{CWD, RenameFlags, renameat_with},
    mount::{UnmountFlags, mount_bind},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{DiskFs, is_mountpoint, unmount};
use crate::Error;

/// Free bytes the images' file system must have beyond HEIST_WORKER_MIN_FREE_BYTES before the
/// pool makes one more file system (an empty one takes under 1 MiB of host disk).
pub const ROOM: u64 = 16 << 20;
/// How long refilling waits after a failure, or while the disk is short, before it looks again
/// (a session taken from the pool wakes it at once).
const RETRY: Duration = Duration::from_secs(5);

/// How many file systems to keep ready, and where.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// File systems kept ready (HEIST_DISK_POOL); 0: none, every open formats its own.
    pub size: usize,
    /// The pool's directory: this worker's own, on the file system of HEIST_DISK_IMAGE_DIR
    /// (images are renamed out of it).
    pub dir: PathBuf,
    /// Free bytes refilling leaves on that file system (HEIST_WORKER_MIN_FREE_BYTES), plus
    /// [`ROOM`].
    pub min_free: u64,
}

/// The ready file systems.
#[derive(Debug, Default)]
pub(super) struct Pool {
    /// `None`: no pool.
    settings: Option<PoolSettings>,
    ready: Mutex<Vec<Ready>>,
    /// Told when one is taken.
    taken: Notify,
}

/// One file system in the pool: `image` mounted at `mount`, empty, never handed out.
#[derive(Debug)]
struct Ready {
    image: PathBuf,
    mount: PathBuf,
}

impl Pool {
    fn take(&self) -> Option<Ready> {
        let ready = self.lock().pop();
        if ready.is_some() {
            self.taken.notify_one();
        }
        ready
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Ready>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl DiskFs {
    /// The same file systems with a pool of `settings.size` made ahead of time (filled by
    /// [`DiskFs::refill`]). Whatever an earlier process left in the pool's directory is deleted
    /// first, also when the size is 0.
    pub fn with_pool(mut self, settings: PoolSettings) -> Result<Self, Error> {
        sweep(&settings.dir)?;
        if settings.size == 0 {
            let _ = std::fs::remove_dir(&settings.dir);
            return Ok(self);
        }
        heist_proto::files::private_dir(&settings.dir).map_err(|e| {
            Error::io(
                format!("cannot create the disk pool {}", settings.dir.display()),
                e,
            )
        })?;
        self.pool.settings = Some(settings);
        Ok(self)
    }

    /// File systems ready in the pool now.
    pub fn pool_ready(&self) -> usize {
        self.pool.len()
    }

    /// Mounts a file system from the pool on session `id`'s empty, unmounted workspace `path`
    /// and gives its image the session's name; `false` when the pool is empty or the hand-over
    /// failed (the caller formats one; a failed one is thrown away, not put back).
    pub(super) fn attach_ready(&self, id: &SessionId, path: &Path) -> bool {
        let Some(ready) = self.pool.take() else {
            return false;
        };
        match self.hand_over(&ready, id, path) {
            Ok(()) => true,
            Err(err) => {
                warn!(session_id = %id, error = %err, "disk pool: cannot hand over a ready file system; formatting one");
                discard(&ready);
                false
            }
        }
    }

    fn hand_over(&self, ready: &Ready, id: &SessionId, path: &Path) -> Result<(), Error> {
        let unused = is_mountpoint(&ready.mount).unwrap_or(false)
            && std::fs::read_dir(&ready.mount)
                .map_err(|e| Error::io(format!("cannot read {}", ready.mount.display()), e))?
                .next()
                .is_none();
        if !unused {
            return Err(Error::Internal(format!(
                "{} is not an empty mounted file system",
                ready.mount.display()
            )));
        }
        let image = self.image(id);
        renameat_with(CWD, &ready.image, CWD, &image, RenameFlags::NOREPLACE).map_err(|e| {
            Error::io(
                format!(
                    "cannot rename {} to {}",
                    ready.image.display(),
                    image.display()
                ),
                e.into(),
            )
        })?;
        // The bind keeps the pool mount's flags (nodev, nosuid, noatime).
        if let Err(err) = mount_bind(&ready.mount, path) {
            let _ = renameat_with(CWD, &image, CWD, &ready.image, RenameFlags::NOREPLACE);
            return Err(Error::io(
                format!(
                    "cannot bind-mount {} on {}",
                    ready.mount.display(),
                    path.display()
                ),
                err.into(),
            ));
        }
        // The session's mount holds the file system now; the pool's goes.
        if let Err(err) = rustix::mount::unmount(&ready.mount, UnmountFlags::empty())
            .or_else(|_| rustix::mount::unmount(&ready.mount, UnmountFlags::DETACH))
        {
            warn!(path = %ready.mount.display(), error = %err, "disk pool: cannot unmount a handed-over file system's pool mount");
        } else {
            let _ = std::fs::remove_dir(&ready.mount);
        }
        Ok(())
    }

    /// Makes one file system for the pool in `dir`.
    fn make_ready(&self, dir: &Path) -> Result<Ready, Error> {
        let name = uuid::Uuid::new_v4().simple().to_string();
        let ready = Ready {
            image: dir.join(format!("{name}.img")),
            mount: dir.join(&name),
        };
        std::fs::create_dir(&ready.mount)
            .map_err(|e| Error::io(format!("cannot create {}", ready.mount.display()), e))?;
        if let Err(err) = self.make_mounted(&ready.image, &ready.mount) {
            let _ = std::fs::remove_dir(&ready.mount);
            return Err(err);
        }
        Ok(ready)
    }

    /// Keeps the pool full until `stop`: makes file systems one at a time while it holds fewer
    /// than its size and the disk has room, then waits until one is taken (or [`RETRY`] after a
    /// failure or while the disk is short). Returns at once without a pool.
    pub async fn refill(self: Arc<Self>, stop: CancellationToken) {
        let Some(settings) = self.pool.settings.clone() else {
            return;
        };
        info!(size = settings.size, dir = %settings.dir.display(), "disk pool: keeping session file systems ready");
        let mut short = false;
        loop {
            let mut retry = false;
            while self.pool.len() < settings.size && !stop.is_cancelled() {
                if !has_room(&settings) {
                    if !short {
                        warn!(dir = %settings.dir.display(), min_free = settings.min_free.saturating_add(ROOM),
                              "disk pool: the disk is short of space; not refilling");
                    }
                    (short, retry) = (true, true);
                    break;
                }
                if short {
                    info!("disk pool: space is back; refilling");
                    short = false;
                }
                let (disk, dir) = (Arc::clone(&self), settings.dir.clone());
                match tokio::task::spawn_blocking(move || disk.make_ready(&dir)).await {
                    Ok(Ok(ready)) if stop.is_cancelled() => {
                        let _ = tokio::task::spawn_blocking(move || discard(&ready)).await;
                    }
                    Ok(Ok(ready)) => {
                        debug!(image = %ready.image.display(), "disk pool: file system ready");
                        self.pool.lock().push(ready);
                    }
                    Ok(Err(err)) => {
                        warn!(error = %err, "disk pool: cannot make a file system; trying again later");
                        retry = true;
                        break;
                    }
                    Err(err) => {
                        warn!(error = %err, "disk pool: the refill task failed; trying again later");
                        retry = true;
                        break;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.pool.taken.notified() => {}
                () = tokio::time::sleep(RETRY), if retry => {}
            }
        }
    }

    /// Unmounts and deletes every file system in the pool, and the pool's directory (a stopping
    /// worker; [`DiskFs::refill`] has stopped).
    pub fn empty_pool(&self) {
        let Some(settings) = &self.pool.settings else {
            return;
        };
        let ready = std::mem::take(&mut *self.pool.lock());
        for ready in &ready {
            discard(ready);
        }
        if let Err(err) = sweep(&settings.dir) {
            warn!(error = %err, "disk pool: cannot clean the pool's directory");
        }
        let _ = std::fs::remove_dir(&settings.dir);
    }
}

/// Whether the pool's file system has room for one more file system above the reserve.
fn has_room(settings: &PoolSettings) -> bool {
    heist_proto::space::free_bytes(&settings.dir)
        .is_ok_and(|free| free >= settings.min_free.saturating_add(ROOM))
}

/// Unmounts and deletes a file system of the pool (best effort: what stays is swept at the next
/// start).
fn discard(ready: &Ready) {
    if is_mountpoint(&ready.mount).unwrap_or(false)
        && let Err(err) = unmount(&ready.mount)
    {
        warn!(path = %ready.mount.display(), error = %err, "disk pool: cannot unmount");
    }
    let _ = std::fs::remove_dir(&ready.mount);
    let _ = std::fs::remove_file(&ready.image);
}

/// Deletes what is in the pool's directory `dir`: mount points are unmounted first (lazily when
/// busy) and removed, then every file (the images). Nothing in it belongs to a session: an image
/// handed over was renamed out of it before its pool mount point was unmounted.
fn sweep(dir: &Path) -> Result<(), Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => {
            return Err(Error::io(
                format!("cannot read the disk pool {}", dir.display()),
                err,
            ));
        }
    };
    let (mut mounts, mut files) = (0_usize, 0_usize);
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot read a disk pool entry", e))?;
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if is_mountpoint(&path).unwrap_or(false) {
                if let Err(err) = unmount(&path) {
                    warn!(path = %path.display(), error = %err, "disk pool: cannot unmount a leftover");
                    continue;
                }
                mounts += 1;
            }
            if let Err(err) = std::fs::remove_dir(&path) {
                warn!(path = %path.display(), error = %err, "disk pool: cannot remove a leftover");
            }
        } else {
            match std::fs::remove_file(&path) {
                Ok(()) => files += 1,
                Err(err) => {
                    warn!(path = %path.display(), error = %err, "disk pool: cannot remove a leftover");
                }
            }
        }
    }
    if mounts + files > 0 {
        info!(dir = %dir.display(), mounts, files, "disk pool: removed leftover file systems");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;
    use crate::{diskfs::DiskQuotaMode, quota::Quotas};

    const QUOTA: u64 = 32 << 20;

    fn quotas() -> Quotas {
        Quotas {
            disk_bytes: QUOTA,
            files: 200,
            ..Quotas::default()
        }
    }

    /// File systems with a pool of `size` in `tmp`, or `None` where this host cannot loop-mount.
    fn disk(tmp: &Path, size: usize) -> Option<DiskFs> {
        let disk =
            DiskFs::start(DiskQuotaMode::Auto, &tmp.join("img"), &quotas()).expect("start")?;
        Some(
            disk.with_pool(PoolSettings {
                size,
                dir: tmp.join("img").join("pool-test"),
                min_free: 1 << 20,
            })
            .expect("pool"),
        )
    }

    /// Makes one file system for the pool, as [`DiskFs::refill`] does.
    fn fill(disk: &DiskFs) {
        let dir = disk.pool.settings.as_ref().expect("pool").dir.clone();
        let ready = disk.make_ready(&dir).expect("make");
        disk.pool.lock().push(ready);
    }

    /// Mount points in /proc/self/mountinfo under `dir`.
    fn mounts_under(dir: &Path) -> usize {
        let dir = std::fs::canonicalize(dir).expect("canonicalize");
        let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&dir))
            .count()
    }

    fn workspace(tmp: &Path, id: &str) -> (SessionId, PathBuf) {
        let path = tmp.join(id);
        std::fs::create_dir(&path).expect("dir");
        (SessionId::parse(id).expect("id"), path)
    }

    #[test]
    fn a_ready_file_system_is_handed_out_once_and_bounded_like_a_formatted_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let Some(disk) = disk(tmp.path(), 2) else {
            eprintln!("skipped: this host cannot loop-mount (not root?)");
            return;
        };
        fill(&disk);
        fill(&disk);
        assert_eq!(disk.pool_ready(), 2);
        let pool_images: Vec<u64> =
            std::fs::read_dir(&disk.pool.settings.as_ref().expect("pool").dir)
                .expect("pool dir")
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "img"))
                .map(|e| e.metadata().expect("meta").ino())
                .collect();
        assert_eq!(pool_images.len(), 2);

        let (a, a_ws) = workspace(tmp.path(), "s-a");
        let (b, b_ws) = workspace(tmp.path(), "s-b");
        disk.attach(&a, &a_ws).expect("attach a");
        disk.attach(&b, &b_ws).expect("attach b");
        assert_eq!(disk.pool_ready(), 0, "both came from the pool");
        for (id, ws) in [(&a, &a_ws), (&b, &b_ws)] {
            let ino = std::fs::metadata(disk.image(id)).expect("image").ino();
            assert!(pool_images.contains(&ino), "{id}'s image is a pool image");
            assert!(is_mountpoint(ws).expect("mountpoint"));
            assert_eq!(std::fs::read_dir(ws).expect("read").count(), 0, "empty");
            let st = rustix::fs::statvfs(ws).expect("statvfs");
            let flags =
                rustix::fs::StatVfsMountFlags::NODEV | rustix::fs::StatVfsMountFlags::NOSUID;
            assert!(st.f_flag.contains(flags), "{id}: nodev,nosuid");
            let free = st.f_bavail * st.f_frsize;
            assert!(
                free >= QUOTA && free <= QUOTA + crate::diskfs::slack(QUOTA),
                "{free}"
            );
        }
        assert_ne!(
            std::fs::metadata(&a_ws).expect("a").dev(),
            std::fs::metadata(&b_ws).expect("b").dev(),
            "two sessions never share a file system"
        );
        std::fs::write(a_ws.join("secret"), b"a's").expect("write");
        assert!(!b_ws.join("secret").exists());
        let err = std::fs::write(a_ws.join("big"), vec![1u8; 48 << 20]).expect_err("over");
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::NOSPC.raw_os_error()),
            "{err}"
        );
        assert_eq!(crate::diskfs::full(&a_ws), Some("disk_bytes"));

        // The pool is empty: the next open formats its own.
        let (c, c_ws) = workspace(tmp.path(), "s-c");
        disk.attach(&c, &c_ws).expect("attach c");
        assert!(is_mountpoint(&c_ws).expect("mountpoint"));
        assert!(!pool_images.contains(&std::fs::metadata(disk.image(&c)).expect("c").ino()));

        for (id, ws) in [(&a, &a_ws), (&b, &b_ws), (&c, &c_ws)] {
            disk.detach(id, ws).expect("detach");
            assert!(!disk.image(id).exists(), "{id}'s image is deleted");
        }
        disk.empty_pool();
        assert_eq!(mounts_under(tmp.path()), 0, "no mount left");
        assert!(!tmp.path().join("img").join("pool-test").exists());
    }

    #[test]
    fn a_restart_deletes_what_the_last_run_left_in_the_pool() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let Some(disk) = disk(tmp.path(), 2) else {
            eprintln!("skipped: this host cannot loop-mount (not root?)");
            return;
        };
        fill(&disk);
        fill(&disk);
        // A half-made one too: an image without its mount.
        let dir = tmp.path().join("img").join("pool-test");
        std::fs::write(dir.join("half.img"), b"").expect("half");
        assert_eq!(mounts_under(&dir), 2);
        // Killed: nothing is cleaned; the next start sweeps before it adopts anything.
        drop(disk);
        let again = self::disk(tmp.path(), 2).expect("restart");
        assert_eq!(mounts_under(tmp.path()), 0, "leftover mounts are gone");
        assert_eq!(
            std::fs::read_dir(&dir).expect("pool dir").count(),
            0,
            "and their images"
        );
        assert_eq!(again.pool_ready(), 0, "nothing is reused");

        // A pool of 0 cleans up too, and leaves no directory.
        fill(&again);
        drop(again);
        let _off = self::disk(tmp.path(), 0).expect("restart without a pool");
        assert_eq!(mounts_under(tmp.path()), 0);
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn the_refill_task_keeps_the_pool_full_and_stops_on_shutdown() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let Some(disk) = disk(tmp.path(), 2) else {
            eprintln!("skipped: this host cannot loop-mount (not root?)");
            return;
        };
        let disk = Arc::new(disk);
        let stop = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&disk).refill(stop.clone()));
        let full = |n: usize| {
            let disk = Arc::clone(&disk);
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while disk.pool_ready() < n {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the pool did not fill"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        full(2).await;
        let (id, ws) = workspace(tmp.path(), "s-a");
        let attached = Arc::clone(&disk);
        let (owned, path) = (id.clone(), ws.clone());
        tokio::task::spawn_blocking(move || attached.attach(&owned, &path))
            .await
            .expect("join")
            .expect("attach");
        full(2).await;
        assert_eq!(disk.pool_ready(), 2, "taken one is replaced, never more");
        stop.cancel();
        task.await.expect("refill stops");
        let owned = Arc::clone(&disk);
        tokio::task::spawn_blocking(move || {
            owned.detach(&id, &ws).expect("detach");
            owned.empty_pool();
        })
        .await
        .expect("join");
        assert_eq!(mounts_under(tmp.path()), 0);
    }

    #[test]
    fn refilling_leaves_the_reserve_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let settings = |min_free| PoolSettings {
            size: 4,
            dir: tmp.path().to_path_buf(),
            min_free,
        };
        assert!(has_room(&settings(1 << 20)));
        assert!(!has_room(&settings(u64::MAX - ROOM)));
        assert!(!has_room(&settings(u64::MAX)), "no overflow");
    }
}
