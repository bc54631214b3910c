//! The checkpoint table: records, lineage, blob reference counts, retention and blob GC.
//!
//! Durable: the `checkpoints` tree (checkpoint id -> `heist.v1.Checkpoint` with its manifest)
//! and the `checkpoint_heads` tree (session id -> the checkpoint the session's next checkpoint
//! descends from: its latest checkpoint, or the one it was restored to or forked from). The
//! blobs live in the [`Cas`].
//!
//! In memory, rebuilt from the trees at startup: every record without its manifest (for
//! listing), how many checkpoints reference each blob (recomputed, so it can never drift from
//! the manifests after a crash), and which workers hold each checkpoint's blobs (for warm
//! placement of forks).
//!
//! Blob deletion vs. concurrent captures: an operation that relies on blobs staying in the store
//! between checking and using them (capture, restore, fork) holds a [`Pin`]. While any pin is
//! held, blobs whose last reference goes away are only queued; they are removed when the last
//! pin is released, if still unreferenced. Pinning, committing and removing blobs happen under
//! one lock, so a blob a capture found present cannot vanish before its manifest is committed.
//!
//! Retention (per session: max count, max age) never leaves a dangling `parent_id`: removing a
//! checkpoint re-points its children to its own parent, so every retained checkpoint's chain
//! stays complete. It never removes a session's newest checkpoint, a checkpoint that is the
//! parent of a checkpoint of *another* session (a fork point), or a session's head (a restore
//! or fork source whose next checkpoint will name it as parent).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use heist_proto::{
    ids::{CheckpointId, SessionId},
    v1::{Checkpoint, EntryKind, Manifest},
};
use prost::Message as _;
use tracing::{info, warn};

use crate::{
    cas::{Cas, Hash, hash_from_bytes},
    error::Error,
    store::Store,
};

/// What removing checkpoints freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Freed {
    /// Checkpoints removed.
    pub checkpoints: u64,
    /// Blobs no remaining manifest references (removed now, or once no capture is running).
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Freed {
    fn add(&mut self, other: Self) {
        self.checkpoints += other.checkpoints;
        self.blobs += other.blobs;
        self.bytes += other.bytes;
    }
}

/// Retention limits (0 / zero means no limit).
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Checkpoints kept per session.
    pub max_per_session: u32,
    /// Oldest age kept.
    pub max_age: Duration,
}

#[derive(Default)]
struct Inner {
    /// Records without manifests, by id (ids are time-ordered).
    by_id: BTreeMap<CheckpointId, Checkpoint>,
    /// Checkpoints referencing each blob.
    refs: HashMap<Hash, u32>,
    /// Session -> the checkpoint its next checkpoint descends from.
    heads: HashMap<SessionId, CheckpointId>,
    /// Checkpoint -> workers known to hold its blobs.
    holders: HashMap<CheckpointId, BTreeSet<String>>,
    /// Operations relying on blobs staying put.
    pins: usize,
    /// Blobs that lost their last reference while pinned.
    deferred: HashSet<Hash>,
}

/// The checkpoint table.
pub struct Checkpoints {
    tree: sled::Tree,
    heads_tree: sled::Tree,
    cas: Arc<Cas>,
    inner: Mutex<Inner>,
}

/// Held while an operation relies on blobs staying in the store. Released on drop.
pub struct Pin {
    owner: Arc<Checkpoints>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let owner = self.owner.clone();
        let release = move || {
            if let Err(err) = owner.unpin() {
                warn!(%err, "cannot remove blobs freed during a capture");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(release)),
            Err(_) => release(),
        }
    }
}

/// The distinct blobs of a manifest, with their sizes: its files' and its agent state's.
pub fn manifest_blobs(manifest: &Manifest) -> HashMap<Hash, u64> {
    let mut blobs: HashMap<Hash, u64> = manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File as i32)
        .filter_map(|e| hash_from_bytes(&e.hash).map(|h| (h, e.size)))
        .collect();
    if let Some(hash) = hash_from_bytes(&manifest.agent_state_hash) {
        blobs.insert(hash, manifest.agent_state_size);
    }
    blobs
}

impl Checkpoints {
    /// Loads every checkpoint, recomputes blob references, and removes blobs no manifest
    /// references (at startup nothing can be mid-capture, so every such blob is garbage,
    /// including any a crash left half-written).
    pub fn load(store: &Store, cas: Arc<Cas>) -> Result<Arc<Self>, Error> {
        let tree = store.open_tree("checkpoints")?;
        let heads_tree = store.open_tree("checkpoint_heads")?;
        let mut inner = Inner::default();
        for item in tree.iter() {
            let (_, bytes) = item?;
            let mut record =
                Checkpoint::decode(bytes.as_ref()).map_err(|source| Error::Corrupt {
                    what: "checkpoint",
                    source,
                })?;
            let Ok(id) = CheckpointId::parse(record.id.as_str()) else {
                continue;
            };
            if let Some(manifest) = record.manifest.take() {
                for hash in manifest_blobs(&manifest).into_keys() {
                    *inner.refs.entry(hash).or_default() += 1;
                }
            }
            inner
                .holders
                .entry(id.clone())
                .or_default()
                .insert(record.worker_id.clone());
            inner.by_id.insert(id, record);
        }
        for item in heads_tree.iter() {
            let (key, value) = item?;
            let session = std::str::from_utf8(&key)
                .ok()
                .and_then(|s| SessionId::parse(s).ok());
            let head = std::str::from_utf8(&value)
                .ok()
                .and_then(|s| CheckpointId::parse(s).ok());
            if let (Some(session), Some(head)) = (session, head) {
                inner.heads.insert(session, head);
            }
        }
        let orphans = cas.unreferenced(|h| inner.refs.contains_key(h), None)?;
        for hash in &orphans {
            cas.remove(hash)?;
        }
        info!(
            checkpoints = inner.by_id.len(),
            blobs = inner.refs.len(),
            orphans_removed = orphans.len(),
            "checkpoints loaded"
        );
        Ok(Arc::new(Self {
            tree,
            heads_tree,
            cas,
            inner: Mutex::new(inner),
        }))
    }

    /// The blob store.
    pub fn cas(&self) -> &Arc<Cas> {
        &self.cas
    }

    /// Keeps blobs from being removed until the pin is dropped.
    pub fn pin(self: &Arc<Self>) -> Pin {
        self.lock().pins += 1;
        Pin {
            owner: self.clone(),
        }
    }

    /// Drops a pin; the last one removes the deferred blobs still unreferenced.
    fn unpin(&self) -> Result<(), Error> {
        let mut inner = self.lock();
        inner.pins = inner.pins.saturating_sub(1);
        if inner.pins > 0 || inner.deferred.is_empty() {
            return Ok(());
        }
        let deferred: Vec<Hash> = inner.deferred.drain().collect();
        for hash in deferred {
            if !inner.refs.contains_key(&hash) {
                self.cas.remove(&hash)?;
            }
        }
        Ok(())
    }

    /// The distinct blobs of `manifest` the store lacks. With `trust_refs`, a blob some
    /// committed manifest references counts as present without a stat (fast: used when
    /// committing a capture); without, every blob is checked on disk (used before a restore or
    /// fork, so a blob lost or removed behind the store's back is reported, not half-restored).
    pub fn missing_blobs(&self, manifest: &Manifest, trust_refs: bool) -> Vec<Hash> {
        let hashes: Vec<Hash> = manifest_blobs(manifest).into_keys().collect();
        let mut missing = if trust_refs {
            self.missing(hashes)
        } else {
            hashes
                .into_iter()
                .filter(|h| !self.cas.contains(h))
                .collect()
        };
        missing.sort_unstable();
        missing
    }

    /// Which of `hashes` the store lacks. A blob some committed manifest references is present
    /// (blobs are removed only when their last reference goes, under the same lock), so only
    /// the others cost a stat.
    pub fn missing(&self, hashes: Vec<Hash>) -> Vec<Hash> {
        let unreferenced: Vec<Hash> = {
            let inner = self.lock();
            hashes
                .into_iter()
                .filter(|h| !inner.refs.contains_key(h))
                .collect()
        };
        unreferenced
            .into_iter()
            .filter(|h| !self.cas.contains(h))
            .collect()
    }

    /// Commits a checkpoint of `session` (its manifest included, its blobs verified present by
    /// the caller under a [`Pin`]): sets its parent to the session's head, makes it the new head,
    /// counts its blob references. Returns the record without the manifest. Not yet flushed.
    pub fn commit(&self, session: &SessionId, mut record: Checkpoint) -> Result<Checkpoint, Error> {
        let id = CheckpointId::parse(record.id.as_str())?;
        let blobs = record
            .manifest
            .as_ref()
            .map(manifest_blobs)
            .unwrap_or_default();
        let mut inner = self.lock();
        record.parent_id = inner
            .heads
            .get(session)
            .filter(|h| inner.by_id.contains_key(*h))
            .map(ToString::to_string)
            .unwrap_or_default();
        self.tree
            .insert(id.as_str().as_bytes(), record.encode_to_vec())?;
        self.set_head_locked(&mut inner, session, &id)?;
        for hash in blobs.into_keys() {
            *inner.refs.entry(hash).or_default() += 1;
        }
        record.manifest = None;
        inner
            .holders
            .entry(id.clone())
            .or_default()
            .insert(record.worker_id.clone());
        inner.by_id.insert(id, record.clone());
        Ok(record)
    }

    /// One record, without its manifest.
    pub fn get(&self, id: &CheckpointId) -> Option<Checkpoint> {
        self.lock().by_id.get(id).cloned()
    }

    /// One record with its manifest, read from the store.
    pub fn get_full(&self, id: &CheckpointId) -> Result<Option<Checkpoint>, Error> {
        Store::get(&self.tree, id.as_str().as_bytes(), "checkpoint")
    }

    /// One page of `owner`'s checkpoints (of `session` when given), newest first, starting
    /// after `after`; and the id to continue after when more remain.
    pub fn list(
        &self,
        owner: &str,
        session: Option<&SessionId>,
        after: Option<&CheckpointId>,
        limit: usize,
    ) -> (Vec<Checkpoint>, Option<CheckpointId>) {
        let inner = self.lock();
        let range = match after {
            Some(after) => inner.by_id.range(..after.clone()),
            None => inner.by_id.range::<CheckpointId, _>(..),
        };
        let mut page = Vec::new();
        let mut last = None;
        for (id, c) in range.rev() {
            if c.owner != owner || session.is_some_and(|s| c.session_id != s.as_str()) {
                continue;
            }
            if page.len() == limit {
                return (page, last);
            }
            page.push(c.clone());
            last = Some(id.clone());
        }
        (page, None)
    }

    /// Makes `id` the checkpoint `session`'s next checkpoint descends from (after a restore or
    /// a fork). Not yet flushed.
    pub fn set_head(&self, session: &SessionId, id: &CheckpointId) -> Result<(), Error> {
        let mut inner = self.lock();
        self.set_head_locked(&mut inner, session, id)
    }

    fn set_head_locked(
        &self,
        inner: &mut Inner,
        session: &SessionId,
        id: &CheckpointId,
    ) -> Result<(), Error> {
        self.heads_tree
            .insert(session.as_str().as_bytes(), id.as_str().as_bytes())?;
        inner.heads.insert(session.clone(), id.clone());
        Ok(())
    }

    /// The checkpoint `session`'s next checkpoint will descend from.
    pub fn head(&self, session: &SessionId) -> Option<CheckpointId> {
        self.lock().heads.get(session).cloned()
    }

    /// Records that `worker` holds the blobs of `id` (it captured or restored it).
    pub fn add_holder(&self, id: &CheckpointId, worker: &str) {
        self.lock()
            .holders
            .entry(id.clone())
            .or_default()
            .insert(worker.to_owned());
    }

    /// Workers known to hold the blobs of `id`.
    pub fn holders(&self, id: &CheckpointId) -> HashSet<String> {
        self.lock()
            .holders
            .get(id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Deletes one of `owner`'s checkpoints, refusing when other checkpoints name it as parent.
    /// Not yet flushed.
    pub fn delete(&self, owner: &str, id: &CheckpointId) -> Result<Freed, Error> {
        let mut inner = self.lock();
        let Some(record) = inner.by_id.get(id).filter(|c| c.owner == owner) else {
            return Err(Error::CheckpointNotFound(id.clone()));
        };
        let parent = record.parent_id.clone();
        let children = inner
            .by_id
            .values()
            .filter(|c| c.parent_id == id.as_str())
            .count();
        if children > 0 {
            return Err(Error::CheckpointHasChildren {
                id: id.clone(),
                children,
            });
        }
        // A session whose head this was descends from its parent from now on.
        let affected: Vec<SessionId> = inner
            .heads
            .iter()
            .filter(|(_, h)| *h == id)
            .map(|(s, _)| s.clone())
            .collect();
        for session in affected {
            match CheckpointId::parse(parent.as_str()) {
                Ok(parent) => self.set_head_locked(&mut inner, &session, &parent)?,
                Err(_) => {
                    self.heads_tree.remove(session.as_str().as_bytes())?;
                    inner.heads.remove(&session);
                }
            }
        }
        self.remove_locked(&mut inner, id)
    }

    /// Removes one checkpoint and drops its blob references (the caller has dealt with its
    /// children and heads).
    fn remove_locked(&self, inner: &mut Inner, id: &CheckpointId) -> Result<Freed, Error> {
        let full: Option<Checkpoint> =
            Store::get(&self.tree, id.as_str().as_bytes(), "checkpoint")?;
        self.tree.remove(id.as_str().as_bytes())?;
        inner.by_id.remove(id);
        inner.holders.remove(id);
        let mut freed = Freed {
            checkpoints: 1,
            ..Freed::default()
        };
        let blobs = full
            .and_then(|c| c.manifest)
            .as_ref()
            .map(manifest_blobs)
            .unwrap_or_default();
        for (hash, size) in blobs {
            let Some(count) = inner.refs.get_mut(&hash) else {
                continue;
            };
            *count = count.saturating_sub(1);
            if *count == 0 {
                inner.refs.remove(&hash);
                freed.blobs += 1;
                freed.bytes += size;
                if inner.pins == 0 {
                    self.cas.remove(&hash)?;
                } else {
                    inner.deferred.insert(hash);
                }
            }
        }
        Ok(freed)
    }

    /// Applies retention to `session`'s checkpoints at time `now`. Not yet flushed.
    pub fn retain(
        &self,
        session: &SessionId,
        limits: Retention,
        now: SystemTime,
    ) -> Result<Freed, Error> {
        let mut inner = self.lock();
        let doomed = plan_retention(&inner, session, limits, now);
        let mut freed = Freed::default();
        for id in doomed {
            let parent = inner
                .by_id
                .get(&id)
                .map(|c| c.parent_id.clone())
                .unwrap_or_default();
            let children: Vec<CheckpointId> = inner
                .by_id
                .iter()
                .filter(|(_, c)| c.parent_id == id.as_str())
                .map(|(k, _)| k.clone())
                .collect();
            for child in children {
                self.reparent_locked(&mut inner, &child, &parent)?;
            }
            freed.add(self.remove_locked(&mut inner, &id)?);
        }
        if freed.checkpoints > 0 {
            info!(session_id = %session, removed = freed.checkpoints, blobs_freed = freed.blobs, "checkpoint retention");
        }
        Ok(freed)
    }

    /// Applies retention to every session that has checkpoints.
    pub fn retain_all(&self, limits: Retention, now: SystemTime) -> Result<Freed, Error> {
        let sessions: BTreeSet<SessionId> = self
            .lock()
            .by_id
            .values()
            .filter_map(|c| SessionId::parse(c.session_id.as_str()).ok())
            .collect();
        let mut freed = Freed::default();
        for session in sessions {
            freed.add(self.retain(&session, limits, now)?);
        }
        Ok(freed)
    }

    /// Removes unreferenced blobs older than `grace` (uploads whose checkpoint was never
    /// committed). Skipped while any operation holds a pin. Returns how many were removed.
    pub fn sweep_unreferenced(&self, grace: Duration) -> Result<usize, Error> {
        let inner = self.lock();
        if inner.pins > 0 {
            return Ok(0);
        }
        let limit = SystemTime::now().checked_sub(grace);
        let orphans = self
            .cas
            .unreferenced(|h| inner.refs.contains_key(h), limit)?;
        for hash in &orphans {
            self.cas.remove(hash)?;
        }
        Ok(orphans.len())
    }

    fn reparent_locked(
        &self,
        inner: &mut Inner,
        child: &CheckpointId,
        parent: &str,
    ) -> Result<(), Error> {
        let full: Option<Checkpoint> =
            Store::get(&self.tree, child.as_str().as_bytes(), "checkpoint")?;
        if let Some(mut full) = full {
            full.parent_id = parent.to_owned();
            self.tree
                .insert(child.as_str().as_bytes(), full.encode_to_vec())?;
        }
        if let Some(c) = inner.by_id.get_mut(child) {
            c.parent_id = parent.to_owned();
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Which of `session`'s checkpoints retention removes, oldest first.
fn plan_retention(
    inner: &Inner,
    session: &SessionId,
    limits: Retention,
    now: SystemTime,
) -> Vec<CheckpointId> {
    let newest_first: Vec<(&CheckpointId, &Checkpoint)> = inner
        .by_id
        .iter()
        .rev()
        .filter(|(_, c)| c.session_id == session.as_str())
        .collect();
    let heads: HashSet<&CheckpointId> = inner.heads.values().collect();
    let fork_points: HashSet<&str> = inner
        .by_id
        .values()
        .filter(|c| c.session_id != session.as_str() && !c.parent_id.is_empty())
        .map(|c| c.parent_id.as_str())
        .collect();
    let max_count = usize::try_from(limits.max_per_session).unwrap_or(usize::MAX);
    let mut doomed: Vec<CheckpointId> = newest_first
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(i, (id, c))| {
            let over_count = max_count > 0 && *i >= max_count;
            let too_old = !limits.max_age.is_zero()
                && c.created_at
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > limits.max_age);
            (over_count || too_old) && !heads.contains(id) && !fork_points.contains(id.as_str())
        })
        .map(|(_, (id, _))| (*id).clone())
        .collect();
    doomed.reverse();
    doomed
}

/// Encodes a page token (opaque to clients: hex of the last id returned).
pub fn encode_page_token(id: &CheckpointId) -> String {
    id.as_str().bytes().map(|b| format!("{b:02x}")).collect()
}

/// Decodes a page token from [`encode_page_token`].
pub fn decode_page_token(token: &str) -> Option<CheckpointId> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
        .collect();
    CheckpointId::parse(String::from_utf8(bytes?).ok()?).ok()
}

#[cfg(test)]
mod tests;
