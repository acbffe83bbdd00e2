//! Command-line interface: one file per command.
//!
//! `Cli` is parsed in main.rs; each subcommand's work lives in its own file.

use clap::{Parser, Subcommand};

pub mod image;

/// bhatti: self-hosted microVM sandboxes.
#[derive(Debug, Parser)]
#[command(name = "bhatti", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build or inspect the guest images (kernel, initramfs, rootfs).
    #[command(subcommand)]
    Image(image::ImageCommand),
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Image(cmd) => image::run(cmd),
    }
}
