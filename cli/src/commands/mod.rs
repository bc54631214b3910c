//! One module per noun, one file per verb (`commands/<noun>/<verb>.rs`). Every verb takes the
//! [`Context`] and its own flags, prints data on stdout, and returns the exit code to use on
//! success (0, or 6 for a tool result with `is_error`).

pub mod admin;
pub mod agents;
pub mod audit;
pub mod chat;
pub mod checkpoint;
pub mod completions;
pub mod dev;
pub mod exec;
pub mod heist;
pub mod login;
pub mod logout;
pub mod mcp;
pub mod run_python;
pub mod session;
pub mod tool;
pub mod transcript;
pub mod turn;
pub mod workers;

use crate::{
    cli::{Cli, Command, Context},
    error::Error,
};

/// Runs the command line; returns the exit code.
pub async fn run(cli: Cli) -> Result<u8, Error> {
    let ctx = Context::new(cli.global);
    match cli.command {
        Command::Login(args) => login::run(&ctx, args).await,
        Command::Logout(args) => logout::run(&ctx, args),
        Command::Workers(cmd) => workers::run(&ctx, cmd).await,
        Command::Admin(cmd) => admin::run(&ctx, cmd).await,
        Command::Audit(cmd) => audit::run(&ctx, cmd).await,
        Command::Session(cmd) => session::run(&ctx, cmd).await,
        Command::Tool(cmd) => tool::run(&ctx, cmd).await,
        Command::Checkpoint(cmd) => checkpoint::run(&ctx, cmd).await,
        Command::Agents(cmd) => agents::run(&ctx, cmd).await,
        Command::Turn(args) => turn::run(&ctx, args).await,
        Command::Transcript(args) => transcript::run(&ctx, args).await,
        Command::Chat(args) => chat::run(&ctx, args).await,
        Command::Heist(cmd) => heist::run(&ctx, cmd).await,
        Command::Exec(args) => exec::run(&ctx, args).await,
        Command::RunPython(args) => run_python::run(&ctx, args).await,
        Command::Completions(args) => completions::run(args),
        Command::Dev(cmd) => dev::run(&ctx, cmd).await,
        Command::Bench(args) => crate::bench::run(&ctx, args).await,
        Command::Mcp(args) => mcp::run(&ctx, args).await,
    }
}
