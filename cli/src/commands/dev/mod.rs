//! `heistctl dev up|demo`: a local cluster of real processes.

pub mod demo;
pub mod up;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{cli::Context, error::Error};

/// Verbs of `dev`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Start a coordinator and N workers on loopback, log in, and run until Ctrl-C.
    Up(up::Args),
    /// Start a throwaway cluster and walk through workers, sessions and tools (`make demo`).
    Demo(demo::Args),
}

/// Runs a `dev` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Up(args) => up::run(ctx, args).await,
        Command::Demo(args) => demo::run(ctx, args).await,
    }
}

/// SIGINT and SIGTERM as one stream of "stop" requests.
pub(crate) struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    /// Installs the handlers (from now on Ctrl-C no longer kills heistctl at once).
    pub(crate) fn install() -> Result<Self, Error> {
        let install =
            |kind| signal(kind).map_err(|e| Error::io("cannot install a signal handler", e));
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
