//! Session phases: create + close latency one at a time ([`Sessions`]), and the memory of the
//! coordinator and the worker idle, with many sessions open, and after closing them ([`Memory`]).

use std::time::Duration;

use futures::future::BoxFuture;
use heist_proto::v1::SessionState;
use tokio::{task::JoinSet, time::Instant};
use tracing::Instrument;

use super::{
    failed,
    load::Latencies,
    phases::{ClusterRss, Lab, Phase, cluster_rss, count_f64, kib_f64},
    report::Metric,
};
use crate::{client::Client, error::Error};

/// Sessions opened or closed at once while filling the worker for [`Memory`].
const PARALLEL: usize = 16;

/// Create + close latency, one session at a time.
pub struct Sessions;

impl Phase for Sessions {
    fn name(&self) -> &'static str {
        "sessions"
    }

    fn title(&self) -> &'static str {
        "CreateSession then CloseSession, one at a time"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(async move {
            let s = lab.settings.clone();
            let client = lab.cluster().await?.client().await?;
            super::progress(&format!(
                "sessions: {} create+close pairs after {} warm-up",
                s.session_iterations, s.session_warmup
            ));
            let deadline = Instant::now() + s.loop_cap();
            for _ in 0..s.session_warmup {
                if Instant::now() >= deadline {
                    break;
                }
                let id = create(&client).await?;
                close(&client, &id).await?;
            }
            let (mut creates, mut closes) = (Latencies::new(), Latencies::new());
            for _ in 0..s.session_iterations {
                if Instant::now() >= deadline {
                    tracing::warn!(
                        done = creates.count(),
                        "sessions: time cap reached; stopping early"
                    );
                    break;
                }
                let started = Instant::now();
                let id = create(&client).await?;
                let created = Instant::now();
                close(&client, &id).await?;
                creates.record(created - started);
                closes.record(created.elapsed());
            }
            if creates.count() == 0 {
                return Err(failed(
                    "sessions: no session was created within the time cap",
                ));
            }
            Ok(vec![
                Metric::new(
                    "create_p50_ms",
                    "create p50",
                    creates.quantile_us(0.5) / 1000.0,
                    "ms",
                ),
                Metric::new(
                    "create_p99_ms",
                    "create p99",
                    creates.quantile_us(0.99) / 1000.0,
                    "ms",
                ),
                Metric::new(
                    "close_p50_ms",
                    "close p50",
                    closes.quantile_us(0.5) / 1000.0,
                    "ms",
                ),
                Metric::new(
                    "close_p99_ms",
                    "close p99",
                    closes.quantile_us(0.99) / 1000.0,
                    "ms",
                ),
                Metric::new(
                    "pairs",
                    "create+close pairs",
                    count_f64(creates.count()),
                    "pairs",
                ),
            ])
        })
    }
}

/// RSS of the coordinator and the worker: idle, with `--sessions` open, after closing them.
pub struct Memory;

impl Phase for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn title(&self) -> &'static str {
        "RSS of coordinator and worker: idle, with N open sessions, after closing them"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(async move {
            let s = lab.settings.clone();
            let cluster = lab.cluster().await?;
            let client = cluster.client().await?;
            let before = cluster_rss(cluster);
            super::progress(&format!("memory: opening {} sessions", s.sessions));
            let started = Instant::now();
            let (ids, error) = open_many(&client, s.sessions, s.loop_cap()).await;
            let open_secs = started.elapsed().as_secs_f64();
            let open = cluster_rss(cluster);
            super::progress(&format!("memory: closing {} sessions", ids.len()));
            let close_error = close_many(&client, &ids, s.loop_cap()).await;
            if let Some(err) = error.or(close_error) {
                return Err(err);
            }
            let closed = cluster_rss(cluster);
            let idle = lab.idle_rss();
            let n = ids.len();
            let mut metrics = Vec::new();
            let mut add = |name, label, kib: Option<u64>| {
                if let Some(kib) = kib {
                    metrics.push(Metric::new(name, label, kib_f64(kib), "KiB"));
                }
            };
            add(
                "coordinator_idle_kib",
                "coordinator RSS idle",
                idle.coordinator_kib,
            );
            add("worker_idle_kib", "worker RSS idle", idle.worker_kib);
            add(
                "coordinator_open_kib",
                "coordinator RSS, sessions open",
                open.coordinator_kib,
            );
            add(
                "worker_open_kib",
                "worker RSS, sessions open",
                open.worker_kib,
            );
            add(
                "coordinator_closed_kib",
                "coordinator RSS after closing",
                closed.coordinator_kib,
            );
            add(
                "worker_closed_kib",
                "worker RSS after closing",
                closed.worker_kib,
            );
            metrics.extend(per_session(&before, &open, n));
            metrics.push(Metric::new(
                "open_sessions",
                "sessions held open",
                count_f64(n as u64),
                "sessions",
            ));
            metrics.push(Metric::new(
                "open_rate_per_s",
                "sessions opened per second",
                count_f64(n as u64) / open_secs.max(1e-9),
                "sessions/s",
            ));
            Ok(metrics)
        })
    }
}

/// RSS growth per open session, in bytes (may be negative when the allocator gives memory back).
fn per_session(before: &ClusterRss, open: &ClusterRss, n: usize) -> Vec<Metric> {
    let delta = |a: Option<u64>, b: Option<u64>| {
        let (a, b) = (a?, b?);
        let n = count_f64(u64::try_from(n).ok()?.max(1));
        Some((kib_f64(b) - kib_f64(a)) * 1024.0 / n)
    };
    let mut out = Vec::new();
    if let Some(v) = delta(before.coordinator_kib, open.coordinator_kib) {
        out.push(Metric::new(
            "coordinator_delta_per_session_b",
            "coordinator RSS per open session",
            v,
            "B",
        ));
    }
    if let Some(v) = delta(before.worker_kib, open.worker_kib) {
        out.push(Metric::new(
            "worker_delta_per_session_b",
            "worker RSS per open session",
            v,
            "B",
        ));
    }
    out
}

/// Creates a session and checks it is usable.
pub(super) async fn create(client: &Client) -> Result<String, Error> {
    let session = client
        .create_session(Default::default(), &uuid::Uuid::new_v4().to_string())
        .await?;
    if session.state != SessionState::Ready as i32 {
        return Err(failed(format!(
            "CreateSession returned session {} in state {}, not READY",
            session.id, session.state
        )));
    }
    Ok(session.id)
}

/// Closes a session.
pub(super) async fn close(client: &Client, id: &str) -> Result<(), Error> {
    client
        .close_session(id, &uuid::Uuid::new_v4().to_string())
        .await
        .map(drop)
}

/// Opens up to `n` sessions, [`PARALLEL`] at a time, until `cap`. Returns the ids opened and the
/// first failure (opening stops there; the caller still closes what was opened).
async fn open_many(client: &Client, n: usize, cap: Duration) -> (Vec<String>, Option<Error>) {
    let (ids, error) = in_parallel(0..n, cap, |_| {
        let client = client.clone();
        async move { create(&client).await }
    })
    .await;
    let error = error.or_else(|| {
        (ids.len() < n).then(|| {
            failed(format!(
                "memory: only {} of {n} sessions opened within {} s",
                ids.len(),
                cap.as_secs()
            ))
        })
    });
    (ids, error)
}

/// Closes every session in `ids`, [`PARALLEL`] at a time, until `cap`; the first failure.
async fn close_many(client: &Client, ids: &[String], cap: Duration) -> Option<Error> {
    let (closed, error) = in_parallel(ids.iter().cloned(), cap, |id| {
        let client = client.clone();
        async move { close(&client, &id).await }
    })
    .await;
    error.or_else(|| {
        (closed.len() < ids.len()).then(|| {
            failed(format!(
                "memory: closing {} sessions took over {} s",
                ids.len(),
                cap.as_secs()
            ))
        })
    })
}

/// Runs `op` on every item, [`PARALLEL`] at a time, until the first failure or `cap`; returns
/// the results so far and the failure. Tasks still running at the end are aborted.
pub(super) async fn in_parallel<I, T, F, Fut>(
    items: I,
    cap: Duration,
    op: F,
) -> (Vec<T>, Option<Error>)
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: Future<Output = Result<T, Error>> + Send + 'static,
    T: Send + 'static,
{
    let deadline = Instant::now() + cap;
    let mut items = items.into_iter();
    let mut tasks = JoinSet::new();
    let mut done = Vec::new();
    loop {
        while tasks.len() < PARALLEL {
            let Some(item) = items.next() else { break };
            tasks.spawn(op(item).instrument(tracing::debug_span!("bench_sessions")));
        }
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(Ok(value)))) => done.push(value),
            Ok(Some(Ok(Err(err)))) => return (done, Some(err)),
            Ok(Some(Err(join))) => {
                return (done, Some(failed(format!("a session task failed: {join}"))));
            }
            Ok(None) | Err(_) => return (done, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_session_growth_is_in_bytes() {
        let before = ClusterRss {
            coordinator_kib: Some(1000),
            worker_kib: Some(2000),
        };
        let open = ClusterRss {
            coordinator_kib: Some(2000),
            worker_kib: None,
        };
        let m = per_session(&before, &open, 1000);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].name, "coordinator_delta_per_session_b");
        assert!((m[0].value - 1024.0).abs() < 1e-9);
    }
}
