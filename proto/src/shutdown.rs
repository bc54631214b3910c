//! Graceful shutdown for every binary: the first SIGTERM or SIGINT starts it, a second one exits
//! the process at once (status 130).

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// A future that resolves on the first SIGTERM or SIGINT. Install it before serving, so a signal
/// arriving during start-up is not lost.
pub fn on_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(
            signal = name,
            "shutting down gracefully (send the signal again to exit now)"
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            warn!("second signal: exiting now");
            std::process::exit(130);
        });
    })
}
