//! Materialising a manifest in a staging directory next to the workspace.
//!
//! Every file's content comes from the first source that has it: the worker's blob cache, a
//! file of the current workspace whose stat still matches the stat cache (a rollback on the
//! worker that captured needs no download), or the coordinator (GetBlobs, written straight into
//! the staging tree). Content is always copied, never hard-linked, and hashed while copying:
//! a source that does not match its hash fails the restore. Restored files get an mtime just
//! before the restore began, so the stat cache can trust them at once (any later write moves
//! mtime past it). Directory modes are applied last, deepest first, so read-only directories do
//! not block their own filling.

use std::{
    collections::HashMap,
    fs,
    io::{self, Read, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use cap_std::fs::Dir;
use heist_proto::v1::{BlobChunk, EntryKind, Manifest};
use rayon::prelude::*;
use tokio::sync::mpsc;

use super::{
    cache::BlobCache,
    manifest::{Hash, MODE_MASK, StatCache, StatKey},
};
use crate::Error;

/// Copy buffer.
const COPY_BUF: usize = 256 * 1024;

/// A file to materialise.
#[derive(Clone, Debug)]
pub struct FilePlan {
    /// Relative path.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
    /// Content hash.
    pub hash: Hash,
}

/// Where a blob's content comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The worker's blob cache.
    Cache(PathBuf),
    /// A file of the current workspace (relative path).
    Workspace(String),
    /// The coordinator; written to the staging path of the blob's first file.
    Remote,
}

/// A validated manifest, split by kind.
#[derive(Debug, Default)]
pub struct Plan {
    /// Directories (path, mode), parents first.
    pub dirs: Vec<(String, u32)>,
    /// Files.
    pub files: Vec<FilePlan>,
    /// Symlinks (path, target).
    pub symlinks: Vec<(String, String)>,
}

impl Plan {
    /// Splits a manifest already checked by `manifest::validate`.
    pub fn new(manifest: &Manifest) -> Self {
        let mut plan = Self::default();
        let mut sorted: Vec<_> = manifest.entries.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        for e in sorted {
            match EntryKind::try_from(e.kind) {
                Ok(EntryKind::Dir) => plan.dirs.push((e.path.clone(), e.mode & MODE_MASK)),
                Ok(EntryKind::Symlink) => {
                    plan.symlinks
                        .push((e.path.clone(), e.symlink_target.clone()));
                }
                Ok(EntryKind::File) => {
                    if let Ok(hash) = e.hash.as_slice().try_into() {
                        plan.files.push(FilePlan {
                            path: e.path.clone(),
                            mode: e.mode & MODE_MASK,
                            size: e.size,
                            hash,
                        });
                    }
                }
                _ => {}
            }
        }
        plan
    }

    /// The first file of each distinct blob, in manifest order.
    pub fn first_files(&self) -> Vec<&FilePlan> {
        let mut seen = std::collections::HashSet::new();
        self.files.iter().filter(|f| seen.insert(f.hash)).collect()
    }
}

/// Decides each distinct blob's source (blocking: stats the current workspace).
pub fn sources(
    plan: &Plan,
    cache: &BlobCache,
    old: Option<(&Dir, &StatCache)>,
) -> HashMap<Hash, Source> {
    let mut by_hash: HashMap<Hash, Vec<&str>> = HashMap::new();
    if let Some((_, stat_cache)) = old {
        for (path, (_, hash)) in stat_cache.iter() {
            by_hash.entry(*hash).or_default().push(path);
        }
    }
    let mut out = HashMap::new();
    for file in plan.first_files() {
        let source = if let Some(path) = cache.get(&file.hash) {
            Source::Cache(path)
        } else if let Some((dir, stat_cache)) = old
            && let Some(path) = by_hash.get(&file.hash).and_then(|paths| {
                paths.iter().find(|p| {
                    dir.symlink_metadata(p).is_ok_and(|m| {
                        m.is_file() && stat_cache.lookup(p, &StatKey::of(&m)) == Some(file.hash)
                    })
                })
            })
        {
            Source::Workspace((*path).to_owned())
        } else {
            Source::Remote
        };
        out.insert(file.hash, source);
    }
    out
}

/// Creates the staging root (mode 0700 until [`finish_modes`]) and every directory and
/// symlink of the plan.
pub fn build_skeleton(staging: &Path, plan: &Plan) -> Result<(), Error> {
    let io = |what: &str, e| Error::io(format!("cannot create {what} in the restore staging"), e);
    fs::create_dir(staging).map_err(|e| io("the staging directory", e))?;
    for (path, _) in &plan.dirs {
        fs::create_dir(staging.join(path)).map_err(|e| io(path, e))?;
    }
    for (path, target) in &plan.symlinks {
        std::os::unix::fs::symlink(target, staging.join(path)).map_err(|e| io(path, e))?;
    }
    Ok(())
}

/// Creates a file of the plan in the staging tree with its final mode.
fn create_file(staging: &Path, file: &FilePlan) -> Result<fs::File, Error> {
    let path = staging.join(&file.path);
    let io = |e| {
        Error::io(
            format!("cannot create {:?} in the restore staging", file.path),
            e,
        )
    };
    let out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    out.set_permissions(fs::Permissions::from_mode(file.mode))
        .map_err(io)?;
    Ok(out)
}

/// Writes blobs streamed from the coordinator into the staging files of `expected` (in
/// request order), verifying each one's hash and size. Runs on a blocking thread.
pub fn write_fetched(
    staging: &Path,
    expected: &[FilePlan],
    mut rx: mpsc::Receiver<BlobChunk>,
) -> Result<u64, Error> {
    let mut bytes = 0u64;
    let mut chunk = rx.blocking_recv();
    for file in expected {
        let mut out = io::BufWriter::with_capacity(COPY_BUF, create_file(staging, file)?);
        let mut hasher = blake3::Hasher::new();
        let mut written = 0u64;
        let wrong = || {
            Error::Internal(format!(
                "the blob store sent a bad stream for {:?}",
                file.path
            ))
        };
        loop {
            let Some(c) = chunk.take() else {
                return Err(wrong());
            };
            if c.hash.as_slice() != file.hash || c.offset != written {
                return Err(wrong());
            }
            hasher.update(&c.data);
            out.write_all(&c.data)
                .map_err(|e| Error::io(format!("cannot write {:?}", file.path), e))?;
            written += c.data.len() as u64;
            chunk = rx.blocking_recv();
            if written >= file.size {
                break;
            }
        }
        out.flush()
            .map_err(|e| Error::io(format!("cannot write {:?}", file.path), e))?;
        if written != file.size || hasher.finalize().as_bytes() != &file.hash {
            return Err(Error::Internal(format!(
                "blob for {:?} does not match its hash: the blob store may be corrupt",
                file.path
            )));
        }
        bytes += written;
    }
    Ok(bytes)
}

/// Copies every file that was not fetched from its source (in parallel), verifying hashes.
pub fn copy_local(
    staging: &Path,
    plan: &Plan,
    sources: &HashMap<Hash, Source>,
    old: Option<&Dir>,
) -> Result<(), Error> {
    let firsts: HashMap<Hash, &str> = plan
        .first_files()
        .into_iter()
        .map(|f| (f.hash, f.path.as_str()))
        .collect();
    plan.files.par_iter().try_for_each(|file| {
        let first = firsts.get(&file.hash).copied().unwrap_or_default();
        let source = sources.get(&file.hash).unwrap_or(&Source::Remote);
        let mut input: Box<dyn Read> = match source {
            Source::Remote if first == file.path => return Ok(()), // fetched in place
            Source::Remote => Box::new(open(&staging.join(first))?),
            Source::Cache(path) => Box::new(open(path)?),
            Source::Workspace(path) => {
                let dir =
                    old.ok_or_else(|| Error::Internal("no workspace to copy from".to_owned()))?;
                Box::new(
                    dir.open(path)
                        .map_err(|e| Error::io(format!("cannot read {path:?}"), e))?,
                )
            }
        };
        let mut out = create_file(staging, file)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf =
            vec![0u8; COPY_BUF.min(usize::try_from(file.size).unwrap_or(COPY_BUF).max(4096))];
        let mut total = 0u64;
        let io = |e| Error::io(format!("cannot restore {:?}", file.path), e);
        loop {
            let n = input.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io)?;
            total += n as u64;
        }
        if total != file.size || hasher.finalize().as_bytes() != &file.hash {
            return Err(Error::Internal(format!(
                "the local copy of {:?} does not match the checkpoint (it changed during the \
                 restore, or the blob cache is damaged): retry",
                file.path
            )));
        }
        Ok(())
    })
}

fn open(path: &Path) -> Result<fs::File, Error> {
    fs::File::open(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
}

/// Stamps every file with `mtime`, records it in a new stat cache, then applies directory modes
/// (deepest first) and the root's mode.
pub fn finish_modes(
    staging: &Path,
    plan: &Plan,
    root_mode: u32,
    mtime: SystemTime,
) -> Result<StatCache, Error> {
    let times = fs::FileTimes::new().set_modified(mtime);
    let keys: Vec<Result<(String, StatKey, Hash), Error>> = plan
        .files
        .par_iter()
        .map(|f| {
            let io = |e| Error::io(format!("cannot finish {:?}", f.path), e);
            let file = fs::File::options()
                .write(true)
                .open(staging.join(&f.path))
                .map_err(io)?;
            file.set_times(times).map_err(io)?;
            let meta = file.metadata().map_err(io)?;
            Ok((f.path.clone(), stat_key(&meta), f.hash))
        })
        .collect();
    let mut cache = StatCache::default();
    for key in keys {
        let (path, key, hash) = key?;
        cache.insert(path, key, hash);
    }
    for (path, mode) in plan.dirs.iter().rev() {
        fs::set_permissions(staging.join(path), fs::Permissions::from_mode(*mode))
            .map_err(|e| Error::io(format!("cannot set the mode of {path:?}"), e))?;
    }
    fs::set_permissions(staging, fs::Permissions::from_mode(root_mode & MODE_MASK))
        .map_err(|e| Error::io("cannot set the workspace mode", e))?;
    Ok(cache)
}

fn stat_key(meta: &fs::Metadata) -> StatKey {
    use std::os::unix::fs::MetadataExt as _;
    StatKey {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
    }
}

/// Removes a directory tree, making read-only directories writable first (best effort).
pub fn remove_tree(path: &Path) {
    if fs::remove_dir_all(path).is_ok() {
        return;
    }
    fn unlock(dir: &Path) {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    unlock(&entry.path());
                }
            }
        }
    }
    unlock(path);
    if let Err(err) = fs::remove_dir_all(path)
        && err.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %err, "cannot remove a leftover restore directory");
    }
}
