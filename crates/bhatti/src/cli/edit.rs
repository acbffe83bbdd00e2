//! `bhatti edit SANDBOX --keep-hot | --allow-cold`: whether the sandbox may
//! cool down when idle (warm, then cold). `--keep-hot` wakes it at once.

use reqwest::Method;
use serde::Serialize;

use super::client::Target;
use super::{output, Ctx};
use crate::api::types::Sandbox;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("thermal").required(true).args(["keep_hot", "allow_cold"])))]
pub struct EditArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Never pause or save it when idle (wakes it now if it is warm or cold)
    #[arg(long)]
    pub keep_hot: bool,
    /// Let it go warm and then cold when idle (the default)
    #[arg(long)]
    pub allow_cold: bool,
}

/// `PATCH /sandboxes/{id}` as the CLI sends it.
#[derive(Debug, Serialize)]
struct PatchBody {
    keep_hot: bool,
}

pub async fn run(ctx: Ctx, args: EditArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let body = PatchBody {
        keep_hot: args.keep_hot,
    };
    let rb = ctx
        .client
        .request(Method::PATCH, &["sandboxes", name])
        .json(&body);
    let resp = ctx.client.send(rb, Target::Sandbox(name)).await?;
    let sb: Sandbox = ctx.client.decode(resp).await?;
    if ctx.json {
        output::print_json(&sb)?;
    } else {
        let what = if sb.keep_hot {
            "kept hot"
        } else {
            "allowed to cool when idle"
        };
        output::println(&format!(
            "sandbox {} is {what} (now {})",
            sb.name,
            sb.thermal.as_deref().unwrap_or(&sb.status)
        ))?;
    }
    Ok(0)
}
