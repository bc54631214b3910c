//! The [`Phase`] trait, the [`Lab`] phases run in (settings, and the local cluster started on
//! first use), and the tool-call phases: the 1-hop and 2-hop baselines and routed `echo` calls.
//! Session phases live in `sessions.rs`. A new phase (sandboxed exec, checkpoints, scaling) is
//! one more `impl Phase` added to [`all`].

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::{
    baseline::{BaselineProcess, Role},
    failed,
    load::{self, EchoTarget},
    machine,
    paired::{self, Spread},
    report::Metric,
    sessions::{Memory, Sessions},
    settings::Settings,
};
use crate::{
    cluster::{LocalCluster, Options},
    error::Error,
};

/// One part of the benchmark.
pub trait Phase: Send + Sync {
    /// Stable key in the report (`routed`, `sessions`, ...).
    fn name(&self) -> &'static str;
    /// One line saying what it measures.
    fn title(&self) -> &'static str;
    /// Measures. Every loop inside is bounded by a count and by `settings.loop_cap()`.
    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>>;
}

/// The phases of a run, in order: baselines first (their processes are gone before the cluster
/// starts), then the cluster.
pub fn all() -> Vec<Box<dyn Phase>> {
    vec![
        Box::new(Baseline { hops: 1 }),
        Box::new(Baseline { hops: 2 }),
        Box::new(Routed),
        Box::new(super::exactly_once::ExactlyOnce),
        Box::new(Sessions),
        Box::new(super::diskpool::DiskPool),
        Box::new(Memory),
        Box::new(super::exec::Exec),
        Box::new(super::checkpoint::Checkpoints),
        Box::new(super::scaling::Scaling),
        Box::new(super::telemetry::Telemetry),
        Box::new(super::mcp::Mcp),
        Box::new(super::audit::Audit),
        Box::new(super::churn::Churn),
    ]
}

/// Resident memory of the cluster processes, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterRss {
    /// The coordinator.
    pub coordinator_kib: Option<u64>,
    /// The (first) worker.
    pub worker_kib: Option<u64>,
}

/// What phases share: the settings, where binaries are, and the cluster once started.
#[derive(Debug)]
pub struct Lab {
    /// Sizes of this run.
    pub settings: Settings,
    /// This heistctl (baseline processes are started from it).
    pub exe: PathBuf,
    /// Where the `coordinator` and `worker` binaries are (`None`: next to heistctl, then PATH).
    pub bin_dir: Option<PathBuf>,
    /// LOG_LEVEL of the cluster processes.
    pub cluster_log_level: String,
    cluster: Option<LocalCluster>,
    idle_rss: ClusterRss,
}

impl Lab {
    /// A lab with no processes running yet.
    pub fn new(
        settings: Settings,
        exe: PathBuf,
        bin_dir: Option<PathBuf>,
        log_level: String,
    ) -> Self {
        Self {
            settings,
            exe,
            bin_dir,
            cluster_log_level: log_level,
            cluster: None,
            idle_rss: ClusterRss::default(),
        }
    }

    /// The local cluster (1 worker, auth on), started on first use; its idle memory is taken
    /// right after it is ready.
    pub async fn cluster(&mut self) -> Result<&LocalCluster, Error> {
        if self.cluster.is_none() {
            super::progress("starting a local cluster (1 coordinator, 1 worker)");
            let data_dir =
                std::env::temp_dir().join(format!("heist-bench-{}", uuid::Uuid::new_v4().simple()));
            let cluster = LocalCluster::start(Options {
                workers: 1,
                port: 0,
                data_dir: Some(data_dir),
                max_sessions: Some(self.settings.worker_max_sessions()),
                bin_dir: self.bin_dir.clone(),
                log_level: self.cluster_log_level.clone(),
                call_timeout: self.settings.call_timeout(),
                ..Options::default()
            })
            .await?;
            self.idle_rss = cluster_rss(&cluster);
            self.cluster = Some(cluster);
        }
        self.cluster
            .as_ref()
            .ok_or_else(|| failed("the local cluster is not running"))
    }

    /// Memory of the cluster processes right after start.
    pub fn idle_rss(&self) -> ClusterRss {
        self.idle_rss
    }

    /// Stops the cluster (if started; SIGKILL when `abort` completes first). Its data
    /// directory is removed when `keep_data` is false, else returned so the logs can be read.
    pub async fn shutdown(
        self,
        keep_data: bool,
        abort: impl Future<Output = ()>,
    ) -> Result<Option<PathBuf>, Error> {
        let Some(cluster) = self.cluster else {
            return Ok(None);
        };
        let data_dir = cluster.data_dir().to_path_buf();
        cluster.stop_or_abort(abort).await?;
        if keep_data {
            return Ok(Some(data_dir));
        }
        if let Err(err) = std::fs::remove_dir_all(&data_dir) {
            tracing::warn!(%err, dir = %data_dir.display(), "cannot remove the bench data directory");
        }
        Ok(None)
    }
}

/// Memory of the coordinator and the first worker of `cluster` now.
pub fn cluster_rss(cluster: &LocalCluster) -> ClusterRss {
    ClusterRss {
        coordinator_kib: machine::cluster_pid(cluster.coordinator()).and_then(machine::rss_kib),
        worker_kib: cluster
            .workers()
            .first()
            .and_then(|w| machine::cluster_pid(w))
            .and_then(machine::rss_kib),
    }
}

/// A plain tonic echo server (1 hop) or a proxy in front of one (2 hops).
struct Baseline {
    hops: u8,
}

impl Phase for Baseline {
    fn name(&self) -> &'static str {
        if self.hops == 1 {
            "baseline-1hop"
        } else {
            "baseline-2hop"
        }
    }

    fn title(&self) -> &'static str {
        if self.hops == 1 {
            "plain tonic echo server: client -> echo"
        } else {
            "plain tonic proxy in front of it: client -> proxy -> echo"
        }
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(async move {
            let echo = BaselineProcess::start(&lab.exe, Role::Echo, None).await?;
            let proxy = if self.hops == 2 {
                Some(BaselineProcess::start(&lab.exe, Role::Proxy, Some(&echo.url)).await?)
            } else {
                None
            };
            let url = proxy.as_ref().map_or(&echo.url, |p| &p.url);
            let target =
                EchoTarget::connect(url, None, "s-baseline", lab.settings.call_timeout()).await?;
            let mut metrics = measure_calls(self.name(), &target, &lab.settings).await?;
            if let Some(kib) = echo.rss_kib() {
                metrics.push(Metric::new(
                    "echo_rss_kib",
                    "echo server RSS",
                    kib_f64(kib),
                    "KiB",
                ));
            }
            if let Some(kib) = proxy.as_ref().and_then(BaselineProcess::rss_kib) {
                metrics.push(Metric::new(
                    "proxy_rss_kib",
                    "proxy RSS",
                    kib_f64(kib),
                    "KiB",
                ));
            }
            if let Some(proxy) = proxy {
                proxy.stop().await;
            }
            echo.stop().await;
            Ok(metrics)
        })
    }
}

/// The `echo` tool through coordinator -> worker, with a bearer token.
struct Routed;

impl Phase for Routed {
    fn name(&self) -> &'static str {
        "routed"
    }

    fn title(&self) -> &'static str {
        "echo tool routed client -> coordinator -> worker, auth on"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(async move {
            let settings = lab.settings.clone();
            let exe = lab.exe.clone();
            let cluster = lab.cluster().await?;
            let client = cluster.client().await?;
            let (target, session) = paired::echo_target(cluster, settings.call_timeout()).await?;
            let mut measured = measure_calls(self.name(), &target, &settings).await;
            if let Ok(metrics) = &mut measured {
                match against_2hop(&exe, &target, &settings).await {
                    Ok(paired) => metrics.extend(paired),
                    Err(err) => measured = Err(err),
                }
            }
            client
                .close_session(&session, &uuid::Uuid::new_v4().to_string())
                .await?;
            measured
        })
    }
}

/// Routed `echo` against the 2-hop baseline (started here) in alternating rounds, so a drift
/// of the machine hits both: each round measures sequential p50 and throughput on one, then
/// the other (the order flips every round); the medians and spreads of the per-round ratios.
async fn against_2hop(exe: &Path, routed: &EchoTarget, s: &Settings) -> Result<Vec<Metric>, Error> {
    let echo = BaselineProcess::start(exe, Role::Echo, None).await?;
    let proxy = match BaselineProcess::start(exe, Role::Proxy, Some(&echo.url)).await {
        Ok(proxy) => proxy,
        Err(err) => {
            echo.stop().await;
            return Err(err);
        }
    };
    let result = async {
        let baseline =
            EchoTarget::connect(&proxy.url, None, "s-baseline", s.call_timeout()).await?;
        baseline.verify().await?;
        let (p50, tput) =
            paired::p50_and_throughput("routed vs 2-hop", routed, &baseline, s, s.concurrency)
                .await?;
        let mut metrics = Spread::of(&p50).metrics(
            ["p50_vs_2hop", "p50_vs_2hop_min", "p50_vs_2hop_max"],
            [
                "p50 / 2-hop p50, median of alternating rounds",
                "p50 / 2-hop p50, lowest round",
                "p50 / 2-hop p50, highest round",
            ],
        );
        metrics.extend(Spread::of(&tput).metrics(
            ["tput_vs_2hop", "tput_vs_2hop_min", "tput_vs_2hop_max"],
            [
                "throughput / 2-hop throughput, median of alternating rounds",
                "throughput / 2-hop throughput, lowest round",
                "throughput / 2-hop throughput, highest round",
            ],
        ));
        Ok(metrics)
    }
    .await;
    proxy.stop().await;
    echo.stop().await;
    result
}

/// Sequential latency and throughput of `target`, as metrics (same for every call phase).
pub(super) async fn measure_calls(
    phase: &str,
    target: &EchoTarget,
    s: &Settings,
) -> Result<Vec<Metric>, Error> {
    target.verify().await?;
    super::progress(&format!(
        "{phase}: {} sequential calls after {} warm-up",
        s.calls, s.warmup_calls
    ));
    let seq = load::sequential(phase, s.warmup_calls, s.calls, s.loop_cap(), || {
        target.call_once()
    })
    .await?;
    super::progress(&format!(
        "{phase}: {} calls in flight for {:.1} s",
        s.concurrency,
        s.throughput().as_secs_f64()
    ));
    let tput =
        load::throughput(target, s.concurrency, s.throughput_warmup(), s.throughput()).await?;
    Ok(vec![
        Metric::new("seq_p50_us", "sequential p50", seq.quantile_us(0.5), "us"),
        Metric::new("seq_p99_us", "sequential p99", seq.quantile_us(0.99), "us"),
        Metric::new("seq_mean_us", "sequential mean", seq.mean_us(), "us"),
        Metric::new(
            "seq_calls",
            "sequential calls",
            count_f64(seq.count()),
            "calls",
        ),
        Metric::new(
            "tput_calls_per_s",
            "throughput",
            tput.per_second(),
            "calls/s",
        ),
        Metric::new(
            "tput_calls",
            "throughput calls",
            count_f64(tput.calls),
            "calls",
        ),
        Metric::new(
            "loaded_p50_us",
            "p50 under load",
            tput.latencies.quantile_us(0.5),
            "us",
        ),
        Metric::new(
            "loaded_p99_us",
            "p99 under load",
            tput.latencies.quantile_us(0.99),
            "us",
        ),
    ])
}

/// A count as a metric value.
#[allow(clippy::cast_precision_loss)]
pub fn count_f64(n: u64) -> f64 {
    n as f64
}

/// KiB as a metric value.
pub fn kib_f64(kib: u64) -> f64 {
    count_f64(kib)
}
