//! `bhatti file read|write|ls`: files inside a sandbox.

use clap::Subcommand;

use super::Ctx;

pub mod ls;
pub mod read;
pub mod write;

/// The server's cap on one file write: 100 MiB.
pub const MAX_WRITE_BYTES: u64 = 100 * 1024 * 1024;

#[derive(Debug, Subcommand)]
pub enum FileCommand {
    /// Print a file's raw bytes to stdout
    Read(read::ReadArgs),
    /// Write stdin (or --from FILE) to a file, atomically; at most 100 MiB
    Write(write::WriteArgs),
    /// List a directory: names, sizes and modes
    Ls(ls::LsArgs),
}

pub async fn run(ctx: Ctx, cmd: FileCommand) -> anyhow::Result<i32> {
    match cmd {
        FileCommand::Read(args) => read::run(ctx, args).await,
        FileCommand::Write(args) => write::run(ctx, args).await,
        FileCommand::Ls(args) => ls::run(ctx, args).await,
    }
}
