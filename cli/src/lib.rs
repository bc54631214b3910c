//! heistctl: the heist command-line client, as a library so tests and other tools can reuse
//! its pieces (the local-cluster launcher above all).
//!
//! - [`cli`]: global flags, the noun/verb tree, and the [`cli::Context`] verbs run with.
//! - [`commands`]: one module per noun, one file per verb (`commands/<noun>/<verb>.rs`).
//! - [`client`]: a typed client for the coordinator's public API (token, deadline, retries).
//! - [`credentials`]: the per-coordinator token cache (mode 0600, atomic writes).
//! - [`output`]: the stable JSON views and the tables.
//! - [`cluster`]: [`cluster::LocalCluster`], a coordinator and N workers as child processes.
//! - [`error`]: the error type and the exit codes scripts can rely on.
//! - [`mcp`]: a client for the coordinator's `/mcp` endpoint (`heistctl mcp`, the bench).

pub mod bench;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod credentials;
pub mod error;
pub mod mcp;
pub mod output;

use std::process::ExitCode;

use clap::Parser;

/// Parses the command line, runs it, reports any error on stderr, and returns the exit code.
pub async fn main_entry() -> ExitCode {
    let cli = cli::Cli::parse();
    if let Err(err) = heist_proto::logging::init(&cli.global.log_level, &cli.global.log_format) {
        eprintln!("error: {err}");
        return ExitCode::from(error::EXIT_USAGE);
    }
    if cli.global.verbose
        && let Some(id) = heist_proto::trace::traceparent_trace_id(client::traceparent())
    {
        eprintln!("trace_id: {id}");
    }
    match commands::run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprint!("{}", err.report());
            ExitCode::from(err.exit_code())
        }
    }
}
