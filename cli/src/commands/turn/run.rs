//! `heistctl turn SESSION AGENT "message" [--request-id ID]`: starts a turn and streams its
//! events live. Ctrl-C detaches (the turn goes on) and says how to re-attach.

use heist_proto::v1::{self, turn_event::Event};

use crate::{
    cli::Context,
    commands::{
        session::create::new_request_id,
        turn::render::{Printer, exit_code},
    },
    error::{EXIT_INTERRUPTED, Error},
};

/// Flags of `turn`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session id.
    #[arg(required = true)]
    pub session: Option<String>,
    /// Agent name (see `heistctl agents ls`).
    #[arg(required = true)]
    pub agent: Option<String>,
    /// The message for the agent.
    #[arg(required = true)]
    pub message: Option<String>,
    /// Client request id: a retry with the same id attaches to the turn the first call
    /// started. A fresh UUID when not given.
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `turn`: exit 0 when the turn completed, 1 otherwise, 130 when detached by Ctrl-C.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let (Some(session), Some(agent), Some(message)) = (args.session, args.agent, args.message)
    else {
        return Err(Error::Usage(
            "usage: heistctl turn SESSION AGENT \"message\"".to_owned(),
        ));
    };
    let request_id = args.request_id.unwrap_or_else(new_request_id);
    let client = ctx.client().await?;
    let events = client
        .run_turn(&session, &agent, &message, &request_id)
        .await?;
    follow(ctx, events).await
}

/// Prints a turn's events until it finishes (exit code from its state) or Ctrl-C (130, with
/// the command that re-attaches on stderr).
pub async fn follow(
    ctx: &Context,
    mut events: tonic::Streaming<v1::TurnEvent>,
) -> Result<u8, Error> {
    let mut printer = Printer::new(ctx.format());
    let (mut turn, mut last, mut end) = (String::new(), 0, None);
    loop {
        let event = tokio::select! {
            event = events.message() => event?,
            _ = tokio::signal::ctrl_c() => {
                eprintln!(
                    "\ndetached: the turn goes on. Re-attach with `heistctl turn watch {turn} --from {}`",
                    last + 1
                );
                return Ok(EXIT_INTERRUPTED);
            }
        };
        let Some(event) = event else { break };
        turn.clone_from(&event.turn_id);
        last = event.seq;
        if let Some(Event::Finished(state)) = event.event {
            end = Some(state);
        }
        printer.print(&event)?;
    }
    Ok(exit_code(end))
}
