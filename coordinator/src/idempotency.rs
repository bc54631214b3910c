//! Request-id deduplication for mutating calls (CreateSession, CloseSession, CallTool of tools
//! that are not read-only).
//!
//! Key: principal + method + request id. Record: a BLAKE3 fingerprint of the request, the encoded
//! response and the creation time, in the `idempotency` tree. The same id with the same request
//! replays the stored response; with a different request it is REQUEST_ID_REUSED. A duplicate
//! that arrives while the first call is still running waits for it (bounded by the duplicate's
//! own deadline, which tonic enforces) and then replays. Records older than the TTL are ignored
//! and swept.
//!
//! Before a call runs, its *intent* is recorded and flushed: a pending record with the
//! fingerprint and what the call reserved (a new session's id), so nothing leaves the
//! coordinator for a request id the store does not know. A call that fails with a definite
//! answer (nothing was applied) removes its intent so it can be retried with other arguments;
//! one whose outcome is unknown (the worker did not answer, the process died) leaves it, and a
//! retry *resumes* it with the same reservation: the worker, which records what it applied per
//! request id, then replays its result or applies the call once. The outcome is never guessed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use heist_proto::ids::RequestId;
use tokio::sync::watch;
use tracing::debug;

use crate::{error::Error, store::Store};

/// A stored outcome of a call with a request id.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// BLAKE3 of the request's canonical form.
    #[prost(bytes = "vec", tag = "1")]
    pub fingerprint: Vec<u8>,
    /// The encoded response.
    #[prost(bytes = "vec", tag = "2")]
    pub response: Vec<u8>,
    /// When the call completed (or, while pending, when it was begun), milliseconds since the
    /// Unix epoch.
    #[prost(uint64, tag = "3")]
    pub created_at_ms: u64,
    /// True while the call has begun but has no recorded result (an intent).
    #[prost(bool, tag = "4")]
    pub pending: bool,
    /// What the call reserved when it began (e.g. the id of the session it creates), handed
    /// back unchanged when a retry resumes it.
    #[prost(bytes = "vec", tag = "5")]
    pub intent: Vec<u8>,
}

/// Builds the fingerprint of a request from its fields, each length-prefixed so different field
/// splits never collide.
pub struct Fingerprint(blake3::Hasher);

impl Fingerprint {
    /// A fingerprint for `method`.
    pub fn new(method: &str) -> Self {
        let mut f = Self(blake3::Hasher::new());
        f.field(method.as_bytes());
        f
    }

    /// Adds one field.
    pub fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// Adds a string map in key order (protobuf maps have no stable encoding order).
    pub fn map(&mut self, map: &HashMap<String, String>) -> &mut Self {
        let mut pairs: Vec<(&String, &String)> = map.iter().collect();
        pairs.sort();
        self.field(&(pairs.len() as u64).to_le_bytes());
        for (k, v) in pairs {
            self.field(k.as_bytes()).field(v.as_bytes());
        }
        self
    }

    /// The digest.
    pub fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// The dedup key of a call.
pub fn key(principal: &str, method: &str, request_id: &RequestId) -> Vec<u8> {
    let mut key =
        Vec::with_capacity(principal.len() + method.len() + request_id.as_str().len() + 24);
    for part in [principal, method, request_id.as_str()] {
        key.extend_from_slice(&(part.len() as u64).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    key
}

/// What to do with a call.
pub enum Begin {
    /// A previous call with this id succeeded: return its (encoded) response.
    Replay(Vec<u8>),
    /// Run the call, then [`Guard::complete`] it. Its intent is durable; [`Guard::intent`] is
    /// what it reserved (a resumed call's original reservation).
    Run(Guard),
}

/// What a claim attempt found.
enum Next {
    /// A call with this key is running: wait for it.
    Wait(watch::Receiver<()>),
    /// This call runs.
    Claimed(Guard),
}

struct InFlight {
    fingerprint: [u8; 32],
    done: watch::Receiver<()>,
}

struct Inner {
    store: Store,
    ttl: Duration,
    in_flight: Mutex<HashMap<Vec<u8>, InFlight>>,
}

/// The deduplication table.
#[derive(Clone)]
pub struct Idempotency {
    inner: Arc<Inner>,
}

impl Idempotency {
    /// A table over the store's `idempotency` tree whose records live for `ttl`.
    pub fn new(store: Store, ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                ttl,
                in_flight: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Decides whether a call runs or replays. A call that runs has its intent (with `intent`,
    /// or the reservation of the call it resumes) recorded and flushed first.
    pub async fn begin(
        &self,
        key: Vec<u8>,
        fingerprint: [u8; 32],
        request_id: &RequestId,
        intent: Vec<u8>,
    ) -> Result<Begin, Error> {
        let mut intent = intent;
        loop {
            let next = {
                let mut in_flight = self.inner.lock();
                match in_flight.get(&key) {
                    Some(running) if running.fingerprint != fingerprint => {
                        return Err(Error::RequestIdReused(request_id.clone()));
                    }
                    Some(running) => Next::Wait(running.done.clone()),
                    None => {
                        let (tx, rx) = watch::channel(());
                        in_flight.insert(
                            key.clone(),
                            InFlight {
                                fingerprint,
                                done: rx,
                            },
                        );
                        Next::Claimed(Guard {
                            owner: self.inner.clone(),
                            key: key.clone(),
                            intent: std::mem::take(&mut intent),
                            resumed: false,
                            _done: tx,
                        })
                    }
                }
            };
            let mut guard = match next {
                Next::Wait(mut done) => {
                    debug!(request_id = %request_id, "waiting for the first call with this request id");
                    // Resolves when the first call's guard is dropped (sender gone).
                    while done.changed().await.is_ok() {}
                    continue;
                }
                Next::Claimed(guard) => guard,
            };
            // Claimed: a finished call may have recorded its result just before.
            return match self.stored(&guard.key)? {
                Some(rec) if rec.fingerprint != fingerprint => {
                    Err(Error::RequestIdReused(request_id.clone()))
                }
                Some(rec) if !rec.pending => Ok(Begin::Replay(rec.response)),
                Some(rec) => {
                    debug!(request_id = %request_id, "resuming a call whose outcome is not recorded");
                    guard.intent = rec.intent;
                    guard.resumed = true;
                    Ok(Begin::Run(guard))
                }
                None => {
                    guard.record_intent(fingerprint).await?;
                    Ok(Begin::Run(guard))
                }
            };
        }
    }

    /// A live (unexpired) record.
    fn stored(&self, key: &[u8]) -> Result<Option<Record>, Error> {
        let rec: Option<Record> = Store::get(&self.inner.store.idempotency, key, "idempotency")?;
        Ok(rec.filter(|r| !self.expired(r, now_ms())))
    }

    fn expired(&self, rec: &Record, now_ms: u64) -> bool {
        let ttl_ms = u64::try_from(self.inner.ttl.as_millis()).unwrap_or(u64::MAX);
        now_ms.saturating_sub(rec.created_at_ms) >= ttl_ms
    }

    /// How many calls began but have no recorded result (their outcome is unknown here until a
    /// retry resumes them).
    pub fn pending(&self) -> Result<usize, Error> {
        let mut n = 0;
        for item in self.inner.store.idempotency.iter() {
            let (_, value) = item?;
            if <Record as prost::Message>::decode(value.as_ref()).is_ok_and(|r| r.pending) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes records older than the TTL; returns how many.
    pub fn sweep(&self, now_ms: u64) -> Result<usize, Error> {
        let tree = &self.inner.store.idempotency;
        let mut removed = 0;
        for item in tree.iter() {
            let (key, value) = item?;
            let stale = match <Record as prost::Message>::decode(value.as_ref()) {
                Ok(rec) => self.expired(&rec, now_ms),
                Err(_) => true,
            };
            if stale {
                tree.remove(key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, InFlight>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The right to run a call. Dropping it without [`Guard::complete`] or [`Guard::abandon`]
/// leaves the intent (the outcome is unknown), and a waiting duplicate then resumes the call.
pub struct Guard {
    owner: Arc<Inner>,
    key: Vec<u8>,
    intent: Vec<u8>,
    resumed: bool,
    _done: watch::Sender<()>,
}

impl Guard {
    /// What the call reserved when it first began.
    pub fn intent(&self) -> &[u8] {
        &self.intent
    }

    /// Whether this call resumes an earlier one whose outcome was not recorded.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Records the intent (flushed) before the call leaves the coordinator.
    async fn record_intent(&self, fingerprint: [u8; 32]) -> Result<(), Error> {
        let rec = Record {
            fingerprint: fingerprint.to_vec(),
            response: Vec::new(),
            created_at_ms: now_ms(),
            pending: true,
            intent: self.intent.clone(),
        };
        Store::put(&self.owner.store.idempotency, &self.key, &rec)?;
        self.owner.store.flush().await?;
        Ok(())
    }

    /// The call failed with a definite answer (nothing was applied): forgets its intent, so the
    /// request id can be used again.
    pub async fn abandon(self) -> Result<(), Error> {
        self.owner.store.idempotency.remove(&self.key)?;
        self.owner.store.flush().await?;
        Ok(())
    }

    /// Records a successful response (flushed) before releasing waiting duplicates.
    pub async fn complete(self, fingerprint: [u8; 32], response: Vec<u8>) -> Result<(), Error> {
        let rec = Record {
            fingerprint: fingerprint.to_vec(),
            response,
            created_at_ms: now_ms(),
            pending: false,
            intent: self.intent.clone(),
        };
        Store::put(&self.owner.store.idempotency, &self.key, &rec)?;
        self.owner.store.flush().await?;
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.owner.lock().remove(&self.key);
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn table(ttl: Duration) -> (tempfile::TempDir, Idempotency) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        (dir, Idempotency::new(store, ttl))
    }

    fn rid(s: &str) -> RequestId {
        RequestId::parse(s).expect("id")
    }

    #[test]
    fn fingerprints_ignore_map_order_but_not_content() {
        let a: HashMap<String, String> = [("x", "1"), ("y", "2")]
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        let mut b = HashMap::new();
        b.insert("y".to_owned(), "2".to_owned());
        b.insert("x".to_owned(), "1".to_owned());
        assert_eq!(
            Fingerprint::new("m").map(&a).finish(),
            Fingerprint::new("m").map(&b).finish()
        );
        b.insert("x".to_owned(), "3".to_owned());
        assert_ne!(
            Fingerprint::new("m").map(&a).finish(),
            Fingerprint::new("m").map(&b).finish()
        );
        // Field boundaries matter: ("ab","c") != ("a","bc").
        let f1 = Fingerprint::new("m").field(b"ab").field(b"c").finish();
        let f2 = Fingerprint::new("m").field(b"a").field(b"bc").finish();
        assert_ne!(f1, f2);
    }

    #[tokio::test]
    async fn replays_same_request_and_refuses_a_different_one() {
        let (_dir, t) = table(Duration::from_secs(60));
        let id = rid("r1");
        let k = key("alice", "CallTool", &id);
        let Begin::Run(guard) = t
            .begin(k.clone(), [1; 32], &id, Vec::new())
            .await
            .expect("begin")
        else {
            panic!("first call must run");
        };
        guard
            .complete([1; 32], b"response".to_vec())
            .await
            .expect("complete");
        match t
            .begin(k.clone(), [1; 32], &id, Vec::new())
            .await
            .expect("begin")
        {
            Begin::Replay(bytes) => assert_eq!(bytes, b"response"),
            Begin::Run(_) => panic!("must replay"),
        }
        let err = t
            .begin(k, [2; 32], &id, Vec::new())
            .await
            .err()
            .expect("reused");
        assert!(matches!(err, Error::RequestIdReused(_)));
        // Another principal's identical id is independent.
        let other = key("bob", "CallTool", &id);
        assert!(matches!(
            t.begin(other, [2; 32], &id, Vec::new()).await,
            Ok(Begin::Run(_))
        ));
    }

    #[tokio::test]
    async fn an_unfinished_call_resumes_with_its_reservation_until_abandoned() {
        let (_dir, t) = table(Duration::from_secs(60));
        let id = rid("r1");
        let k = key("alice", "CreateSession", &id);
        let Begin::Run(first) = t
            .begin(k.clone(), [1; 32], &id, b"s-first".to_vec())
            .await
            .expect("begin")
        else {
            panic!("first call must run");
        };
        assert!(!first.resumed());
        // The intent is durable before the call runs.
        assert_eq!(t.pending().expect("pending"), 1);
        drop(first);
        // A retry (here, or after a restart) resumes it with the first reservation.
        let Begin::Run(again) = t
            .begin(k.clone(), [1; 32], &id, b"s-second".to_vec())
            .await
            .expect("begin")
        else {
            panic!("must resume");
        };
        assert!(again.resumed());
        assert_eq!(again.intent(), b"s-first");
        assert!(matches!(
            t.begin(k.clone(), [2; 32], &id, Vec::new()).await,
            Err(Error::RequestIdReused(_))
        ));
        // A definite failure forgets the intent: the id is free again.
        again.abandon().await.expect("abandon");
        assert_eq!(t.pending().expect("pending"), 0);
        let Begin::Run(fresh) = t.begin(k, [2; 32], &id, Vec::new()).await.expect("begin") else {
            panic!("must run");
        };
        assert!(!fresh.resumed());
    }

    #[tokio::test]
    async fn duplicates_wait_for_the_running_call_then_replay() {
        let (_dir, t) = table(Duration::from_secs(60));
        let id = rid("r1");
        let k = key("alice", "CreateSession", &id);
        let Begin::Run(guard) = t
            .begin(k.clone(), [7; 32], &id, Vec::new())
            .await
            .expect("begin")
        else {
            panic!("first call must run");
        };
        let t2 = t.clone();
        let (k2, id2) = (k.clone(), id.clone());
        let waiter = tokio::spawn(async move { t2.begin(k2, [7; 32], &id2, Vec::new()).await });
        // A different request with the same id is refused at once, even while running.
        assert!(matches!(
            t.begin(k.clone(), [8; 32], &id, Vec::new()).await,
            Err(Error::RequestIdReused(_))
        ));
        guard
            .complete([7; 32], b"first".to_vec())
            .await
            .expect("complete");
        match waiter.await.expect("join").expect("begin") {
            Begin::Replay(bytes) => assert_eq!(bytes, b"first"),
            Begin::Run(_) => panic!("duplicate must replay"),
        }
    }

    #[tokio::test]
    async fn expired_records_are_ignored_and_swept() {
        let (_dir, t) = table(Duration::from_millis(1));
        let id = rid("r1");
        let k = key("alice", "CallTool", &id);
        let Begin::Run(guard) = t
            .begin(k.clone(), [1; 32], &id, Vec::new())
            .await
            .expect("begin")
        else {
            panic!("first call must run");
        };
        guard
            .complete([1; 32], b"old".to_vec())
            .await
            .expect("complete");
        assert_eq!(t.sweep(now_ms() + 10).expect("sweep"), 1);
        assert!(matches!(
            t.begin(k, [2; 32], &id, Vec::new()).await,
            Ok(Begin::Run(_))
        ));
    }
}
