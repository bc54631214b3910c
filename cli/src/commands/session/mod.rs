//! `heistctl session create|ls|show|close|fork`.

pub mod close;
pub mod create;
pub mod fork;
pub mod ls;
pub mod show;

use heist_proto::v1;

use crate::{
    cli::Context,
    error::Error,
    output::{self, Format, SessionView},
};

/// Verbs of `session`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a session on a worker chosen by labels, free capacity and load.
    #[command(alias = "new")]
    Create(create::Args),
    /// List your sessions, newest first.
    #[command(alias = "list")]
    Ls(ls::Args),
    /// Show one session.
    #[command(alias = "get")]
    Show(show::Args),
    /// Close a session and remove its workspace.
    Close(close::Args),
    /// Create a session from a checkpoint (on any worker).
    Fork(fork::Args),
}

/// Runs a `session` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Create(args) => create::run(ctx, args).await,
        Command::Ls(args) => ls::run(ctx, args).await,
        Command::Show(args) => show::run(ctx, args).await,
        Command::Close(args) => close::run(ctx, args).await,
        Command::Fork(args) => fork::run(ctx, args).await,
    }
}

/// Prints one session: JSON object or `key: value` lines.
pub fn print_one(format: Format, session: &v1::Session) -> Result<(), Error> {
    let view = SessionView::from(session);
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => output::write_json(&mut out, &view),
        Format::Table => output::write_text(&mut out, &output::session_details(&view)),
    }
}

/// Prints sessions: JSON array or a table.
pub fn print_many(format: Format, sessions: &[v1::Session]) -> Result<(), Error> {
    let views: Vec<SessionView> = sessions.iter().map(SessionView::from).collect();
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => output::write_json(&mut out, &views),
        Format::Table => output::write_text(&mut out, &output::sessions_table(&views)),
    }
}
