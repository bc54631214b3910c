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
//! Stored trees: a manifest is stored whole, or as a delta against the checkpoint's parent
//! (`Checkpoint.delta`: the entries added or changed, the paths removed). A delta is at most
//! HEIST_CHECKPOINT_MAX_DELTA_CHAIN links from a whole manifest: [`Checkpoints::delta_base`]
//! asks for a whole capture when the head's chain is that long. Reading a checkpoint's tree
//! ([`Checkpoints::get_full`]) applies the chain's deltas to its whole base, under the table's
//! lock so retention cannot rewrite the chain meanwhile. Blob references count what each
//! stored record names (a delta names only its changed entries); a blob a child's tree takes
//! from an ancestor stays referenced by that ancestor, which cannot go first: deleting a
//! parent is refused, and retention rewrites each child against its grandparent (the two
//! deltas composed, or a whole manifest when the parent was whole) before it removes the
//! parent.
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
    v1::{Checkpoint, EntryKind, Manifest, ManifestDelta, ManifestEntry},
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
    /// Checkpoint -> deltas between its stored tree and a whole manifest (an upper bound;
    /// absent or 0: stored whole).
    depths: HashMap<CheckpointId, u32>,
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
            if let Some(delta) = record.delta.take() {
                inner.depths.insert(id.clone(), delta.depth.max(1));
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

    /// The checkpoint `session`'s next capture may be sent as a delta against: its head, unless
    /// the head's chain of deltas is already `max_chain` long (then the capture is whole).
    pub fn delta_base(&self, session: &SessionId, max_chain: u32) -> Option<CheckpointId> {
        let inner = self.lock();
        let head = inner.heads.get(session)?;
        let depth = inner.depths.get(head).copied().unwrap_or(0);
        (inner.by_id.contains_key(head) && depth < max_chain).then(|| head.clone())
    }

    /// Commits a checkpoint of `session` (its manifest included, its blobs verified present by
    /// the caller under a [`Pin`]): sets its parent to the session's head (to the delta's base
    /// when the manifest is a delta), makes it the new head, counts its blob references. Returns
    /// the record without the manifest. Not yet flushed. A delta whose base was removed meanwhile
    /// is [`Error::DeltaBaseGone`] and nothing is committed.
    pub fn commit(&self, session: &SessionId, mut record: Checkpoint) -> Result<Checkpoint, Error> {
        let id = CheckpointId::parse(record.id.as_str())?;
        let blobs = record
            .manifest
            .as_ref()
            .map(manifest_blobs)
            .unwrap_or_default();
        let mut inner = self.lock();
        let mut depth = 0;
        if let Some(delta) = record.delta.as_mut() {
            let base = CheckpointId::parse(delta.base_id.as_str())?;
            if !inner.by_id.contains_key(&base) {
                return Err(Error::DeltaBaseGone { base });
            }
            depth = inner.depths.get(&base).copied().unwrap_or(0) + 1;
            delta.depth = depth;
            record.parent_id = base.to_string();
        } else {
            record.parent_id = inner
                .heads
                .get(session)
                .filter(|h| inner.by_id.contains_key(*h))
                .map(ToString::to_string)
                .unwrap_or_default();
        }
        self.tree
            .insert(id.as_str().as_bytes(), record.encode_to_vec())?;
        self.set_head_locked(&mut inner, session, &id)?;
        for hash in blobs.into_keys() {
            *inner.refs.entry(hash).or_default() += 1;
        }
        if depth > 0 {
            inner.depths.insert(id.clone(), depth);
        }
        record.manifest = None;
        record.delta = None;
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

    /// One record with its whole manifest, read from the store (a delta applied to its
    /// chain's base).
    pub fn get_full(&self, id: &CheckpointId) -> Result<Option<Checkpoint>, Error> {
        let inner = self.lock();
        let Some(mut record) = self.stored(id)? else {
            return Ok(None);
        };
        let Some(delta) = record.delta.take() else {
            return Ok(Some(record));
        };
        let manifest = record.manifest.get_or_insert_default();
        let mut layers = vec![(std::mem::take(&mut manifest.entries), delta.removed_paths)];
        let mut base_id = delta.base_id;
        let whole = loop {
            let broken = |why: String| Error::BrokenChain {
                id: id.clone(),
                why,
            };
            // Deltas are at most HEIST_CHECKPOINT_MAX_DELTA_CHAIN long (the setting may have
            // been lowered since); a chain longer than the table is a cycle.
            if layers.len() > inner.by_id.len() + 1 {
                return Err(broken("its chain of deltas loops".to_owned()));
            }
            let base = CheckpointId::parse(base_id.as_str())
                .map_err(|_| broken(format!("malformed delta base {base_id:?}")))?;
            let Some(mut stored) = self.stored(&base)? else {
                return Err(broken(format!("its delta base {base} is gone")));
            };
            let entries = stored.manifest.take().unwrap_or_default().entries;
            match stored.delta.take() {
                Some(next) => {
                    layers.push((entries, next.removed_paths));
                    base_id = next.base_id;
                }
                None => break entries,
            }
        };
        let mut tree: BTreeMap<String, ManifestEntry> =
            whole.into_iter().map(|e| (e.path.clone(), e)).collect();
        for (changed, removed) in layers.into_iter().rev() {
            for path in removed {
                tree.remove(&path);
            }
            for entry in changed {
                tree.insert(entry.path.clone(), entry);
            }
        }
        manifest.entries = tree.into_values().collect();
        Ok(Some(record))
    }

    /// One record as stored (a delta's manifest holds only its changes).
    fn stored(&self, id: &CheckpointId) -> Result<Option<Checkpoint>, Error> {
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
        let full = self.stored(id)?;
        self.tree.remove(id.as_str().as_bytes())?;
        inner.by_id.remove(id);
        inner.holders.remove(id);
        inner.depths.remove(id);
        let blobs = full
            .and_then(|c| c.manifest)
            .as_ref()
            .map(manifest_blobs)
            .unwrap_or_default();
        let mut freed = self.release_locked(inner, blobs)?;
        freed.checkpoints = 1;
        Ok(freed)
    }

    /// Drops one reference to each of `blobs`; those left with none are removed (or queued
    /// while pinned).
    fn release_locked(&self, inner: &mut Inner, blobs: HashMap<Hash, u64>) -> Result<Freed, Error> {
        let mut freed = Freed::default();
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
            if !children.is_empty() {
                let gone = self.stored(&id)?.unwrap_or_default();
                for child in children {
                    self.reparent_locked(&mut inner, &child, &parent, &gone)?;
                }
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

    /// Makes `parent` the parent of `child` in place of `gone` (its stored record), which is
    /// about to be removed. A child stored as a delta against `gone` is rewritten first: as a
    /// delta against `gone`'s own base (the two composed), or whole when `gone` was whole. Its
    /// new blob references are counted before its old ones are dropped, so nothing it still
    /// needs is freed.
    fn reparent_locked(
        &self,
        inner: &mut Inner,
        child: &CheckpointId,
        parent: &str,
        gone: &Checkpoint,
    ) -> Result<(), Error> {
        if let Some(mut full) = self.stored(child)? {
            full.parent_id = parent.to_owned();
            if let Some(delta) = full.delta.take() {
                let manifest = full.manifest.get_or_insert_default();
                let before = manifest_blobs(manifest);
                let changed = std::mem::take(&mut manifest.entries);
                let below = gone.manifest.as_ref().map_or(&[][..], |m| &m.entries[..]);
                let (entries, rebased) = rebase(below, gone.delta.as_ref(), changed, delta);
                manifest.entries = entries;
                let depth = rebased.as_ref().map_or(0, |d| d.depth);
                if let Some(d) = &rebased {
                    full.parent_id.clone_from(&d.base_id);
                }
                full.delta = rebased;
                for hash in manifest_blobs(manifest).into_keys() {
                    *inner.refs.entry(hash).or_default() += 1;
                }
                if depth > 0 {
                    inner.depths.insert(child.clone(), depth);
                } else {
                    inner.depths.remove(child);
                }
                self.tree
                    .insert(child.as_str().as_bytes(), full.encode_to_vec())?;
                self.release_locked(inner, before)?;
            } else {
                self.tree
                    .insert(child.as_str().as_bytes(), full.encode_to_vec())?;
            }
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

/// A delta (`changed`, `delta`) against a checkpoint whose stored tree is `below` (its entries)
/// and `below_delta`, rewritten against what that checkpoint was stored against: whole when it
/// was whole (returns the whole tree and no delta), else the two deltas composed.
fn rebase(
    below: &[ManifestEntry],
    below_delta: Option<&ManifestDelta>,
    changed: Vec<ManifestEntry>,
    delta: ManifestDelta,
) -> (Vec<ManifestEntry>, Option<ManifestDelta>) {
    // path -> Some(entry): present as this; None: removed.
    let mut tree: BTreeMap<String, Option<ManifestEntry>> = below
        .iter()
        .map(|e| (e.path.clone(), Some(e.clone())))
        .collect();
    if let Some(d) = below_delta {
        for path in &d.removed_paths {
            tree.insert(path.clone(), None);
        }
    }
    for path in delta.removed_paths {
        tree.insert(path, None);
    }
    for entry in changed {
        tree.insert(entry.path.clone(), Some(entry));
    }
    let mut entries = Vec::with_capacity(tree.len());
    let mut removed_paths = Vec::new();
    for (path, entry) in tree {
        match entry {
            Some(entry) => entries.push(entry),
            None => removed_paths.push(path),
        }
    }
    let rebased = below_delta.map(|d| ManifestDelta {
        base_id: d.base_id.clone(),
        removed_paths,
        depth: d.depth.max(1),
    });
    (entries, rebased)
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
