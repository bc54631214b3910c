//! The content-addressed blob store: `<data_dir>/blobs/<2 hex>/<64 hex>`, each file named by the
//! BLAKE3 hash of its content.
//!
//! Writing: [`Cas::writer`] streams a blob into an anonymous file (`O_TMPFILE`) in its own
//! shard directory while hashing it; [`BlobWriter::finish`] checks hash and size and links it
//! in under its name. A link never replaces: a blob that is already there is kept as it is
//! (it may be durable and named by a committed manifest, which a not-yet-synced copy renamed
//! over it would put at risk), and a crash leaves no temporary file behind. Where the file
//! system cannot make anonymous files (or `/proc/self/fd` is missing), the upload goes to a
//! named temporary file (`.upload-<uuid>`) that is hard-linked in and then removed; leftovers
//! of those are removed by the scan for unreferenced blobs ([`Cas::unreferenced`]). Temporary
//! files sit next to their blobs, not in one shared directory: the parallel PutBlobs streams of
//! a capture then work in different directories instead of queueing on one directory's lock
//! (10,000 files of 20 KiB from 4 threads: 3.2–3.7 s against 4.1–4.4 s through one directory,
//! measured in alternating runs). Nothing is fsynced while writing: the
//! uploader records the blobs it stored ([`Cas::written`]), and whoever commits a manifest
//! first makes every blob written so far durable with one [`Cas::sync_written`] (one
//! [`Cas::sync_batch`]), so the several PutBlobs streams of a capture cost one sync, not one
//! each. Measured on this machine for 10,000 files of 20 KiB: one `syncfs(2)` 0.2 s, one
//! `fsync` per file 2.5 s, 8 threads of `fsync` 0.9 s; so a large batch is made durable with
//! `syncfs` on the store's file system. `syncfs` also flushes unrelated dirty data on that file
//! system, so a small batch (at most [`FSYNC_BATCH_MAX`] blobs, e.g. a capture after one file
//! changed) is made durable with an `fsync` of each file and of its shard directory instead.
//!
//! Write-back is started ahead of that sync: once [`FLUSH_AHEAD_BYTES`] of recorded blobs are
//! waiting, a background thread makes them durable ([`Cas::written`] starts it; one at a time)
//! while the uploads go on, so the sync before a large commit finds little left to write. A
//! first capture of 200 MiB otherwise waited for all of it to reach the disk after the last
//! byte arrived.
//!
//! A crash between a rename and the next sync can leave a blob whose name is durable but whose
//! content is not. No manifest references such a blob (manifests are committed only after a
//! sync), and [`Cas::unreferenced`] lets startup remove every blob no manifest names, so such a
//! blob never survives a restart.
//!
//! Reading: [`Cas::read_chunk`] reads at an offset (the caller streams 1 MiB chunks).

use std::{
    fs,
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

use tracing::warn;

use crate::error::Error;

/// Size of one streamed chunk, in bytes.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Name prefix of a blob being uploaded, in its shard directory.
const UPLOAD_PREFIX: &str = ".upload-";
/// Largest batch made durable file by file; larger batches use one `syncfs`.
pub const FSYNC_BATCH_MAX: usize = 64;
pub use heist_proto::hash::{Hash, hex, parse_hex};

/// A hash from wire bytes (exactly 32).
pub fn hash_from_bytes(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

/// Blobs written and not yet synced beyond which [`Cas::written`] syncs at once (bounds the
/// list when uploads are never committed).
const MAX_UNSYNCED: usize = 100_000;
/// Bytes of recorded, unsynced blobs at which a background sync starts (see the module docs).
pub const FLUSH_AHEAD_BYTES: u64 = 32 << 20;

/// The blob store.
#[derive(Debug)]
pub struct Cas {
    root: PathBuf,
    /// Blobs renamed into place since the last sync, and their bytes.
    unsynced: Mutex<(Vec<Hash>, u64)>,
    /// A background sync is running (at most one).
    flushing: AtomicBool,
    /// Uploads go to anonymous files (`O_TMPFILE`, linked in by `/proc/self/fd`); probed at
    /// open.
    anonymous: bool,
    /// Held while a sync runs, so a caller that finds nothing left to sync still returns only
    /// after the sync that took its blobs.
    syncing: Mutex<()>,
}

impl Cas {
    /// Opens (creating) the store at `root`. Temporary files a previous process left in the
    /// shard directories go with the startup scan ([`Cas::unreferenced`]); the shared `tmp/`
    /// directory of older stores is removed here.
    pub fn open(root: &Path) -> Result<Self, Error> {
        heist_proto::files::private_dir(root).map_err(|e| Error::io("cannot create", root, e))?;
        let legacy_tmp = root.join("tmp");
        if legacy_tmp.exists() {
            fs::remove_dir_all(&legacy_tmp)
                .map_err(|e| Error::io("cannot clean", &legacy_tmp, e))?;
        }
        for shard in 0..=255u8 {
            let dir = root.join(format!("{shard:02x}"));
            fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
        }
        Ok(Self {
            anonymous: anonymous_files_work(root),
            root: root.to_path_buf(),
            unsynced: Mutex::new((Vec::new(), 0)),
            flushing: AtomicBool::new(false),
            syncing: Mutex::new(()),
        })
    }

    /// Records blobs just stored (renamed into place), `bytes` in all, to be made durable by
    /// the next [`Cas::sync_written`]. Once [`FLUSH_AHEAD_BYTES`] are waiting, a background
    /// thread starts that sync (unless one runs already).
    pub fn written(self: &Arc<Self>, hashes: &[Hash], bytes: u64) -> Result<(), Error> {
        let (many, ahead) = {
            let mut unsynced = self.unsynced.lock().unwrap_or_else(PoisonError::into_inner);
            unsynced.0.extend_from_slice(hashes);
            unsynced.1 = unsynced.1.saturating_add(bytes);
            (
                unsynced.0.len() > MAX_UNSYNCED,
                unsynced.1 >= FLUSH_AHEAD_BYTES,
            )
        };
        if many {
            self.sync_written()?;
        } else if ahead && !self.flushing.swap(true, Ordering::AcqRel) {
            let cas = self.clone();
            let started = std::thread::Builder::new()
                .name("blob-flush".to_owned())
                .spawn(move || {
                    // A failure puts the blobs back: the commit's own sync reports it.
                    if let Err(err) = cas.sync_written() {
                        warn!(%err, "background sync of the blob store failed");
                    }
                    cas.flushing.store(false, Ordering::Release);
                });
            if started.is_err() {
                self.flushing.store(false, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Makes every blob recorded by [`Cas::written`] before the call durable (per-file `fsync`
    /// or one `syncfs`, see [`Cas::sync_batch`]). Called before a manifest naming them commits.
    pub fn sync_written(&self) -> Result<(), Error> {
        let _one = self.syncing.lock().unwrap_or_else(PoisonError::into_inner);
        let (batch, bytes) =
            std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            return Ok(());
        }
        let synced = self.sync_batch(&batch);
        if synced.is_err() {
            let mut unsynced = self.unsynced.lock().unwrap_or_else(PoisonError::into_inner);
            unsynced.0.extend(batch);
            unsynced.1 = unsynced.1.saturating_add(bytes);
        }
        synced
    }

    /// Where blob `hash` lives.
    pub fn path(&self, hash: &Hash) -> PathBuf {
        let name = hex(hash);
        self.root.join(&name[..2]).join(name)
    }

    /// Whether the blob is in the store.
    pub fn contains(&self, hash: &Hash) -> bool {
        fs::symlink_metadata(self.path(hash)).is_ok_and(|m| m.is_file())
    }

    /// Size of a stored blob, if present.
    pub fn size(&self, hash: &Hash) -> Option<u64> {
        fs::symlink_metadata(self.path(hash))
            .ok()
            .filter(fs::Metadata::is_file)
            .map(|m| m.len())
    }

    /// Starts writing a blob of `size` bytes named `hash`.
    pub fn writer(&self, hash: Hash, size: u64) -> Result<BlobWriter, Error> {
        let dest = self.path(&hash);
        let (file, tmp) = if self.anonymous {
            let shard = dest.parent().unwrap_or(&self.root);
            (
                anonymous_file(shard)
                    .map_err(|e| Error::io("cannot create a file in", shard, e))?,
                None,
            )
        } else {
            let tmp =
                dest.with_file_name(format!("{UPLOAD_PREFIX}{}", uuid::Uuid::new_v4().simple()));
            let file = fs::File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
            (file, Some(tmp))
        };
        Ok(BlobWriter {
            hash,
            size,
            written: 0,
            hasher: blake3::Hasher::new(),
            file,
            tmp,
            dest,
            stored: false,
        })
    }

    /// Makes the blobs `written` (just renamed into place) durable, choosing per-file `fsync`
    /// or one `syncfs` by batch size (see the module docs).
    pub fn sync_batch(&self, written: &[Hash]) -> Result<(), Error> {
        if written.len() > FSYNC_BATCH_MAX {
            return self.sync();
        }
        let mut shards = std::collections::BTreeSet::new();
        for hash in written {
            let path = self.path(hash);
            match fs::File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // Removed since (an upload never committed, swept): nothing to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("cannot sync", &path, e)),
            }
            if let Some(dir) = path.parent() {
                shards.insert(dir.to_path_buf());
            }
        }
        for dir in shards {
            fs::File::open(&dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("cannot sync", &dir, e))?;
        }
        Ok(())
    }

    /// Makes every blob written so far durable: one `syncfs(2)` on the store's file system.
    pub fn sync(&self) -> Result<(), Error> {
        let dir =
            fs::File::open(&self.root).map_err(|e| Error::io("cannot open", &self.root, e))?;
        nix::unistd::syncfs(&dir)
            .map_err(|e| Error::io("cannot sync", &self.root, io::Error::from(e)))
    }

    /// Reads up to `buf.len()` bytes of blob `hash` at `offset`; returns how many (0 at the end).
    /// A missing blob is `Ok(None)`.
    pub fn read_chunk(
        &self,
        hash: &Hash,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Option<usize>, Error> {
        let path = self.path(hash);
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("cannot open", path, e)),
        };
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io("cannot read", &path, e))?;
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("cannot read", path, e)),
            }
        }
        Ok(Some(filled))
    }

    /// Re-hashes a stored blob: `Some(true)` when its content matches its name.
    pub fn verify(&self, hash: &Hash) -> Result<Option<bool>, Error> {
        let path = self.path(hash);
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("cannot open", path, e)),
        };
        let mut hasher = blake3::Hasher::new();
        io::copy(&mut file, &mut hasher).map_err(|e| Error::io("cannot read", &path, e))?;
        Ok(Some(hasher.finalize().as_bytes() == hash))
    }

    /// Removes a blob; returns its size if it was there.
    pub fn remove(&self, hash: &Hash) -> Result<Option<u64>, Error> {
        let path = self.path(hash);
        let size = self.size(hash);
        match fs::remove_file(&path) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("cannot remove", path, e)),
        }
    }

    /// Every stored blob for which `referenced` is false and that was last modified before
    /// `older_than` (`None`: any age). Temporary files of uploads last written before
    /// `older_than` are removed on the way (`None`, at startup: all of them; an upload stalled
    /// for longer than the sweep's grace fails and is retried).
    pub fn unreferenced(
        &self,
        referenced: impl Fn(&Hash) -> bool,
        older_than: Option<SystemTime>,
    ) -> Result<Vec<Hash>, Error> {
        let mut out = Vec::new();
        for shard in 0..=255u8 {
            let dir = self.root.join(format!("{shard:02x}"));
            let entries = fs::read_dir(&dir).map_err(|e| Error::io("cannot read", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io("cannot read", &dir, e))?;
                let old_enough = || match older_than {
                    None => true,
                    Some(limit) => entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t < limit),
                };
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    continue;
                };
                if name.starts_with(UPLOAD_PREFIX) {
                    // An upload that never finished (its writer went with a crash).
                    if old_enough() {
                        let path = entry.path();
                        match fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(Error::io("cannot remove", &path, e)),
                        }
                    }
                    continue;
                }
                let Some(hash) = parse_hex(name) else {
                    continue;
                };
                if !referenced(&hash) && old_enough() {
                    out.push(hash);
                }
            }
        }
        Ok(out)
    }
}

/// Why a blob upload was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// More bytes than announced, or a chunk at the wrong offset.
    BadChunk(String),
    /// The content hashes to something else, or its size differs.
    Mismatch,
}

/// A blob being written. Dropping it unfinished removes the temporary file.
#[derive(Debug)]
pub struct BlobWriter {
    hash: Hash,
    size: u64,
    written: u64,
    hasher: blake3::Hasher,
    /// Written chunk by chunk (chunks are up to 1 MiB: no extra buffering).
    file: fs::File,
    /// The named temporary file, where the store cannot make anonymous ones.
    tmp: Option<PathBuf>,
    dest: PathBuf,
    /// Linked into place (nothing to clean up).
    stored: bool,
}

impl BlobWriter {
    /// The blob being written.
    pub fn hash(&self) -> &Hash {
        &self.hash
    }

    /// Its announced size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes received so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends a chunk that must start at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Result<(), Rejected>, Error> {
        if offset != self.written {
            return Ok(Err(Rejected::BadChunk(format!(
                "chunk at offset {offset}, expected {}",
                self.written
            ))));
        }
        let end = self.written + data.len() as u64;
        if end > self.size {
            return Ok(Err(Rejected::BadChunk(format!(
                "{end} bytes sent for a blob announced as {} bytes",
                self.size
            ))));
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .map_err(|e| Error::io("cannot write", &self.dest, e))?;
        self.written = end;
        Ok(Ok(()))
    }

    /// Checks size and hash and links the blob in under its name; a copy already there is
    /// kept, never replaced.
    pub fn finish(mut self) -> Result<Result<(), Rejected>, Error> {
        if self.written != self.size || self.hasher.finalize().as_bytes() != &self.hash {
            return Ok(Err(Rejected::Mismatch));
        }
        let linked = match &self.tmp {
            Some(tmp) => fs::hard_link(tmp, &self.dest),
            None => link_file(&self.file, &self.dest),
        };
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("cannot store", &self.dest, e)),
        }
        self.stored = true;
        if let Some(tmp) = &self.tmp {
            // Its name only: the blob keeps the content under its own.
            let _ = fs::remove_file(tmp);
        }
        Ok(Ok(()))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // An anonymous file goes with its descriptor.
        if !self.stored
            && let Some(tmp) = &self.tmp
        {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// An anonymous file in `dir` (`O_TMPFILE`): it has no name until linked in, and goes with its
/// descriptor if never linked (a crash leaves nothing).
fn anonymous_file(dir: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_TMPFILE)
        .open(dir)
}

/// Links `file` in as `dest` (failing with `AlreadyExists` if something is there), through
/// its `/proc/self/fd` path, which `linkat(2)` follows to the file itself (linking by the
/// descriptor alone, `AT_EMPTY_PATH`, needs CAP_DAC_READ_SEARCH).
fn link_file(file: &fs::File, dest: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let source = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        &source,
        nix::fcntl::AT_FDCWD,
        dest,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )
    .map_err(io::Error::from)
}

/// Whether anonymous files can be made and linked in at `root` (the file system supports
/// `O_TMPFILE` and `/proc/self/fd` is there): tried once, with a probe file that is removed.
fn anonymous_files_work(root: &Path) -> bool {
    let probe = root.join(format!(".probe-{}", uuid::Uuid::new_v4().simple()));
    let works = anonymous_file(root)
        .and_then(|file| link_file(&file, &probe))
        .is_ok();
    let _ = fs::remove_file(&probe);
    works
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(data: &[u8]) -> Hash {
        *blake3::hash(data).as_bytes()
    }

    fn put(cas: &Cas, data: &[u8], chunk: usize) -> Result<(), Rejected> {
        let mut w = cas.writer(hash(data), data.len() as u64).expect("writer");
        let mut offset = 0;
        for piece in data.chunks(chunk.max(1)) {
            w.write(offset, piece).expect("io")?;
            offset += piece.len() as u64;
        }
        w.finish().expect("io")
    }

    /// Blobs recorded by [`Cas::written`] and not yet synced, and their bytes.
    fn unsynced(cas: &Cas) -> (usize, u64) {
        let unsynced = cas.unsynced.lock().unwrap_or_else(PoisonError::into_inner);
        (unsynced.0.len(), unsynced.1)
    }

    /// Temporary upload files in the shard directories.
    fn uploads_left(cas: &Cas) -> usize {
        (0..=255u8)
            .flat_map(|shard| fs::read_dir(cas.root.join(format!("{shard:02x}"))).expect("shard"))
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .starts_with(UPLOAD_PREFIX)
            })
            .count()
    }

    /// The store at `dir` with uploads in named temporary files, as where the file system
    /// cannot make anonymous ones.
    fn open_named(dir: &Path) -> Cas {
        Cas {
            anonymous: false,
            ..Cas::open(dir).expect("open")
        }
    }

    #[test]
    fn an_unfinished_upload_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cas = Cas::open(dir.path()).expect("open");
        assert!(cas.anonymous, "this file system makes anonymous files");
        let mut w = cas.writer(hash(b"hello"), 5).expect("writer");
        w.write(0, b"hel").expect("io").expect("accepted");
        // A crash: the writer never finishes nor cleans up; its file has no name.
        std::mem::forget(w);
        assert_eq!(uploads_left(&cas), 0);
        assert!(!cas.contains(&hash(b"hello")));
        let entries = (0..=255u8)
            .flat_map(|shard| fs::read_dir(cas.root.join(format!("{shard:02x}"))).expect("shard"))
            .count();
        assert_eq!(entries, 0, "no file appeared in any shard");
    }

    /// Uploading a blob the store holds already keeps the stored file (which a committed
    /// manifest may name, and which may be durable while the new copy is not yet).
    #[test]
    fn a_blob_stored_again_keeps_the_stored_file() {
        use std::os::unix::fs::MetadataExt as _;
        for anonymous in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let cas = if anonymous {
                Cas::open(dir.path()).expect("open")
            } else {
                open_named(dir.path())
            };
            let data = b"the same content twice".to_vec();
            put(&cas, &data, CHUNK_BYTES).expect("stored");
            let first = fs::metadata(cas.path(&hash(&data))).expect("stat").ino();
            put(&cas, &data, 4).expect("stored again");
            let second = fs::metadata(cas.path(&hash(&data))).expect("stat").ino();
            assert_eq!(
                first, second,
                "anonymous: {anonymous}: the first file stays"
            );
            assert_eq!(cas.verify(&hash(&data)).expect("verify"), Some(true));
            assert_eq!(
                uploads_left(&cas),
                0,
                "anonymous: {anonymous}: no temporary left"
            );
        }
    }

    #[test]
    fn an_unfinished_upload_is_removed_by_the_scan_for_unreferenced_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cas = open_named(dir.path());
        let mut w = cas.writer(hash(b"hello"), 5).expect("writer");
        w.write(0, b"hel").expect("io").expect("accepted");
        // A crash: the writer never finishes nor cleans up.
        std::mem::forget(w);
        assert_eq!(uploads_left(&cas), 1);
        let past = SystemTime::now() - std::time::Duration::from_secs(3600);
        assert!(
            cas.unreferenced(|_| false, Some(past))
                .expect("scan")
                .is_empty()
        );
        assert_eq!(
            uploads_left(&cas),
            1,
            "a recent upload may still be running"
        );
        assert!(cas.unreferenced(|_| false, None).expect("scan").is_empty());
        assert_eq!(uploads_left(&cas), 0, "the startup scan removes it");
        assert!(!cas.contains(&hash(b"hello")));
    }

    #[test]
    fn recorded_blobs_past_the_flush_threshold_are_synced_in_the_background() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cas = Arc::new(Cas::open(dir.path()).expect("open"));
        let small = b"a few bytes".to_vec();
        put(&cas, &small, CHUNK_BYTES).expect("stored");
        cas.written(&[hash(&small)], small.len() as u64)
            .expect("recorded");
        assert_eq!(
            unsynced(&cas),
            (1, small.len() as u64),
            "below the threshold: kept"
        );

        let big = vec![7u8; usize::try_from(FLUSH_AHEAD_BYTES).expect("fits")];
        put(&cas, &big, CHUNK_BYTES).expect("stored");
        cas.written(&[hash(&big)], big.len() as u64)
            .expect("recorded");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while unsynced(&cas) != (0, 0) {
            assert!(
                std::time::Instant::now() < deadline,
                "the background sync took both blobs"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // The commit's sync waits for the background one and finds nothing left.
        cas.sync_written().expect("sync");
        assert_eq!(unsynced(&cas), (0, 0));
    }

    #[test]
    fn put_get_verify_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cas = Cas::open(dir.path()).expect("open");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let h = hash(&data);
        assert!(!cas.contains(&h));
        put(&cas, &data, CHUNK_BYTES).expect("stored");
        cas.sync_batch(&[h]).expect("sync one");
        cas.sync().expect("sync all");
        assert!(cas.contains(&h));
        assert_eq!(cas.size(&h), Some(data.len() as u64));
        assert_eq!(cas.verify(&h).expect("verify"), Some(true));
        let name = hex(&h);
        assert!(cas.path(&h).ends_with(format!("{}/{name}", &name[..2])));

        let mut back = Vec::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = cas
                .read_chunk(&h, back.len() as u64, &mut buf)
                .expect("read")
                .expect("present");
            if n == 0 {
                break;
            }
            back.extend_from_slice(&buf[..n]);
        }
        assert_eq!(back, data);

        // Storing it again is fine; the empty blob is a blob too.
        put(&cas, &data, 1000).expect("again");
        put(&cas, b"", 10).expect("empty");
        assert!(cas.contains(&hash(b"")));
        assert_eq!(uploads_left(&cas), 0);
    }

    #[test]
    fn wrong_content_size_or_offsets_are_rejected_and_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cas = Cas::open(dir.path()).expect("open");
        let mut w = cas.writer(hash(b"hello"), 5).expect("writer");
        w.write(0, b"jello").expect("io").expect("accepted");
        assert_eq!(w.finish().expect("io"), Err(Rejected::Mismatch));
        assert!(!cas.contains(&hash(b"hello")));

        let mut w = cas.writer(hash(b"hello"), 5).expect("writer");
        assert!(matches!(
            w.write(0, b"hello world").expect("io"),
            Err(Rejected::BadChunk(_))
        ));
        assert!(matches!(
            w.write(3, b"lo").expect("io"),
            Err(Rejected::BadChunk(_))
        ));
        w.write(0, b"hel").expect("io").expect("ok");
        assert_eq!(w.finish().expect("io"), Err(Rejected::Mismatch), "short");
        assert_eq!(uploads_left(&cas), 0);
    }

    #[test]
    fn tampered_blobs_fail_verification_and_unreferenced_ones_are_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cas = Cas::open(dir.path()).expect("open");
        put(&cas, b"keep", 2).expect("keep");
        put(&cas, b"drop", 2).expect("drop");
        fs::write(cas.path(&hash(b"keep")), b"evil").expect("tamper");
        assert_eq!(cas.verify(&hash(b"keep")).expect("verify"), Some(false));
        assert_eq!(cas.verify(&hash(b"none")).expect("verify"), None);

        let keep = hash(b"keep");
        let orphans = cas.unreferenced(|h| *h == keep, None).expect("scan");
        assert_eq!(orphans, vec![hash(b"drop")]);
        let past = SystemTime::now() - std::time::Duration::from_secs(3600);
        assert!(
            cas.unreferenced(|_| false, Some(past))
                .expect("scan")
                .is_empty()
        );
        assert_eq!(cas.remove(&hash(b"drop")).expect("remove"), Some(4));
        assert_eq!(cas.remove(&hash(b"drop")).expect("remove"), None);
        assert_eq!(parse_hex(&hex(&keep)), Some(keep));
        assert_eq!(parse_hex("zz"), None);
    }
}
