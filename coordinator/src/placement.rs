//! Placement: which worker gets a new session.
//!
//! Candidates are the workers taking sessions (READY and connected: never SUSPECT, DRAINING or
//! LOST). Those whose labels contain every requested label (but `heist.*` policy labels), that have a free slot and whose filesystem pool is not saturated (as
//! their last heartbeat said) are eligible; the least loaded wins, by
//! sessions per slot, then calls in flight, then id (so the choice is deterministic). The
//! session count includes sessions placed but not yet reported by the worker's heartbeat, so
//! concurrent creates spread instead of piling onto the same worker.

use std::{cmp::Ordering, collections::HashMap};

use heist_proto::ids::WorkerId;

use crate::error::Error;

/// Session labels with this prefix set session policy and are not matched against workers.
pub const POLICY_PREFIX: &str = "heist.";

/// A worker as placement sees it.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    /// The worker.
    pub id: &'a WorkerId,
    /// Its labels.
    pub labels: &'a HashMap<String, String>,
    /// Maximum concurrent sessions.
    pub capacity: u32,
    /// Sessions placed on it (including ones still being created).
    pub active_sessions: u32,
    /// Calls in flight at its last heartbeat.
    pub in_flight: u32,
    /// Its last heartbeat said every thread of its filesystem pool was busy.
    pub saturated: bool,
}

impl Candidate<'_> {
    /// Whether the worker has every selector label; `heist.*` labels are session policy
    /// (e.g. `heist.failover`), not a selector.
    fn matches(&self, selector: &HashMap<String, String>) -> bool {
        selector
            .iter()
            .filter(|(k, _)| !k.starts_with(POLICY_PREFIX))
            .all(|(k, v)| self.labels.get(k) == Some(v))
    }

    fn has_room(&self) -> bool {
        self.active_sessions < self.capacity && !self.saturated
    }

    /// Compares load as `active/capacity` without floating point.
    fn cmp_load(&self, other: &Self) -> Ordering {
        let mine = u64::from(self.active_sessions) * u64::from(other.capacity.max(1));
        let theirs = u64::from(other.active_sessions) * u64::from(self.capacity.max(1));
        mine.cmp(&theirs)
            .then(self.in_flight.cmp(&other.in_flight))
            .then_with(|| self.id.cmp(other.id))
    }
}

/// Picks the worker for a session with label `selector`.
pub fn place<'a>(
    candidates: &[Candidate<'a>],
    selector: &HashMap<String, String>,
) -> Result<&'a WorkerId, Error> {
    if candidates.is_empty() {
        return Err(Error::NoWorkers);
    }
    let matching: Vec<&Candidate<'a>> = candidates.iter().filter(|c| c.matches(selector)).collect();
    if matching.is_empty() {
        return Err(Error::NoMatchingWorker {
            labels: format_labels(selector),
        });
    }
    matching
        .iter()
        .filter(|c| c.has_room())
        .min_by(|a, b| a.cmp_load(b))
        .map(|c| c.id)
        .ok_or(Error::AllWorkersFull {
            workers: matching.len(),
        })
}

/// Labels as `k=v,k=v`, sorted by key.
pub fn format_labels(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<(&String, &String)> = labels.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct W {
        id: WorkerId,
        labels: HashMap<String, String>,
        capacity: u32,
        active: u32,
        in_flight: u32,
        saturated: bool,
    }

    fn w(id: &str, labels: &[(&str, &str)], capacity: u32, active: u32) -> W {
        W {
            id: WorkerId::parse(id).expect("id"),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            capacity,
            active,
            in_flight: 0,
            saturated: false,
        }
    }

    fn cands(ws: &[W]) -> Vec<Candidate<'_>> {
        ws.iter()
            .map(|w| Candidate {
                id: &w.id,
                labels: &w.labels,
                capacity: w.capacity,
                active_sessions: w.active,
                in_flight: w.in_flight,
                saturated: w.saturated,
            })
            .collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_candidates_is_no_workers() {
        assert!(matches!(place(&[], &sel(&[])), Err(Error::NoWorkers)));
    }

    #[test]
    fn picks_least_loaded_by_ratio_then_in_flight_then_id() {
        let ws = vec![w("a", &[], 4, 2), w("b", &[], 10, 3), w("c", &[], 10, 3)];
        assert_eq!(place(&cands(&ws), &sel(&[])).expect("placed").as_str(), "b");
        let mut ws = ws;
        ws[1].in_flight = 5;
        assert_eq!(place(&cands(&ws), &sel(&[])).expect("placed").as_str(), "c");
    }

    #[test]
    fn filters_by_labels() {
        let ws = vec![w("a", &[("gpu", "yes")], 4, 3), w("b", &[], 4, 0)];
        let got = place(&cands(&ws), &sel(&[("gpu", "yes")])).expect("placed");
        assert_eq!(got.as_str(), "a");
        let err = place(&cands(&ws), &sel(&[("gpu", "no")])).expect_err("none");
        assert!(matches!(err, Error::NoMatchingWorker { ref labels } if labels == "gpu=no"));
    }

    #[test]
    fn full_workers_are_skipped_and_reported() {
        let ws = vec![
            w("a", &[], 1, 1),
            w("b", &[], 2, 2),
            w("c", &[("x", "y")], 5, 0),
        ];
        let err = place(&cands(&ws[..2]), &sel(&[])).expect_err("full");
        assert!(matches!(err, Error::AllWorkersFull { workers: 2 }));
        assert_eq!(place(&cands(&ws), &sel(&[])).expect("placed").as_str(), "c");
    }

    #[test]
    fn a_saturated_worker_gets_no_new_sessions() {
        let mut ws = vec![w("a", &[], 4, 0), w("b", &[], 4, 3)];
        ws[0].saturated = true;
        assert_eq!(
            place(&cands(&ws), &sel(&[])).expect("placed").as_str(),
            "b",
            "the idle but saturated worker is skipped"
        );
        ws[1].saturated = true;
        let err = place(&cands(&ws), &sel(&[])).expect_err("all saturated");
        assert!(matches!(err, Error::AllWorkersFull { workers: 2 }));
    }

    #[test]
    fn counting_placements_spreads_consecutive_creates() {
        let mut ws = vec![w("a", &[], 4, 0), w("b", &[], 4, 0)];
        let mut picks = Vec::new();
        for _ in 0..4 {
            let id = place(&cands(&ws), &sel(&[])).expect("placed").clone();
            let chosen = ws.iter_mut().find(|w| w.id == id).expect("known");
            chosen.active += 1;
            picks.push(id.into_string());
        }
        assert_eq!(picks, ["a", "b", "a", "b"]);
    }
}
