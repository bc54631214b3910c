//! Building a manifest from a workspace, with a stat cache so unchanged files are not re-hashed,
//! the difference between two manifests (a capture sent as a delta), and checking a manifest
//! before it is materialised.
//!
//! The walk works on directory file descriptors: each directory is listed with `getdents64`,
//! each entry is examined with `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`, and a subdirectory
//! is entered with `openat(dirfd, name, O_DIRECTORY | O_NOFOLLOW)`. Every name is a single
//! component read from the directory itself (`.` and `..` skipped), so nothing is resolved
//! through a symlink or outside the workspace: a directory swapped for a symlink to `/` while
//! we walk fails to open instead of being followed. Files are hashed through the `cap_std`
//! workspace handle, whose opens are resolved beneath the workspace. Recorded: regular files
//! (mode, size, BLAKE3), directories (mode) and symlinks (target verbatim). Sockets, FIFOs and
//! device nodes are skipped with a warning.
//!
//! Stat cache (in memory, per session; a restarted worker re-hashes once): path -> (dev, inode,
//! size, mtime ns, ctime ns) -> hash. A file whose stat matches is not read. A file modified
//! less than [`RACY_WINDOW_NS`] before the scan started is never cached: file timestamps come
//! from a coarse clock, so a write in the same tick as our read could leave its stat unchanged.
//! Hashing runs on the rayon pool, one file per task (measured faster than chunks of files on
//! `spawn_blocking` for the benchmark's 10,000-file tree).

use std::{
    cmp::Ordering as Order,
    collections::{BTreeSet, HashMap},
    io::Read,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicUsize, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use cap_std::fs::{Dir, Metadata, MetadataExt as _};
use heist_proto::v1::{EntryKind, Manifest, ManifestEntry};
use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use tracing::warn;

use crate::Error;

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// Files modified this recently before a scan are not trusted to the stat cache.
pub const RACY_WINDOW_NS: i128 = 20_000_000;
/// Permission bits recorded and restored (no setuid, setgid or sticky bits).
pub const MODE_MASK: u32 = 0o777;
/// Longest path a manifest may carry, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Read buffer for hashing.
const READ_BUF: usize = 256 * 1024;

/// What identifies a file's content without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatKey {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Status change time, ns since the epoch.
    pub ctime_ns: i128,
}

impl StatKey {
    /// The key of `meta`.
    pub fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// The key of an `fstatat` result.
    pub fn of_stat(st: &Stat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
            ctime_ns: i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
        }
    }

    /// Whether the content may still change without the stat changing, seen at
    /// `scan_start_ns`: a write stamps mtime from a coarse clock, so a write in the same tick as
    /// a recent one leaves mtime (and size) as they were. (ctime is not used here: it also
    /// moves for metadata-only changes, which never make a cached hash wrong.)
    pub fn racy(&self, scan_start_ns: i128) -> bool {
        self.mtime_ns + RACY_WINDOW_NS > scan_start_ns
    }
}

/// Path -> (stat, hash) of one session's files at its last capture or restore.
#[derive(Debug, Default)]
pub struct StatCache {
    entries: HashMap<String, (StatKey, Hash)>,
}

impl StatCache {
    /// The hash of `path` if its stat still matches.
    pub fn lookup(&self, path: &str, key: &StatKey) -> Option<Hash> {
        self.entries
            .get(path)
            .filter(|(k, _)| k == key)
            .map(|(_, h)| *h)
    }

    /// Records a file.
    pub fn insert(&mut self, path: String, key: StatKey, hash: Hash) {
        self.entries.insert(path, (key, hash));
    }

    /// Forgets a file.
    pub fn remove(&mut self, path: &str) {
        self.entries.remove(path);
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry (for restores that reuse files of the current workspace).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &(StatKey, Hash))> {
        self.entries.iter()
    }
}

/// Wall-clock now, ns since the epoch.
pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// A scanned workspace.
#[derive(Debug, Default)]
pub struct Scan {
    /// The manifest, sorted by path.
    pub manifest: Manifest,
    /// Files whose content was read.
    pub hashed_files: u64,
    /// Bytes read.
    pub hashed_bytes: u64,
    /// Files a change journal cannot vouch for until they are examined again: written too
    /// recently to trust their stat, or with other hard links.
    pub recheck: Vec<String>,
    /// Directories found, by inode (a change journal names directories by inode).
    pub dirs: Vec<(u64, String)>,
}

struct Found {
    path: String,
    kind: EntryKind,
    mode: u32,
    key: StatKey,
    target: String,
    /// The hash the stat cache vouches for (files whose stat it holds unchanged).
    known: Option<Hash>,
    /// A file with other hard links: a write through another path changes it too.
    linked: bool,
}

impl Found {
    fn new(path: String, kind: EntryKind, mode: u32, key: StatKey, target: String) -> Self {
        Self {
            path,
            kind,
            mode,
            key,
            target,
            known: None,
            linked: false,
        }
    }
}

/// Walks `root` and builds its manifest, hashing only files `cache` cannot vouch for; `cache`
/// then describes the files as scanned.
pub fn scan(root: &Dir, cache: &mut StatCache, max_entries: usize) -> Result<Scan, Error> {
    let walked = walk_tree(root, cache, max_entries)?;
    let todo = walked.to_hash();
    let fresh = hash_files(root, &walked, &todo)?;
    walked.finish(cache, fresh)
}

/// A walked workspace: every entry, sorted by path, not yet hashed.
pub struct Walked {
    found: Vec<Found>,
    /// When the walk began, ns since the epoch (for the stat cache's racy window).
    scan_start: i128,
}

/// A file hashed during a capture: its index in [`Walked`], hash and stat.
pub type Hashed = (usize, Hash, StatKey);

/// The directory `root` itself, opened for reading: a workspace handle may be an `O_PATH`
/// descriptor, which can be neither listed nor given to `fanotify_mark`.
pub fn open_dir(root: std::os::fd::BorrowedFd<'_>) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        root,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The error for `e`, met while capturing `path`.
fn capture_error(path: &str, e: rustix::io::Errno) -> Error {
    Error::io(format!("cannot capture {path:?}"), std::io::Error::from(e))
}

/// Walks `root` (see the module docs), at most `max_entries` entries, looking each file up in
/// `cache` as it goes.
pub fn walk_tree(root: &Dir, cache: &StatCache, max_entries: usize) -> Result<Walked, Error> {
    let scan_start = now_ns();
    let top = open_dir(root.as_fd()).map_err(|e| capture_error(".", e))?;
    let walk = Walk {
        cache,
        counted: AtomicUsize::new(0),
        max: max_entries,
    };
    let mut found = walk.dir(top, "")?;
    if walk.counted.load(Ordering::Relaxed) > max_entries {
        return Err(too_many(max_entries));
    }
    found.par_sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(Walked { found, scan_start })
}

/// What a partial walk ([`rescan`]) examines.
#[derive(Debug, Default)]
pub struct Targets {
    /// Paths whose entry is examined again (stat; a new directory is walked whole).
    pub paths: BTreeSet<String>,
    /// Directories created or moved in since the last capture: walked whole.
    pub subtrees: BTreeSet<String>,
    /// Files with other hard links the last capture knew of (a new one means a walk).
    pub linked: BTreeSet<String>,
}

/// A partial walk: the entries it found, and what they replace in the last capture's tree.
pub struct Rescanned {
    /// The entries found, sorted by path, not yet hashed.
    pub walked: Walked,
    /// Paths examined, sorted: their entries in the old tree are replaced by what was found.
    pub examined: Vec<String>,
    /// Directories whose entries in the old tree are all replaced (walked again, or gone).
    pub cleared: Vec<String>,
    /// A file with other hard links was found that the last capture did not know of: the
    /// other paths of it may have changed unseen, so the capture must walk.
    pub new_link: bool,
}

/// Whether `path` lies under one of `roots` (not counting itself).
fn under_any(path: &str, roots: &BTreeSet<String>) -> bool {
    let mut at = path;
    while let Some((parent, _)) = at.rsplit_once('/') {
        if roots.contains(parent) {
            return true;
        }
        at = parent;
    }
    false
}

/// Whether the old tree (sorted by path) has a directory at `path`.
fn old_dir(old: &[ManifestEntry], path: &str) -> bool {
    old.binary_search_by(|e| e.path.as_str().cmp(path))
        .is_ok_and(|i| old[i].kind == EntryKind::Dir as i32)
}

/// Examines the entries `targets` names in `root`, against `old` (the last capture's tree,
/// sorted by path): each named path is stat-ed as a walk would, and a directory that is new
/// there (or created or moved in since) is walked whole. Parents are opened one component at
/// a time with `O_NOFOLLOW`, as in a walk.
pub fn rescan(
    root: &Dir,
    cache: &StatCache,
    old: &[ManifestEntry],
    targets: &Targets,
    max_entries: usize,
) -> Result<Rescanned, Error> {
    let scan_start = now_ns();
    let walk = Walk {
        cache,
        counted: AtomicUsize::new(0),
        max: max_entries,
    };
    let top = open_dir(root.as_fd()).map_err(|e| capture_error(".", e))?;
    // Directories opened so far, by path; None where the path is no directory now.
    let mut parents: HashMap<String, Option<OwnedFd>> = HashMap::new();
    parents.insert(String::new(), Some(top));
    let (mut found, mut examined, mut cleared) = (Vec::new(), Vec::new(), Vec::new());
    let mut walked_whole: BTreeSet<String> = BTreeSet::new();
    for path in &targets.paths {
        // Sorted: a directory comes before what is under it.
        if path.is_empty() || under_any(path, &walked_whole) {
            continue;
        }
        examined.push(path.clone());
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        let was_dir = old_dir(old, path);
        let Some(dir) = open_parent(&mut parents, parent)? else {
            if was_dir {
                cleared.push(path.clone());
            }
            continue;
        };
        let cname = std::ffi::CString::new(name).map_err(|_| Error::Uncapturable {
            path: path.clone(),
            why: "the name holds a NUL byte".to_owned(),
        })?;
        let st = match rustix::fs::statat(dir, &cname, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => {
                if was_dir {
                    cleared.push(path.clone());
                }
                continue;
            }
            Err(e) => return Err(capture_error(path, e)),
        };
        match walk.entry(dir, &cname, path.clone(), &st)? {
            Some((entry, Some(sub))) => {
                if !was_dir || targets.subtrees.contains(path) {
                    found.extend(walk.dir(sub, path)?);
                    walked_whole.insert(path.clone());
                    cleared.push(path.clone());
                }
                found.push(entry);
            }
            Some((entry, None)) => {
                if was_dir {
                    cleared.push(path.clone());
                }
                found.push(entry);
            }
            None => {
                if was_dir {
                    cleared.push(path.clone());
                }
            }
        }
    }
    let new_link = found
        .iter()
        .any(|f| f.linked && !targets.linked.contains(&f.path));
    found.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(Rescanned {
        walked: Walked { found, scan_start },
        examined,
        cleared,
        new_link,
    })
}

/// The directory at `path` (opened one component at a time from the nearest one opened), or
/// None when it is no longer a directory there.
fn open_parent<'a>(
    parents: &'a mut HashMap<String, Option<OwnedFd>>,
    path: &str,
) -> Result<Option<&'a OwnedFd>, Error> {
    if !parents.contains_key(path) {
        let (up, name) = path.rsplit_once('/').unwrap_or(("", path));
        let opened = match open_parent(parents, up)? {
            None => None,
            Some(dir) => match rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => Some(fd),
                Err(
                    rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP,
                ) => None,
                Err(e) => return Err(capture_error(path, e)),
            },
        };
        parents.insert(path.to_owned(), opened);
    }
    Ok(parents.get(path).and_then(Option::as_ref))
}

/// A tree patched by a partial walk.
#[derive(Debug, Default)]
pub struct Patched {
    /// The whole new tree, sorted by path.
    pub entries: Vec<ManifestEntry>,
    /// Entries added or changed since `old`.
    pub changed: Vec<ManifestEntry>,
    /// Paths of `old` that are gone.
    pub removed: Vec<String>,
}

/// `old` (sorted by path) with the entries at `examined` and everything under `cleared`
/// replaced by `found` (sorted by path): the new tree and its difference from `old`.
pub fn patch(
    old: Vec<ManifestEntry>,
    found: Vec<ManifestEntry>,
    examined: &[String],
    cleared: &[String],
) -> Patched {
    let mut replaced = vec![false; old.len()];
    for path in examined {
        if let Ok(i) = old.binary_search_by(|e| e.path.as_str().cmp(path)) {
            replaced[i] = true;
        }
    }
    for dir in cleared {
        // Everything under `dir/` sorts between `dir/` and `dir0` ('0' follows '/').
        let (from, to) = (format!("{dir}/"), format!("{dir}0"));
        let start = old.partition_point(|e| e.path < from);
        let end = old.partition_point(|e| e.path < to);
        for flag in replaced.get_mut(start..end).unwrap_or_default() {
            *flag = true;
        }
    }
    let mut out = Patched {
        entries: Vec::with_capacity(old.len() + found.len()),
        ..Patched::default()
    };
    let mut found = found.into_iter().peekable();
    for (entry, replaced) in old.into_iter().zip(replaced) {
        while let Some(new) = found.next_if(|f| f.path < entry.path) {
            out.changed.push(new.clone());
            out.entries.push(new);
        }
        match found.next_if(|f| f.path == entry.path) {
            Some(new) => {
                if new != entry {
                    out.changed.push(new.clone());
                }
                out.entries.push(new);
            }
            None if replaced => out.removed.push(entry.path),
            None => out.entries.push(entry),
        }
    }
    for new in found {
        out.changed.push(new.clone());
        out.entries.push(new);
    }
    out
}

/// The error for a workspace of more than `max` entries.
pub fn too_many(max: usize) -> Error {
    Error::LimitExceeded {
        limit: "checkpoint_max_entries",
        message: format!(
            "the workspace has more than {max} entries (HEIST_CHECKPOINT_MAX_ENTRIES): \
             remove files before checkpointing"
        ),
    }
}

impl Walked {
    /// Entries found.
    pub fn len(&self) -> usize {
        self.found.len()
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Indices of the files the stat cache could not vouch for.
    pub fn to_hash(&self) -> Vec<usize> {
        self.found
            .iter()
            .enumerate()
            .filter(|(_, f)| f.kind == EntryKind::File && f.known.is_none())
            .map(|(i, _)| i)
            .collect()
    }

    /// Path and size (as walked) of entry `i`.
    pub fn file(&self, i: usize) -> (&str, u64) {
        self.found
            .get(i)
            .map_or(("", 0), |f| (f.path.as_str(), f.key.size))
    }

    /// The manifest, from `fresh` hashes and the ones the walk found in `cache`; then
    /// brings `cache` up to date: the fresh files are recorded (unless racy), and the entries
    /// of files no longer in the workspace are dropped.
    pub fn finish(self, cache: &mut StatCache, fresh: Vec<Hashed>) -> Result<Scan, Error> {
        let (out, cached) = self.build(cache, fresh)?;
        // Entries for paths the walk did not find (removed files, or files turned into
        // directories or links).
        if cache.len() > cached {
            let files: std::collections::HashSet<&str> = out
                .manifest
                .entries
                .iter()
                .filter(|e| e.kind == EntryKind::File as i32)
                .map(|e| e.path.as_str())
                .collect();
            cache
                .entries
                .retain(|path, _| files.contains(path.as_str()));
        }
        Ok(out)
    }

    /// The entries of a partial walk ([`rescan`]), from `fresh` hashes and the ones found in
    /// `cache`; the fresh files are recorded in `cache` (unless racy). Entries of files that
    /// are gone are dropped from `cache` by [`patch`]'s caller.
    pub fn finish_partial(self, cache: &mut StatCache, fresh: Vec<Hashed>) -> Result<Scan, Error> {
        self.build(cache, fresh).map(|(scan, _)| scan)
    }

    /// The entries, and how many files of them `cache` holds afterwards.
    fn build(self, cache: &mut StatCache, fresh: Vec<Hashed>) -> Result<(Scan, usize), Error> {
        let Self { found, scan_start } = self;
        let mut fresh: HashMap<usize, (Hash, StatKey)> =
            fresh.into_iter().map(|(i, h, k)| (i, (h, k))).collect();
        let mut out = Scan::default();
        out.manifest.entries.reserve_exact(found.len());
        // Files of the walk the cache holds once this is done.
        let mut cached = 0usize;
        for (i, f) in found.into_iter().enumerate() {
            let mut entry = ManifestEntry {
                path: f.path,
                kind: f.kind as i32,
                mode: f.mode & MODE_MASK,
                size: 0,
                hash: Vec::new(),
                symlink_target: f.target,
            };
            if f.kind == EntryKind::Dir {
                out.dirs.push((f.key.ino, entry.path.clone()));
            }
            if f.kind == EntryKind::File {
                let hash = if let Some(hash) = f.known {
                    cached += 1;
                    entry.size = f.key.size;
                    hash
                } else {
                    let (hash, key) = fresh.remove(&i).ok_or_else(|| {
                        Error::Internal(format!("{:?} was neither cached nor hashed", entry.path))
                    })?;
                    out.hashed_files += 1;
                    out.hashed_bytes += key.size;
                    entry.size = key.size;
                    if key.racy(scan_start) {
                        cache.remove(&entry.path);
                        out.recheck.push(entry.path.clone());
                    } else {
                        cache.insert(entry.path.clone(), key, hash);
                        cached += 1;
                    }
                    hash
                };
                if f.linked {
                    out.recheck.push(entry.path.clone());
                }
                entry.hash = hash.to_vec();
            }
            out.manifest.entries.push(entry);
        }
        Ok((out, cached))
    }
}

/// Below this many bytes in at most [`INLINE_HASH_FILES`] files, files are hashed on the
/// calling thread: waking the rayon pool costs more than it saves.
const INLINE_HASH_BYTES: u64 = 1 << 20;
/// See [`INLINE_HASH_BYTES`].
const INLINE_HASH_FILES: usize = 16;

/// Hashes the files at `indices` of `walked`, in parallel on the rayon pool (a few small files
/// on the calling thread).
pub fn hash_files(root: &Dir, walked: &Walked, indices: &[usize]) -> Result<Vec<Hashed>, Error> {
    let one = |&i: &usize| {
        let (path, _) = walked.file(i);
        hash_file(root, path).map(|(hash, key)| (i, hash, key))
    };
    let bytes: u64 = indices.iter().map(|&i| walked.file(i).1).sum();
    if indices.len() <= INLINE_HASH_FILES && bytes < INLINE_HASH_BYTES {
        return indices.iter().map(one).collect();
    }
    indices.par_iter().map(one).collect()
}

/// Bytes of directory entries read per `getdents64` call.
const DIR_BUF: usize = 32 * 1024;
/// Entries a directory's walk counts before adding them to the shared count.
const COUNT_EVERY: usize = 1024;

/// One walk of a workspace.
struct Walk<'a> {
    /// Looked up for every file found.
    cache: &'a StatCache,
    /// Entries found so far: each directory adds its entries in steps of [`COUNT_EVERY`], and
    /// the walk stops once the total passes `max`.
    counted: AtomicUsize,
    max: usize,
}

impl Walk<'_> {
    /// Lists the directory `dir` (recursively; subdirectories in parallel on the rayon pool), whose
    /// path in the workspace is `prefix`.
    fn dir(&self, dir: OwnedFd, prefix: &str) -> Result<Vec<Found>, Error> {
        let (counted, max) = (&self.counted, self.max);
        let shown = if prefix.is_empty() { "." } else { prefix };
        let mut out = Vec::new();
        let mut subdirs = Vec::new();
        let mut uncounted = 0usize;
        let mut buf: Vec<u8> = Vec::with_capacity(DIR_BUF);
        // Entries are examined as they are read: `*at` calls do not depend on the read position.
        let mut listing = rustix::fs::RawDir::new(&dir, buf.spare_capacity_mut());
        while let Some(entry) = listing.next() {
            let entry = entry.map_err(|e| capture_error(shown, e))?;
            let cname = entry.file_name();
            if cname == c"." || cname == c".." {
                continue;
            }
            let Some(name) = cname.to_str().ok() else {
                return Err(Error::Uncapturable {
                    path: format!("{prefix}/{}", cname.to_string_lossy()),
                    why: "the name is not UTF-8: rename it".to_owned(),
                });
            };
            let mut path = String::with_capacity(prefix.len() + 1 + name.len());
            if !prefix.is_empty() {
                path.push_str(prefix);
                path.push('/');
            }
            path.push_str(name);
            uncounted += 1;
            if uncounted == COUNT_EVERY {
                if counted.fetch_add(uncounted, Ordering::Relaxed) + uncounted > max {
                    return Err(too_many(max));
                }
                uncounted = 0;
            }
            let st = rustix::fs::statat(&dir, cname, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| capture_error(&path, e))?;
            match self.entry(&dir, cname, path, &st)? {
                Some((found, Some(sub))) => {
                    subdirs.push((sub, found.path.clone()));
                    out.push(found);
                }
                Some((found, None)) => out.push(found),
                None => {}
            }
        }
        drop(dir);
        if counted.fetch_add(uncounted, Ordering::Relaxed) + uncounted > max {
            return Err(too_many(max));
        }
        let nested: Vec<Result<Vec<Found>, Error>> = subdirs
            .into_par_iter()
            .map(|(sub, path)| self.dir(sub, &path))
            .collect();
        for inner in nested {
            out.extend(inner?);
        }
        Ok(out)
    }
}

impl Walk<'_> {
    /// The entry `cname` of `dir` (at `path` in the workspace), whose `lstat` is `st`: a
    /// directory comes with its descriptor. None for what checkpoints do not record.
    fn entry(
        &self,
        dir: &OwnedFd,
        cname: &std::ffi::CStr,
        path: String,
        st: &Stat,
    ) -> Result<Option<(Found, Option<OwnedFd>)>, Error> {
        let (key, mode) = (StatKey::of_stat(st), st.st_mode);
        Ok(Some(match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                // O_NOFOLLOW | O_DIRECTORY: if the entry became a symlink or a file since the
                // stat, this fails rather than leaving the workspace.
                let sub = rustix::fs::openat(
                    dir,
                    cname,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| capture_error(&path, e))?;
                let found = Found::new(path, EntryKind::Dir, mode, key, String::new());
                (found, Some(sub))
            }
            FileType::RegularFile => {
                let known = self.cache.lookup(&path, &key);
                let mut file = Found::new(path, EntryKind::File, mode, key, String::new());
                file.known = known;
                file.linked = st.st_nlink > 1;
                (file, None)
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(dir, cname, Vec::new())
                    .map_err(|e| capture_error(&path, e))?;
                let Ok(target) = target.into_string() else {
                    return Err(Error::Uncapturable {
                        path,
                        why: "the symlink target is not UTF-8: change it".to_owned(),
                    });
                };
                (
                    Found::new(path, EntryKind::Symlink, mode, key, target),
                    None,
                )
            }
            _ => {
                warn!(path = %path, "skipping a socket, FIFO or device node: checkpoints record files, directories and symlinks");
                return Ok(None);
            }
        }))
    }
}

/// The changes that turn `old` into `new` (both sorted by path): the entries of `new` that are
/// not in `old` or differ there, and the paths of `old` that are not in `new`.
pub fn diff(old: &[ManifestEntry], new: &[ManifestEntry]) -> (Vec<ManifestEntry>, Vec<String>) {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => a.path.cmp(&b.path),
            (Some(_), None) => Order::Less,
            (None, _) => Order::Greater,
        };
        match order {
            Order::Less => {
                removed.push(old[i].path.clone());
                i += 1;
            }
            Order::Greater => {
                changed.push(new[j].clone());
                j += 1;
            }
            Order::Equal => {
                if old[i] != new[j] {
                    changed.push(new[j].clone());
                }
                i += 1;
                j += 1;
            }
        }
    }
    (changed, removed)
}

/// Hashes one file, opened beneath `root`; fails if it changes while being read.
pub fn hash_file(root: &Dir, path: &str) -> Result<(Hash, StatKey), Error> {
    let io = |e: std::io::Error| Error::io(format!("cannot read {path:?}"), e);
    let mut file = root.open(path).map_err(io)?;
    let before = StatKey::of(&file.metadata().map_err(io)?);
    let (hash, read) = hash_reader(&mut file, |_| Ok(())).map_err(io)?;
    let after = StatKey::of(&file.metadata().map_err(io)?);
    if before != after || read != after.size {
        return Err(Error::ChangedDuringCapture(path.to_owned()));
    }
    Ok((hash, after))
}

/// Reads `src` to its end through one buffer per thread (not a zeroed one per file), hashing
/// every chunk and handing it to `sink`; returns the hash and the bytes read.
pub fn hash_reader(
    src: &mut impl Read,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<(Hash, u64)> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; READ_BUF]);
    }
    let mut hasher = blake3::Hasher::new();
    let read = BUF.with_borrow_mut(|buf| {
        let mut read = 0u64;
        loop {
            let n = src.read(buf)?;
            if n == 0 {
                return Ok::<_, std::io::Error>(read);
            }
            hasher.update(&buf[..n]);
            sink(&buf[..n])?;
            read += n as u64;
        }
    })?;
    Ok((*hasher.finalize().as_bytes(), read))
}

/// Checks that every path of `manifest` is a clean relative path, entries are unique, files
/// carry 32-byte hashes, and every parent is a directory of the manifest.
pub fn validate(manifest: &Manifest) -> Result<(), Error> {
    let bad = |message: String| Error::InvalidArgument {
        field: "manifest".to_owned(),
        message,
    };
    let mut kinds: HashMap<&str, EntryKind> = HashMap::with_capacity(manifest.entries.len());
    for entry in &manifest.entries {
        let path = entry.path.as_str();
        let clean = !path.is_empty()
            && path.len() <= MAX_PATH_BYTES
            && !path.contains('\0')
            && path
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= 255);
        if !clean {
            return Err(bad(format!(
                "path {path:?} is not a clean relative path (no empty, `.` or `..` components)"
            )));
        }
        let kind = EntryKind::try_from(entry.kind).unwrap_or(EntryKind::Unspecified);
        match kind {
            EntryKind::File if entry.hash.len() != 32 => {
                return Err(bad(format!("file {path:?} has no 32-byte hash")));
            }
            EntryKind::Symlink if entry.symlink_target.is_empty() => {
                return Err(bad(format!("symlink {path:?} has no target")));
            }
            EntryKind::Unspecified => return Err(bad(format!("{path:?} has no kind"))),
            _ => {}
        }
        if kinds.insert(path, kind).is_some() {
            return Err(bad(format!("{path:?} appears twice")));
        }
    }
    for entry in &manifest.entries {
        if let Some((parent, _)) = entry.path.rsplit_once('/')
            && kinds.get(parent) != Some(&EntryKind::Dir)
        {
            return Err(bad(format!(
                "{:?} is inside {parent:?}, which is not a directory of the manifest",
                entry.path
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt as _, symlink};

    use cap_std::ambient_authority;

    use super::*;

    fn open(path: &std::path::Path) -> Dir {
        Dir::open_ambient_dir(path, ambient_authority()).expect("open")
    }

    fn set_old_mtime(path: &std::path::Path) {
        let old = SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(path)
            .expect("open")
            .set_modified(old)
            .expect("set mtime");
    }

    /// A partial walk of the paths that changed, patched into the old tree, gives the tree a
    /// whole walk gives, and the same difference.
    #[test]
    fn rescan_and_patch_match_a_whole_walk() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        for d in ["a/x", "a/y", "b", "gone/deep"] {
            std::fs::create_dir_all(root.join(d)).expect("dirs");
        }
        for f in [
            "a/x/1",
            "a/x/2",
            "a/y/1",
            "b/1",
            "b/2",
            "gone/deep/1",
            "kind",
        ] {
            std::fs::write(root.join(f), f).expect("write");
        }
        let dir = open(root);
        let mut cache = StatCache::default();
        let old = scan(&dir, &mut cache, 1000).expect("scan").manifest.entries;

        std::fs::write(root.join("a/x/1"), "changed").expect("write");
        std::fs::remove_dir_all(root.join("gone")).expect("rm");
        std::fs::remove_file(root.join("kind")).expect("rm");
        std::fs::create_dir_all(root.join("kind/inner")).expect("dir over file");
        std::fs::write(root.join("kind/inner/f"), "f").expect("write");
        std::fs::rename(root.join("a/y"), root.join("b/y")).expect("mv");
        std::fs::set_permissions(root.join("b"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");

        let targets = Targets {
            paths: ["a/x/1", "gone", "kind", "a/y", "b/y", "b", "b/y/1"]
                .map(str::to_owned)
                .into(),
            subtrees: ["b/y".to_owned()].into(),
            linked: BTreeSet::new(),
        };
        let found = rescan(&dir, &cache, &old, &targets, 1000).expect("rescan");
        assert!(!found.new_link);
        let todo = found.walked.to_hash();
        let fresh = hash_files(&dir, &found.walked, &todo).expect("hash");
        let partial = found
            .walked
            .finish_partial(&mut cache, fresh)
            .expect("finish")
            .manifest
            .entries;
        let patched = patch(old.clone(), partial, &found.examined, &found.cleared);

        let whole = scan(&dir, &mut StatCache::default(), 1000)
            .expect("scan")
            .manifest
            .entries;
        assert_eq!(patched.entries, whole);
        let (changed, removed) = diff(&old, &whole);
        assert_eq!(patched.changed, changed);
        let mut got_removed = patched.removed;
        got_removed.sort();
        assert_eq!(got_removed, removed);
    }

    #[test]
    fn manifest_records_files_dirs_symlinks_and_modes_sorted() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        std::fs::create_dir_all(root.join("src/empty")).expect("dirs");
        std::fs::write(root.join("src/main.py"), b"print(1)\n").expect("write");
        std::fs::write(root.join("run.sh"), b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        symlink("/etc/passwd", root.join("escape")).expect("symlink");
        symlink("src/main.py", root.join("link")).expect("symlink");

        let scan = scan(&open(root), &mut StatCache::default(), 100).expect("scan");
        let got: Vec<(&str, i32, u32, u64, &str)> = scan
            .manifest
            .entries
            .iter()
            .map(|e| {
                (
                    e.path.as_str(),
                    e.kind,
                    e.mode,
                    e.size,
                    e.symlink_target.as_str(),
                )
            })
            .collect();
        let (f, d, l) = (
            EntryKind::File as i32,
            EntryKind::Dir as i32,
            EntryKind::Symlink as i32,
        );
        assert_eq!(got[0], ("escape", l, 0o777, 0, "/etc/passwd"));
        assert_eq!(got[1], ("link", l, 0o777, 0, "src/main.py"));
        assert_eq!(got[2], ("run.sh", f, 0o755, 10, ""));
        assert_eq!(got[3].0, "src");
        assert_eq!(got[3].1, d);
        assert_eq!(got[4].0, "src/empty");
        assert_eq!(got[5].0, "src/main.py");
        assert_eq!(
            scan.manifest.entries[5].hash,
            blake3::hash(b"print(1)\n").as_bytes().to_vec()
        );
        assert_eq!(scan.hashed_files, 2);
        validate(&scan.manifest).expect("valid");

        let err = super::scan(&open(root), &mut StatCache::default(), 3).expect_err("limit");
        assert!(matches!(err, Error::LimitExceeded { .. }));
    }

    #[test]
    fn stat_cache_skips_unchanged_files_and_distrusts_fresh_ones() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        for name in ["a", "b", "c"] {
            std::fs::write(root.join(name), name.repeat(1000)).expect("write");
            set_old_mtime(&root.join(name));
        }
        std::fs::write(root.join("fresh"), b"just written").expect("write");
        let mut cache = StatCache::default();
        let first = scan(&open(root), &mut cache, 100).expect("scan");
        assert_eq!(first.hashed_files, 4);
        assert_eq!(
            cache.len(),
            3,
            "a file written just now is racy, not cached"
        );

        std::fs::write(root.join("b"), "B".repeat(1000)).expect("rewrite same size");
        let second = scan(&open(root), &mut cache, 100).expect("scan");
        assert_eq!(second.hashed_files, 2, "only b (changed) and fresh (racy)");
        let b = second
            .manifest
            .entries
            .iter()
            .find(|e| e.path == "b")
            .expect("b");
        assert_eq!(
            b.hash,
            blake3::hash("B".repeat(1000).as_bytes())
                .as_bytes()
                .to_vec()
        );

        // The cache follows the workspace: a removed file and a file turned into a directory
        // leave it, so a later file at the same path is hashed again.
        std::fs::remove_file(root.join("c")).expect("remove c");
        std::fs::remove_file(root.join("a")).expect("remove a");
        std::fs::create_dir(root.join("a")).expect("a is a directory now");
        set_old_mtime(&root.join("b"));
        set_old_mtime(&root.join("fresh"));
        let third = scan(&open(root), &mut cache, 100).expect("scan");
        assert_eq!(third.hashed_files, 2, "b and fresh were not cached");
        let mut cached: Vec<&str> = cache.iter().map(|(path, _)| path.as_str()).collect();
        cached.sort_unstable();
        assert_eq!(cached, ["b", "fresh"]);
    }

    #[test]
    fn the_entry_limit_holds_for_large_directories() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        for i in 0..1500 {
            std::fs::write(root.join(format!("f{i}")), b"").expect("write");
        }
        let err = scan(&open(root), &mut StatCache::default(), 1200).expect_err("limit");
        assert!(matches!(err, Error::LimitExceeded { .. }), "{err}");
        let err = scan(&open(root), &mut StatCache::default(), 1499).expect_err("limit");
        assert!(matches!(err, Error::LimitExceeded { .. }), "{err}");
        let scan = scan(&open(root), &mut StatCache::default(), 1500).expect("at the limit");
        assert_eq!(scan.manifest.entries.len(), 1500);
    }

    #[test]
    fn the_walk_records_links_without_following_them_and_skips_fifos() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("outside");
        let root = tmp.path().join("ws");
        std::fs::create_dir_all(root.join("src")).expect("dirs");
        std::fs::create_dir_all(&outside).expect("dirs");
        std::fs::write(outside.join("secret"), b"not ours").expect("write");
        std::fs::write(root.join("src/a.txt"), b"a").expect("write");
        symlink("/", root.join("to-root")).expect("symlink");
        symlink(&outside, root.join("to-outside")).expect("symlink");
        symlink("src", root.join("to-src")).expect("symlink");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");

        let scan = scan(&open(&root), &mut StatCache::default(), 100).expect("scan");
        let got: Vec<(&str, i32)> = scan
            .manifest
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind))
            .collect();
        let (f, d, l) = (
            EntryKind::File as i32,
            EntryKind::Dir as i32,
            EntryKind::Symlink as i32,
        );
        assert_eq!(
            got,
            [
                ("src", d),
                ("src/a.txt", f),
                ("to-outside", l),
                ("to-root", l),
                ("to-src", l),
            ],
            "links are recorded, not entered; the FIFO is skipped"
        );
        assert_eq!(scan.hashed_files, 1);
    }

    #[test]
    fn diff_lists_changed_added_and_removed_entries() {
        let file = |p: &str, content: &[u8]| ManifestEntry {
            path: p.to_owned(),
            kind: EntryKind::File as i32,
            mode: 0o644,
            size: content.len() as u64,
            hash: blake3::hash(content).as_bytes().to_vec(),
            symlink_target: String::new(),
        };
        let old = vec![file("a", b"1"), file("b", b"2"), file("c", b"3")];
        let mut chmod = file("c", b"3");
        chmod.mode = 0o600;
        let new = vec![
            file("a", b"1"),
            file("b2", b"x"),
            chmod.clone(),
            file("d", b"4"),
        ];
        let (changed, removed) = diff(&old, &new);
        let paths: Vec<&str> = changed.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["b2", "c", "d"]);
        assert_eq!(changed[1], chmod);
        assert_eq!(removed, ["b"]);
        let (changed, removed) = diff(&new, &new);
        assert!(changed.is_empty() && removed.is_empty());
        let (changed, removed) = diff(&[], &old);
        assert_eq!((changed.len(), removed.len()), (3, 0));
        let (changed, removed) = diff(&old, &[]);
        assert_eq!((changed.len(), removed.len()), (0, 3));
    }

    #[test]
    fn validation_refuses_unclean_paths_orphans_and_duplicates() {
        let file = |p: &str| ManifestEntry {
            path: p.to_owned(),
            kind: EntryKind::File as i32,
            hash: vec![0; 32],
            ..ManifestEntry::default()
        };
        let dir = |p: &str| ManifestEntry {
            path: p.to_owned(),
            kind: EntryKind::Dir as i32,
            ..ManifestEntry::default()
        };
        let m = |entries: Vec<ManifestEntry>| Manifest {
            entries,
            ..Manifest::default()
        };
        assert!(validate(&m(vec![dir("a"), file("a/b")])).is_ok());
        for bad in [
            m(vec![file("../x")]),
            m(vec![file("/etc/passwd")]),
            m(vec![file("a//b")]),
            m(vec![file("./x")]),
            m(vec![file("a/b")]),
            m(vec![file("x"), file("x")]),
            m(vec![ManifestEntry {
                hash: vec![1],
                ..file("short")
            }]),
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
