//! `bhatti stop` / `bhatti start`: save a sandbox to disk (its RAM is freed)
//! and restore it. Any command that touches a stopped sandbox also wakes it.

use super::client::Target;
use super::{output, Ctx};
use crate::model::Sandbox;

#[derive(Debug, clap::Args)]
pub struct ThermalArgs {
    /// Sandbox name or ID
    pub sandbox: String,
}

/// Which way to move the sandbox.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Stop,
    Start,
}

pub async fn run(ctx: Ctx, args: ThermalArgs, action: Action) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let verb = match action {
        Action::Stop => "stop",
        Action::Start => "start",
    };
    let sb: Sandbox = ctx
        .client
        .post_json(
            &["sandboxes", name, verb],
            &serde_json::json!({}),
            Target::Sandbox(name),
        )
        .await?;
    if ctx.json {
        output::print_json(&sb)?;
    } else {
        output::println(&format!("sandbox {} is {}", sb.name, sb.status))?;
    }
    Ok(0)
}
