//! The worker registry: every worker the coordinator knows, with its live state.
//!
//! Persisted part: the `heist.v1.Worker` record (state, labels, capacity, ...); the registry
//! hands changed records back to its caller, which writes them. Live part, memory only: the
//! command channel of the worker's control stream, its lease deadline, its tool catalogue and
//! its data-plane client.
//!
//! States follow cluster.proto: READY on registration; SUSPECT the moment the stream breaks, or
//! when no heartbeat came for `suspect_after` (a frozen or partitioned worker whose stream is
//! still open; its next heartbeat makes it READY again); LOST when the lease runs out (see
//! [`Registry::sweep`]). A SUSPECT worker gets no sessions and no calls: they fail fast with
//! UNAVAILABLE. DRAINING after GoingAway (or a
//! draining registration); GONE when a worker that said GoingAway disconnects. Each
//! registration gets a new epoch: events from an older stream of the same worker are ignored,
//! so a replaced stream can never mark the new registration suspect.

use std::{
    collections::HashMap,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use heist_proto::{
    ids::WorkerId,
    v1::{AgentSpec, CoordinatorMessage, Heartbeat, ToolSpec, Worker, WorkerState},
};
use tokio::{sync::mpsc, time::Instant};
use tonic::Status;

use crate::{error::Error, worker_client::WorkerClient};

/// Sender half of a worker's control stream.
pub type Commands = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// A worker's tool catalogue, sorted by name.
#[derive(Debug, Default)]
pub struct Catalogue {
    tools: Vec<ToolSpec>,
    by_name: HashMap<String, usize>,
    agents: Vec<AgentSpec>,
}

impl Catalogue {
    /// A catalogue from a registration (duplicates: the first one wins).
    pub fn new(mut tools: Vec<ToolSpec>) -> Self {
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        tools.dedup_by(|a, b| a.name == b.name);
        let by_name = tools
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            tools,
            by_name,
            agents: Vec::new(),
        }
    }

    /// The same catalogue with the worker's agents, sorted by name.
    pub fn with_agents(mut self, mut agents: Vec<AgentSpec>) -> Self {
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        agents.dedup_by(|a, b| a.name == b.name);
        self.agents = agents;
        self
    }

    /// Every agent, by name.
    pub fn agents(&self) -> &[AgentSpec] {
        &self.agents
    }

    /// One agent by name.
    pub fn agent(&self, name: &str) -> Option<&AgentSpec> {
        self.agents.iter().find(|a| a.name == name)
    }

    /// One tool by name.
    pub fn get(&self, name: &str) -> Option<&ToolSpec> {
        self.by_name.get(name).map(|&i| &self.tools[i])
    }

    /// Every tool, by name.
    pub fn tools(&self) -> &[ToolSpec] {
        &self.tools
    }
}

/// What routing a call to a worker needs.
#[derive(Clone)]
pub struct Route {
    /// Data-plane client.
    pub client: Arc<WorkerClient>,
    /// Its tools.
    pub catalogue: Arc<Catalogue>,
}

/// A worker as placement needs it.
#[derive(Clone, Debug)]
pub struct PlacementView {
    /// The worker.
    pub id: WorkerId,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Its capacity.
    pub capacity: u32,
    /// Calls in flight at its last heartbeat.
    pub in_flight: u32,
    /// Its last heartbeat said its filesystem pool was saturated.
    pub saturated: bool,
}

/// A new registration.
pub struct Registration {
    /// The record to store (state JOINING, timestamps set).
    pub record: Worker,
    /// The worker registered as draining: its first heartbeat makes it DRAINING, not READY.
    pub draining: bool,
    /// Its tools.
    pub catalogue: Arc<Catalogue>,
    /// Its data-plane client.
    pub client: Arc<WorkerClient>,
    /// Its control stream.
    pub commands: Commands,
}

struct Entry {
    record: Worker,
    epoch: u64,
    commands: Option<Commands>,
    lease_deadline: Instant,
    /// When its last heartbeat (or its registration) arrived.
    last_heartbeat: Instant,
    catalogue: Arc<Catalogue>,
    client: Option<Arc<WorkerClient>>,
    /// The worker said GoingAway on its current stream.
    going_away: bool,
    /// It registered as draining (see [`Registration::draining`]).
    joined_draining: bool,
    /// Its last heartbeat said its filesystem pool was saturated: no new sessions.
    fs_pool_saturated: bool,
}

impl Entry {
    fn state(&self) -> WorkerState {
        WorkerState::try_from(self.record.state).unwrap_or(WorkerState::Unspecified)
    }

    fn set_state(&mut self, state: WorkerState) {
        self.record.state = state as i32;
    }

    /// Connected and routable: its stream is up and it has not been declared lost.
    fn connected(&self) -> bool {
        self.commands.is_some()
            && matches!(self.state(), WorkerState::Ready | WorkerState::Draining)
    }
}

/// All known workers.
pub struct Registry {
    workers: RwLock<HashMap<WorkerId, Entry>>,
    next_epoch: AtomicU64,
    lease_ttl: Duration,
    suspect_after: Duration,
}

impl Registry {
    /// An empty registry whose leases last `lease_ttl`; a connected worker silent for
    /// `suspect_after` is SUSPECT.
    pub fn new(lease_ttl: Duration, suspect_after: Duration) -> Self {
        Self {
            workers: RwLock::new(HashMap::new()),
            next_epoch: AtomicU64::new(1),
            lease_ttl,
            suspect_after,
        }
    }

    /// Loads stored workers at startup. Workers that were live become SUSPECT with a fresh
    /// lease: they either reconnect in time or are marked lost. Returns the changed records.
    pub fn load(&self, records: Vec<Worker>, now: Instant) -> Vec<Worker> {
        let mut changed = Vec::new();
        let mut workers = self.write();
        for record in records {
            let Ok(id) = WorkerId::parse(record.id.clone()) else {
                continue;
            };
            let mut entry = Entry {
                record,
                epoch: 0,
                commands: None,
                lease_deadline: now + self.lease_ttl,
                last_heartbeat: now,
                catalogue: Arc::new(Catalogue::default()),
                client: None,
                going_away: false,
                joined_draining: false,
                fs_pool_saturated: false,
            };
            if matches!(
                entry.state(),
                WorkerState::Ready | WorkerState::Draining | WorkerState::Joining
            ) {
                entry.set_state(WorkerState::Suspect);
                changed.push(entry.record.clone());
            }
            workers.insert(id, entry);
        }
        changed
    }

    /// Registers (or re-registers) a worker, replacing any previous entry and dropping its
    /// stream. Returns the new epoch.
    pub fn register(&self, id: &WorkerId, reg: Registration, now: Instant) -> u64 {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            record: reg.record,
            epoch,
            commands: Some(reg.commands),
            lease_deadline: now + self.lease_ttl,
            last_heartbeat: now,
            catalogue: reg.catalogue,
            client: Some(reg.client),
            going_away: false,
            joined_draining: reg.draining,
            fs_pool_saturated: false,
        };
        self.write().insert(id.clone(), entry);
        epoch
    }

    /// The data-plane client of a worker, for reuse when it re-registers at the same address.
    pub fn client(&self, id: &WorkerId) -> Option<Arc<WorkerClient>> {
        self.read().get(id).and_then(|e| e.client.clone())
    }

    /// Records a heartbeat: renews the lease and updates the load. The first one after a
    /// registration makes a JOINING worker READY (or DRAINING); a worker declared suspect or
    /// lost while its stream stayed up comes back. Returns the record when its state changed.
    pub fn heartbeat(
        &self,
        id: &WorkerId,
        epoch: u64,
        hb: &Heartbeat,
        now: Instant,
    ) -> Option<Worker> {
        let mut workers = self.write();
        let entry = workers.get_mut(id).filter(|e| e.epoch == epoch)?;
        entry.lease_deadline = now + self.lease_ttl;
        entry.last_heartbeat = now;
        entry.record.in_flight_calls = hb.in_flight_calls;
        entry.fs_pool_saturated = hb.fs_pool_saturated;
        if !hb.coordinator_key_id.is_empty() {
            entry
                .record
                .coordinator_key_id
                .clone_from(&hb.coordinator_key_id);
        }
        entry.record.last_seen_at = Some(SystemTime::now().into());
        match entry.state() {
            // The first heartbeat: the worker can now verify coordinator credentials.
            WorkerState::Joining if entry.joined_draining => entry.set_state(WorkerState::Draining),
            WorkerState::Joining | WorkerState::Lost => entry.set_state(WorkerState::Ready),
            // Silent for a while (frozen, partitioned), answering again.
            WorkerState::Suspect if entry.going_away => entry.set_state(WorkerState::Draining),
            WorkerState::Suspect => entry.set_state(WorkerState::Ready),
            _ => return None,
        }
        Some(entry.record.clone())
    }

    /// The worker said GoingAway: DRAINING. Returns the changed record.
    pub fn going_away(&self, id: &WorkerId, epoch: u64) -> Option<Worker> {
        let mut workers = self.write();
        let entry = workers.get_mut(id).filter(|e| e.epoch == epoch)?;
        entry.set_state(WorkerState::Draining);
        entry.going_away = true;
        Some(entry.record.clone())
    }

    /// The worker's stream (of this epoch) ended: GONE after GoingAway, SUSPECT otherwise.
    /// Returns the changed record.
    pub fn disconnected(&self, id: &WorkerId, epoch: u64) -> Option<Worker> {
        let mut workers = self.write();
        let entry = workers.get_mut(id).filter(|e| e.epoch == epoch)?;
        entry.commands = None;
        match entry.state() {
            WorkerState::Draining if entry.going_away => entry.set_state(WorkerState::Gone),
            WorkerState::Ready | WorkerState::Draining | WorkerState::Joining => {
                entry.set_state(WorkerState::Suspect);
            }
            _ => return None,
        }
        Some(entry.record.clone())
    }

    /// Marks SUSPECT every connected worker silent for `suspect_after`, and LOST every worker
    /// whose lease ran out. Returns the changed records.
    pub fn sweep(&self, now: Instant) -> Vec<Worker> {
        let mut changed = Vec::new();
        for entry in self.write().values_mut() {
            let live = matches!(
                entry.state(),
                WorkerState::Ready
                    | WorkerState::Draining
                    | WorkerState::Suspect
                    | WorkerState::Joining
            );
            if live && now >= entry.lease_deadline {
                entry.set_state(WorkerState::Lost);
                changed.push(entry.record.clone());
            } else if matches!(entry.state(), WorkerState::Ready | WorkerState::Draining)
                && now.saturating_duration_since(entry.last_heartbeat) >= self.suspect_after
            {
                entry.set_state(WorkerState::Suspect);
                changed.push(entry.record.clone());
            }
        }
        changed
    }

    /// Sends a command on a worker's stream (dropped if it is not connected or its buffer is
    /// full; commands are re-derived on the next registration anyway).
    pub fn send(&self, id: &WorkerId, msg: CoordinatorMessage) {
        if let Some(tx) = self.read().get(id).and_then(|e| e.commands.clone()) {
            let _ = tx.try_send(Ok(msg));
        }
    }

    /// Ends a worker's current control stream with `status` (the worker sees why).
    pub fn end_stream(&self, id: &WorkerId, status: Status) {
        if let Some(tx) = self.read().get(id).and_then(|e| e.commands.clone()) {
            let _ = tx.try_send(Err(status));
        }
    }

    /// Client and catalogue of a connected worker.
    pub fn route(&self, id: &WorkerId) -> Result<Route, Error> {
        let workers = self.read();
        match workers.get(id) {
            Some(entry) if entry.connected() => match &entry.client {
                Some(client) => Ok(Route {
                    client: client.clone(),
                    catalogue: entry.catalogue.clone(),
                }),
                None => Err(Error::WorkerUnavailable(id.clone())),
            },
            _ => Err(Error::WorkerUnavailable(id.clone())),
        }
    }

    /// Whether a worker is connected right now.
    pub fn is_connected(&self, id: &WorkerId) -> bool {
        self.read().get(id).is_some_and(Entry::connected)
    }

    /// The catalogue a worker registered with (even if it is disconnected now).
    pub fn catalogue(&self, id: &WorkerId) -> Option<Arc<Catalogue>> {
        self.read().get(id).map(|e| e.catalogue.clone())
    }

    /// Catalogues of connected workers, ordered by worker id.
    pub fn connected_catalogues(&self) -> Vec<Arc<Catalogue>> {
        let workers = self.read();
        let mut live: Vec<(&WorkerId, &Entry)> =
            workers.iter().filter(|(_, e)| e.connected()).collect();
        live.sort_by(|a, b| a.0.cmp(b.0));
        live.into_iter().map(|(_, e)| e.catalogue.clone()).collect()
    }

    /// Workers taking new sessions: READY and connected.
    pub fn placement_views(&self) -> Vec<PlacementView> {
        self.read()
            .iter()
            .filter(|(_, e)| e.commands.is_some() && e.state() == WorkerState::Ready)
            .map(|(id, e)| PlacementView {
                id: id.clone(),
                labels: e.record.labels.clone(),
                capacity: e.record.capacity,
                in_flight: e.record.in_flight_calls,
                saturated: e.fs_pool_saturated,
            })
            .collect()
    }

    /// Every worker's record, ordered by id.
    pub fn list(&self) -> Vec<Worker> {
        let mut all: Vec<Worker> = self.read().values().map(|e| e.record.clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// One worker's record.
    pub fn get(&self, id: &WorkerId) -> Option<Worker> {
        self.read().get(id).map(|e| e.record.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<WorkerId, Entry>> {
        self.workers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<WorkerId, Entry>> {
        self.workers.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);
    const SILENT: Duration = Duration::from_secs(6);

    fn registration(
        id: &WorkerId,
    ) -> (
        Registration,
        mpsc::Receiver<Result<CoordinatorMessage, Status>>,
    ) {
        let client = WorkerClient::new(
            id.clone(),
            "http://127.0.0.1:1",
            crate::signing_keys::SigningKeys::for_tests(),
            "heist",
            Duration::from_secs(30),
            &crate::worker_client::ChannelTuning::from(&crate::Config::default()),
        )
        .expect("client");
        let (tx, rx) = mpsc::channel(4);
        let record = Worker {
            id: id.to_string(),
            capacity: 2,
            state: WorkerState::Joining as i32,
            ..Worker::default()
        };
        let reg = Registration {
            record,
            draining: false,
            catalogue: Arc::new(Catalogue::new(vec![ToolSpec {
                name: "echo".to_owned(),
                read_only: true,
                ..ToolSpec::default()
            }])),
            client: Arc::new(client),
            commands: tx,
        };
        (reg, rx)
    }

    /// Registers and sends the first heartbeat: the worker is READY.
    fn join(r: &Registry, id: &WorkerId, reg: Registration, now: Instant) -> u64 {
        let epoch = r.register(id, reg, now);
        assert!(r.heartbeat(id, epoch, &Heartbeat::default(), now).is_some());
        epoch
    }

    fn state(r: &Registry, id: &WorkerId) -> WorkerState {
        WorkerState::try_from(r.get(id).expect("known").state).expect("state")
    }

    #[tokio::test]
    async fn a_joining_worker_takes_nothing_until_its_first_heartbeat() {
        let r = Registry::new(TTL, SILENT);
        let id = WorkerId::parse("w1").expect("id");
        let now = Instant::now();
        let (reg, _rx) = registration(&id);
        let epoch = r.register(&id, reg, now);
        assert_eq!(state(&r, &id), WorkerState::Joining);
        assert!(r.placement_views().is_empty());
        assert!(matches!(r.route(&id), Err(Error::WorkerUnavailable(_))));
        assert!(
            r.heartbeat(&id, epoch, &Heartbeat::default(), now)
                .is_some()
        );
        assert_eq!(state(&r, &id), WorkerState::Ready);
        assert_eq!(r.placement_views().len(), 1);
        assert!(r.route(&id).is_ok());
        // Later heartbeats change nothing.
        assert!(
            r.heartbeat(&id, epoch, &Heartbeat::default(), now)
                .is_none()
        );
    }

    #[tokio::test]
    async fn stream_break_is_suspect_then_lease_expiry_is_lost() {
        let r = Registry::new(TTL, SILENT);
        let id = WorkerId::parse("w1").expect("id");
        let now = Instant::now();
        let (reg, _rx) = registration(&id);
        let epoch = join(&r, &id, reg, now);
        assert!(r.is_connected(&id));
        assert_eq!(r.placement_views().len(), 1);
        assert!(r.route(&id).is_ok());

        assert!(r.disconnected(&id, epoch).is_some());
        assert_eq!(state(&r, &id), WorkerState::Suspect);
        assert!(!r.is_connected(&id));
        assert!(matches!(r.route(&id), Err(Error::WorkerUnavailable(_))));
        assert!(r.placement_views().is_empty());

        assert!(r.sweep(now + TTL / 2).is_empty());
        assert_eq!(r.sweep(now + TTL).len(), 1);
        assert_eq!(state(&r, &id), WorkerState::Lost);
    }

    #[tokio::test]
    async fn heartbeats_renew_the_lease() {
        let r = Registry::new(TTL, SILENT);
        let id = WorkerId::parse("w1").expect("id");
        let now = Instant::now();
        let (reg, _rx) = registration(&id);
        let epoch = join(&r, &id, reg, now);
        let hb = Heartbeat {
            active_sessions: 1,
            in_flight_calls: 3,
            fs_pool_saturated: true,
            coordinator_key_id: "kid-2".to_owned(),
        };
        r.heartbeat(&id, epoch, &hb, now + TTL / 2);
        assert!(r.sweep(now + TTL).is_empty());
        assert_eq!(r.placement_views()[0].in_flight, 3);
        assert!(
            r.placement_views()[0].saturated,
            "placement sees the pool saturated"
        );
        assert_eq!(r.sweep(now + TTL * 2).len(), 1);
        // A heartbeat on a still-open stream brings a lost worker back.
        assert!(r.heartbeat(&id, epoch, &hb, now + TTL * 2).is_some());
        assert_eq!(state(&r, &id), WorkerState::Ready);
    }

    #[tokio::test]
    async fn a_silent_worker_is_suspect_and_comes_back_with_its_next_heartbeat() {
        let r = Registry::new(TTL, SILENT);
        let id = WorkerId::parse("w1").expect("id");
        let now = Instant::now();
        let (reg, _rx) = registration(&id);
        let epoch = join(&r, &id, reg, now);
        assert!(r.sweep(now + SILENT / 2).is_empty());
        assert_eq!(r.sweep(now + SILENT).len(), 1);
        assert_eq!(state(&r, &id), WorkerState::Suspect);
        assert!(r.placement_views().is_empty(), "suspect takes no sessions");
        assert!(
            matches!(r.route(&id), Err(Error::WorkerUnavailable(_))),
            "calls to a suspect worker fail fast"
        );
        let hb = Heartbeat::default();
        assert!(r.heartbeat(&id, epoch, &hb, now + SILENT).is_some());
        assert_eq!(state(&r, &id), WorkerState::Ready);
        assert!(r.route(&id).is_ok());
    }

    #[tokio::test]
    async fn old_streams_cannot_touch_a_new_registration() {
        let r = Registry::new(TTL, SILENT);
        let id = WorkerId::parse("w1").expect("id");
        let now = Instant::now();
        let (first, _rx1) = registration(&id);
        let old = join(&r, &id, first, now);
        let (second, _rx2) = registration(&id);
        let new = join(&r, &id, second, now);
        assert_ne!(old, new);
        assert!(r.disconnected(&id, old).is_none());
        assert!(r.going_away(&id, old).is_none());
        assert_eq!(state(&r, &id), WorkerState::Ready);
        assert!(r.is_connected(&id));
    }

    #[tokio::test]
    async fn going_away_drains_then_disconnect_is_gone() {
        let r = Registry::new(TTL, SILENT);
        let id = WorkerId::parse("w1").expect("id");
        let (reg, _rx) = registration(&id);
        let epoch = join(&r, &id, reg, Instant::now());
        r.going_away(&id, epoch);
        assert_eq!(state(&r, &id), WorkerState::Draining);
        assert!(r.placement_views().is_empty(), "draining takes no sessions");
        assert!(r.route(&id).is_ok(), "draining still routes calls");
        r.disconnected(&id, epoch);
        assert_eq!(state(&r, &id), WorkerState::Gone);
        assert!(
            r.sweep(Instant::now() + TTL * 2).is_empty(),
            "gone is final"
        );
    }

    #[test]
    fn loaded_live_workers_become_suspect() {
        let r = Registry::new(TTL, SILENT);
        let now = Instant::now();
        let rec = |id: &str, s: WorkerState| Worker {
            id: id.to_owned(),
            state: s as i32,
            ..Worker::default()
        };
        let changed = r.load(
            vec![rec("a", WorkerState::Ready), rec("b", WorkerState::Gone)],
            now,
        );
        assert_eq!(changed.len(), 1);
        let a = WorkerId::parse("a").expect("id");
        assert_eq!(state(&r, &a), WorkerState::Suspect);
        assert_eq!(r.sweep(now + TTL).len(), 1);
        assert_eq!(r.list().len(), 2);
    }

    #[test]
    fn catalogue_is_sorted_and_deduplicated() {
        let t = |n: &str| ToolSpec {
            name: n.to_owned(),
            ..ToolSpec::default()
        };
        let c = Catalogue::new(vec![t("fs.read"), t("echo"), t("calc"), t("echo")]);
        let names: Vec<&str> = c.tools().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["calc", "echo", "fs.read"]);
        assert!(c.get("echo").is_some());
        assert!(c.get("nope").is_none());
    }
}
