//! `bhatti destroy` / `bhatti rm`: destroys a sandbox.
//!
//! On a terminal it asks first (unless `-y`); without a terminal (scripts,
//! pipes) it proceeds, as it always has.

use std::io::IsTerminal;

use serde_json::json;

use super::client::Target;
use super::{output, terminal, Ctx};

#[derive(Debug, clap::Args)]
pub struct DestroyArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Do not ask for confirmation
    #[arg(short = 'y', long = "yes")]
    pub yes: bool,
}

pub async fn run(ctx: Ctx, args: DestroyArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    if !args.yes && std::io::stdin().is_terminal() {
        let answer = terminal::prompt_line(&format!(
            "destroy sandbox {name}? Its VM, disk and sessions are gone for good [y/N] "
        ))?;
        if !matches!(answer.as_deref(), Some("y" | "Y" | "yes")) {
            eprintln!("not destroyed");
            return Ok(1);
        }
    }
    ctx.client
        .delete(&["sandboxes", name], Target::Sandbox(name))
        .await?;
    if ctx.json {
        output::print_json(&json!({"destroyed": name}))?;
    } else {
        output::println(&format!("destroyed sandbox {name}"))?;
    }
    Ok(0)
}
