//! `bhatti completion <shell>`: prints a completion script.

use std::io;

use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// The shell to print the script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Writes the script to stdout, e.g. `bhatti completion bash > /etc/bash_completion.d/bhatti`.
pub fn run(args: CompletionArgs) -> anyhow::Result<i32> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "bhatti", &mut io::stdout());
    Ok(0)
}
