//! `heistctl chat SESSION AGENT`: a conversation. Each line read from stdin is a turn, whose
//! events are streamed; an empty line is skipped, end of input ends the chat.

use std::io::{BufRead as _, Write as _};

use crate::{
    cli::Context,
    commands::{session::create::new_request_id, turn::run::follow},
    error::{EXIT_INTERRUPTED, EXIT_OK, Error},
};

/// Flags of `chat`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session id.
    pub session: String,
    /// Agent name (see `heistctl agents ls`).
    pub agent: String,
}

/// Runs `chat` until end of input (or Ctrl-C during a turn, which detaches from it).
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let client = ctx.client().await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
    // Lines are read on a thread of their own: stdin blocks.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    loop {
        eprint!("{}> ", args.agent);
        let _ = std::io::stderr().flush();
        let Some(line) = rx.recv().await else {
            eprintln!();
            return Ok(EXIT_OK);
        };
        let message = line.trim();
        if message.is_empty() {
            continue;
        }
        let events = client
            .run_turn(&args.session, &args.agent, message, &new_request_id())
            .await?;
        if follow(ctx, events).await? == EXIT_INTERRUPTED {
            return Ok(EXIT_INTERRUPTED);
        }
    }
}
