//! An elapsed-time line on stderr while a long call (capture, restore, fork) runs. On a
//! terminal it is redrawn in place with a spinner; otherwise nothing is printed until the end.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

/// How often the line is redrawn.
const TICK: Duration = Duration::from_millis(100);
const SPINNER: [char; 4] = ['|', '/', '-', '\\'];

/// A running progress line.
pub struct Progress {
    started: Instant,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `what` (e.g. "capturing s-...") with the elapsed time.
    pub fn start(what: String) -> Self {
        let started = Instant::now();
        let ticker = std::io::stderr().is_terminal().then(|| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(TICK);
                let mut n = 0usize;
                loop {
                    tick.tick().await;
                    let spin = SPINNER[n % SPINNER.len()];
                    n += 1;
                    let mut err = std::io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r{spin} {what} {:.1} s ",
                        started.elapsed().as_secs_f64()
                    );
                    let _ = err.flush();
                }
            })
        });
        Self { started, ticker }
    }

    /// Stops the line and prints `summary` with the elapsed time on stderr.
    pub fn finish(self, summary: &str) {
        let elapsed = self.started.elapsed();
        self.clear();
        eprintln!("{summary} in {:.2} s", elapsed.as_secs_f64());
    }

    /// Stops the line without a summary (the call failed; the error is printed elsewhere).
    pub fn abandon(self) {
        self.clear();
    }

    fn clear(&self) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}
