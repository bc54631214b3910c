//! `heistctl completions SHELL`: a completion script on stdout.

use clap::CommandFactory;
use clap_complete::Shell;

use crate::{cli::Cli, error::Error};

/// Flags of `completions`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Shell to generate for (bash, zsh, fish, elvish, powershell).
    pub shell: Shell,
}

/// Prints the script, e.g. `heistctl completions bash > ~/.local/share/bash-completion/completions/heistctl`.
pub fn run(args: Args) -> Result<u8, Error> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "heistctl", &mut std::io::stdout());
    Ok(crate::error::EXIT_OK)
}
