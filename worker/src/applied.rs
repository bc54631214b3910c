//! What this worker applied, per request id: the worker's half of end-to-end exactly-once.
//!
//! A mutating call carries the client's request id from the coordinator. Before the worker
//! applies it, it records (flushed, in its own small sled store under `HEIST_STATE_DIR`) that
//! the call is *applying*; when the call ends it records the result (*done*). A retry with the
//! same id (after a coordinator crash, or a lost answer) then:
//!
//! - finds *done*: the recorded result is replayed (`replayed` set), nothing runs again;
//! - finds the call still running here: waits for it, then replays;
//! - finds *applying* left by a worker that died mid-call, or a call stopped half-way: the
//!   outcome is not known and is not guessed: ABORTED with reason OUTCOME_UNKNOWN;
//! - finds nothing: applies the call once.
//!
//! A call that fails before it changes anything (a bad argument, an unknown tool) forgets its
//! record, so it can be retried. Records live as long as their session (closing it removes
//! them).

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use heist_proto::{ids::SessionId, v1};
use prost::Message as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::Error;

/// The state of a recorded call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
enum Phase {
    /// Recorded before the call ran; still there means the call was interrupted.
    Applying = 0,
    /// The call finished; `response` is its result.
    Done = 1,
    /// The call was interrupted: whether it took effect is not known.
    Unknown = 2,
}

/// One recorded call.
#[derive(Clone, PartialEq, prost::Message)]
struct Entry {
    /// BLAKE3 of the tool name and its canonically encoded arguments.
    #[prost(bytes = "vec", tag = "1")]
    fingerprint: Vec<u8>,
    /// Where the call is (see [`Phase`]).
    #[prost(enumeration = "Phase", tag = "2")]
    phase: i32,
    /// The encoded `CallToolResponse` once done.
    #[prost(bytes = "vec", tag = "3")]
    response: Vec<u8>,
    /// When the record was written, milliseconds since the Unix epoch.
    #[prost(uint64, tag = "4")]
    updated_at_ms: u64,
}

/// The store of applied request ids.
#[derive(Clone)]
pub(crate) struct Applied {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    in_flight: Mutex<HashMap<Vec<u8>, watch::Receiver<()>>>,
    /// Group commit: flush requests taken so far.
    requested: AtomicU64,
    /// Serialises flushes; holds the highest request known durable.
    flushed: tokio::sync::Mutex<u64>,
}

/// What a claim attempt found.
enum Next {
    /// The call is running here: wait for it.
    Wait(watch::Receiver<()>),
    /// This call runs.
    Claimed(Claim),
}

/// A recorded result, marked replayed.
fn replay(entry: &Entry, request_id: &str) -> Result<v1::CallToolResponse, Error> {
    let mut response = v1::CallToolResponse::decode(entry.response.as_slice()).map_err(|e| {
        Error::Internal(format!(
            "recorded result of request {request_id} does not decode: {e}"
        ))
    })?;
    response.replayed = true;
    Ok(response)
}

/// What to do with a call that carries a request id.
pub(crate) enum Begin {
    /// Already applied: this is its recorded result.
    Replay(v1::CallToolResponse),
    /// Apply it, then settle the claim.
    Run(Claim),
}

impl Applied {
    /// Opens (or creates) the store in `dir`. Calls a previous run left *applying* are now
    /// *unknown*: that process died while applying them.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        heist_proto::files::private_dir(dir).map_err(|e| {
            Error::io(
                format!("cannot create the applied-request store {}", dir.display()),
                e,
            )
        })?;
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| store_error(dir, &e))?;
        let tree = db.open_tree("applied").map_err(|e| store_error(dir, &e))?;
        let mut interrupted = 0;
        for item in tree.iter() {
            let (key, value) = item.map_err(|e| store_error(dir, &e))?;
            let Ok(mut entry) = Entry::decode(value.as_ref()) else {
                continue;
            };
            if entry.phase == Phase::Applying as i32 {
                entry.phase = Phase::Unknown as i32;
                tree.insert(key, entry.encode_to_vec())
                    .map_err(|e| store_error(dir, &e))?;
                interrupted += 1;
            }
        }
        if interrupted > 0 {
            warn!(
                interrupted,
                "calls were interrupted by the last shutdown; their outcome is unknown"
            );
        }
        info!(dir = %dir.display(), records = tree.len(), "applied-request store open");
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                tree,
                in_flight: Mutex::new(HashMap::new()),
                requested: AtomicU64::new(0),
                flushed: tokio::sync::Mutex::new(0),
            }),
        })
    }

    /// Claims `request_id` in `session` for a call with `fingerprint`, or says to replay.
    /// A duplicate arriving while the first call runs waits for it.
    pub async fn begin(
        &self,
        session: &SessionId,
        request_id: &str,
        fingerprint: [u8; 32],
    ) -> Result<Begin, Error> {
        let key = key(session, request_id);
        loop {
            let next = {
                let mut in_flight = self.inner.lock();
                match in_flight.get(&key) {
                    Some(done) => Next::Wait(done.clone()),
                    None => {
                        match self.get(&key)? {
                            Some(entry) if entry.fingerprint != fingerprint => {
                                return Err(Error::RequestIdReused(request_id.to_owned()));
                            }
                            Some(entry) if entry.phase == Phase::Done as i32 => {
                                return replay(&entry, request_id).map(Begin::Replay);
                            }
                            Some(_) => return Err(Error::OutcomeUnknown(request_id.to_owned())),
                            None => {}
                        }
                        let (tx, rx) = watch::channel(());
                        in_flight.insert(key.clone(), rx);
                        Next::Claimed(Claim {
                            owner: Arc::clone(&self.inner),
                            key: key.clone(),
                            fingerprint,
                            settled: false,
                            started: false,
                            _done: tx,
                        })
                    }
                }
            };
            match next {
                Next::Wait(mut done) => {
                    debug!(
                        request_id,
                        "waiting for the running call with this request id"
                    );
                    while done.changed().await.is_ok() {}
                }
                Next::Claimed(claim) => {
                    // Not started: dropped on a failure from here, the record goes again.
                    claim.write(Phase::Applying, Vec::new())?;
                    self.flush().await?;
                    return Ok(Begin::Run(claim));
                }
            }
        }
    }

    /// Forgets every record of `session` (it was closed or evicted).
    pub fn forget_session(&self, session: &SessionId) {
        let mut prefix = session.as_str().as_bytes().to_vec();
        prefix.push(0);
        let keys: Vec<sled::IVec> = self
            .inner
            .tree
            .scan_prefix(&prefix)
            .keys()
            .filter_map(Result::ok)
            .collect();
        for key in keys {
            if let Err(err) = self.inner.tree.remove(key) {
                warn!(%err, session_id = %session, "cannot remove an applied-request record");
            }
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>, Error> {
        let value = self
            .inner
            .tree
            .get(key)
            .map_err(|e| Error::Internal(format!("applied-request store: {e}")))?;
        Ok(value.and_then(|v| Entry::decode(v.as_ref()).ok()))
    }

    async fn flush(&self) -> Result<(), Error> {
        self.inner.flush().await
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, watch::Receiver<()>>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes every write so far durable. Group commit: one flush covers every request taken
    /// before it started, so concurrent calls share fsyncs. (sled's own `flush_async` is not
    /// used: in 0.34 concurrent calls to it can deadlock.)
    async fn flush(&self) -> Result<(), Error> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut flushed = self.flushed.lock().await;
        if *flushed >= ticket {
            return Ok(());
        }
        let covers = self.requested.load(Ordering::SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| Error::Internal(format!("applied-request store flush: {e}")))?
            .map_err(|e| Error::Internal(format!("applied-request store: {e}")))?;
        *flushed = covers;
        Ok(())
    }
}

/// The right to apply one call. Mark it [`Claim::start`]ed when the call begins to act and
/// settle it with [`Claim::done`] or [`Claim::failed`]; dropped unsettled after it started
/// (the call was stopped half-way), its outcome is recorded as unknown; dropped before, the
/// call never ran and its record is removed.
pub(crate) struct Claim {
    owner: Arc<Inner>,
    key: Vec<u8>,
    fingerprint: [u8; 32],
    settled: bool,
    started: bool,
    _done: watch::Sender<()>,
}

impl Claim {
    /// The call is about to act: from now on an interruption leaves its outcome unknown.
    pub fn start(&mut self) {
        self.started = true;
    }

    /// Records the call's result (flushed) before anyone sees it.
    pub async fn done(mut self, response: &v1::CallToolResponse) -> Result<(), Error> {
        self.write(Phase::Done, response.encode_to_vec())?;
        self.settled = true;
        self.owner.flush().await
    }

    /// Settles a call that failed: one that failed before it changed anything is forgotten
    /// (it may be retried); one stopped half-way is recorded as of unknown outcome.
    pub async fn failed(mut self, err: &Error) -> Result<(), Error> {
        if err.interrupted() {
            self.write(Phase::Unknown, Vec::new())?;
        } else {
            self.owner
                .tree
                .remove(&self.key)
                .map_err(|e| Error::Internal(format!("applied-request store: {e}")))?;
        }
        self.settled = true;
        self.owner.flush().await
    }

    fn write(&self, phase: Phase, response: Vec<u8>) -> Result<(), Error> {
        let entry = Entry {
            fingerprint: self.fingerprint.to_vec(),
            phase: phase as i32,
            response,
            updated_at_ms: now_ms(),
        };
        self.owner
            .tree
            .insert(&self.key, entry.encode_to_vec())
            .map_err(|e| Error::Internal(format!("applied-request store: {e}")))?;
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.settled {
        } else if self.started {
            if self.write(Phase::Unknown, Vec::new()).is_err() {
                warn!("cannot record an interrupted call");
            }
        } else if self.owner.tree.remove(&self.key).is_err() {
            warn!("cannot remove the record of a call that never ran");
        }
        self.owner.lock().remove(&self.key);
    }
}

/// The fingerprint of a tool call: tool name and arguments (prost `Struct` fields are a
/// BTreeMap, so the encoding is canonical).
pub(crate) fn fingerprint(request: &v1::CallToolRequest) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    let args = request
        .arguments
        .as_ref()
        .map(prost::Message::encode_to_vec)
        .unwrap_or_default();
    for field in [request.tool.as_bytes(), args.as_slice()] {
        hasher.update(&(field.len() as u64).to_le_bytes());
        hasher.update(field);
    }
    *hasher.finalize().as_bytes()
}

fn key(session: &SessionId, request_id: &str) -> Vec<u8> {
    let mut key = session.as_str().as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(request_id.as_bytes());
    key
}

fn store_error(dir: &Path, err: &sled::Error) -> Error {
    Error::Config(format!(
        "cannot open the worker's state store at {} (HEIST_STATE_DIR): {err}",
        dir.display()
    ))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The store directory: HEIST_STATE_DIR, else `BASE_WORKSPACE.state` next to the workspaces.
pub(crate) fn state_dir(config: &crate::Config) -> std::path::PathBuf {
    config.state_dir.clone().unwrap_or_else(|| {
        let base = std::path::absolute(&config.base_workspace)
            .unwrap_or_else(|_| config.base_workspace.clone());
        let mut name = base.file_name().unwrap_or_default().to_os_string();
        name.push(".state");
        base.with_file_name(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionId {
        SessionId::parse("s-1").expect("id")
    }

    fn response(text: &str) -> v1::CallToolResponse {
        v1::CallToolResponse {
            worker_id: text.to_owned(),
            ..Default::default()
        }
    }

    async fn run(store: &Applied, id: &str, fp: u8) -> Begin {
        store.begin(&session(), id, [fp; 32]).await.expect("begin")
    }

    #[tokio::test]
    async fn a_done_call_replays_and_another_call_with_its_id_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Applied::open(dir.path()).expect("open");
        let Begin::Run(mut claim) = run(&store, "r1", 1).await else {
            panic!("first call runs");
        };
        claim.start();
        claim.done(&response("first")).await.expect("done");
        match run(&store, "r1", 1).await {
            Begin::Replay(r) => {
                assert_eq!(r.worker_id, "first");
                assert!(r.replayed);
            }
            Begin::Run(_) => panic!("must replay"),
        }
        let err = store.begin(&session(), "r1", [2; 32]).await.err();
        assert!(matches!(err, Some(Error::RequestIdReused(_))));
        // Survives a restart.
        drop(store);
        let store = Applied::open(dir.path()).expect("reopen");
        assert!(matches!(run(&store, "r1", 1).await, Begin::Replay(_)));
        // Closing the session forgets its records.
        store.forget_session(&session());
        assert!(matches!(run(&store, "r1", 2).await, Begin::Run(_)));
    }

    #[tokio::test]
    async fn an_interrupted_call_is_of_unknown_outcome_and_one_that_never_ran_is_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Applied::open(dir.path()).expect("open");
        let Begin::Run(never) = run(&store, "never", 1).await else {
            panic!("runs");
        };
        drop(never);
        assert!(matches!(run(&store, "never", 1).await, Begin::Run(_)));

        let Begin::Run(mut stopped) = run(&store, "stopped", 1).await else {
            panic!("runs");
        };
        stopped.start();
        drop(stopped);
        let err = store.begin(&session(), "stopped", [1; 32]).await.err();
        assert!(matches!(err, Some(Error::OutcomeUnknown(_))), "{err:?}");

        // A process that dies while applying: the record says applying; reopened, unknown.
        let Begin::Run(mut dying) = run(&store, "dying", 1).await else {
            panic!("runs");
        };
        dying.start();
        // As if the process died here: nothing more is written.
        dying.settled = true;
        drop(dying);
        drop(store);
        // A flush still running on the blocking pool holds the store's lock a moment longer
        // (a dead process's lock goes with it).
        let reopened = || Applied::open(dir.path());
        let mut store = reopened();
        for _ in 0..250 {
            if store.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            store = reopened();
        }
        let store = store.expect("reopen");
        let err = store.begin(&session(), "dying", [1; 32]).await.err();
        assert!(matches!(err, Some(Error::OutcomeUnknown(_))), "{err:?}");
    }

    #[tokio::test]
    async fn a_duplicate_waits_for_the_running_call_then_replays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Applied::open(dir.path()).expect("open");
        let Begin::Run(mut claim) = run(&store, "r1", 1).await else {
            panic!("runs");
        };
        claim.start();
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.begin(&session(), "r1", [1; 32]).await }
        });
        tokio::task::yield_now().await;
        claim.done(&response("once")).await.expect("done");
        match waiter.await.expect("join").expect("begin") {
            Begin::Replay(r) => assert_eq!(r.worker_id, "once"),
            Begin::Run(_) => panic!("must replay"),
        }
    }
}
