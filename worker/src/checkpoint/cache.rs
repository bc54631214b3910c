//! The worker's local blob cache: `<dir>/<2 hex>/<64 hex>`, bounded by HEIST_BLOB_CACHE_BYTES
//! (least recently used blobs are evicted), so restoring a checkpoint on a worker that captured
//! or restored it before needs nothing from the coordinator.
//!
//! Blobs enter by copying a workspace file while hashing it; a file whose content no longer
//! matches the expected hash is not cached. Restores copy out of the cache (never hard-link: a
//! tool may modify a workspace file in place, and the cache must not change with it). The
//! index lives in memory and is rebuilt from the directory at startup (oldest mtime first).

use std::{
    collections::HashMap,
    fs,
    io::{self, Read, Write as _},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
};

use tracing::{debug, warn};

use heist_proto::hash::{hex, parse_hex};

use super::manifest::Hash;
use crate::Error;

#[derive(Debug, Default)]
struct Index {
    /// Blob -> (size, last use tick).
    entries: HashMap<Hash, (u64, u64)>,
    total: u64,
    tick: u64,
}

/// The cache.
#[derive(Debug)]
pub struct BlobCache {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
}

impl BlobCache {
    /// Opens (creating) the cache at `dir` holding at most `max_bytes` (0: disabled).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, Error> {
        let cache = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            index: Mutex::new(Index::default()),
        };
        if max_bytes == 0 {
            return Ok(cache);
        }
        let io = |e| {
            Error::io(
                format!("cannot prepare the blob cache {}", dir.display()),
                e,
            )
        };
        heist_proto::files::private_dir(dir).map_err(io)?;
        let tmp = dir.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io)?;
        }
        fs::create_dir_all(&tmp).map_err(io)?;
        let mut found = Vec::new();
        for shard in 0..=255u8 {
            let shard_dir = dir.join(format!("{shard:02x}"));
            fs::create_dir_all(&shard_dir).map_err(io)?;
            for entry in fs::read_dir(&shard_dir).map_err(io)? {
                let entry = entry.map_err(io)?;
                let (Some(hash), Ok(meta)) = (
                    entry.file_name().to_str().and_then(parse_hex),
                    entry.metadata(),
                ) else {
                    continue;
                };
                found.push((meta.modified().ok(), hash, meta.len()));
            }
        }
        found.sort();
        {
            let mut index = cache.lock();
            for (_, hash, size) in found {
                index.tick += 1;
                let tick = index.tick;
                index.entries.insert(hash, (size, tick));
                index.total += size;
            }
        }
        cache.evict()?;
        Ok(cache)
    }

    /// Whether caching is on.
    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        let name = hex(hash);
        self.dir.join(&name[..2]).join(name)
    }

    /// The cached file of `hash`, marked as just used.
    pub fn get(&self, hash: &Hash) -> Option<PathBuf> {
        let mut index = self.lock();
        index.tick += 1;
        let tick = index.tick;
        let entry = index.entries.get_mut(hash)?;
        entry.1 = tick;
        Some(self.path(hash))
    }

    /// Whether `hash` is cached.
    pub fn contains(&self, hash: &Hash) -> bool {
        self.lock().entries.contains_key(hash)
    }

    /// Copies `src` into the cache as `hash` if its content hashes to it. Returns whether the
    /// blob is cached afterwards.
    pub fn insert_from(&self, src: &mut impl Read, hash: &Hash, size: u64) -> Result<bool, Error> {
        if !self.enabled() || size > self.max_bytes {
            return Ok(false);
        }
        if self.contains(hash) {
            return Ok(true);
        }
        let tmp =
            self.dir
                .join("tmp")
                .join(format!("{}.{}", hex(hash), uuid::Uuid::new_v4().simple()));
        let io = |e| {
            Error::io(
                format!("cannot write the blob cache file {}", tmp.display()),
                e,
            )
        };
        let written = (|| -> io::Result<Option<()>> {
            let mut out = fs::File::create(&tmp)?;
            let (got, total) = super::manifest::hash_reader(src, |chunk| out.write_all(chunk))?;
            Ok((total == size && got == *hash).then_some(()))
        })();
        match written {
            Ok(Some(())) => {}
            Ok(None) => {
                let _ = fs::remove_file(&tmp);
                debug!("a file changed before it could be cached; skipping it");
                return Ok(false);
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io(e));
            }
        }
        fs::rename(&tmp, self.path(hash)).map_err(io)?;
        {
            let mut index = self.lock();
            index.tick += 1;
            let tick = index.tick;
            if index.entries.insert(*hash, (size, tick)).is_none() {
                index.total += size;
            }
        }
        self.evict()?;
        Ok(true)
    }

    /// Removes least recently used blobs until the cache is within its bound.
    fn evict(&self) -> Result<(), Error> {
        let doomed: Vec<Hash> = {
            let mut index = self.lock();
            if index.total <= self.max_bytes {
                return Ok(());
            }
            let mut by_age: Vec<(u64, Hash, u64)> = index
                .entries
                .iter()
                .map(|(h, (size, tick))| (*tick, *h, *size))
                .collect();
            by_age.sort_unstable();
            let mut doomed = Vec::new();
            for (_, hash, size) in by_age {
                if index.total <= self.max_bytes {
                    break;
                }
                index.entries.remove(&hash);
                index.total -= size;
                doomed.push(hash);
            }
            doomed
        };
        for hash in doomed {
            if let Err(err) = fs::remove_file(self.path(&hash))
                && err.kind() != io::ErrorKind::NotFound
            {
                warn!(%err, "cannot evict a blob from the cache");
            }
        }
        Ok(())
    }

    /// Bytes cached.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(data: &[u8]) -> Hash {
        *blake3::hash(data).as_bytes()
    }

    #[test]
    fn caches_verified_content_and_evicts_the_least_recently_used() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cache = BlobCache::open(tmp.path(), 10).expect("open");
        assert!(
            cache
                .insert_from(&mut &b"aaaa"[..], &h(b"aaaa"), 4)
                .expect("a")
        );
        assert!(
            cache
                .insert_from(&mut &b"bbbb"[..], &h(b"bbbb"), 4)
                .expect("b")
        );
        assert!(
            !cache
                .insert_from(&mut &b"evil"[..], &h(b"cccc"), 4)
                .expect("wrong content")
        );
        assert!(
            cache.get(&h(b"aaaa")).is_some(),
            "touch a: b is now the oldest"
        );
        assert!(
            cache
                .insert_from(&mut &b"dddd"[..], &h(b"dddd"), 4)
                .expect("d")
        );
        assert!(cache.contains(&h(b"aaaa")) && cache.contains(&h(b"dddd")));
        assert!(!cache.contains(&h(b"bbbb")));
        assert_eq!(cache.total_bytes(), 8);
        let path = cache.get(&h(b"dddd")).expect("cached");
        assert_eq!(fs::read(path).expect("read"), b"dddd");

        let reopened = BlobCache::open(tmp.path(), 10).expect("reopen");
        assert!(reopened.contains(&h(b"aaaa")) && reopened.contains(&h(b"dddd")));
        let off = BlobCache::open(&tmp.path().join("off"), 0).expect("disabled");
        assert!(!off.insert_from(&mut &b"x"[..], &h(b"x"), 1).expect("noop"));
    }
}
