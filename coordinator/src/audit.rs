//! The audit log: append-only, hash-chained records of security decisions in the `audit` tree
//! (key: sequence number, big-endian; value: a prost [`AuditRecord`]).
//!
//! Each record's `hash` is BLAKE3 over the previous record's hash and the record's own encoding
//! (with `hash` empty), so [`verify`] finds the first record that was modified, removed,
//! inserted or moved. Appends are serialised by one lock (to chain) and not flushed one by
//! one: they ride on the store's next flush (sled also flushes on its own within a second).
//! Known limit: removing records from the end (truncation) leaves a valid shorter chain.

use std::sync::{Mutex, PoisonError};

use prost::Message;
use tracing::warn;

use crate::{error::Error, store::Store};

/// One audit record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditRecord {
    /// Position in the log, from 1.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// When, milliseconds since the Unix epoch.
    #[prost(uint64, tag = "2")]
    pub at_unix_ms: u64,
    /// What happened, e.g. `worker.joined`, `worker.refused`, `token.issued`, `token.refused`.
    #[prost(string, tag = "3")]
    pub kind: String,
    /// Who or what it was about (a worker id, a client id).
    #[prost(string, tag = "4")]
    pub subject: String,
    /// Details (peer address, reason).
    #[prost(string, tag = "5")]
    pub detail: String,
    /// Hash of the previous record (zeros for the first).
    #[prost(bytes = "vec", tag = "6")]
    pub prev_hash: Vec<u8>,
    /// BLAKE3(prev_hash || this record encoded with `hash` empty).
    #[prost(bytes = "vec", tag = "7")]
    pub hash: Vec<u8>,
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

/// The log: appends, reads and checks.
pub struct AuditLog {
    tree: sled::Tree,
    /// Last sequence number and hash.
    head: Mutex<(u64, [u8; 32])>,
    /// The last sequence number written, for tails waiting on new records.
    written: tokio::sync::watch::Sender<u64>,
}

impl AuditLog {
    /// Opens the `audit` tree of `store` and finds its head.
    pub fn open(store: &Store) -> Result<Self, Error> {
        let tree = store.open_tree("audit")?;
        let head = match tree.last()? {
            Some((_, value)) => {
                let last =
                    AuditRecord::decode(value.as_ref()).map_err(|source| Error::Corrupt {
                        what: "audit record",
                        source,
                    })?;
                (last.seq, last.hash.as_slice().try_into().unwrap_or([0; 32]))
            }
            None => (0, [0; 32]),
        };
        Ok(Self {
            tree,
            written: tokio::sync::watch::Sender::new(head.0),
            head: Mutex::new(head),
        })
    }

    /// Appends a record. An audit write that fails is logged, never fails the caller's request.
    pub fn record(&self, kind: &str, subject: &str, detail: &str) {
        let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        let mut record = AuditRecord {
            seq: head.0 + 1,
            at_unix_ms: heist_proto::identity::unix_ms(),
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            detail: detail.to_owned(),
            prev_hash: head.1.to_vec(),
            hash: Vec::new(),
        };
        let hash = record.compute_hash();
        record.hash = hash.to_vec();
        match self
            .tree
            .insert(record.seq.to_be_bytes(), record.encode_to_vec())
        {
            Ok(_) => {
                *head = (record.seq, hash);
                self.written.send_replace(record.seq);
            }
            Err(err) => warn!(%err, kind, "audit record not written"),
        }
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
        for entry in self.tree.range((after + 1).to_be_bytes()..) {
            let (_, value) = entry?;
            let record = AuditRecord::decode(value.as_ref()).map_err(|source| Error::Corrupt {
                what: "audit record",
                source,
            })?;
            if out.len() == limit {
                return Ok((out, true));
            }
            if keep(&record) {
                out.push(record);
            }
        }
        Ok((out, false))
    }

    /// The last sequence number written.
    pub fn head(&self) -> u64 {
        *self.written.borrow()
    }

    /// Changes of the last sequence number written.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.written.subscribe()
    }

    /// Checks the whole chain ([`verify`]).
    pub fn verify(&self) -> Result<u64, Broken> {
        verify(&self.tree)
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

/// Checks the whole chain; returns how many records it holds, or the first broken link.
pub fn verify(tree: &sled::Tree) -> Result<u64, Broken> {
    let mut expected = 1u64;
    let mut prev = [0u8; 32];
    for entry in tree.iter() {
        let broken = |why: String| Broken { seq: expected, why };
        let (key, value) = entry.map_err(|e| broken(format!("unreadable: {e}")))?;
        let record = AuditRecord::decode(value.as_ref())
            .map_err(|_| broken("does not decode (modified)".to_owned()))?;
        let key_seq = <[u8; 8]>::try_from(key.as_ref())
            .ok()
            .map(u64::from_be_bytes);
        if key_seq != Some(expected) || record.seq != expected {
            return Err(broken(format!(
                "expected record {expected}, found record {} under key {:?} (removed, inserted \
                 or reordered)",
                record.seq, key_seq
            )));
        }
        if record.prev_hash != prev {
            return Err(broken(
                "does not link to the record before it (removed, inserted or reordered)".to_owned(),
            ));
        }
        let hash = record.compute_hash();
        if record.hash != hash {
            return Err(broken(
                "its content does not match its hash (modified)".to_owned(),
            ));
        }
        prev = hash;
        expected += 1;
    }
    Ok(expected - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(n: usize) -> (tempfile::TempDir, Store, AuditLog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let log = AuditLog::open(&store).expect("log");
        for i in 0..n {
            log.record("token.issued", &format!("client-{i}"), "peer=127.0.0.1");
        }
        (dir, store, log)
    }

    fn key(seq: u64) -> [u8; 8] {
        seq.to_be_bytes()
    }

    #[test]
    fn an_untouched_log_verifies_and_survives_reopen() {
        let (_dir, store, log) = log_with(5);
        assert_eq!(verify(&log.tree), Ok(5));
        drop(log);
        let log = AuditLog::open(&store).expect("reopen");
        log.record("worker.joined", "w1", "");
        assert_eq!(verify(&log.tree), Ok(6));
    }

    #[test]
    fn tampering_is_found_at_the_first_broken_link() {
        // Modified.
        let (_d, _s, log) = log_with(5);
        let mut r = AuditRecord::decode(log.tree.get(key(3)).expect("get").expect("3").as_ref())
            .expect("decode");
        r.subject = "someone-else".into();
        log.tree.insert(key(3), r.encode_to_vec()).expect("insert");
        assert_eq!(verify(&log.tree).expect_err("modified").seq, 3);

        // Removed.
        let (_d, _s, log) = log_with(5);
        log.tree.remove(key(2)).expect("remove");
        assert_eq!(verify(&log.tree).expect_err("removed").seq, 2);

        // Reordered (two values swapped).
        let (_d, _s, log) = log_with(5);
        let (a, b) = (
            log.tree.get(key(2)).expect("get").expect("2"),
            log.tree.get(key(4)).expect("get").expect("4"),
        );
        log.tree.insert(key(2), b).expect("insert");
        log.tree.insert(key(4), a).expect("insert");
        assert_eq!(verify(&log.tree).expect_err("reordered").seq, 2);

        // Inserted: a well-formed record renumbering the rest cannot fix the chain after it.
        let (_d, _s, log) = log_with(3);
        let mut fake = AuditRecord::decode(log.tree.get(key(2)).expect("get").expect("2").as_ref())
            .expect("decode");
        fake.kind = "token.issued".into();
        fake.subject = "forged".into();
        fake.hash = fake.compute_hash().to_vec();
        let old2 = log.tree.get(key(2)).expect("get").expect("2");
        let old3 = log.tree.get(key(3)).expect("get").expect("3");
        log.tree
            .insert(key(2), fake.encode_to_vec())
            .expect("insert");
        let mut moved = AuditRecord::decode(old2.as_ref()).expect("decode");
        moved.seq = 3;
        log.tree
            .insert(key(3), moved.encode_to_vec())
            .expect("insert");
        log.tree.insert(key(4), old3).expect("insert");
        assert_eq!(verify(&log.tree).expect_err("inserted").seq, 3);
    }
}
