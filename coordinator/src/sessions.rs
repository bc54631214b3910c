//! The session table: every session, in memory for reads (the call path never touches sled) and
//! written through to the `sessions` tree on every change.
//!
//! Writes insert into sled while holding the table lock, so memory and disk see changes in the
//! same order; callers flush before acknowledging. The table also counts, per worker, the
//! sessions that occupy a slot there (creating, ready, closing or recovering), which is what
//! placement uses as the worker's load, and indexes each owner's sessions that are not closed,
//! so listing open sessions never walks the closed ones. Closed and failed sessions are
//! collected after the retention ([`SessionTable::collect`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ops::Bound,
    sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::SystemTime,
};

use heist_proto::{
    ids::{SessionId, WorkerId},
    v1::{Session, SessionState},
};

use crate::{error::Error, store::Store};

/// Whether a session in `state` occupies a slot on its worker.
fn holds_slot(state: i32) -> bool {
    [
        SessionState::Creating as i32,
        SessionState::Ready as i32,
        SessionState::Closing as i32,
        SessionState::Recovering as i32,
    ]
    .contains(&state)
}

/// Whether the coordinator considers a session in `state` open on its worker.
fn is_open(state: i32) -> bool {
    state == SessionState::Creating as i32 || state == SessionState::Ready as i32
}

/// What a worker's re-registration changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Sessions re-attached (now READY).
    pub attached: usize,
    /// Sessions marked FAILED because the worker no longer has them.
    pub failed: usize,
    /// Session ids the worker holds but must drop.
    pub evict: Vec<String>,
}

#[derive(Default)]
struct Inner {
    by_id: BTreeMap<SessionId, Session>,
    /// Sessions occupying a slot, per worker id.
    slots: HashMap<String, u32>,
    /// Sessions whose CreateSession (or failover) is still running in this process.
    creating: HashSet<SessionId>,
    /// Per owner, the ids of their sessions that are not closed.
    live: HashMap<String, BTreeSet<SessionId>>,
}

impl Inner {
    /// Applies `session` as the new value of its id, keeping slot counts right, and writes it.
    fn put(&mut self, tree: &sled::Tree, id: SessionId, session: Session) -> Result<(), Error> {
        Store::put(tree, id.as_str().as_bytes(), &session)?;
        if let Some(old) = self.by_id.get(&id)
            && holds_slot(old.state)
            && let Some(n) = self.slots.get_mut(&old.worker_id)
        {
            *n = n.saturating_sub(1);
        }
        if holds_slot(session.state) {
            *self.slots.entry(session.worker_id.clone()).or_default() += 1;
        }
        self.index(&id, &session);
        self.by_id.insert(id, session);
        Ok(())
    }

    /// Keeps the owner's index of sessions that are not closed.
    fn index(&mut self, id: &SessionId, session: &Session) {
        if session.state == SessionState::Closed as i32 {
            if let Some(ids) = self.live.get_mut(&session.owner) {
                ids.remove(id);
                if ids.is_empty() {
                    self.live.remove(&session.owner);
                }
            }
        } else {
            self.live
                .entry(session.owner.clone())
                .or_default()
                .insert(id.clone());
        }
    }
}

/// All sessions.
pub struct SessionTable {
    tree: sled::Tree,
    inner: RwLock<Inner>,
}

impl SessionTable {
    /// Loads every stored session.
    pub fn load(store: &Store) -> Result<Self, Error> {
        let mut inner = Inner::default();
        for mut session in Store::load_all::<Session>(&store.sessions, "session")? {
            if session.state == SessionState::Recovering as i32 {
                // Its failover was cut short by a restart: the restore's outcome is unknown.
                session.state = SessionState::Failed as i32;
                session.failure_reason = format!(
                    "the coordinator restarted while session {} was failing over to worker {}: \
                     fork its latest checkpoint into a new session",
                    session.id, session.worker_id
                );
                Store::put(&store.sessions, session.id.as_bytes(), &session)?;
            }
            if let Ok(id) = SessionId::parse(session.id.clone()) {
                if holds_slot(session.state) {
                    *inner.slots.entry(session.worker_id.clone()).or_default() += 1;
                }
                inner.index(&id, &session);
                inner.by_id.insert(id, session);
            }
        }
        Ok(Self {
            tree: store.sessions.clone(),
            inner: RwLock::new(inner),
        })
    }

    /// A copy of one session.
    pub fn get(&self, id: &SessionId) -> Option<Session> {
        self.read().by_id.get(id).cloned()
    }

    /// Runs `f` on one session without copying it.
    pub fn with<R>(&self, id: &SessionId, f: impl FnOnce(&Session) -> R) -> Option<R> {
        self.read().by_id.get(id).map(f)
    }

    /// Inserts a new session chosen by `place` under the table lock, so concurrent creates see
    /// each other's placements. `place` gets the slot counts per worker id.
    pub fn create(
        &self,
        place: impl FnOnce(&HashMap<String, u32>) -> Result<Session, Error>,
    ) -> Result<Session, Error> {
        let mut inner = self.write();
        let session = place(&inner.slots)?;
        let id = SessionId::parse(session.id.clone())?;
        inner.creating.insert(id.clone());
        inner.put(&self.tree, id, session.clone())?;
        Ok(session)
    }

    /// A CreateSession retried after its outcome was lost resumes the session it reserved:
    /// a CREATING or FAILED session is CREATING again (and left alone by reconciliation) until
    /// [`SessionTable::finish_create`]. Returns the session, or `None` if it is in another
    /// state (ready, closing, closed: nothing to resume) or does not exist.
    pub fn resume_create(&self, id: &SessionId) -> Result<Option<Session>, Error> {
        let mut inner = self.write();
        let Some(mut session) = inner.by_id.get(id).cloned() else {
            return Ok(None);
        };
        if session.state != SessionState::Creating as i32
            && session.state != SessionState::Failed as i32
        {
            return Ok(None);
        }
        session.state = SessionState::Creating as i32;
        session.failure_reason.clear();
        session.updated_at = Some(SystemTime::now().into());
        inner.creating.insert(id.clone());
        inner.put(&self.tree, id.clone(), session.clone())?;
        Ok(Some(session))
    }

    /// The CreateSession that made `id` has finished (either way).
    pub fn finish_create(&self, id: &SessionId) {
        self.write().creating.remove(id);
    }

    /// Changes one session with `f` (which returns whether it changed anything) and writes it.
    /// Returns the session after the change, or `None` if it does not exist.
    pub fn update(
        &self,
        id: &SessionId,
        f: impl FnOnce(&mut Session) -> bool,
    ) -> Result<Option<Session>, Error> {
        let mut inner = self.write();
        let Some(mut session) = inner.by_id.get(id).cloned() else {
            return Ok(None);
        };
        if f(&mut session) {
            session.updated_at = Some(SystemTime::now().into());
            inner.put(&self.tree, id.clone(), session.clone())?;
        }
        Ok(Some(session))
    }

    /// Counts one acknowledged mutating call in `id` (see `Session.acked_mutations`); returns
    /// the new count. Written through, not flushed: after a crash the count may be short by
    /// the calls of the last moments.
    pub fn count_mutation(&self, id: &SessionId) -> Result<Option<u64>, Error> {
        let mut inner = self.write();
        let Some(mut session) = inner.by_id.get(id).cloned() else {
            return Ok(None);
        };
        session.acked_mutations += 1;
        let n = session.acked_mutations;
        inner.put(&self.tree, id.clone(), session)?;
        Ok(Some(n))
    }

    /// The open sessions (creating or ready) on `worker`, except those a running create or
    /// failover holds.
    pub fn open_on(&self, worker: &WorkerId) -> Vec<Session> {
        let inner = self.read();
        inner
            .by_id
            .iter()
            .filter(|(id, s)| {
                s.worker_id == worker.as_str() && is_open(s.state) && !inner.creating.contains(*id)
            })
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Moves an open session off `from` for a failover: under the table lock `place` picks the
    /// new worker from the slot counts; the session is then RECOVERING there (and left alone
    /// by reconciliation until [`SessionTable::finish_create`]). `None` when the session is no
    /// longer open on `from`.
    pub fn relocate(
        &self,
        id: &SessionId,
        from: &WorkerId,
        place: impl FnOnce(&HashMap<String, u32>) -> Result<WorkerId, Error>,
    ) -> Result<Option<Session>, Error> {
        let mut inner = self.write();
        let Some(mut session) = inner.by_id.get(id).cloned() else {
            return Ok(None);
        };
        if session.worker_id != from.as_str()
            || !is_open(session.state)
            || inner.creating.contains(id)
        {
            return Ok(None);
        }
        let to = place(&inner.slots)?;
        session.worker_id = to.to_string();
        session.state = SessionState::Recovering as i32;
        session.updated_at = Some(SystemTime::now().into());
        inner.creating.insert(id.clone());
        inner.put(&self.tree, id.clone(), session.clone())?;
        Ok(Some(session))
    }

    /// How many sessions are in each state (state number → count), for the metrics.
    pub fn count_by_state(&self) -> std::collections::BTreeMap<i32, i64> {
        let mut counts = std::collections::BTreeMap::new();
        for session in self.read().by_id.values() {
            *counts.entry(session.state).or_insert(0) += 1;
        }
        counts
    }

    /// Sessions occupying a slot on `worker`.
    pub fn slots(&self, worker: &str) -> u32 {
        self.read().slots.get(worker).copied().unwrap_or(0)
    }

    /// One page of `owner`'s sessions, newest first, starting after `after`. Returns the page
    /// and the id to continue after when more remain. Without `include_closed` only the
    /// owner's index of sessions that are not closed is walked.
    pub fn list(
        &self,
        owner: &str,
        include_closed: bool,
        after: Option<&SessionId>,
        limit: usize,
    ) -> (Vec<Session>, Option<SessionId>) {
        let inner = self.read();
        let upto = |after: Option<&SessionId>| match after {
            Some(after) => (Bound::Unbounded, Bound::Excluded(after.clone())),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        let sessions: Box<dyn Iterator<Item = (&SessionId, &Session)>> = if include_closed {
            Box::new(
                inner
                    .by_id
                    .range(upto(after))
                    .rev()
                    .filter(|(_, s)| s.owner == owner),
            )
        } else {
            match inner.live.get(owner) {
                Some(ids) => Box::new(
                    ids.range(upto(after))
                        .rev()
                        .filter_map(|id| inner.by_id.get_key_value(id)),
                ),
                None => Box::new(std::iter::empty()),
            }
        };
        let mut page = Vec::new();
        let mut last = None;
        for (id, session) in sessions {
            if page.len() == limit {
                return (page, last);
            }
            page.push(session.clone());
            last = Some(id.clone());
        }
        (page, None)
    }

    /// Removes the closed and failed sessions last changed before `cutoff` (their records;
    /// the caller drops what else they own). Returns their ids.
    pub fn collect(&self, cutoff: SystemTime) -> Result<Vec<SessionId>, Error> {
        let mut inner = self.write();
        let done: Vec<SessionId> = inner
            .by_id
            .iter()
            .filter(|(id, s)| {
                (s.state == SessionState::Closed as i32 || s.state == SessionState::Failed as i32)
                    && !inner.creating.contains(*id)
                    && s.updated_at
                        .and_then(|t| SystemTime::try_from(t).ok())
                        .is_none_or(|t| t <= cutoff)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &done {
            self.tree.remove(id.as_str().as_bytes())?;
            if let Some(session) = inner.by_id.remove(id)
                && let Some(ids) = inner.live.get_mut(&session.owner)
            {
                ids.remove(id);
                if ids.is_empty() {
                    inner.live.remove(&session.owner);
                }
            }
        }
        Ok(done)
    }

    /// How many sessions the table holds (every state).
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.read().by_id.is_empty()
    }

    /// Reconciles the sessions on `worker` with the ones it says it holds after (re-)registering:
    /// open and listed -> READY; listed but not open here -> evict; open but not listed ->
    /// FAILED; closing -> CLOSED (and evicted if listed). Sessions whose CreateSession is still
    /// running are left alone.
    pub fn reconcile(&self, worker: &WorkerId, listed: &[String]) -> Result<Reconciled, Error> {
        let listed: HashSet<&str> = listed.iter().map(String::as_str).collect();
        let mut out = Reconciled::default();
        let mut inner = self.write();
        let now = SystemTime::now();
        let mut changes = Vec::new();
        for (id, s) in inner
            .by_id
            .iter()
            .filter(|(_, s)| s.worker_id == worker.as_str())
        {
            if inner.creating.contains(id) {
                continue;
            }
            let held = listed.contains(id.as_str());
            let mut next = s.clone();
            if is_open(s.state) && held {
                next.state = SessionState::Ready as i32;
                out.attached += 1;
            } else if is_open(s.state) {
                next.state = SessionState::Failed as i32;
                next.failure_reason =
                    format!("worker {worker} re-registered without the session's workspace");
                out.failed += 1;
            } else if s.state == SessionState::Closing as i32 {
                next.state = SessionState::Closed as i32;
            }
            if next != *s {
                next.updated_at = Some(now.into());
                changes.push((id.clone(), next));
            }
        }
        for (id, next) in changes {
            inner.put(&self.tree, id, next)?;
        }
        for raw in listed {
            let keep = SessionId::parse(raw).ok().is_some_and(|id| {
                inner.creating.contains(&id)
                    || inner
                        .by_id
                        .get(&id)
                        .is_some_and(|s| s.worker_id == worker.as_str() && is_open(s.state))
            });
            if !keep {
                out.evict.push(raw.to_owned());
            }
        }
        out.evict.sort();
        Ok(out)
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Encodes a page token (opaque to clients: hex of the last id returned).
pub fn encode_page_token(id: &SessionId) -> String {
    id.as_str().bytes().map(|b| format!("{b:02x}")).collect()
}

/// Decodes a page token from [`encode_page_token`].
pub fn decode_page_token(token: &str) -> Option<SessionId> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
        .collect();
    SessionId::parse(String::from_utf8(bytes?).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (tempfile::TempDir, Store, SessionTable) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let table = SessionTable::load(&store).expect("load");
        (dir, store, table)
    }

    fn new_session(table: &SessionTable, owner: &str, worker: &str) -> SessionId {
        let s = table
            .create(|_| {
                Ok(Session {
                    id: SessionId::generate().into_string(),
                    owner: owner.to_owned(),
                    worker_id: worker.to_owned(),
                    state: SessionState::Creating as i32,
                    ..Session::default()
                })
            })
            .expect("create");
        let id = SessionId::parse(s.id).expect("id");
        table.finish_create(&id);
        id
    }

    fn set(table: &SessionTable, id: &SessionId, state: SessionState) {
        table
            .update(id, |s| {
                s.state = state as i32;
                true
            })
            .expect("update")
            .expect("exists");
    }

    fn state(table: &SessionTable, id: &SessionId) -> SessionState {
        SessionState::try_from(table.get(id).expect("exists").state).expect("state")
    }

    #[test]
    fn slot_counts_follow_state_changes_and_reload() {
        let (_dir, store, t) = table();
        let a = new_session(&t, "alice", "w1");
        let _b = new_session(&t, "alice", "w1");
        assert_eq!(t.slots("w1"), 2);
        set(&t, &a, SessionState::Ready);
        assert_eq!(t.slots("w1"), 2);
        set(&t, &a, SessionState::Closed);
        assert_eq!(t.slots("w1"), 1);
        let reloaded = SessionTable::load(&store).expect("reload");
        assert_eq!(reloaded.slots("w1"), 1);
        assert_eq!(state(&reloaded, &a), SessionState::Closed);
    }

    #[test]
    fn lists_own_sessions_newest_first_in_pages() {
        let (_dir, _store, t) = table();
        let ids: Vec<SessionId> = (0..5).map(|_| new_session(&t, "alice", "w1")).collect();
        new_session(&t, "bob", "w1");
        set(&t, &ids[0], SessionState::Closed);

        let (page, next) = t.list("alice", false, None, 2);
        let got: Vec<&str> = page.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(got, [ids[4].as_str(), ids[3].as_str()]);
        let next = next.expect("more");
        let token = encode_page_token(&next);
        let after = decode_page_token(&token).expect("token");
        let (page, next) = t.list("alice", false, Some(&after), 2);
        let got: Vec<&str> = page.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(got, [ids[2].as_str(), ids[1].as_str()]);
        assert!(
            next.is_none(),
            "the closed session is not listed, so this is the last page"
        );

        let (all, _) = t.list("alice", true, None, 100);
        assert_eq!(all.len(), 5);
        assert!(decode_page_token("zz").is_none());
    }

    #[test]
    fn reconcile_attaches_fails_and_evicts() {
        let (_dir, _store, t) = table();
        let w = WorkerId::parse("w1").expect("id");
        let kept = new_session(&t, "alice", "w1");
        let missing = new_session(&t, "alice", "w1");
        let closed = new_session(&t, "alice", "w1");
        let elsewhere = new_session(&t, "alice", "w2");
        set(&t, &kept, SessionState::Ready);
        set(&t, &missing, SessionState::Ready);
        set(&t, &closed, SessionState::Closed);
        let listed = vec![
            kept.to_string(),
            closed.to_string(),
            elsewhere.to_string(),
            "s-unknown".to_owned(),
        ];
        let out = t.reconcile(&w, &listed).expect("reconcile");
        assert_eq!(out.attached, 1);
        assert_eq!(out.failed, 1);
        let mut want = vec![
            closed.to_string(),
            elsewhere.to_string(),
            "s-unknown".to_owned(),
        ];
        want.sort();
        assert_eq!(out.evict, want);
        assert_eq!(state(&t, &kept), SessionState::Ready);
        assert_eq!(state(&t, &missing), SessionState::Failed);
        assert!(
            t.get(&missing)
                .expect("exists")
                .failure_reason
                .contains("re-registered")
        );
        assert_eq!(t.slots("w1"), 1);
    }

    #[test]
    fn ten_thousand_closed_sessions_are_collected_and_never_listed() {
        let (_dir, store, t) = table();
        let open = new_session(&t, "alice", "w1");
        set(&t, &open, SessionState::Ready);
        for _ in 0..10_000 {
            let id = new_session(&t, "alice", "w1");
            set(&t, &id, SessionState::Closed);
        }
        let (page, next) = t.list("alice", false, None, 100);
        assert_eq!(
            page.len(),
            1,
            "the open-session index holds only the open one"
        );
        assert!(next.is_none());
        assert_eq!(t.len(), 10_001);
        // Not yet past the retention: nothing goes.
        let long_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
        assert!(t.collect(long_ago).expect("collect").is_empty());
        let collected = t.collect(SystemTime::now()).expect("collect");
        assert_eq!(collected.len(), 10_000);
        assert_eq!(t.len(), 1);
        assert_eq!(store.sessions.len(), 1, "gone from disk too");
        assert_eq!(state(&t, &open), SessionState::Ready);
        let reloaded = SessionTable::load(&store).expect("reload");
        assert_eq!(reloaded.len(), 1);
    }

    #[test]
    fn reconcile_leaves_running_creates_alone() {
        let (_dir, _store, t) = table();
        let w = WorkerId::parse("w1").expect("id");
        let s = t
            .create(|_| {
                Ok(Session {
                    id: SessionId::generate().into_string(),
                    owner: "alice".to_owned(),
                    worker_id: "w1".to_owned(),
                    state: SessionState::Creating as i32,
                    ..Session::default()
                })
            })
            .expect("create");
        let out = t.reconcile(&w, &[]).expect("reconcile");
        assert_eq!(out, Reconciled::default());
        let id = SessionId::parse(s.id).expect("id");
        assert_eq!(state(&t, &id), SessionState::Creating);
    }
}
