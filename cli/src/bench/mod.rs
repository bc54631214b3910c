//! `heistctl bench` (what `make bench` runs): measures the cluster against baselines measured in
//! the same run, so a regression or a win shows as a ratio rather than a noisy absolute number.
//!
//! - [`settings`]: how much each phase measures (`--quick` for smoke tests).
//! - [`phases`]: the [`phases::Phase`] trait, the [`phases::Lab`] phases share (the local
//!   cluster), and the tool-call phases; [`sessions`]: session latency and memory;
//!   [`diskpool`]: session latency with the disk pool against without it.
//! - [`baseline`]: the plain tonic echo server and forwarding proxy, run as child processes via
//!   the hidden `heistctl bench serve-baseline`.
//! - [`load`]: the client code every call phase uses (sequential latency, throughput).
//! - [`report`]: metrics, ratios, the targets; the table and the JSON.
//! - [`machine`]: CPU, kernel, and process memory from /proc.
//! - [`exec`]: sandboxed `exec true` through the cluster against a plain spawn of `true`.
//! - [`checkpoint`]: checkpoint capture and restore against `tar -cf` and `cp -a`.
//! - [`scaling`]: routed throughput with 1, 2 and 4 workers.
//! - [`mcp`]: MCP `tools/call` of `echo` (HTTP/1.1 and HTTP/2) against gRPC CallTool.
//! - [`audit`]: routed throughput with every executed call audited against none.
//!
//! Everything talks to 127.0.0.1 only; every loop stops at a count and at a time cap; children
//! are stopped at the end, on error and on Ctrl-C (a second Ctrl-C kills them at once).

pub mod audit;
pub mod baseline;
pub mod checkpoint;
pub mod churn;
pub mod diskpool;
pub mod exactly_once;
pub mod exec;
pub mod load;
pub mod machine;
pub mod mcp;
pub mod paired;
pub mod phases;
pub mod report;
pub mod scaling;
pub mod sessions;
pub mod settings;
pub mod telemetry;

use std::path::{Path, PathBuf};

use self::{
    machine::Machine,
    phases::{Lab, Phase},
    report::{PhaseReport, Report},
    settings::{Overrides, Settings},
};
use crate::{
    cli::Context,
    commands::dev::StopSignals,
    error::{EXIT_OK, Error},
    output,
};

/// Flags of `heistctl bench`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// Internal helpers (hidden).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Sequential calls recorded per target, after the warm-up [default: 5000; --quick: 200].
    #[arg(long, env = "HEIST_BENCH_CALLS")]
    pub calls: Option<u64>,
    /// Sequential warm-up calls per target [default: 500; --quick: 20].
    #[arg(long, env = "HEIST_BENCH_WARMUP")]
    pub warmup: Option<u64>,
    /// Seconds of the throughput measurement per target, after 1 s of warm-up [default: 5; --quick: 1].
    #[arg(long, env = "HEIST_BENCH_DURATION_S", value_name = "SECONDS")]
    pub duration_s: Option<u64>,
    /// Calls in flight during the throughput measurement [default: 64].
    #[arg(long, env = "HEIST_BENCH_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Sessions held open for the memory measurement [default: 1000; --quick: 20].
    #[arg(long, env = "HEIST_BENCH_SESSIONS")]
    pub sessions: Option<usize>,
    /// Session create+close pairs recorded [default: 300; --quick: 20].
    #[arg(long, env = "HEIST_BENCH_SESSION_ITERATIONS")]
    pub session_iterations: Option<u64>,
    /// Tiny counts: checks the harness works, numbers are rough.
    #[arg(long, env = "HEIST_BENCH_QUICK")]
    pub quick: bool,
    /// Also write every number as JSON to this file.
    #[arg(long, env = "HEIST_BENCH_JSON", value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Directory with the `coordinator` and `worker` binaries (default: next to heistctl, then PATH).
    #[arg(long, env = "HEIST_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Run only these phases (repeatable, e.g. `--phase checkpoint`) [default: all].
    #[arg(
        long = "phase",
        value_name = "NAME",
        env = "HEIST_BENCH_PHASES",
        value_delimiter = ','
    )]
    pub phases: Vec<String>,
    /// LOG_LEVEL of the cluster processes (logging costs time; keep it quiet).
    #[arg(long, env = "HEIST_BENCH_LOG_LEVEL", default_value = "warn")]
    pub cluster_log_level: String,
}

impl Args {
    fn overrides(&self) -> Overrides {
        Overrides {
            quick: self.quick,
            calls: self.calls,
            warmup: self.warmup,
            duration_s: self.duration_s,
            concurrency: self.concurrency,
            sessions: self.sessions,
            session_iterations: self.session_iterations,
        }
    }
}

/// Hidden verbs of `bench`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Internal: serve a baseline (echo or proxy) on 127.0.0.1:0 and print the address.
    #[command(hide = true)]
    ServeBaseline(baseline::ServeArgs),
}

/// Runs `heistctl bench`.
pub async fn run(_ctx: &Context, args: Args) -> Result<u8, Error> {
    if let Some(Command::ServeBaseline(serve)) = args.command {
        return baseline::serve(serve).await;
    }
    let settings = Settings::resolve(&args.overrides())?;
    let exe =
        std::env::current_exe().map_err(|e| Error::io("cannot find the heistctl executable", e))?;
    let machine = Machine::detect();
    progress(&format!("machine: {}", machine.summary()));
    if cfg!(debug_assertions) && !settings.quick {
        progress(
            "warning: this heistctl is a debug build; use `make bench` for numbers worth keeping",
        );
    }
    let mut signals = StopSignals::install()?;
    let mut lab = Lab::new(
        settings.clone(),
        exe,
        args.bin_dir.clone(),
        args.cluster_log_level.clone(),
    );
    let mut phases = phases::all();
    if !args.phases.is_empty() {
        let known: Vec<&str> = phases.iter().map(|p| p.name()).collect();
        if let Some(unknown) = args.phases.iter().find(|n| !known.contains(&n.as_str())) {
            return Err(Error::Usage(format!(
                "--phase {unknown:?} is not a phase: choose from {}",
                known.join(", ")
            )));
        }
        phases.retain(|p| args.phases.iter().any(|n| n == p.name()));
    }
    let outcome = tokio::select! {
        outcome = run_phases(&phases, &mut lab) => outcome,
        () = signals.recv() => Err(Error::Interrupted),
    };
    progress("stopping");
    // Keep the cluster logs when something failed (not when the user stopped the run).
    let keep_logs = matches!(&outcome, Err(err) if !matches!(err, Error::Interrupted));
    if let Some(dir) = lab.shutdown(keep_logs, signals.recv()).await? {
        eprintln!("cluster logs kept in {}", dir.display());
    }
    let report = Report::new(machine, settings, outcome?);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        progress(&format!("JSON written to {}", path.display()));
    }
    output::write_text(&mut std::io::stdout(), &report.render())?;
    Ok(EXIT_OK)
}

/// Runs each phase in order.
async fn run_phases(phases: &[Box<dyn Phase>], lab: &mut Lab) -> Result<Vec<PhaseReport>, Error> {
    let mut reports = Vec::with_capacity(phases.len());
    for phase in phases {
        progress(&format!("{}: {}", phase.name(), phase.title()));
        let metrics = phase.run(lab).await?;
        reports.push(PhaseReport {
            name: phase.name(),
            title: phase.title(),
            metrics,
        });
    }
    Ok(reports)
}

/// Writes the report as pretty JSON (creating the parent directory).
fn write_json(path: &Path, report: &Report) -> Result<(), Error> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
    }
    let text = serde_json::to_string_pretty(report)
        .map_err(|e| Error::io("cannot encode the report as JSON", std::io::Error::other(e)))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// A progress line on stderr (stdout is for the table).
pub(crate) fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// A benchmark step that did not go as expected.
pub(crate) fn failed(msg: impl Into<String>) -> Error {
    let msg = msg.into();
    Error::io("benchmark", std::io::Error::other(msg))
}
