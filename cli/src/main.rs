//! `heistctl`: parses flags and runs the command (see the `heistctl` library).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    heistctl::main_entry().await
}
