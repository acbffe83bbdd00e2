//! `bhatti user …`: operator commands that work directly on the local
//! database (no daemon needed; safe while it runs thanks to WAL and the
//! busy timeout).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::config::DaemonConfig;
use crate::store::Store;

pub mod create;
pub mod delete;
pub mod list;
pub mod rotate_key;

/// Where the database is: `--data-dir`, else the daemon config's `data_dir`.
#[derive(Debug, Args)]
pub struct UserArgs {
    /// Data directory holding state.db [default: data_dir of the daemon
    /// config, /var/lib/bhatti]
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        conflicts_with = "user_config"
    )]
    pub data_dir: Option<PathBuf>,
    /// Daemon config file to read data_dir from [default: $BHATTI_CONFIG,
    /// /var/lib/bhatti/config.yaml]
    #[arg(
        long = "config",
        id = "user_config",
        global = true,
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: UserCommand,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user and print its API key (shown once).
    Create(create::CreateArgs),
    /// List users with their limits and sandbox counts.
    #[command(visible_alias = "ls")]
    List,
    /// Replace a user's API key; the old key stops working immediately.
    RotateKey(rotate_key::RotateKeyArgs),
    /// Delete a user (refused while the user has sandboxes).
    #[command(visible_alias = "rm")]
    Delete(delete::DeleteArgs),
}

impl UserArgs {
    /// The data dir: `--data-dir`, else `data_dir` from the daemon config
    /// (`--config` > `$BHATTI_CONFIG` > /var/lib/bhatti/config.yaml, whose
    /// absence means the default /var/lib/bhatti).
    pub fn data_dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(dir) = &self.data_dir {
            return Ok(dir.clone());
        }
        Ok(DaemonConfig::load(self.config.as_deref())?.config.data_dir)
    }
}

/// Runs `bhatti user …`; returns the exit code.
pub fn run(args: UserArgs, json: bool) -> anyhow::Result<i32> {
    let data_dir = args.data_dir()?;
    match args.command {
        // Creating the first user may create the database.
        UserCommand::Create(a) => create::run(&Store::open(&data_dir)?, a, json),
        UserCommand::List => list::run(&Store::open_existing(&data_dir)?, json),
        UserCommand::RotateKey(a) => rotate_key::run(&Store::open_existing(&data_dir)?, a, json),
        UserCommand::Delete(a) => delete::run(&Store::open_existing(&data_dir)?, a, json),
    }
}
