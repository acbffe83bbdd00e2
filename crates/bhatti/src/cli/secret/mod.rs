//! `bhatti secret set|list|delete`: your secrets (values are never shown).

use clap::Subcommand;

use super::Ctx;

pub mod delete;
pub mod list;
pub mod set;

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Create or replace a secret (the value is read from stdin when omitted)
    Set(set::SetArgs),
    /// List your secrets' names (never their values)
    #[command(visible_alias = "ls")]
    List,
    /// Delete a secret
    #[command(visible_alias = "rm")]
    Delete(delete::DeleteArgs),
}

pub async fn run(ctx: Ctx, cmd: SecretCommand) -> anyhow::Result<i32> {
    match cmd {
        SecretCommand::Set(args) => set::run(ctx, args).await,
        SecretCommand::List => list::run(ctx).await,
        SecretCommand::Delete(args) => delete::run(ctx, args).await,
    }
}
