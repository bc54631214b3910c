//! `heistctl chat SESSION AGENT`: a conversation. Each line is a turn, whose events are
//! streamed; an empty line is skipped, end of input (Ctrl-D) ends the chat.
//!
//! On a terminal, lines are edited with a line editor whose history (up/down, Ctrl-R) is kept
//! across chats in `--history` (default `<state dir>/heist/chat_history`, at most
//! `--history-size` lines). Piped input is read line by line, with no history.

use std::{
    io::{BufRead as _, IsTerminal as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::PathBuf,
    sync::mpsc as sync_mpsc,
};

use rustyline::{Config, DefaultEditor, error::ReadlineError};
use tokio::sync::mpsc;

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
    /// History file [default: <state dir>/heist/chat_history, e.g. ~/.local/state/heist].
    #[arg(long, env = "HEIST_CHAT_HISTORY", value_name = "FILE")]
    pub history: Option<PathBuf>,
    /// Most lines kept in the history file.
    #[arg(long, env = "HEIST_CHAT_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,
}

/// Runs `chat` until end of input (or Ctrl-C during a turn, which detaches from it).
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let client = ctx.client().await?;
    let prompt = format!("{}> ", args.agent);
    let history = args.history.clone().or_else(default_history);
    let (mut lines, done) = spawn_reader(prompt, history, args.history_size);
    while let Some(line) = lines.recv().await {
        let message = line.trim();
        if !message.is_empty() {
            let events = client
                .run_turn(&args.session, &args.agent, message, &new_request_id())
                .await?;
            if follow(ctx, events).await? == EXIT_INTERRUPTED {
                return Ok(EXIT_INTERRUPTED);
            }
        }
        // The reader prompts for the next line only once the turn is over.
        if done.send(()).is_err() {
            break;
        }
    }
    eprintln!();
    Ok(EXIT_OK)
}

fn default_history() -> Option<PathBuf> {
    dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .map(|d| d.join("heist").join("chat_history"))
}

/// Reads lines on a thread of its own (reading blocks): one line, then it waits on the second
/// channel until that line's turn is over.
fn spawn_reader(
    prompt: String,
    history: Option<PathBuf>,
    history_size: usize,
) -> (mpsc::Receiver<String>, sync_mpsc::Sender<()>) {
    let (tx, rx) = mpsc::channel::<String>(1);
    let (done_tx, done_rx) = sync_mpsc::channel::<()>();
    std::thread::spawn(move || {
        let send = |line: String| tx.blocking_send(line).is_ok() && done_rx.recv().is_ok();
        if std::io::stdin().is_terminal() {
            match Editor::open(history, history_size) {
                Ok(mut editor) => {
                    while let Some(line) = editor.read(&prompt) {
                        if !send(line) {
                            break;
                        }
                    }
                    return;
                }
                Err(err) => eprintln!("chat: no line editing ({err}); reading plain lines"),
            }
        }
        let mut stdin = std::io::stdin().lock();
        loop {
            eprint!("{prompt}");
            let _ = std::io::stderr().flush();
            let mut line = String::new();
            match stdin.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if !send(line) => break,
                Ok(_) => {}
            }
        }
    });
    (rx, done_tx)
}

/// The line editor and where its history lives.
struct Editor {
    editor: DefaultEditor,
    history: Option<PathBuf>,
}

impl Editor {
    fn open(history: Option<PathBuf>, size: usize) -> rustyline::Result<Self> {
        let config = Config::builder()
            .max_history_size(size)?
            .auto_add_history(false)
            .build();
        let mut editor = DefaultEditor::with_config(config)?;
        if let Some(path) = &history {
            // A first chat has no history file yet.
            let _ = editor.load_history(path);
        }
        Ok(Self { editor, history })
    }

    /// The next line; `None` at Ctrl-D or Ctrl-C at the prompt.
    fn read(&mut self, prompt: &str) -> Option<String> {
        match self.editor.readline(prompt) {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = self.editor.add_history_entry(line.as_str());
                    self.save();
                }
                Some(line)
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => None,
            Err(err) => {
                eprintln!("chat: cannot read a line: {err}");
                None
            }
        }
    }

    fn save(&mut self) {
        let Some(path) = &self.history else { return };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // What was said stays the user's own: the file is created 0600.
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path);
        if let Err(err) = self.editor.save_history(path) {
            eprintln!("chat: cannot save the history to {}: {err}", path.display());
        }
    }
}
