//! The audit log: append-only, hash-chained records of security decisions in the `audit` tree,
//! and its signed head in the `audit_head` tree. Each batch the writer takes is one value (a
//! prost [`AuditBatch`]) under the number of its first record, big-endian: one insert per
//! batch, not per record, which is what keeps auditing every call cheap. A value holding a
//! single [`AuditRecord`] (the layout before batches) reads as a batch of one.
//!
//! Each record's `hash` is BLAKE3 over the previous record's hash and the record's own encoding
//! (with `hash` empty), so [`verify`] finds the first record that was modified, removed,
//! inserted or moved. The signed head ([`Head`]: the last record's number and hash, with a
//! BLAKE3 MAC under a key derived from the current token signing key) is written in the same
//! sled transaction as every batch of records, so removing records from the end (truncation)
//! or appending forged ones no longer leaves a log that verifies.
//!
//! Writing: [`AuditLog::record`] queues a record and returns; [`AuditLog::append`] queues one
//! and returns once it is in the store; [`AuditLog::append_queued`] returns once it is queued
//! while fewer than [`MAX_QUEUED`] wait, and waits like `append` beyond that (a flood is slowed
//! to the writer's pace, never queued without bound). Readers settle the queue first
//! ([`AuditLog::settle`]), so a listing made after a call was answered holds its record. One writer thread (`audit-writer`) takes everything
//! queued, numbers and chains it in queue order, and writes it with the head in one
//! transaction: one head MAC per batch, not per record. Records are not flushed here: they
//! ride on the store's next group flush ([`Store::flush`]), which the callers that acknowledge
//! something to a client make before answering (see docs/SECURITY.md, "Audit log").
//!
//! At start ([`AuditLog::open`]) the chain's last record is compared with the signed head. A
//! log that ends before the head (records removed while the coordinator was stopped), one
//! with no or a wrong head, or one that goes past the head is logged as an error and marked by
//! a first record of kind [`TRUNCATED`], [`HEAD_INVALID`] or [`UNANCHORED`]; a truncated log
//! continues after the head's number, so the gap stays in the chain. [`AuditLog::verify`]
//! reports each of them as broken.

use std::{
    convert::Infallible,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use prost::Message;
use sled::{Transactional as _, transaction::TransactionError};
use tokio::sync::{oneshot, watch};
use tracing::error;

use crate::{error::Error, signing_keys::SigningKeys, store::Store};

/// The tree holding the signed head, and its key there.
const HEAD_TREE: &str = "audit_head";
const HEAD_KEY: &[u8] = b"head";
/// Most records written in one transaction (more queued ones go in the next).
const MAX_BATCH: usize = 1024;
/// How long the writer gathers a batch that nobody waits on (only queued records) before it
/// writes it; a job someone waits on ([`AuditLog::append`], [`AuditLog::settle`]) ends the
/// wait at once.
const LINGER: Duration = Duration::from_millis(5);
/// Most records [`AuditLog::append_queued`] leaves queued without waiting for the writer.
pub const MAX_QUEUED: usize = 8 * MAX_BATCH;

/// Kind of the first record after a start that found records missing from the end.
pub const TRUNCATED: &str = "audit.truncated";
/// Kind of the first record after a start that found the signed head invalid or not matching.
pub const HEAD_INVALID: &str = "audit.head_invalid";
/// Kind of the first record after a start that found records the signed head does not cover
/// (or no head at all).
pub const UNANCHORED: &str = "audit.unanchored";
/// The marks of tampering found at start.
const MARKS: [&str; 3] = [TRUNCATED, HEAD_INVALID, UNANCHORED];

/// Which routed tool calls get a `tool.executed` record (HEIST_AUDIT_CALLS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuditCalls {
    /// Every call, read-only tools too.
    #[default]
    All,
    /// Calls of tools that are not read-only.
    Mutating,
    /// None (refusals are still recorded).
    Off,
}

impl AuditCalls {
    /// Whether a call of a tool with this `read_only` flag is recorded.
    pub fn records(self, read_only: bool) -> bool {
        match self {
            Self::All => true,
            Self::Mutating => !read_only,
            Self::Off => false,
        }
    }
}

/// One audit record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditRecord {
    /// Position in the log, from 1.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// When, milliseconds since the Unix epoch.
    #[prost(uint64, tag = "2")]
    pub at_unix_ms: u64,
    /// What happened, e.g. `worker.joined`, `token.issued`, `tool.executed`.
    #[prost(string, tag = "3")]
    pub kind: String,
    /// Who or what it was about (a principal, a worker id, a client id).
    #[prost(string, tag = "4")]
    pub subject: String,
    /// Details (peer address, reason; for a tool call its session, tool, argument digest,
    /// outcome and duration, never the arguments).
    #[prost(string, tag = "5")]
    pub detail: String,
    /// Hash of the previous record (zeros for the first).
    #[prost(bytes = "vec", tag = "6")]
    pub prev_hash: Vec<u8>,
    /// BLAKE3(prev_hash || this record encoded with `hash` empty).
    #[prost(bytes = "vec", tag = "7")]
    pub hash: Vec<u8>,
}

/// The records one transaction wrote, stored as one value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditBatch {
    /// In order. Tag 8, which no field of [`AuditRecord`] has: a value holding one record
    /// decodes as an empty batch, and is read as that record ([`decode_value`]).
    #[prost(message, repeated, tag = "8")]
    pub records: Vec<AuditRecord>,
}

/// The records of one value of the `audit` tree: a batch, or a single record.
pub fn decode_value(bytes: &[u8]) -> Result<Vec<AuditRecord>, prost::DecodeError> {
    let batch = AuditBatch::decode(bytes)?;
    if batch.records.is_empty() {
        Ok(vec![AuditRecord::decode(bytes)?])
    } else {
        Ok(batch.records)
    }
}

/// The value that stores `records` (the first one's number is its key).
pub fn encode_batch(records: Vec<AuditRecord>) -> Vec<u8> {
    AuditBatch { records }.encode_to_vec()
}

impl AuditRecord {
    fn compute_hash(&self) -> [u8; 32] {
        let mut unsigned = self.clone();
        unsigned.hash.clear();
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.prev_hash);
        hasher.update(&unsigned.encode_to_vec());
        *hasher.finalize().as_bytes()
    }
}

/// The signed head: the number and hash of the last record written, authenticated by a key
/// only the coordinator holds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Head {
    /// The last record's number.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The last record's hash.
    #[prost(bytes = "vec", tag = "2")]
    pub hash: Vec<u8>,
    /// The signing key the MAC key was derived from.
    #[prost(string, tag = "3")]
    pub kid: String,
    /// BLAKE3 keyed hash of `seq` (big-endian) and `hash`.
    #[prost(bytes = "vec", tag = "4")]
    pub mac: Vec<u8>,
}

impl Head {
    fn mac(key: &[u8; 32], seq: u64, hash: &[u8]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(key);
        hasher.update(&seq.to_be_bytes());
        hasher.update(hash);
        hasher.finalize()
    }

    /// A head for record `seq` with `hash`, under the current key.
    fn signed(keys: &SigningKeys, seq: u64, hash: &[u8; 32]) -> Result<Self, Error> {
        let (kid, key) = keys
            .audit_key(None)
            .ok_or_else(|| Error::InvalidConfig("no current signing key".to_owned()))?;
        Ok(Self {
            seq,
            hash: hash.to_vec(),
            kid,
            mac: Self::mac(&key, seq, hash).as_bytes().to_vec(),
        })
    }

    /// Whether the MAC holds (compared in constant time), or why not.
    fn check(&self, keys: &SigningKeys) -> Result<(), String> {
        let Some((_, key)) = keys.audit_key(Some(&self.kid)) else {
            return Err(format!(
                "it names signing key {:?}, which the store no longer holds",
                self.kid
            ));
        };
        let mac: [u8; 32] = self
            .mac
            .as_slice()
            .try_into()
            .map_err(|_| "its MAC is not 32 bytes".to_owned())?;
        if Self::mac(&key, self.seq, &self.hash) == blake3::Hash::from(mac) {
            Ok(())
        } else {
            Err("its MAC does not match (forged or modified)".to_owned())
        }
    }
}

/// A record to write.
struct Entry {
    kind: String,
    subject: String,
    detail: String,
}

impl Entry {
    fn new(kind: &str, subject: &str, detail: String) -> Self {
        Self {
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            detail,
        }
    }
}

/// Work for the writer: a record (or none: a barrier), and who waits for its number.
struct Job {
    entry: Option<Entry>,
    done: Option<oneshot::Sender<Option<u64>>>,
}

/// What waits for the writer. Senders wake it only for the first job of a batch, a job someone
/// waits on, or a full batch: queued records alone cost it no wake-up each.
#[derive(Default)]
struct Queue {
    pending: Mutex<Pending>,
    ready: Condvar,
}

#[derive(Default)]
struct Pending {
    jobs: Vec<Job>,
    /// Whether a job someone waits on is among them.
    waited: bool,
    /// The log is gone: the writer ends once the jobs are written.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `job`; false once closed.
    fn push(&self, job: Job) -> bool {
        self.push_within(job, usize::MAX).is_ok()
    }

    /// Adds `job` unless `limit` jobs or more wait already (then it is handed back); `Ok(false)`
    /// once closed.
    fn push_within(&self, job: Job, limit: usize) -> Result<bool, Job> {
        let mut p = self.lock();
        if p.closed {
            return Ok(false);
        }
        if p.jobs.len() >= limit {
            return Err(job);
        }
        let waited = job.done.is_some();
        let wake = p.jobs.is_empty() || waited || p.jobs.len() + 1 >= MAX_BATCH;
        p.waited |= waited;
        p.jobs.push(job);
        drop(p);
        if wake {
            self.ready.notify_one();
        }
        Ok(true)
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The next batch: waits for a first job, then, unless someone waits on one, gathers more
    /// for up to [`LINGER`]. `None` once closed and empty.
    fn take(&self) -> Option<Vec<Job>> {
        let mut p = self.lock();
        while p.jobs.is_empty() {
            if p.closed {
                return None;
            }
            p = self.ready.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
        let until = Instant::now() + LINGER;
        while !p.waited && !p.closed && p.jobs.len() < MAX_BATCH {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            p = self
                .ready
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        p.waited = false;
        Some(std::mem::take(&mut p.jobs))
    }
}

/// The log: appends, reads and checks.
pub struct AuditLog {
    tree: sled::Tree,
    heads: sled::Tree,
    keys: Arc<SigningKeys>,
    /// The writer's queue.
    queue: Arc<Queue>,
    /// The writer thread, joined on drop (it holds the store open).
    writer: Option<std::thread::JoinHandle<()>>,
    /// The last sequence number written, for tails waiting on new records.
    written: watch::Receiver<u64>,
}

impl AuditLog {
    /// Opens the `audit` trees of `store`, checks the chain's end against the signed head
    /// (marking what it finds, see the module docs), and starts the writer thread, which ends
    /// when the log is dropped.
    pub fn open(store: &Store, keys: Arc<SigningKeys>) -> Result<Self, Error> {
        let tree = store.open_tree("audit")?;
        let heads = store.open_tree(HEAD_TREE)?;
        let last = match tree.last()? {
            Some((_, value)) => decode_records(&value)?.pop(),
            None => None,
        };
        let chain_end = last.map_or((0, [0; 32]), |last| {
            (last.seq, last.hash.as_slice().try_into().unwrap_or([0; 32]))
        });
        let signed = read_head(&heads)?;
        let (head, mark) = found_at_start(&keys, chain_end, signed.as_ref());
        let (written_tx, written) = watch::channel(head.0);
        let mut writer = Writer {
            tree: tree.clone(),
            heads: heads.clone(),
            keys: keys.clone(),
            store: store.clone(),
            head,
            written: written_tx,
        };
        if let Some(mark) = mark {
            error!(kind = %mark.kind, detail = %mark.detail, "the audit log was tampered with while the coordinator was stopped");
            writer.write(vec![mark])?;
        }
        let queue = Arc::new(Queue::default());
        let jobs = Arc::clone(&queue);
        let writer = std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || writer.run(&jobs))
            .map_err(|e| Error::io("cannot start the audit writer for", "audit", e))?;
        Ok(Self {
            tree,
            heads,
            keys,
            queue,
            writer: Some(writer),
            written,
        })
    }

    /// Queues a record and returns at once. A record that cannot be written is logged and
    /// marks the store failed (mutations are refused until a test write works); it never
    /// fails the caller's request.
    pub fn record(&self, kind: &str, subject: &str, detail: &str) {
        self.send(Entry::new(kind, subject, detail.to_owned()), None);
    }

    /// Queues a record and returns its number once it is in the store (not yet flushed:
    /// the caller's next [`Store::flush`] covers it); `None` when it could not be written.
    pub async fn append(&self, kind: &str, subject: &str, detail: String) -> Option<u64> {
        self.written(Entry::new(kind, subject, detail)).await
    }

    /// Queues `entry` and returns its number once it is in the store.
    async fn written(&self, entry: Entry) -> Option<u64> {
        let (done, written) = oneshot::channel();
        self.send(entry, Some(done));
        written.await.ok().flatten()
    }

    /// Queues a record and returns at once while fewer than [`MAX_QUEUED`] records wait for
    /// the writer; beyond that, returns once it is in the store, like [`AuditLog::append`].
    /// For records nothing waits on (a read-only call's: it is not flushed before the answer
    /// either way).
    pub async fn append_queued(&self, kind: &str, subject: &str, detail: String) {
        let job = Job {
            entry: Some(Entry::new(kind, subject, detail)),
            done: None,
        };
        match self.queue.push_within(job, MAX_QUEUED) {
            Ok(true) => {}
            Ok(false) => error!(
                kind,
                "audit record not written: the audit writer has stopped"
            ),
            Err(job) => {
                if let Some(entry) = job.entry {
                    self.written(entry).await;
                }
            }
        }
    }

    /// Returns once every record queued before the call is in the store.
    pub async fn settle(&self) {
        let (done, written) = oneshot::channel();
        if self.enqueue(Job {
            entry: None,
            done: Some(done),
        }) {
            let _ = written.await;
        }
    }

    fn send(&self, entry: Entry, done: Option<oneshot::Sender<Option<u64>>>) {
        let kind = entry.kind.clone();
        if !self.enqueue(Job {
            entry: Some(entry),
            done,
        }) {
            error!(%kind, "audit record not written: the audit writer has stopped");
        }
    }

    /// Hands `job` to the writer; false when it has stopped.
    fn enqueue(&self, job: Job) -> bool {
        self.queue.push(job)
    }

    /// Jobs queued and not yet taken by the writer.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queue.lock().jobs.len()
    }

    /// Up to `limit` records after `after` that `keep` accepts, in order, and whether the
    /// log holds more after the last one returned.
    pub fn list(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&AuditRecord) -> bool,
    ) -> Result<(Vec<AuditRecord>, bool), Error> {
        let mut out = Vec::new();
        // The value holding record `after + 1` starts at or before it.
        let first = (after + 1).to_be_bytes();
        let start = match self.tree.range(..=first).next_back().transpose()? {
            Some((key, _)) => key,
            None => sled::IVec::from(&first[..]),
        };
        for entry in self.tree.range(start..) {
            let (_, value) = entry?;
            for record in decode_records(&value)? {
                if record.seq <= after {
                    continue;
                }
                if out.len() == limit {
                    return Ok((out, true));
                }
                if keep(&record) {
                    out.push(record);
                }
            }
        }
        Ok((out, false))
    }

    /// The last sequence number written.
    pub fn head(&self) -> u64 {
        *self.written.borrow()
    }

    /// Changes of the last sequence number written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.written.clone()
    }

    /// Checks the whole chain ([`verify`]), the marks of tampering found at earlier starts,
    /// and the chain's end against the signed head; returns how many records it holds.
    pub fn verify(&self) -> Result<u64, Broken> {
        // The head first: records written after this read only make the chain longer.
        let signed = read_head(&self.heads).map_err(|e| Broken {
            seq: 0,
            why: format!("the signed head is unreadable: {e}"),
        })?;
        let count = walk(&self.tree, |record| {
            if MARKS.contains(&record.kind.as_str()) {
                return Err(format!(
                    "the coordinator found the log tampered with at a start ({}): {}",
                    record.kind, record.detail
                ));
            }
            match &signed {
                Some(head) if head.seq == record.seq && head.hash != record.hash => {
                    Err("does not match the signed head (replaced)".to_owned())
                }
                _ => Ok(()),
            }
        })?;
        let Some(head) = signed else {
            return if count == 0 {
                Ok(0)
            } else {
                Err(Broken {
                    seq: count + 1,
                    why: format!(
                        "the log has {count} records and no signed head: records after \
                         {count} may have been removed"
                    ),
                })
            };
        };
        head.check(&self.keys).map_err(|why| Broken {
            seq: head.seq,
            why: format!("the signed head is not valid: {why}"),
        })?;
        if count < head.seq {
            return Err(Broken {
                seq: count + 1,
                why: format!(
                    "truncated: the log ends at record {count} but its signed head names record \
                     {}; records {} to {} were removed",
                    head.seq,
                    count + 1,
                    head.seq
                ),
            });
        }
        Ok(count)
    }
}

impl Drop for AuditLog {
    /// Stops the writer after what is queued and waits for it, so the store is closed when
    /// the log is gone.
    fn drop(&mut self) {
        self.queue.close();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            error!("the audit writer panicked");
        }
    }
}

/// What the start found: the head to continue from and the mark to write first, if any.
fn found_at_start(
    keys: &SigningKeys,
    chain_end: (u64, [u8; 32]),
    signed: Option<&Head>,
) -> ((u64, [u8; 32]), Option<Entry>) {
    let (last, last_hash) = chain_end;
    let Some(head) = signed else {
        if last == 0 {
            return (chain_end, None);
        }
        let why = format!(
            "the log held {last} records and no signed head: records after {last} may have \
             been removed"
        );
        return (chain_end, Some(Entry::new(UNANCHORED, "", why)));
    };
    if let Err(why) = head.check(keys) {
        let why = format!("the signed head is not valid ({why}); the chain ended at record {last}");
        return (chain_end, Some(Entry::new(HEAD_INVALID, "", why)));
    }
    if head.seq > last {
        let why = format!(
            "records {} to {} were missing at start: the log ended at record {last}, its signed \
             head named record {}",
            last + 1,
            head.seq,
            head.seq
        );
        let hash = head.hash.as_slice().try_into().unwrap_or([0; 32]);
        return ((head.seq, hash), Some(Entry::new(TRUNCATED, "", why)));
    }
    if head.seq < last {
        let why = format!(
            "records {} to {last} were not covered by the signed head (written outside the \
             coordinator)",
            head.seq + 1
        );
        return (chain_end, Some(Entry::new(UNANCHORED, "", why)));
    }
    if head.hash != last_hash {
        let why = format!("record {last} does not match the signed head (replaced)");
        return (chain_end, Some(Entry::new(HEAD_INVALID, "", why)));
    }
    (chain_end, None)
}

fn read_head(heads: &sled::Tree) -> Result<Option<Head>, Error> {
    heads
        .get(HEAD_KEY)?
        .map(|bytes| {
            Head::decode(bytes.as_ref()).map_err(|source| Error::Corrupt {
                what: "audit head",
                source,
            })
        })
        .transpose()
}

fn decode_records(bytes: &[u8]) -> Result<Vec<AuditRecord>, Error> {
    decode_value(bytes).map_err(|source| Error::Corrupt {
        what: "audit record",
        source,
    })
}

/// The writer thread's state: the chain's head and where to write.
struct Writer {
    tree: sled::Tree,
    heads: sled::Tree,
    keys: Arc<SigningKeys>,
    store: Store,
    head: (u64, [u8; 32]),
    written: watch::Sender<u64>,
}

impl Writer {
    /// Writes what is queued, a batch at a time (at most [`MAX_BATCH`] records a
    /// transaction), until the log is closed and its queue empty.
    fn run(mut self, queue: &Queue) {
        while let Some(mut jobs) = queue.take() {
            while !jobs.is_empty() {
                let rest = jobs.split_off(jobs.len().min(MAX_BATCH));
                self.write_batch(std::mem::replace(&mut jobs, rest));
            }
        }
    }

    /// Writes the records of `batch` and answers who waits on its jobs.
    fn write_batch(&mut self, mut batch: Vec<Job>) {
        let base = self.head.0;
        let holds: Vec<bool> = batch.iter().map(|j| j.entry.is_some()).collect();
        let entries: Vec<Entry> = batch.iter_mut().filter_map(|j| j.entry.take()).collect();
        let count = entries.len();
        let ok = count == 0
            || match self.write(entries) {
                Ok(()) => true,
                Err(err) => {
                    error!(%err, records = count, "audit records not written");
                    self.store.reserve.failed(&err);
                    false
                }
            };
        let mut seq = base;
        for (job, holds) in batch.into_iter().zip(holds) {
            seq += u64::from(holds);
            if let Some(done) = job.done {
                let _ = done.send(ok.then_some(seq));
            }
        }
    }

    /// Numbers, chains and writes `entries` with the new signed head in one transaction.
    fn write(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
        let (mut seq, mut prev) = self.head;
        let key = (seq + 1).to_be_bytes();
        let at_unix_ms = heist_proto::identity::unix_ms();
        let mut records = Vec::with_capacity(entries.len());
        for Entry {
            kind,
            subject,
            detail,
        } in entries
        {
            seq += 1;
            let mut record = AuditRecord {
                seq,
                at_unix_ms,
                kind,
                subject,
                detail,
                prev_hash: prev.to_vec(),
                hash: Vec::new(),
            };
            prev = record.compute_hash();
            record.hash = prev.to_vec();
            records.push(record);
        }
        let value = encode_batch(records);
        let head = Head::signed(&self.keys, seq, &prev)?.encode_to_vec();
        (&self.tree, &self.heads)
            .transaction(|(tree, heads)| {
                tree.insert(&key[..], value.as_slice())?;
                heads.insert(HEAD_KEY, head.as_slice())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<Infallible>>(())
            })
            .map_err(|err| match err {
                TransactionError::Storage(err) => Error::from(err),
                TransactionError::Abort(never) => match never {},
            })?;
        self.head = (seq, prev);
        self.written.send_replace(seq);
        Ok(())
    }
}

/// Where the chain breaks.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit log broken at record {seq}: {why}")]
pub struct Broken {
    /// The first record that does not fit.
    pub seq: u64,
    /// Why.
    pub why: String,
}

/// Checks the chain alone (no signed head); returns how many records it holds, or the first
/// broken link. [`AuditLog::verify`] also checks the head.
pub fn verify(tree: &sled::Tree) -> Result<u64, Broken> {
    walk(tree, |_| Ok(()))
}

/// Walks the chain, checking each link and asking `each` about each record.
fn walk(
    tree: &sled::Tree,
    mut each: impl FnMut(&AuditRecord) -> Result<(), String>,
) -> Result<u64, Broken> {
    let mut expected = 1u64;
    let mut prev = [0u8; 32];
    for entry in tree.iter() {
        let broken = |why: String| Broken { seq: expected, why };
        let (key, value) = entry.map_err(|e| broken(format!("unreadable: {e}")))?;
        let records = decode_value(value.as_ref())
            .map_err(|_| broken("does not decode (modified)".to_owned()))?;
        let key_seq = <[u8; 8]>::try_from(key.as_ref())
            .ok()
            .map(u64::from_be_bytes);
        for (i, record) in records.iter().enumerate() {
            let broken = |why: String| Broken { seq: expected, why };
            // A value is keyed by its first record.
            let first = i == 0;
            if first
                && record.kind == TRUNCATED
                && key_seq == Some(record.seq)
                && record.seq > expected
            {
                return Err(broken(format!("truncated: {}", record.detail)));
            }
            if (first && key_seq != Some(expected)) || record.seq != expected {
                return Err(broken(format!(
                    "expected record {expected}, found record {} under key {:?} (removed, \
                     inserted or reordered)",
                    record.seq, key_seq
                )));
            }
            if record.prev_hash != prev {
                return Err(broken(
                    "does not link to the record before it (removed, inserted or reordered)"
                        .to_owned(),
                ));
            }
            let hash = record.compute_hash();
            if record.hash != hash {
                return Err(broken(
                    "its content does not match its hash (modified)".to_owned(),
                ));
            }
            each(record).map_err(broken)?;
            prev = hash;
            expected += 1;
        }
    }
    Ok(expected - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        keys: Arc<SigningKeys>,
        log: AuditLog,
    }

    async fn log_with(n: usize) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let keys = SigningKeys::for_tests();
        let log = AuditLog::open(&store, keys.clone()).expect("log");
        // One at a time: each record is a value of its own, which the tampering tests edit.
        for i in 0..n {
            log.append(
                "token.issued",
                &format!("client-{i}"),
                "peer=127.0.0.1".to_owned(),
            )
            .await
            .expect("written");
        }
        Fixture {
            _dir: dir,
            store,
            keys,
            log,
        }
    }

    fn key(seq: u64) -> [u8; 8] {
        seq.to_be_bytes()
    }

    /// The record of a value holding one.
    fn one(value: sled::IVec) -> AuditRecord {
        let mut records = decode_value(&value).expect("decode");
        assert_eq!(records.len(), 1, "{records:?}");
        records.remove(0)
    }

    #[tokio::test]
    async fn an_untouched_log_verifies_and_survives_reopen() {
        let f = log_with(5).await;
        assert_eq!(f.log.verify(), Ok(5));
        drop(f.log);
        let log = AuditLog::open(&f.store, f.keys.clone()).expect("reopen");
        assert_eq!(
            log.append("worker.joined", "w1", String::new()).await,
            Some(6)
        );
        assert_eq!(log.verify(), Ok(6));
    }

    #[tokio::test]
    async fn tampering_is_found_at_the_first_broken_link() {
        // Modified.
        let f = log_with(5).await;
        let tree = &f.log.tree;
        let mut r = one(tree.get(key(3)).expect("get").expect("3"));
        r.subject = "someone-else".into();
        tree.insert(key(3), encode_batch(vec![r])).expect("insert");
        assert_eq!(verify(tree).expect_err("modified").seq, 3);

        // Removed.
        let f = log_with(5).await;
        f.log.tree.remove(key(2)).expect("remove");
        assert_eq!(verify(&f.log.tree).expect_err("removed").seq, 2);

        // Reordered (two values swapped).
        let f = log_with(5).await;
        let tree = &f.log.tree;
        let (a, b) = (
            tree.get(key(2)).expect("get").expect("2"),
            tree.get(key(4)).expect("get").expect("4"),
        );
        tree.insert(key(2), b).expect("insert");
        tree.insert(key(4), a).expect("insert");
        assert_eq!(verify(tree).expect_err("reordered").seq, 2);

        // Inserted: a well-formed record renumbering the rest cannot fix the chain after it.
        let f = log_with(3).await;
        let tree = &f.log.tree;
        let mut fake = one(tree.get(key(2)).expect("get").expect("2"));
        fake.kind = "token.issued".into();
        fake.subject = "forged".into();
        fake.hash = fake.compute_hash().to_vec();
        let old2 = tree.get(key(2)).expect("get").expect("2");
        let old3 = tree.get(key(3)).expect("get").expect("3");
        tree.insert(key(2), encode_batch(vec![fake]))
            .expect("insert");
        let mut moved = one(old2);
        moved.seq = 3;
        tree.insert(key(3), encode_batch(vec![moved]))
            .expect("insert");
        tree.insert(key(4), old3).expect("insert");
        assert_eq!(verify(tree).expect_err("inserted").seq, 3);
    }

    #[tokio::test]
    async fn records_removed_from_the_end_are_found_while_running_and_after_a_restart() {
        let f = log_with(6).await;
        // While running: the chain alone still verifies, the signed head does not.
        f.log.tree.remove(key(6)).expect("remove");
        f.log.tree.remove(key(5)).expect("remove");
        assert_eq!(verify(&f.log.tree), Ok(4));
        let broken = f.log.verify().expect_err("truncated");
        assert_eq!(broken.seq, 5, "{broken}");
        assert!(broken.why.contains("records 5 to 6"), "{broken}");

        // After a restart: a mark continues after the head, so the gap stays in the chain
        // even once new records move the head on.
        drop(f.log);
        let log = AuditLog::open(&f.store, f.keys.clone()).expect("reopen");
        assert_eq!(
            log.append("token.issued", "c", String::new()).await,
            Some(8)
        );
        let (records, _) = log.list(0, 100, |_| true).expect("list");
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 7, 8]);
        assert_eq!(records[4].kind, TRUNCATED);
        let broken = log.verify().expect_err("still truncated");
        assert_eq!(broken.seq, 5, "{broken}");
        assert!(broken.why.contains("records 5 to 6"), "{broken}");
    }

    #[tokio::test]
    async fn a_forged_or_missing_head_is_found() {
        // A head recomputed without the key.
        let f = log_with(3).await;
        let mut head = read_head(&f.log.heads).expect("read").expect("head");
        head.seq = 2;
        head.hash = one(f.log.tree.get(key(2)).expect("get").expect("2")).hash;
        f.log.tree.remove(key(3)).expect("remove");
        f.log
            .heads
            .insert(HEAD_KEY, head.encode_to_vec())
            .expect("forge");
        let broken = f.log.verify().expect_err("forged");
        assert!(broken.why.contains("MAC does not match"), "{broken}");
        drop(f.log);
        let log = AuditLog::open(&f.store, f.keys.clone()).expect("reopen");
        let (records, _) = log.list(2, 10, |_| true).expect("list");
        assert_eq!(records[0].kind, HEAD_INVALID);
        assert!(log.verify().is_err());

        // No head at all, with records.
        let f = log_with(3).await;
        f.log.heads.remove(HEAD_KEY).expect("remove");
        assert!(
            f.log
                .verify()
                .expect_err("no head")
                .why
                .contains("no signed head")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_keep_one_ordered_chain() {
        let f = Arc::new(log_with(0).await);
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let f = f.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..50 {
                        let subject = format!("p{t}");
                        let seq = f.log.append("tool.executed", &subject, i.to_string()).await;
                        seqs.push(seq.expect("written"));
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            let seqs = task.await.expect("task");
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
            all.extend(seqs);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=400).collect::<Vec<u64>>());
        assert_eq!(f.log.verify(), Ok(400));
    }

    #[tokio::test]
    async fn batches_and_single_records_read_as_one_chain() {
        // Records 1 to 3 as single-record values (the layout before batches), then queued
        // records, which the writer stores a batch per value.
        let f = log_with(3).await;
        for seq in 1..=3 {
            let record = one(f.log.tree.get(key(seq)).expect("get").expect("value"));
            f.log
                .tree
                .insert(key(seq), record.encode_to_vec())
                .expect("insert");
        }
        for i in 0..50 {
            f.log.record("tool.executed", "p", &i.to_string());
        }
        f.log.settle().await;
        assert_eq!(f.log.verify(), Ok(53));
        assert!(f.log.tree.len() < 53, "{} values", f.log.tree.len());
        let (records, more) = f.log.list(2, 5, |_| true).expect("list");
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [3, 4, 5, 6, 7]);
        assert!(more);
        let (records, more) = f.log.list(50, 10, |_| true).expect("list");
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [51, 52, 53]
        );
        assert!(!more);

        // A record modified inside a batch is found at that record.
        let (last_key, value) = f.log.tree.last().expect("read").expect("last");
        let mut batch = decode_value(&value).expect("decode");
        assert!(batch.len() > 1, "{batch:?}");
        let middle = batch.len() / 2;
        batch[middle].detail = "edited".into();
        let edited = batch[middle].seq;
        f.log
            .tree
            .insert(last_key, encode_batch(batch))
            .expect("tamper");
        assert_eq!(f.log.verify().expect_err("modified").seq, edited);
    }

    #[tokio::test]
    async fn queued_appends_stay_bounded_in_order_and_are_all_written() {
        let f = log_with(0).await;
        let n = 3 * MAX_QUEUED;
        let mut most = 0;
        for i in 0..n {
            f.log
                .append_queued("tool.executed", "p", i.to_string())
                .await;
            most = most.max(f.log.queued());
        }
        assert!(most <= MAX_QUEUED, "{most} queued");
        f.log.settle().await;
        assert_eq!(f.log.verify(), Ok(n as u64));
        let (records, _) = f.log.list(0, n, |_| true).expect("list");
        let details: Vec<String> = records.into_iter().map(|r| r.detail).collect();
        assert_eq!(details, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
    }
}
