//! `bhatti unpublish <sandbox> -p PORT`: removes a published port.

use serde_json::json;

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct UnpublishArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Port to unpublish (required)
    #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
}

pub async fn run(ctx: Ctx, args: UnpublishArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let port = args.port.to_string();
    ctx.client
        .delete(
            &["sandboxes", name, "publish", &port],
            Target::Sandbox(name),
        )
        .await?;
    if ctx.json {
        output::print_json(&json!({"sandbox": name, "port": args.port, "unpublished": true}))?;
    } else {
        output::println(&format!("unpublished port {port} of {name}"))?;
    }
    Ok(0)
}
