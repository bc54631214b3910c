//! Numbered event streams that outlive their readers: an agent turn's events, a heist game's.
//!
//! Every event is written to a sled tree under `<stream id> 0x00 <seq as big-endian u64>`
//! before it is handed to live readers, so a reader can re-attach from any event number:
//! [`EventLog::follow`] subscribes to the live feed first, then replays what is stored from the
//! requested number on, then continues live, skipping what it already sent. A stream ends for
//! its readers when its writer calls [`EventLog::close`] (or drops the writer's handle) after
//! the last event; a stream with no live writer is replayed and ends.

use std::{
    collections::HashMap,
    marker::PhantomData,
    sync::{Arc, Mutex, PoisonError},
};

use futures::{StreamExt as _, stream::BoxStream};
use prost::Message;
use tokio::sync::broadcast;

use crate::{error::Error, store::Store};

/// How many live events a slow reader may fall behind before it re-reads from the store.
const LIVE_BUFFER: usize = 1024;

/// A family of event streams in one tree.
pub struct EventLog<E> {
    store: Store,
    tree: sled::Tree,
    live: Mutex<HashMap<String, broadcast::Sender<(u64, E)>>>,
    _event: PhantomData<fn() -> E>,
}

impl<E> EventLog<E>
where
    E: Message + Default + Clone + Send + 'static,
{
    /// Opens the tree `name` of the store.
    pub fn open(store: &Store, name: &str) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Self {
            tree: store.open_tree(name)?,
            store: store.clone(),
            live: Mutex::new(HashMap::new()),
            _event: PhantomData,
        }))
    }

    /// Marks a stream as being written: readers that attach now follow it live until
    /// [`EventLog::close`].
    pub fn open_stream(&self, id: &str) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.to_owned())
            .or_insert_with(|| broadcast::channel(LIVE_BUFFER).0);
    }

    /// Stores event `seq` of stream `id` and hands it to live readers. Durable once
    /// [`Store::flush`] has run (the caller decides how often; a finished stream must be
    /// flushed).
    pub fn append(&self, id: &str, seq: u64, event: &E) -> Result<(), Error> {
        self.tree.insert(key(id, seq), event.encode_to_vec())?;
        if let Some(live) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
        {
            // No receiver is fine: nobody is watching right now.
            let _ = live.send((seq, event.clone()));
        }
        Ok(())
    }

    /// Ends the live feed of a stream (after its last event) and makes it durable.
    pub async fn close(&self, id: &str) -> Result<(), Error> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        self.store.flush().await
    }

    /// Number of the last stored event of a stream (0 when it has none).
    pub fn last_seq(&self, id: &str) -> Result<u64, Error> {
        Ok(self
            .tree
            .scan_prefix(prefix(id))
            .keys()
            .next_back()
            .transpose()?
            .and_then(|k| seq_of(&k))
            .unwrap_or(0))
    }

    /// Stored events of a stream from `from_seq` on, at most `limit`.
    pub fn read(&self, id: &str, from_seq: u64, limit: usize) -> Result<Vec<(u64, E)>, Error> {
        self.tree
            .range(key(id, from_seq.max(1))..key(id, u64::MAX))
            .take(limit)
            .map(|item| {
                let (k, v) = item?;
                let seq = seq_of(&k).unwrap_or(0);
                let event = E::decode(v.as_ref()).map_err(|source| Error::Corrupt {
                    what: "event",
                    source,
                })?;
                Ok((seq, event))
            })
            .collect()
    }

    /// Removes every stored event of a stream (retention).
    pub fn remove(&self, id: &str) -> Result<(), Error> {
        for k in self.tree.scan_prefix(prefix(id)).keys() {
            self.tree.remove(k?)?;
        }
        Ok(())
    }

    /// The stream from `from_seq` on: stored events, then live ones until the writer closes it.
    /// Each event is sent once, in order.
    pub fn follow(
        self: &Arc<Self>,
        id: &str,
        from_seq: u64,
    ) -> BoxStream<'static, Result<E, Error>> {
        let live = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .map(broadcast::Sender::subscribe);
        let state = Follow {
            log: Arc::clone(self),
            id: id.to_owned(),
            next: from_seq.max(1),
            live,
            buffered: Vec::new(),
        };
        futures::stream::unfold(state, Follow::step).boxed()
    }
}

struct Follow<E> {
    log: Arc<EventLog<E>>,
    id: String,
    next: u64,
    live: Option<broadcast::Receiver<(u64, E)>>,
    buffered: Vec<(u64, E)>,
}

impl<E> Follow<E>
where
    E: Message + Default + Clone + Send + 'static,
{
    async fn step(mut self) -> Option<(Result<E, Error>, Self)> {
        loop {
            if let Some(pos) = self.buffered.iter().position(|(seq, _)| *seq == self.next) {
                let (_, event) = self.buffered.remove(pos);
                self.next += 1;
                return Some((Ok(event), self));
            }
            self.buffered.clear();
            // What the store has from here on (covers everything written before we subscribed,
            // and anything a lagging receiver skipped).
            match self.log.read(&self.id, self.next, 256) {
                Err(e) => return Some((Err(e), self)),
                Ok(stored) if !stored.is_empty() => {
                    self.buffered = stored;
                    continue;
                }
                Ok(_) => {}
            }
            let live = self.live.as_mut()?;
            match live.recv().await {
                Ok((seq, event)) if seq == self.next => {
                    self.next += 1;
                    return Some((Ok(event), self));
                }
                // Already sent (replayed) or ahead of a gap the store fills: loop re-reads.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    // Writer gone: send whatever the store still has after this point, then end.
                    self.live = None;
                }
            }
        }
    }
}

fn prefix(id: &str) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(0);
    k
}

fn key(id: &str, seq: u64) -> Vec<u8> {
    let mut k = prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use prost_types::Duration as Event;

    use super::*;

    fn event(n: i64) -> Event {
        Event {
            seconds: n,
            nanos: 0,
        }
    }

    fn log() -> (tempfile::TempDir, Arc<EventLog<Event>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        (dir, EventLog::open(&store, "events").expect("log"))
    }

    #[tokio::test]
    async fn a_reader_that_attaches_midway_gets_every_event_once_in_order() {
        let (_dir, log) = log();
        log.open_stream("t1");
        for n in 1..=3 {
            log.append("t1", n as u64, &event(n)).expect("append");
        }
        let early = log.follow("t1", 1);
        let late = log.follow("t1", 2);
        for n in 4..=6 {
            log.append("t1", n as u64, &event(n)).expect("append");
        }
        log.close("t1").await.expect("close");
        let early: Vec<i64> = early.map(|e| e.expect("event").seconds).collect().await;
        let late: Vec<i64> = late.map(|e| e.expect("event").seconds).collect().await;
        assert_eq!(early, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(late, vec![2, 3, 4, 5, 6]);
        assert_eq!(log.last_seq("t1").expect("last"), 6);
    }

    #[tokio::test]
    async fn a_closed_stream_replays_and_ends_and_streams_do_not_mix() {
        let (_dir, log) = log();
        log.open_stream("a");
        log.open_stream("ab");
        log.append("a", 1, &event(10)).expect("append");
        log.append("ab", 1, &event(20)).expect("append");
        log.close("a").await.expect("close");
        let replay: Vec<i64> = log
            .follow("a", 1)
            .map(|e| e.expect("event").seconds)
            .collect()
            .await;
        assert_eq!(replay, vec![10]);
        assert_eq!(log.read("ab", 1, 10).expect("read").len(), 1);
        log.remove("a").expect("remove");
        assert_eq!(log.last_seq("a").expect("last"), 0);
        assert_eq!(log.last_seq("ab").expect("last"), 1);
    }

    #[tokio::test]
    async fn a_reader_that_falls_far_behind_catches_up_from_the_store() {
        let (_dir, log) = log();
        log.open_stream("t");
        let reader = log.follow("t", 1);
        let total = (LIVE_BUFFER * 3) as i64;
        for n in 1..=total {
            log.append("t", n as u64, &event(n)).expect("append");
        }
        log.close("t").await.expect("close");
        let got: Vec<i64> = reader.map(|e| e.expect("event").seconds).collect().await;
        assert_eq!(got, (1..=total).collect::<Vec<_>>());
    }
}
