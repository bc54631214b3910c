//! [`App`]: the state every service shares, opened from the data directory at startup, and the
//! background tasks that keep it tidy (lease sweeper, idempotency sweeper, checkpoint GC).

use std::{sync::Arc, time::Duration};

use heist_proto::{
    ids::WorkerId,
    v1::{Session, Worker, WorkerState},
};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::{
    auth::Auth,
    cas::Cas,
    checkpoints::{Checkpoints, Retention},
    config::Config,
    error::Error,
    idempotency::Idempotency,
    registry::Registry,
    sessions::SessionTable,
    signing_keys::SigningKeys,
    store::Store,
    turns::TurnStore,
    worker_keys::WorkerKeys,
};

/// How often the store's free space is measured in the background.
const STORE_SPACE_PERIOD: Duration = Duration::from_secs(1);

/// Shared coordinator state.
pub struct App {
    /// The configuration it was started with.
    pub config: Config,
    /// Durable state.
    pub store: Store,
    /// The keys that sign client tokens and worker credentials.
    pub keys: Arc<SigningKeys>,
    /// Clients and the token grant.
    pub auth: Auth,
    /// Workers.
    pub registry: Registry,
    /// Worker id -> key bindings and the proof checks.
    pub worker_keys: WorkerKeys,
    /// The hash-chained audit log.
    pub audit: crate::audit::AuditLog,
    /// Sessions.
    pub sessions: SessionTable,
    /// Request-id records.
    pub idempotency: Idempotency,
    /// Checkpoints and the blob store.
    pub checkpoints: Arc<Checkpoints>,
    /// Agent turns and their events.
    pub turns: TurnStore,
    /// Heist games, their sealed moles and their events.
    pub heists: crate::heist::service::Heists,
    /// The TLS material (HEIST_TLS_*), when the port serves TLS.
    pub tls: Option<Arc<heist_proto::tls::Tls>>,
    /// Prometheus metrics, served on `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Every task spawned on behalf of the server; waited for at shutdown.
    pub tasks: TaskTracker,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
}

impl App {
    /// Opens the store under `config.data_dir`, loads workers and sessions, and upserts the
    /// bootstrap admin client.
    pub async fn open(config: Config) -> Result<Arc<Self>, Error> {
        let tls = config
            .tls
            .load()
            .map_err(|e| Error::InvalidConfig(e.to_string()))?
            .map(Arc::new);
        let store = Store::open(&config.data_dir)?.with_min_free(config.store_min_free_bytes);
        let longest_lifetime = config
            .token_ttl
            .max(config.worker_credential_ttl)
            .max(crate::turns::GRANT_TTL);
        let keys = Arc::new(SigningKeys::open(
            &store,
            &config.data_dir,
            &config.token_issuer,
            longest_lifetime,
        )?);
        let auth = Auth::new(
            store.clone(),
            keys.clone(),
            config.token_issuer.clone(),
            config.token_ttl,
            &config.admin_client_id,
            &config.admin_client_secret,
        )
        .await?
        .with_throttle(crate::throttle::LoginThrottle::new(&config));
        let registry = Registry::new(config.lease_ttl, config.suspect_after);
        let audit = crate::audit::AuditLog::open(&store, keys.clone())?;
        let worker_keys = WorkerKeys::open(
            &store,
            config.worker_proof_window,
            config.worker_proof_nonces,
            &config.forget_worker_keys,
        )?;
        let workers: Vec<Worker> = Store::load_all(&store.workers, "worker")?;
        let known = workers.len();
        for record in registry.load(workers, Instant::now()) {
            Store::put(&store.workers, record.id.as_bytes(), &record)?;
        }
        let sessions = SessionTable::load(&store)?;
        let cas = Arc::new(Cas::open(&config.data_dir.join("blobs"))?);
        let checkpoints = Checkpoints::load(&store, cas)?;
        let turns = TurnStore::open(&store)?;
        turns.recover()?;
        let heists = crate::heist::service::Heists::open(&store)?;
        store.flush().await?;
        info!(workers = known, data_dir = %config.data_dir.display(), "state loaded");
        Ok(Arc::new(Self {
            idempotency: Idempotency::new(store.clone(), config.idempotency_ttl),
            config,
            store,
            keys,
            auth,
            registry,
            worker_keys,
            audit,
            sessions,
            checkpoints,
            turns,
            heists,
            tls,
            metrics: Arc::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }))
    }

    /// Writes changed worker records (flushed lazily: worker state is not acknowledged to
    /// clients, and sled flushes on its own within a second).
    pub fn persist_workers(&self, records: &[Worker]) {
        for record in records {
            if let Err(err) = Store::put(&self.store.workers, record.id.as_bytes(), record) {
                error!(worker_id = %record.id, %err, "cannot store worker record");
            }
        }
    }

    /// A session as clients see it: `worker_connected` from the live registry.
    pub fn view(&self, mut session: Session) -> Session {
        session.worker_connected = WorkerId::parse(session.worker_id.as_str())
            .is_ok_and(|id| self.registry.is_connected(&id));
        session
    }

    /// A worker as clients see it: `active_sessions` counted by the coordinator.
    pub fn worker_view(&self, mut worker: Worker) -> Worker {
        worker.active_sessions = self.sessions.slots(&worker.id);
        worker
    }

    /// Starts the named background tasks; they stop when [`App::shutdown`] is cancelled.
    pub fn spawn_background(self: &Arc<Self>) {
        let app = self.clone();
        self.tasks
            .spawn(async move { app.sweep_leases().await }.instrument(info_span!("lease-sweeper")));
        let app = self.clone();
        self.tasks.spawn(
            async move { app.sweep_idempotency().await }
                .instrument(info_span!("idempotency-sweeper")),
        );
        let app = self.clone();
        self.tasks.spawn(
            async move { app.collect_checkpoints().await }.instrument(info_span!("checkpoint-gc")),
        );
        let app = self.clone();
        self.tasks.spawn(
            async move { app.collect_sessions_periodically().await }
                .instrument(info_span!("session-gc")),
        );
        let app = self.clone();
        self.tasks.spawn(
            async move { app.watch_store_space().await }.instrument(info_span!("store-space")),
        );
    }

    /// Every second: is the data directory's file system below its reserve? When it is back
    /// above, a test write decides whether mutations are taken again (no restart needed).
    async fn watch_store_space(&self) {
        let store = self.store.clone();
        let probe = move || {
            let store = store.clone();
            async move { store.probe().await.map_err(|err| err.to_string()) }
        };
        self.store
            .reserve
            .monitor(STORE_SPACE_PERIOD, probe, self.shutdown.cancelled())
            .await;
    }

    /// Collects, every HEIST_SESSION_GC_INTERVAL_S, the closed and failed sessions older than
    /// the retention.
    async fn collect_sessions_periodically(&self) {
        let mut tick = tokio::time::interval(self.config.session_gc_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.collect_sessions(std::time::SystemTime::now()) {
                Ok(0) => {}
                Ok(n) => info!(sessions = n, "closed sessions collected"),
                Err(err) => warn!(%err, "session collection failed"),
            }
        }
    }

    /// Drops the closed and failed sessions last changed more than the retention before `now`,
    /// with their transcripts (their request-id records expire with HEIST_IDEMPOTENCY_TTL_S;
    /// their checkpoints follow checkpoint retention). Returns how many.
    pub fn collect_sessions(&self, now: std::time::SystemTime) -> Result<usize, Error> {
        let cutoff = now
            .checked_sub(self.config.session_retention)
            .unwrap_or(std::time::UNIX_EPOCH);
        let collected = self.sessions.collect(cutoff)?;
        for id in &collected {
            self.turns.forget_session(id)?;
        }
        Ok(collected.len())
    }

    /// Checkpoint retention limits from the configuration.
    pub fn retention(&self) -> Retention {
        Retention {
            max_per_session: self.config.checkpoint_max_per_session,
            max_age: self.config.checkpoint_max_age,
        }
    }

    /// Age retention for every session, then the sweep of blobs no manifest references.
    async fn collect_checkpoints(&self) {
        let period = self.config.checkpoint_gc_interval;
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let table = self.checkpoints.clone();
            let (limits, grace) = (self.retention(), self.config.blob_orphan_grace);
            let swept = tokio::task::spawn_blocking(move || {
                let freed = table.retain_all(limits, std::time::SystemTime::now())?;
                let orphans = table.sweep_unreferenced(grace)?;
                Ok::<_, Error>((freed, orphans))
            })
            .await;
            match swept {
                Ok(Ok((freed, orphans))) => {
                    if let Err(err) = self.store.flush().await {
                        warn!(%err, "cannot flush after checkpoint retention");
                    }
                    if freed.checkpoints > 0 || orphans > 0 {
                        info!(
                            checkpoints = freed.checkpoints,
                            blobs = freed.blobs + orphans as u64,
                            "checkpoint garbage collected"
                        );
                    }
                }
                Ok(Err(err)) => warn!(%err, "checkpoint garbage collection failed"),
                Err(err) => warn!(%err, "checkpoint garbage collection panicked"),
            }
        }
    }

    /// Marks workers SUSPECT when they fall silent and LOST when their lease runs out; a LOST
    /// worker's sessions fail over ([`crate::lifecycle::failover`]) in a task of their own.
    async fn sweep_leases(self: &Arc<Self>) {
        let period = (self.config.lease_ttl.min(self.config.suspect_after) / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let lost = self.registry.sweep(Instant::now());
            for record in &lost {
                if record.state == WorkerState::Suspect as i32 {
                    warn!(worker_id = %record.id, "worker suspect: no heartbeat");
                } else {
                    warn!(worker_id = %record.id, "worker lost: lease expired");
                    if let Ok(id) = WorkerId::parse(record.id.as_str()) {
                        let app = Arc::clone(self);
                        let span = info_span!("worker-failover", worker_id = %id);
                        self.tasks.spawn(
                            async move {
                                crate::lifecycle::failover::worker_lost(&app, &id).await;
                            }
                            .instrument(span),
                        );
                    }
                }
            }
            self.persist_workers(&lost);
        }
    }

    /// Drops request-id records older than the TTL.
    async fn sweep_idempotency(&self) {
        let period = self.config.idempotency_ttl.min(Duration::from_secs(60));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let table = self.idempotency.clone();
            let now = crate::idempotency::now_ms();
            match tokio::task::spawn_blocking(move || table.sweep(now)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(removed)) => info!(removed, "expired request-id records removed"),
                Ok(Err(err)) => warn!(%err, "idempotency sweep failed"),
                Err(err) => warn!(%err, "idempotency sweep panicked"),
            }
        }
    }
}
