//! `bhatti destroy` / `bhatti rm`: destroys a sandbox.

use serde_json::json;

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct DestroyArgs {
    /// Sandbox name or ID
    pub sandbox: String,
}

pub async fn run(ctx: Ctx, args: DestroyArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
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
