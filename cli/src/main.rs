//! `heistctl`: parses flags and runs the command (see the `heistctl` library).

use std::process::ExitCode;

/// The allocator: a gRPC server makes many small allocations per call, which mimalloc serves
/// with less work than the system's (docs/BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    heistctl::main_entry().await
}
