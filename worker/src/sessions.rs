//! Sessions and their workspaces: `BASE_WORKSPACE/<session id>/`.
//!
//! Opening creates the directory (idempotent), closing removes it recursively (idempotent). At
//! startup every directory under the base whose name is a valid session id is adopted as an
//! open session, so a restarted worker re-reports what it still holds and the coordinator can
//! re-attach or evict it.
//!
//! Lookups (every tool call) take a short read lock on the map; opening and closing are
//! serialized by an async lifecycle lock so the capacity check and the directory work cannot
//! interleave. Opening and closing tell the other owners of per-session state through
//! [`SessionHooks`] (see `lifecycle`, which is the one place that lists them).

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use cap_std::{ambient_authority, fs::Dir};
use futures::future::BoxFuture;
use heist_proto::ids::SessionId;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{Error, diskfs::DiskFs, quota::UsageCache, sandbox::RunningCommands};

/// One session's workspace, opened once as a directory capability.
pub struct Workspace {
    id: SessionId,
    path: PathBuf,
    dir: Dir,
    /// What the workspace holds, for the disk and file quotas.
    usage: UsageCache,
    /// Sandboxed commands running in it now.
    running: RunningCommands,
    /// Cancelled when the session is closed.
    closed: CancellationToken,
    /// Services this session's tools reach (kept across a restore).
    services: Arc<SessionServices>,
}

/// Per-session services tools can reach (a database handle, agent memory), keyed by type. Set
/// up when the session comes into use; they live as long as the session.
#[derive(Default)]
pub struct SessionServices(RwLock<http::Extensions>);

impl SessionServices {
    /// Adds (or replaces) the service of type `T`.
    pub fn insert<T: Clone + Send + Sync + 'static>(&self, service: T) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(service);
    }

    /// The service of type `T`, if the session has one.
    pub fn get<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get::<T>()
            .cloned()
    }
}

impl Workspace {
    /// Opens an existing workspace directory.
    pub fn open(id: SessionId, path: PathBuf) -> io::Result<Self> {
        let dir = Dir::open_ambient_dir(&path, ambient_authority())?;
        Ok(Self {
            id,
            path,
            dir,
            usage: UsageCache::default(),
            running: RunningCommands::new(0),
            closed: CancellationToken::new(),
            services: Arc::default(),
        })
    }

    /// The session's services.
    pub fn services(&self) -> &SessionServices {
        &self.services
    }

    /// The session id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// Absolute path of the workspace.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory every tool path is resolved beneath.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// The cached usage of the workspace (disk and file quotas). Whoever changes the workspace
    /// in bulk (a restore) must call `invalidate()` on it.
    pub fn usage(&self) -> &UsageCache {
        &self.usage
    }

    /// How many sandboxed commands run in the workspace now.
    pub fn running_commands(&self) -> &RunningCommands {
        &self.running
    }

    /// Cancelled when the session is closed (its commands stop then).
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }
}

/// What the owners of per-session state outside [`Sessions`] are told.
pub trait SessionHooks: Send + Sync {
    /// A session's directory exists and its workspace is about to be opened (created or
    /// adopted). An error fails the open.
    fn opening<'a>(&'a self, id: &'a SessionId, path: &'a Path)
    -> BoxFuture<'a, Result<(), Error>>;
    /// A session left the table and its commands were told to stop; its directory is removed
    /// next. An error is reported, and the directory is still removed.
    fn closing<'a>(&'a self, id: &'a SessionId, path: &'a Path)
    -> BoxFuture<'a, Result<(), Error>>;
}

/// Hooks that do nothing (tests of the table alone).
pub struct NoHooks;

impl SessionHooks for NoHooks {
    fn opening<'a>(&'a self, _: &'a SessionId, _: &'a Path) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
    fn closing<'a>(&'a self, _: &'a SessionId, _: &'a Path) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
}

/// The sessions open on this worker.
pub struct Sessions {
    base: PathBuf,
    max: u32,
    open: RwLock<HashMap<SessionId, Arc<Workspace>>>,
    lifecycle: tokio::sync::Mutex<()>,
    draining: AtomicBool,
    /// Per-session file systems (the disk quota), when the worker uses them.
    disk: Option<Arc<DiskFs>>,
}

impl Sessions {
    /// Creates `base` if needed and adopts the workspaces already in it.
    pub async fn load(base: &Path, max: u32) -> Result<Self, Error> {
        Self::load_with_disk(base, max, None).await
    }

    /// [`Sessions::load`], giving every workspace its own file system from `disk` (adopted
    /// workspaces get theirs mounted again before they are opened).
    pub async fn load_with_disk(
        base: &Path,
        max: u32,
        disk: Option<Arc<DiskFs>>,
    ) -> Result<Self, Error> {
        let base = base.to_path_buf();
        let for_adopt = disk.clone();
        let (base, adopted) =
            tokio::task::spawn_blocking(move || adopt(&base, for_adopt.as_deref()))
                .await
                .map_err(|e| Error::Internal(format!("workspace scan failed: {e}")))??;
        if !adopted.is_empty() {
            info!(count = adopted.len(), base = %base.display(), "adopted existing workspaces");
        }
        let open = adopted
            .into_iter()
            .map(|ws| (ws.id.clone(), Arc::new(ws)))
            .collect();
        Ok(Self {
            base,
            max,
            open: RwLock::new(open),
            lifecycle: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            disk,
        })
    }

    /// The absolute base directory.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The open session `id`.
    pub fn get(&self, id: &SessionId) -> Result<Arc<Workspace>, Error> {
        self.read()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))
    }

    /// Every open workspace (for telling the hooks about adopted sessions at start-up).
    pub fn all(&self) -> Vec<Arc<Workspace>> {
        self.read().values().cloned().collect()
    }

    /// Opens `id` (creating its workspace, then telling `hooks`), or returns it if it is
    /// already open.
    pub async fn open(
        &self,
        id: SessionId,
        hooks: &dyn SessionHooks,
    ) -> Result<Arc<Workspace>, Error> {
        let _serial = self.lifecycle.lock().await;
        if let Some(ws) = self.read().get(&id) {
            return Ok(Arc::clone(ws));
        }
        if self.is_draining() {
            return Err(Error::Draining);
        }
        if self.len() >= self.max as usize {
            return Err(Error::Full { max: self.max });
        }
        let path = self.base.join(id.as_str());
        let (dir, disk, owned) = (path.clone(), self.disk.clone(), id.clone());
        tokio::task::spawn_blocking(move || {
            create_dir(&dir)?;
            // The file system goes on before the directory is opened as a capability.
            match disk {
                Some(disk) => disk.attach(&owned, &dir),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("workspace task failed: {e}")))??;
        hooks.opening(&id, &path).await?;
        let ws = tokio::task::spawn_blocking(move || {
            Workspace::open(id, path.clone()).map_err(|source| Error::Workspace { path, source })
        })
        .await
        .map_err(|e| Error::Internal(format!("workspace task failed: {e}")))??;
        let ws = Arc::new(ws);
        self.write().insert(ws.id.clone(), Arc::clone(&ws));
        Ok(ws)
    }

    /// Closes `id`, tells `hooks`, and removes its workspace; returns whether it was open.
    /// Removing the directory is attempted even when the session was not open, so a retry
    /// finishes the job.
    pub async fn close(&self, id: &SessionId, hooks: &dyn SessionHooks) -> Result<bool, Error> {
        let _serial = self.lifecycle.lock().await;
        let removed = self.write().remove(id);
        if let Some(ws) = &removed {
            // Commands still running in it are stopped.
            ws.closed.cancel();
        }
        let was_open = removed.is_some();
        // Our own handle on the directory goes before its file system is unmounted.
        drop(removed);
        let path = self.base.join(id.as_str());
        if let Err(err) = hooks.closing(id, &path).await {
            warn!(session_id = %id, error = %err, "a session owner failed to let go of the session");
        }
        let (disk, owned) = (self.disk.clone(), id.clone());
        tokio::task::spawn_blocking(move || {
            if let Some(disk) = disk {
                disk.detach(&owned, &path)?;
            }
            match std::fs::remove_dir_all(&path) {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(Error::Workspace { path, source }),
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("workspace task failed: {e}")))??;
        Ok(was_open)
    }

    /// Replaces the workspace of the open session `id` with the tree at `staging` (built next
    /// to it, on the same file system), under the lifecycle lock so a close cannot interleave:
    /// the old tree is renamed to `trash`, `staging` is renamed into place and reopened. If the
    /// second rename fails the old tree is put back. The caller removes `trash` afterwards.
    pub async fn swap_workspace(
        &self,
        id: &SessionId,
        staging: PathBuf,
        trash: PathBuf,
    ) -> Result<Arc<Workspace>, Error> {
        let _serial = self.lifecycle.lock().await;
        let path = self.get(id)?.path().to_path_buf();
        let owned = id.clone();
        let ws = tokio::task::spawn_blocking(move || {
            let failed = |source| Error::Workspace {
                path: path.clone(),
                source,
            };
            if staging.parent() == Some(path.as_path()) {
                // The workspace is its own file system (a mountpoint cannot be renamed): the
                // tree was built inside it and the contents are swapped instead.
                swap_contents(&path, &staging, &trash).map_err(failed)?;
            } else {
                std::fs::rename(&path, &trash).map_err(failed)?;
                if let Err(err) = std::fs::rename(&staging, &path) {
                    let _ = std::fs::rename(&trash, &path);
                    return Err(failed(err));
                }
            }
            Workspace::open(owned, path.clone()).map_err(failed)
        })
        .await
        .map_err(|e| Error::Internal(format!("workspace task failed: {e}")))??;
        let mut ws = ws;
        if let Some(old) = self.read().get(id) {
            ws.services = Arc::clone(&old.services);
        }
        let ws = Arc::new(ws);
        let old = self.write().insert(id.clone(), Arc::clone(&ws));
        // Commands still running in the replaced tree would write into the trash: stop them, as
        // a close would. (Calls that start now see the restored workspace.)
        if let Some(old) = old {
            old.closed().cancel();
        }
        Ok(ws)
    }

    /// Unmounts every session's file system, keeping the images (a stopping worker; the next
    /// start mounts them again when it adopts the sessions), and deletes the file systems made
    /// ahead of time (the pool's refill task has stopped).
    pub async fn unmount_all(&self) {
        let Some(disk) = self.disk.clone() else {
            return;
        };
        let paths: Vec<PathBuf> = self.read().values().map(|ws| ws.path.clone()).collect();
        let done = tokio::task::spawn_blocking(move || {
            for path in paths {
                if let Err(err) = disk.release(&path) {
                    warn!(path = %path.display(), error = %err, "cannot unmount a session's file system");
                }
            }
            disk.empty_pool();
        })
        .await;
        if let Err(err) = done {
            warn!(error = %err, "unmount task failed");
        }
    }

    /// Ids of the open sessions, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.read().keys().map(ToString::to_string).collect();
        ids.sort();
        ids
    }

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops taking new sessions (existing ones keep working).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether new sessions are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SessionId, Arc<Workspace>>> {
        self.open.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SessionId, Arc<Workspace>>> {
        self.open.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Replaces the contents of `root` with those of `staging` (a directory in `root`): every other
/// entry of `root` is moved into `trash` (created in `root`), then every entry of `staging` into
/// `root`, which takes `staging`'s permissions; `staging` is removed. If a move fails, what was
/// moved is moved back. The caller removes `trash`.
fn swap_contents(root: &Path, staging: &Path, trash: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let skip = |name: &std::ffi::OsStr| {
        Some(name) == staging.file_name() || Some(name) == trash.file_name()
    };
    let names = |dir: &Path| -> io::Result<Vec<std::ffi::OsString>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .filter(|n| n.as_ref().map_or(true, |n| !skip(n)))
            .collect()
    };
    let move_all = |names: &[std::ffi::OsString], from: &Path, to: &Path| -> io::Result<usize> {
        for (done, name) in names.iter().enumerate() {
            if let Err(err) = std::fs::rename(from.join(name), to.join(name)) {
                for back in &names[..done] {
                    let _ = std::fs::rename(to.join(back), from.join(back));
                }
                return Err(err);
            }
        }
        Ok(names.len())
    };
    std::fs::create_dir(trash)?;
    let old = names(root)?;
    move_all(&old, root, trash)?;
    let new = names(staging)?;
    if let Err(err) = move_all(&new, staging, root) {
        let _ = move_all(&old, trash, root);
        return Err(err);
    }
    let mode = std::fs::metadata(staging)?.permissions().mode();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode))?;
    std::fs::remove_dir(staging)
}

/// Creates `base` if needed and opens every session directory in it.
fn adopt(base: &Path, disk: Option<&DiskFs>) -> Result<(PathBuf, Vec<Workspace>), Error> {
    heist_proto::files::private_dir(base).map_err(|e| {
        Error::io(
            format!("cannot create BASE_WORKSPACE {}", base.display()),
            e,
        )
    })?;
    let base = std::fs::canonicalize(base).map_err(|e| {
        Error::io(
            format!("cannot resolve BASE_WORKSPACE {}", base.display()),
            e,
        )
    })?;
    let entries = std::fs::read_dir(&base)
        .map_err(|e| Error::io(format!("cannot read BASE_WORKSPACE {}", base.display()), e))?;
    let mut adopted = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot read BASE_WORKSPACE entry", e))?;
        let name = entry.file_name();
        let path = entry.path();
        // Only real directories (not symlinks) named like a session are workspaces.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let id = name.to_str().and_then(|n| SessionId::parse(n).ok());
        match (is_dir, id) {
            (true, Some(id)) => match disk
                .map_or(Ok(()), |disk| disk.attach(&id, &path))
                .and_then(|()| {
                    Workspace::open(id, path.clone()).map_err(|source| Error::Workspace {
                        path: path.clone(),
                        source,
                    })
                }) {
                Ok(ws) => adopted.push(ws),
                Err(err) => {
                    warn!(path = %path.display(), error = %err, "cannot adopt workspace; skipping it")
                }
            },
            _ => warn!(path = %path.display(), "not a session workspace; leaving it alone"),
        }
    }
    Ok((base, adopted))
}

/// Creates (or reuses) a workspace directory.
fn create_dir(path: &Path) -> Result<(), Error> {
    let failed = |source| Error::Workspace {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            // Reuse a leftover directory, but never a symlink planted in its place.
            let meta = std::fs::symlink_metadata(path).map_err(failed)?;
            if !meta.is_dir() {
                return Err(failed(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a directory; remove it",
                )));
            }
        }
        Err(err) => return Err(failed(err)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(raw: &str) -> SessionId {
        SessionId::parse(raw).expect("id")
    }

    #[tokio::test]
    async fn open_is_idempotent_and_close_removes_the_workspace() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sessions = Sessions::load(&tmp.path().join("ws"), 4)
            .await
            .expect("load");
        let a = sessions.open(id("s-a"), &NoHooks).await.expect("open");
        assert!(a.path().is_dir());
        assert!(a.path().is_absolute());
        std::fs::write(a.path().join("f"), b"x").expect("write");
        let again = sessions.open(id("s-a"), &NoHooks).await.expect("reopen");
        assert_eq!(again.path(), a.path());
        assert!(
            again.path().join("f").exists(),
            "reopening keeps the content"
        );
        assert_eq!(sessions.ids(), ["s-a"]);

        assert!(sessions.close(&id("s-a"), &NoHooks).await.expect("close"));
        assert!(!a.path().exists());
        assert!(
            !sessions
                .close(&id("s-a"), &NoHooks)
                .await
                .expect("close again")
        );
        assert!(sessions.is_empty());
        assert!(matches!(
            sessions.get(&id("s-a")),
            Err(Error::SessionNotFound(_))
        ));
    }

    #[tokio::test]
    async fn capacity_and_draining_refuse_new_sessions_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sessions = Sessions::load(tmp.path(), 1).await.expect("load");
        sessions.open(id("s-a"), &NoHooks).await.expect("first");
        assert!(matches!(
            sessions.open(id("s-b"), &NoHooks).await,
            Err(Error::Full { max: 1 })
        ));
        sessions.set_draining();
        assert!(
            sessions.open(id("s-a"), &NoHooks).await.is_ok(),
            "an open session stays openable"
        );
        sessions.close(&id("s-a"), &NoHooks).await.expect("close");
        assert!(matches!(
            sessions.open(id("s-b"), &NoHooks).await,
            Err(Error::Draining)
        ));
    }

    #[tokio::test]
    async fn restart_adopts_session_directories_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let sessions = Sessions::load(tmp.path(), 4).await.expect("load");
            sessions.open(id("s-1"), &NoHooks).await.expect("open");
            sessions.open(id("s-2"), &NoHooks).await.expect("open");
        }
        std::fs::write(tmp.path().join("stray-file"), b"x").expect("file");
        std::fs::create_dir(tmp.path().join("not a session")).expect("dir");
        std::os::unix::fs::symlink("/tmp", tmp.path().join("s-link")).expect("symlink");

        let sessions = Sessions::load(tmp.path(), 4).await.expect("reload");
        assert_eq!(sessions.ids(), ["s-1", "s-2"]);
        assert!(sessions.get(&id("s-1")).is_ok());
    }

    #[tokio::test]
    async fn a_planted_symlink_is_not_used_as_a_workspace() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("outside");
        let sessions = Sessions::load(tmp.path(), 4).await.expect("load");
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("s-x")).expect("symlink");
        assert!(matches!(
            sessions.open(id("s-x"), &NoHooks).await,
            Err(Error::Workspace { .. })
        ));
    }
}
