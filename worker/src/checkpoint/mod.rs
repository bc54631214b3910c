//! Checkpoint capture and restore on the worker.
//!
//! Capture ([`Checkpointer::capture`]): walk the workspace and hash what the stat cache cannot
//! vouch for ([`manifest`]), ask the coordinator which blobs it lacks, upload only those
//! ([`blobs`]), and return the manifest. Hashing runs in batches on a blocking thread; each
//! batch's blobs are offered to the coordinator and uploaded while the next batch is hashed. Blobs not yet in the local [`cache`] are copied there
//! afterwards by a background task, so a later restore here needs no download.
//!
//! Each session remembers the tree of the last checkpoint it captured or was restored to, under
//! that checkpoint's id. When the coordinator names that checkpoint as the base of a capture,
//! only the entries added, changed or removed since are returned (a delta), so the cost of a
//! capture after a small change does not grow with the size of the tree. Where the workspace
//! is a file system of its own, a [`journal`] of its changes lets such a capture stat only the
//! entries that changed and patch the remembered tree, instead of walking the workspace.
//!
//! Restore ([`Checkpointer::restore`]): build the manifest's tree in a staging directory next to
//! the workspace ([`restore`]), taking content from the cache, from unchanged files of the
//! current workspace, or from the coordinator; then swap it in with two renames under the
//! session lifecycle lock and delete the old tree in the background. Any error before the swap
//! removes the staging directory and leaves the workspace as it was.
//!
//! Captures and restores of one session are serialized; different sessions run in parallel.
//! Leftover staging and trash directories (named `.heist-*` under BASE_WORKSPACE) are removed
//! at startup by [`clean_leftovers`].

pub mod blobs;
pub mod cache;
pub mod journal;
pub mod manifest;
pub mod restore;

use std::{
    collections::{BTreeSet, HashMap},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use heist_proto::{
    identity::WorkerKey,
    ids::{SessionId, WorkerId},
    v1::{
        CaptureStats, CaptureWorkspaceResponse, EntryKind, Manifest, ManifestDelta, ManifestEntry,
        RestoreStats, RestoreWorkspaceResponse,
    },
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use self::{
    blobs::{BlobClient, blob_error},
    cache::BlobCache,
    journal::{Changes, Journal, bits},
    manifest::{Hash, StatCache, Targets},
    restore::{FilePlan, Plan, Source},
};
use crate::{
    Config, Error,
    sessions::{Sessions, Workspace},
};

/// Prefix of the worker's own directories under BASE_WORKSPACE (never a session id).
pub const PRIVATE_PREFIX: &str = ".heist-";
/// Chunks buffered between the network and the restore writer.
const FETCH_DEPTH: usize = 8;
/// Concurrent PutBlobs / GetBlobs streams for a large transfer (each has its own disk thread on
/// both sides, so blob files are created and written in parallel).
const STREAMS: usize = 4;
/// Below this many blobs a transfer uses one stream.
const MIN_BLOBS_PER_STREAM: usize = 64;

/// Splits `items` into up to [`STREAMS`] groups of similar total `weight`.
fn split<T>(mut items: Vec<T>, weight: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let groups = STREAMS
        .min(items.len().div_ceil(MIN_BLOBS_PER_STREAM))
        .max(1);
    items.sort_by_key(|item| std::cmp::Reverse(weight(item)));
    let mut out: Vec<(u64, Vec<T>)> = (0..groups).map(|_| (0, Vec::new())).collect();
    for item in items {
        let w = weight(&item);
        if let Some(lightest) = out.iter_mut().min_by_key(|(total, _)| *total) {
            lightest.0 += w;
            lightest.1.push(item);
        }
    }
    out.into_iter()
        .map(|(_, group)| group)
        .filter(|g| !g.is_empty())
        .collect()
}

/// Hashed batches waiting for their blobs to be offered to the store.
const HASHED_AHEAD: usize = 2;
/// A hashing batch ends at this many bytes...
const HASH_BATCH_BYTES: u64 = 32 << 20;
/// ...or this many files, so the first uploads start early.
const HASH_BATCH_FILES: usize = 2048;

/// Splits the files to hash into batches of at most [`HASH_BATCH_BYTES`] or
/// [`HASH_BATCH_FILES`] (a single larger file is a batch of its own).
fn hash_batches(walked: &manifest::Walked, todo: Vec<usize>) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let (mut batch, mut bytes) = (Vec::new(), 0u64);
    for i in todo {
        let size = walked.file(i).1;
        if !batch.is_empty() && (bytes + size > HASH_BATCH_BYTES || batch.len() >= HASH_BATCH_FILES)
        {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        batch.push(i);
        bytes += size;
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// The uploads of one capture: blobs are offered as they are hashed; those the store lacks
/// are uploaded on at most [`STREAMS`] PutBlobs streams at a time while hashing goes on.
struct Uploads<'a> {
    client: BlobClient,
    root: &'a cap_std::fs::Dir,
    /// Blobs already offered (each is checked and sent once per capture).
    offered: std::collections::HashSet<Hash>,
    streams: Arc<tokio::sync::Semaphore>,
    tasks: tokio::task::JoinSet<Result<(), Error>>,
    blobs: u64,
    bytes: u64,
}

impl<'a> Uploads<'a> {
    fn new(client: BlobClient, root: &'a cap_std::fs::Dir) -> Self {
        Self {
            client,
            root,
            offered: std::collections::HashSet::new(),
            streams: Arc::new(tokio::sync::Semaphore::new(STREAMS)),
            tasks: tokio::task::JoinSet::new(),
            blobs: 0,
            bytes: 0,
        }
    }

    /// Asks the store which of `blobs` (hash, size, path) not offered before it lacks, and
    /// starts uploading those.
    async fn offer(&mut self, blobs: Vec<(Hash, u64, String)>) -> Result<(), Error> {
        let new: Vec<(Hash, u64, String)> = blobs
            .into_iter()
            .filter(|(hash, _, _)| self.offered.insert(*hash))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let hashes: Vec<Hash> = new.iter().map(|(hash, _, _)| *hash).collect();
        let missing: std::collections::HashSet<Hash> = self
            .client
            .find_missing(&hashes)
            .await?
            .into_iter()
            .collect();
        let upload: Vec<(Hash, u64, String)> = new
            .into_iter()
            .filter(|(hash, _, _)| missing.contains(hash))
            .collect();
        self.blobs += upload.len() as u64;
        self.bytes += upload.iter().map(|(_, size, _)| size).sum::<u64>();
        for group in split(upload, |(_, size, _)| *size) {
            let root = self
                .root
                .try_clone()
                .map_err(|e| Error::io("cannot open the workspace", e))?;
            let (client, streams) = (self.client.clone(), self.streams.clone());
            self.tasks.spawn(
                async move {
                    let _stream = streams
                        .acquire_owned()
                        .await
                        .map_err(|e| Error::Internal(format!("upload slots closed: {e}")))?;
                    client.put(root, group).await.map(|_| ())
                }
                .instrument(info_span!("blob-upload")),
            );
        }
        // A failed upload ends the capture now rather than after the hashing.
        while let Some(done) = self.tasks.try_join_next() {
            done.map_err(|e| Error::Internal(format!("blob upload failed: {e}")))??;
        }
        Ok(())
    }

    /// Waits for every upload; returns the blobs and bytes uploaded.
    async fn finish(mut self) -> Result<(u64, u64), Error> {
        while let Some(done) = self.tasks.join_next().await {
            done.map_err(|e| Error::Internal(format!("blob upload failed: {e}")))??;
        }
        Ok((self.blobs, self.bytes))
    }
}

/// Per-session capture/restore state.
#[derive(Default)]
struct SessionState {
    /// Serializes captures and restores of the session.
    busy: Arc<tokio::sync::Mutex<()>>,
    /// The session's stat cache.
    stat: Arc<Mutex<StatCache>>,
    /// The tree of the checkpoint last captured or restored, by checkpoint id (a delta base).
    tree: Arc<Mutex<Option<Remembered>>>,
    /// The session's change journal.
    journal: Arc<Mutex<JournalState>>,
}

/// A session's change journal and what a capture needs to use it.
#[derive(Default)]
struct JournalState {
    /// Started by the first capture where the workspace allows one.
    journal: Option<Journal>,
    /// Not to be tried again: the workspace is not a file system of its own.
    unavailable: bool,
    /// The checkpoint whose capture the journal has covered since that capture began: a
    /// capture against that tree may examine only what the journal names.
    covers: Option<String>,
    /// Directory inode -> path in that tree (the root is "").
    dirs: HashMap<u64, String>,
    /// Files examined at every capture (see [`manifest::Scan::recheck`]).
    recheck: BTreeSet<String>,
}

impl JournalState {
    /// What a capture against the tree of `covers` examines: the entries named since, and the
    /// files to recheck. None if something may be missing.
    fn targets(&self, changes: &Changes) -> Option<Targets> {
        if changes.lost {
            return None;
        }
        let mut targets = Targets {
            paths: self.recheck.clone(),
            linked: self.recheck.clone(),
            ..Targets::default()
        };
        for ((dir, name), mask) in &changes.named {
            // A directory the tree did not have is new since: a create or a move into a
            // directory it had names it, and it is walked whole.
            let Some(parent) = self.dirs.get(dir) else {
                continue;
            };
            let name = std::str::from_utf8(name).ok()?;
            let path = match (parent.is_empty(), name) {
                (_, ".") => parent.clone(),
                (true, _) => name.to_owned(),
                (false, _) => format!("{parent}/{name}"),
            };
            if mask & bits::ONDIR != 0 && mask & (bits::CREATE | bits::MOVED_TO) != 0 {
                targets.subtrees.insert(path.clone());
            }
            targets.paths.insert(path);
        }
        Some(targets)
    }

    /// After a successful capture of `checkpoint` whose scan is `scan`: the journal (if the
    /// session has one) covers the next capture against it. `journaled`: the scan is of what
    /// the journal named; else of the whole tree, which has `tree_dirs` directories.
    fn covered(
        &mut self,
        root: &cap_std::fs::Dir,
        checkpoint: &str,
        scan: &mut manifest::Scan,
        journaled: bool,
        tree_dirs: usize,
    ) {
        if self.journal.is_none() || checkpoint.is_empty() {
            return;
        }
        if !journaled {
            self.dirs.clear();
            let Ok(top) = rustix::fs::fstat(root) else {
                return;
            };
            self.dirs.insert(top.st_ino, String::new());
        }
        self.dirs.extend(std::mem::take(&mut scan.dirs));
        self.recheck = std::mem::take(&mut scan.recheck).into_iter().collect();
        // Inodes of directories removed since the last walk linger (harmless: they name paths
        // that are examined and found gone); a walk starts the map afresh when they pile up.
        if self.dirs.len() <= 2 * tree_dirs + 1024 {
            self.covers = Some(checkpoint.to_owned());
        }
    }
}

/// How a capture finds what changed.
enum Scope {
    /// Walk the whole tree.
    Walk,
    /// Examine what the journal named since the capture of `old`.
    Journal { targets: Targets, old: Remembered },
}

/// A checkpoint's tree as this worker sent or received it.
struct Remembered {
    /// The checkpoint.
    id: String,
    /// Its entries, sorted by path.
    entries: Vec<ManifestEntry>,
}

/// Per-session handles, taken once per capture or restore.
struct Handles {
    busy: Arc<tokio::sync::Mutex<()>>,
    stat: Arc<Mutex<StatCache>>,
    tree: Arc<Mutex<Option<Remembered>>>,
    journal: Arc<Mutex<JournalState>>,
}

/// Captures and restores workspaces.
pub struct Checkpointer {
    blobs: BlobClient,
    cache: Arc<BlobCache>,
    max_entries: usize,
    /// Whether captures may use a change journal (HEIST_CHECKPOINT_JOURNAL).
    journal: bool,
    sessions: Mutex<HashMap<SessionId, SessionState>>,
    /// Stops background cache fills at shutdown.
    stop: CancellationToken,
}

/// Removes staging and trash directories a previous run left under `base`.
pub fn clean_leftovers(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let is_private = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PRIVATE_PREFIX));
        if is_private && entry.file_type().is_ok_and(|t| t.is_dir()) {
            info!(path = %entry.path().display(), "removing a leftover restore directory");
            restore::remove_tree(&entry.path());
        }
    }
}

/// The blob cache directory: HEIST_BLOB_CACHE_DIR, else `BASE_WORKSPACE/../blobs`.
pub fn cache_dir(config: &Config) -> PathBuf {
    config.blob_cache_dir.clone().unwrap_or_else(|| {
        let base = std::path::absolute(&config.base_workspace)
            .unwrap_or_else(|_| config.base_workspace.clone());
        base.parent()
            .map_or_else(|| base.join("blobs"), |p| p.join("blobs"))
    })
}

/// `mutex`, poisoned or not.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Checkpointer {
    /// A checkpointer for `config`; `stop` ends background work.
    pub fn new(config: &Config, stop: CancellationToken) -> Result<Self, Error> {
        Ok(Self {
            blobs: BlobClient::new(config)?,
            cache: Arc::new(BlobCache::open(
                &cache_dir(config),
                config.blob_cache_bytes,
            )?),
            max_entries: config.checkpoint_max_entries,
            // A process left running could write through a mapping, which reports nothing.
            journal: config.checkpoint_journal && config.sandbox.commands_end_whole(),
            sessions: Mutex::new(HashMap::new()),
            stop,
        })
    }

    /// The same checkpointer proving `worker`'s identity with `key` on every blob call.
    pub fn with_identity(mut self, worker: WorkerId, key: Arc<WorkerKey>) -> Self {
        self.blobs = self.blobs.with_identity(worker, key);
        self
    }

    fn state(&self, id: &SessionId) -> Handles {
        let mut map = self.lock();
        let s = map.entry(id.clone()).or_default();
        Handles {
            busy: s.busy.clone(),
            stat: s.stat.clone(),
            tree: s.tree.clone(),
            journal: s.journal.clone(),
        }
    }

    /// Stops background work (cache fills).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Drops what is kept for a closed session.
    pub fn forget(&self, id: &SessionId) {
        self.lock().remove(id);
    }

    /// Whether anything is kept for `id` (tests of the session lifecycle).
    #[cfg(test)]
    pub(crate) fn holds(&self, id: &SessionId) -> bool {
        self.lock().contains_key(id)
    }

    /// Keeps state for `id` as a capture would (tests of the session lifecycle).
    #[cfg(test)]
    pub(crate) fn touch(&self, id: &SessionId) {
        let _ = self.state(id);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SessionId, SessionState>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// CaptureWorkspace: manifest of the session's workspace, every blob durable at the
    /// coordinator; a delta against `base` when this session remembers that checkpoint's tree.
    /// The captured tree is remembered as `checkpoint`.
    pub async fn capture(
        &self,
        sessions: &Sessions,
        id: &SessionId,
        checkpoint: &str,
        base: &str,
    ) -> Result<CaptureWorkspaceResponse, Error> {
        let started = Instant::now();
        let Handles {
            busy,
            stat,
            tree,
            journal,
        } = self.state(id);
        let _busy = busy.lock().await;
        let workspace = sessions.get(id)?;
        let root = workspace
            .dir()
            .try_clone()
            .map_err(|e| Error::io("cannot open the workspace", e))?;
        let scope = self.scope(&workspace, &journal, &tree);
        let walk_root = root
            .try_clone()
            .map_err(|e| Error::io("cannot open the workspace", e))?;
        let (max, walk_stat) = (self.max_entries, stat.clone());
        let walk_tree = tree.clone();
        let (walked, patching) = tokio::task::spawn_blocking(move || {
            let cache = walk_stat.lock().unwrap_or_else(PoisonError::into_inner);
            if let Scope::Journal { targets, old } = scope {
                let found = manifest::rescan(&walk_root, &cache, &old.entries, &targets, max)?;
                if !found.new_link {
                    return Ok((found.walked, Some((old, found.examined, found.cleared))));
                }
                debug!("a file with other hard links appeared: walking the workspace");
                *lock(&walk_tree) = Some(old);
            }
            manifest::walk_tree(&walk_root, &cache, max).map(|walked| (walked, None))
        })
        .await
        .map_err(|e| Error::Internal(format!("workspace scan failed: {e}")))??;
        let examined_entries = walked.len() as u64;
        let todo = walked.to_hash();
        let walked = Arc::new(walked);

        // Hash in batches on a blocking thread; each batch's blobs are offered to the store and
        // uploaded while the next batch is hashed.
        let (tx, mut rx) = mpsc::channel(HASHED_AHEAD);
        let hash_root = root
            .try_clone()
            .map_err(|e| Error::io("cannot open the workspace", e))?;
        let (hash_walked, batches) = (walked.clone(), hash_batches(&walked, todo));
        let hasher = tokio::task::spawn_blocking(move || {
            for batch in batches {
                let hashed = manifest::hash_files(&hash_root, &hash_walked, &batch);
                let failed = hashed.is_err();
                if tx.blocking_send(hashed).is_err() || failed {
                    return;
                }
            }
        });
        let mut uploads = Uploads::new(self.blobs.clone(), &root);
        let mut fresh = Vec::new();
        while let Some(batch) = rx.recv().await {
            let batch = batch?;
            let blobs = batch
                .iter()
                .map(|(i, hash, key)| (*hash, key.size, walked.file(*i).0.to_owned()))
                .collect();
            uploads.offer(blobs).await?;
            fresh.extend(batch);
        }
        hasher
            .await
            .map_err(|e| Error::Internal(format!("workspace hashing failed: {e}")))?;
        let walked = Arc::into_inner(walked)
            .ok_or_else(|| Error::Internal("the workspace walk is still shared".to_owned()))?;
        let journaled = patching.is_some();
        let (entries, sent, delta, mut scan) = {
            let mut cache = stat.lock().unwrap_or_else(PoisonError::into_inner);
            match patching {
                Some((old, examined, cleared)) => {
                    let mut scan = walked.finish_partial(&mut cache, fresh)?;
                    let found = std::mem::take(&mut scan.manifest.entries);
                    let patched = manifest::patch(old.entries, found, &examined, &cleared);
                    // Files gone, or turned into directories or links.
                    let not_files = patched.changed.iter().filter(|e| e.hash.is_empty());
                    for path in patched.removed.iter().chain(not_files.map(|e| &e.path)) {
                        cache.remove(path);
                    }
                    drop(cache);
                    let (sent, delta) = if !base.is_empty() && old.id == base {
                        let delta = ManifestDelta {
                            base_id: base.to_owned(),
                            removed_paths: patched.removed,
                            depth: 0,
                        };
                        (patched.changed, Some(delta))
                    } else {
                        (patched.entries.clone(), None)
                    };
                    (patched.entries, sent, delta, scan)
                }
                None => {
                    let mut scan = walked.finish(&mut cache, fresh)?;
                    drop(cache);
                    let entries = std::mem::take(&mut scan.manifest.entries);
                    let (sent, delta) = self.delta(&tree, base, &entries);
                    (entries, sent, delta, scan)
                }
            }
        };
        if entries.len() > self.max_entries {
            return Err(manifest::too_many(self.max_entries));
        }
        let scanned = started.elapsed();
        let (mut files, mut bytes, mut dirs) = (0u64, 0u64, 0usize);
        for entry in &entries {
            if entry.hash.len() == 32 {
                files += 1;
                bytes += entry.size;
            } else if entry.kind == EntryKind::Dir as i32 {
                dirs += 1;
            }
        }
        let mut firsts: HashMap<Hash, (u64, String)> = HashMap::new();
        for entry in &sent {
            if let Ok(hash) = <Hash>::try_from(entry.hash.as_slice()) {
                firsts
                    .entry(hash)
                    .or_insert_with(|| (entry.size, entry.path.clone()));
            }
        }
        // Whatever the entries sent name and no batch offered yet (files the stat cache vouched
        // for, when the manifest is whole).
        uploads
            .offer(
                firsts
                    .iter()
                    .map(|(h, (size, path))| (*h, *size, path.clone()))
                    .collect(),
            )
            .await?;
        let (uploaded_blobs, uploaded_bytes) = uploads.finish().await?;
        *tree.lock().unwrap_or_else(PoisonError::into_inner) =
            (!checkpoint.is_empty()).then(|| Remembered {
                id: checkpoint.to_owned(),
                entries,
            });
        lock(&journal).covered(&root, checkpoint, &mut scan, journaled, dirs);

        let uncached: Vec<(Hash, u64, String)> = firsts
            .into_iter()
            .filter(|(h, _)| !self.cache.contains(h))
            .map(|(h, (size, path))| (h, size, path))
            .collect();
        self.fill_cache(root, uncached);

        let sent_entries = sent.len() + delta.as_ref().map_or(0, |d| d.removed_paths.len());
        let stats = CaptureStats {
            files,
            bytes,
            hashed_files: scan.hashed_files,
            hashed_bytes: scan.hashed_bytes,
            uploaded_blobs,
            uploaded_bytes,
            duration_us: micros(started.elapsed()),
            sent_entries: sent_entries as u64,
            examined_entries,
        };
        info!(session_id = %id, files, examined_entries, journaled, hashed_files = stats.hashed_files, uploaded_blobs = stats.uploaded_blobs, sent_entries, delta = delta.is_some(), scan_us = micros(scanned), duration_us = stats.duration_us, "workspace captured");
        Ok(CaptureWorkspaceResponse {
            manifest: Some(Manifest {
                entries: sent,
                ..Manifest::default()
            }),
            stats: Some(stats),
            delta,
        })
    }

    /// The entries to send for `entries` and the delta they make: only what changed since
    /// `base` when this session remembers that checkpoint's tree (its unchanged entries' blobs
    /// are the base's, which the coordinator holds), else every entry.
    fn delta(
        &self,
        tree: &Mutex<Option<Remembered>>,
        base: &str,
        entries: &[ManifestEntry],
    ) -> (Vec<ManifestEntry>, Option<ManifestDelta>) {
        let remembered = tree.lock().unwrap_or_else(PoisonError::into_inner);
        match remembered.as_ref() {
            Some(last) if !base.is_empty() && last.id == base => {
                let (changed, removed_paths) = manifest::diff(&last.entries, entries);
                let delta = ManifestDelta {
                    base_id: base.to_owned(),
                    removed_paths,
                    depth: 0,
                };
                (changed, Some(delta))
            }
            _ => (entries.to_vec(), None),
        }
    }

    /// How this capture finds what changed; starts the session's journal if it has none yet.
    /// Whatever the journal reported until now is taken: it covers the next capture only once
    /// this one succeeds ([`JournalState::covered`]).
    fn scope(
        &self,
        workspace: &Workspace,
        journal: &Mutex<JournalState>,
        tree: &Mutex<Option<Remembered>>,
    ) -> Scope {
        let mut state = lock(journal);
        let covers = state.covers.take();
        let Some(running) = state.journal.as_mut() else {
            if self.journal && !state.unavailable {
                let own = crate::diskfs::is_mountpoint(workspace.path()).unwrap_or(false);
                match Journal::watch(workspace.dir().as_fd(), own) {
                    Ok(started) => state.journal = Some(started),
                    Err(why) => {
                        debug!(session_id = %workspace.id(), %why, "no change journal: captures walk the workspace");
                        state.unavailable = matches!(why, journal::Unavailable::NotOwnFileSystem);
                    }
                }
            }
            return Scope::Walk;
        };
        let changes = running.take();
        // A command still running may write through a mapping, which reports nothing until
        // the mapping goes.
        let idle = workspace.running_commands().load(Ordering::SeqCst) == 0;
        let Some(covers) = covers.filter(|_| idle) else {
            return Scope::Walk;
        };
        let Some(targets) = state.targets(&changes) else {
            return Scope::Walk;
        };
        let mut remembered = tree.lock().unwrap_or_else(PoisonError::into_inner);
        match remembered.take() {
            Some(old) if old.id == covers => Scope::Journal { targets, old },
            other => {
                *remembered = other;
                Scope::Walk
            }
        }
    }

    /// Copies blobs into the local cache in the background (verifying each one).
    fn fill_cache(&self, root: cap_std::fs::Dir, blobs: Vec<(Hash, u64, String)>) {
        if !self.cache.enabled() || blobs.is_empty() {
            return;
        }
        let (cache, stop) = (self.cache.clone(), self.stop.clone());
        let span = info_span!("blob-cache-fill", blobs = blobs.len());
        tokio::task::spawn_blocking(move || {
            let _span = span.enter();
            for (hash, size, path) in blobs {
                if stop.is_cancelled() {
                    return;
                }
                let Ok(mut file) = root.open(&path) else {
                    continue; // gone since: nothing to cache
                };
                if let Err(err) = cache.insert_from(&mut file, &hash, size) {
                    warn!(%err, "cannot fill the blob cache");
                    return;
                }
            }
            debug!("blob cache filled");
        });
    }

    /// RestoreWorkspace: replaces the session's workspace with the manifest's tree, and
    /// remembers it as `checkpoint` (when not empty) for later deltas.
    pub async fn restore(
        &self,
        sessions: &Sessions,
        id: &SessionId,
        manifest: Manifest,
        checkpoint: &str,
    ) -> Result<RestoreWorkspaceResponse, Error> {
        let started = Instant::now();
        let begun = SystemTime::now() - Duration::from_secs(1);
        manifest::validate(&manifest)?;
        let Handles {
            busy,
            stat,
            tree,
            journal,
        } = self.state(id);
        let _busy = busy.lock().await;
        // The restore rewrites the tree: the next capture walks, under a new journal.
        *lock(&journal) = JournalState::default();
        let restored_tree = (!checkpoint.is_empty()).then(|| {
            let mut entries = manifest.entries.clone();
            if !entries.is_sorted_by(|a, b| a.path < b.path) {
                entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
            }
            Remembered {
                id: checkpoint.to_owned(),
                entries,
            }
        });
        let workspace = sessions.get(id)?;
        let old_root = workspace
            .dir()
            .try_clone()
            .map_err(|e| Error::io("cannot open the workspace", e))?;
        let root_mode = std::fs::metadata(workspace.path())
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
            .unwrap_or(0o755);
        let tag = format!("{id}-{}", uuid::Uuid::new_v4().simple());
        // A workspace that is its own file system (the disk quota) is restored inside it: the
        // tree is built there and swapped in by moving entries, not by renaming the mountpoint.
        let own_fs = crate::diskfs::is_mountpoint(workspace.path()).unwrap_or(false);
        let aside = if own_fs {
            workspace.path()
        } else {
            sessions.base()
        };
        let staging = aside.join(format!("{PRIVATE_PREFIX}staging-{tag}"));
        let trash = aside.join(format!("{PRIVATE_PREFIX}trash-{tag}"));

        let built = self
            .build(&staging, manifest, old_root, stat.clone(), root_mode, begun)
            .await;
        let (plan, new_stat, fetched_blobs, fetched_bytes) = match built {
            Ok(done) => done,
            Err(err) => {
                let doomed = staging.clone();
                let _ = tokio::task::spawn_blocking(move || restore::remove_tree(&doomed)).await;
                return Err(err);
            }
        };
        if let Err(err) = sessions
            .swap_workspace(id, staging.clone(), trash.clone())
            .await
        {
            let _ = tokio::task::spawn_blocking(move || restore::remove_tree(&staging)).await;
            return Err(err);
        }
        let removal = tokio::task::spawn_blocking(move || restore::remove_tree(&trash));
        if own_fs {
            // The trash is in the workspace (and takes its quota): gone before anyone looks.
            let _ = removal.await;
        }
        *stat.lock().unwrap_or_else(PoisonError::into_inner) = new_stat;
        *tree.lock().unwrap_or_else(PoisonError::into_inner) = restored_tree;

        if let Ok(ws) = sessions.get(id)
            && let Ok(root) = ws.dir().try_clone()
        {
            let uncached: Vec<(Hash, u64, String)> = plan
                .first_files()
                .into_iter()
                .filter(|f| !self.cache.contains(&f.hash))
                .map(|f| (f.hash, f.size, f.path.clone()))
                .collect();
            self.fill_cache(root, uncached);
        }
        let stats = RestoreStats {
            files: plan.files.len() as u64,
            bytes: plan.files.iter().map(|f| f.size).sum(),
            fetched_blobs,
            fetched_bytes,
            duration_us: micros(started.elapsed()),
        };
        info!(session_id = %id, files = stats.files, fetched_blobs, duration_us = stats.duration_us, "workspace restored");
        Ok(RestoreWorkspaceResponse { stats: Some(stats) })
    }

    /// Builds the staging tree; returns the plan, the new stat cache and what was fetched.
    async fn build(
        &self,
        staging: &Path,
        manifest: Manifest,
        old_root: cap_std::fs::Dir,
        stat: Arc<Mutex<StatCache>>,
        root_mode: u32,
        begun: SystemTime,
    ) -> Result<(Plan, StatCache, u64, u64), Error> {
        let (cache, dir) = (self.cache.clone(), staging.to_path_buf());
        let prepared = tokio::task::spawn_blocking(move || {
            let plan = Plan::new(&manifest);
            restore::build_skeleton(&dir, &plan)?;
            let sources = {
                let previous = stat.lock().unwrap_or_else(PoisonError::into_inner);
                restore::sources(&plan, &cache, Some((&old_root, &previous)))
            };
            Ok::<_, Error>((plan, sources, old_root))
        })
        .await
        .map_err(|e| Error::Internal(format!("restore task failed: {e}")))??;
        let (plan, sources, old_root) = prepared;

        let remote: Vec<FilePlan> = plan
            .first_files()
            .into_iter()
            .filter(|f| matches!(sources.get(&f.hash), Some(Source::Remote)))
            .cloned()
            .collect();
        let fetched_blobs = remote.len() as u64;
        let mut fetches = Vec::new();
        for group in split(remote, |f| f.size) {
            fetches.push(async move {
                let mut bytes = 0;
                for batch in group.chunks(self.blobs.batch()) {
                    bytes += self.fetch(staging, batch.to_vec()).await?;
                }
                Ok::<u64, Error>(bytes)
            });
        }
        let fetched_bytes: u64 = futures::future::try_join_all(fetches)
            .await?
            .into_iter()
            .sum();

        let dir = staging.to_path_buf();
        let new_stat = tokio::task::spawn_blocking(move || {
            restore::copy_local(&dir, &plan, &sources, Some(&old_root))?;
            let stat = restore::finish_modes(&dir, &plan, root_mode, begun)?;
            Ok::<_, Error>((plan, stat))
        })
        .await
        .map_err(|e| Error::Internal(format!("restore task failed: {e}")))??;
        Ok((new_stat.0, new_stat.1, fetched_blobs, fetched_bytes))
    }

    /// Makes `bytes` a blob in the coordinator's store (uploaded only if it lacks it) and in
    /// the local cache; returns its BLAKE3 hash and size. For small blobs that are not files
    /// of the workspace (the agent state).
    pub async fn put_bytes(&self, bytes: Vec<u8>) -> Result<(Hash, u64), Error> {
        let hash: Hash = *blake3::hash(&bytes).as_bytes();
        let size = bytes.len() as u64;
        if !self.blobs.find_missing(&[hash]).await?.is_empty() {
            let io = |e| Error::io("cannot stage a blob for upload", e);
            let dir = tempfile::tempdir().map_err(io)?;
            std::fs::write(dir.path().join("blob"), &bytes).map_err(io)?;
            let root = cap_std::fs::Dir::open_ambient_dir(dir.path(), cap_std::ambient_authority())
                .map_err(io)?;
            self.blobs
                .put(root, vec![(hash, size, "blob".to_owned())])
                .await?;
        }
        if let Err(err) = self.cache.insert_from(&mut bytes.as_slice(), &hash, size) {
            warn!(%err, "cannot cache a blob");
        }
        Ok((hash, size))
    }

    /// The content of blob `hash` (from the local cache, else the coordinator), verified.
    pub async fn get_bytes(&self, hash: Hash, size: u64) -> Result<Vec<u8>, Error> {
        if let Some(path) = self.cache.get(&hash)
            && let Ok(bytes) = std::fs::read(&path)
            && *blake3::hash(&bytes).as_bytes() == hash
        {
            return Ok(bytes);
        }
        let mut stream = self.blobs.get(&[hash]).await?;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(64 << 20));
        while let Some(chunk) = stream.message().await.map_err(blob_error)? {
            if chunk.hash.as_slice() == hash.as_slice() {
                bytes.extend_from_slice(&chunk.data);
            }
        }
        if *blake3::hash(&bytes).as_bytes() != hash {
            return Err(Error::Internal(
                "the agent state blob from the coordinator does not match its hash".to_owned(),
            ));
        }
        Ok(bytes)
    }

    /// Streams `files`' blobs from the coordinator into their staging paths.
    async fn fetch(&self, staging: &Path, files: Vec<FilePlan>) -> Result<u64, Error> {
        let hashes: Vec<Hash> = files.iter().map(|f| f.hash).collect();
        let mut stream = self.blobs.get(&hashes).await?;
        let (tx, rx) = mpsc::channel(FETCH_DEPTH);
        let dir = staging.to_path_buf();
        let writer = tokio::task::spawn_blocking(move || restore::write_fetched(&dir, &files, rx))
            .instrument(info_span!("restore-writer"));
        let mut received = Ok(());
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if tx.send(chunk).await.is_err() {
                        break; // the writer stopped: its error says why
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    received = Err(blob_error(status));
                    break;
                }
            }
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Error::Internal(format!("restore writer failed: {e}")))?;
        received?;
        written
    }
}
