//! Two one-worker clusters side by side that differ only in their environment ("on" and
//! "off"), loaded with routed `echo` in alternating rounds: on then off, then off then on, and so
//! on. A drift in the machine's speed hits both sides alike, and the result is the median of the
//! per-round on/off ratios, with their spread (lowest and highest). The telemetry and audit
//! phases measure their costs this way; [`order`] and [`Spread`] are the same rounds for any
//! two targets (the routed phase against the 2-hop baseline).

use std::path::{Path, PathBuf};

use super::{
    load::{self, EchoTarget, Target},
    phases::Lab,
    report::Metric,
};
use crate::{
    cluster::{LocalCluster, Options},
    error::Error,
};

/// Round pairs of a full run (`--quick`: 2).
const ROUNDS: usize = 5;

/// Rounds of a run of these settings.
pub fn rounds(s: &super::settings::Settings) -> usize {
    if s.quick { 2 } else { ROUNDS }
}

/// One of the two things measured in alternating rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The one measured first in even rounds.
    A,
    /// The other.
    B,
}

/// The order of `round`: A then B in even rounds, B then A in odd ones.
pub fn order(round: usize) -> [Which; 2] {
    if round.is_multiple_of(2) {
        [Which::A, Which::B]
    } else {
        [Which::B, Which::A]
    }
}

/// The median of per-round ratios and their spread.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The lowest round.
    pub min: f64,
    /// The highest round.
    pub max: f64,
}

impl Spread {
    /// Of `ratios` (NaN for none).
    pub fn of(ratios: &[f64]) -> Self {
        let mut sorted = ratios.to_vec();
        Self {
            median: median(&mut sorted),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// The median, lowest and highest round as ratio metrics, named and labelled in that
    /// order.
    pub fn metrics(&self, names: [&'static str; 3], labels: [&'static str; 3]) -> Vec<Metric> {
        [self.median, self.min, self.max]
            .into_iter()
            .zip(names.into_iter().zip(labels))
            .map(|(value, (name, label))| Metric::new(name, label, value, "x"))
            .collect()
    }
}

/// One side: its cluster, data directory and a session to call `echo` in.
pub struct Side {
    /// The running cluster.
    pub cluster: LocalCluster,
    data_dir: PathBuf,
    target: EchoTarget,
}

/// The two sides.
pub struct Pair {
    /// The side whose cost is measured.
    pub on: Side,
    /// The baseline.
    pub off: Side,
}

/// An environment variable of a side's processes.
pub fn env(key: &str, value: &str) -> (String, String) {
    (key.to_owned(), value.to_owned())
}

impl Pair {
    /// Starts both sides (`phase` names their data directories) with a verified `echo` session
    /// each; on failure, whatever was started is stopped again.
    pub async fn start(
        lab: &Lab,
        phase: &str,
        on: Vec<(String, String)>,
        off: Vec<(String, String)>,
    ) -> Result<Self, Error> {
        let on = Side::start(lab, &format!("{phase}-on"), on).await?;
        match Side::start(lab, &format!("{phase}-off"), off).await {
            Ok(off) => Ok(Self { on, off }),
            Err(err) => {
                on.stop().await?;
                Err(err)
            }
        }
    }

    /// Stops both sides and removes their data directories.
    pub async fn stop(self) -> Result<(), Error> {
        let on = self.on.stop().await;
        self.off.stop().await?;
        on
    }

    /// Runs the rounds; `after_round` runs after each (a scrape of the "on" side, say).
    pub async fn alternate(
        &self,
        lab: &Lab,
        phase: &str,
        mut after_round: impl AsyncFnMut(&Self) -> Result<(), Error>,
    ) -> Result<Rounds, Error> {
        let s = &lab.settings;
        let mut out = Rounds::default();
        let rounds = rounds(s);
        for round in 0..rounds {
            super::progress(&format!(
                "{phase}: round {}/{rounds}, {} calls in flight for {:.1} s per side",
                round + 1,
                s.concurrency,
                s.throughput().as_secs_f64()
            ));
            let (mut on, mut off) = (None, None);
            for which in order(round) {
                let (side, slot) = match which {
                    Which::A => (&self.on, &mut on),
                    Which::B => (&self.off, &mut off),
                };
                let cpu_before = side.cluster.cpu_seconds();
                let measured = load::throughput(
                    &side.target,
                    s.concurrency,
                    s.throughput_warmup(),
                    s.throughput(),
                )
                .await?;
                // CPU per call of the side's own processes (warm-up included in the CPU, so
                // counted against the calls of warm-up and window together).
                let cpu = cpu_before
                    .zip(side.cluster.cpu_seconds())
                    .map(|(before, after)| (after - before, measured.all_calls));
                *slot = Some((measured, cpu));
            }
            after_round(self).await?;
            let (Some((on, on_cpu)), Some((off, off_cpu))) = (on, off) else {
                unreachable!("order() names both sides");
            };
            if let (Some(on_cpu), Some(off_cpu)) = (per_call(on_cpu), per_call(off_cpu)) {
                out.cpu_ratios.push(on_cpu / off_cpu);
                out.on_cpu_us.push(on_cpu * 1e6);
                out.off_cpu_us.push(off_cpu * 1e6);
            }
            out.on_calls += on.calls;
            out.on_rates.push(on.per_second());
            out.off_rates.push(off.per_second());
            out.ratios.push(on.per_second() / off.per_second());
        }
        Ok(out)
    }
}

/// Sequential p50 and throughput (`in_flight` calls at once) of `a` against `b` in alternating
/// rounds: each round measures both on one target, then on the other (the order flips every
/// round). Returns the per-round ratios a/b of p50 and of throughput.
pub async fn p50_and_throughput<A: Target, B: Target>(
    what: &str,
    a: &A,
    b: &B,
    s: &super::settings::Settings,
    in_flight: usize,
) -> Result<(Vec<f64>, Vec<f64>), Error> {
    let rounds = rounds(s);
    let calls = (s.calls / u64::try_from(rounds).unwrap_or(1)).max(20);
    let (mut p50, mut tput) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        super::progress(&format!(
            "{what}: round {}/{rounds}, {calls} sequential calls and {:.1} s of {in_flight} in \
             flight per side",
            round + 1,
            s.throughput().as_secs_f64(),
        ));
        // (p50 in us, calls/s) of a and of b.
        let mut measured = [(0.0, 0.0); 2];
        for which in order(round) {
            match which {
                Which::A => measured[0] = p50_and_rate(what, a, calls, s, in_flight).await?,
                Which::B => measured[1] = p50_and_rate(what, b, calls, s, in_flight).await?,
            }
        }
        let [(a_p50, a_rate), (b_p50, b_rate)] = measured;
        p50.push(a_p50 / b_p50);
        tput.push(a_rate / b_rate);
    }
    Ok((p50, tput))
}

/// Sequential p50 (us) of `calls` calls, then calls/s with `in_flight` calls at once.
async fn p50_and_rate<T: Target>(
    what: &str,
    target: &T,
    calls: u64,
    s: &super::settings::Settings,
    in_flight: usize,
) -> Result<(f64, f64), Error> {
    let seq = load::sequential(what, s.warmup_calls.min(calls), calls, s.loop_cap(), || {
        target.call_once()
    })
    .await?;
    let rate = load::throughput(target, in_flight, s.throughput_warmup(), s.throughput()).await?;
    Ok((seq.quantile_us(0.5), rate.per_second()))
}

/// Starts a one-worker cluster of a phase's own (`name` names its data directory) with `env`
/// for its processes; [`stop_cluster`] stops it and removes the directory.
pub async fn start_cluster(
    lab: &Lab,
    name: &str,
    env: Vec<(String, String)>,
) -> Result<(LocalCluster, PathBuf), Error> {
    let data_dir = std::env::temp_dir().join(format!(
        "heist-bench-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let cluster = LocalCluster::start(Options {
        workers: 1,
        port: 0,
        data_dir: Some(data_dir.clone()),
        max_sessions: Some(lab.settings.worker_max_sessions()),
        bin_dir: lab.bin_dir.clone(),
        log_level: lab.cluster_log_level.clone(),
        call_timeout: lab.settings.call_timeout(),
        env,
        ..Options::default()
    })
    .await?;
    Ok((cluster, data_dir))
}

/// Stops a cluster [`start_cluster`] started and removes its data directory.
pub async fn stop_cluster(cluster: LocalCluster, data_dir: &Path) -> Result<(), Error> {
    cluster.stop().await?;
    if let Err(err) = std::fs::remove_dir_all(data_dir) {
        tracing::warn!(%err, dir = %data_dir.display(), "cannot remove the bench data directory");
    }
    Ok(())
}

/// A fresh session on `cluster` and a verified `echo` target in it, with the session's id.
pub async fn echo_target(
    cluster: &LocalCluster,
    call_timeout: std::time::Duration,
) -> Result<(EchoTarget, String), Error> {
    let client = cluster.client().await?;
    let session = client
        .create_session(Default::default(), &uuid::Uuid::new_v4().to_string())
        .await?;
    let target = EchoTarget::connect(
        cluster.coordinator_url(),
        Some(cluster.access_token()),
        &session.id,
        call_timeout,
    )
    .await?;
    target.verify().await?;
    Ok((target, session.id))
}

impl Side {
    async fn start(lab: &Lab, name: &str, env: Vec<(String, String)>) -> Result<Self, Error> {
        let (cluster, data_dir) = start_cluster(lab, name, env).await?;
        let target = match echo_target(&cluster, lab.settings.call_timeout()).await {
            Ok((target, _)) => target,
            Err(err) => {
                cluster.stop().await?;
                return Err(err);
            }
        };
        Ok(Self {
            cluster,
            data_dir,
            target,
        })
    }

    async fn stop(self) -> Result<(), Error> {
        stop_cluster(self.cluster, &self.data_dir).await
    }
}

/// CPU seconds per call of a (CPU seconds, calls) measurement, when both were counted (CPU
/// time moves in clock ticks).
fn per_call(cpu: Option<(f64, u64)>) -> Option<f64> {
    cpu.filter(|&(seconds, calls)| seconds > 0.0 && calls > 0)
        .map(|(seconds, calls)| seconds / calls as f64)
}

/// What the rounds measured.
#[derive(Debug, Default)]
pub struct Rounds {
    /// Calls/s of the "on" side, one per round.
    pub on_rates: Vec<f64>,
    /// Calls/s of the "off" side, one per round.
    pub off_rates: Vec<f64>,
    /// on/off of each round.
    pub ratios: Vec<f64>,
    /// Calls the "on" side answered in its measured windows.
    pub on_calls: u64,
    /// CPU µs per call of each side's processes (coordinator and workers), one per round: a
    /// cost that another process's load on the same CPUs does not change.
    pub on_cpu_us: Vec<f64>,
    /// The same for the "off" side.
    pub off_cpu_us: Vec<f64>,
    /// on/off CPU per call of each round.
    pub cpu_ratios: Vec<f64>,
}

impl Rounds {
    /// The medians `on_calls_per_s` and `off_calls_per_s`, labelled with what each side is,
    /// and `on_vs_off` (the median of the per-round ratios) with its spread.
    pub fn metrics(&mut self, on: &'static str, off: &'static str) -> Vec<Metric> {
        let mut metrics = vec![
            Metric::new("on_calls_per_s", on, median(&mut self.on_rates), "calls/s"),
            Metric::new(
                "off_calls_per_s",
                off,
                median(&mut self.off_rates),
                "calls/s",
            ),
        ];
        metrics.extend(Spread::of(&self.ratios).metrics(
            ["on_vs_off", "on_vs_off_min", "on_vs_off_max"],
            [
                "on / off, median of per-round ratios",
                "on / off, lowest round",
                "on / off, highest round",
            ],
        ));
        if !self.cpu_ratios.is_empty() {
            metrics.push(Metric::new(
                "on_cpu_us_per_call",
                "CPU per call, on (coordinator + workers), median",
                median(&mut self.on_cpu_us),
                "us",
            ));
            metrics.push(Metric::new(
                "off_cpu_us_per_call",
                "CPU per call, off (coordinator + workers), median",
                median(&mut self.off_cpu_us),
                "us",
            ));
            metrics.push(Metric::new(
                "on_vs_off_cpu_per_call",
                "on / off CPU per call, median of per-round ratios",
                median(&mut self.cpu_ratios),
                "x",
            ));
        }
        metrics
    }
}

/// The median (NaN for none).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}
