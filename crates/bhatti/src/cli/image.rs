//! `bhatti image build`.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the guest images if missing or out of date.
    Build,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<i32> {
    match cmd {
        ImageCommand::Build => anyhow::bail!("image build is not implemented yet"),
    }
}
