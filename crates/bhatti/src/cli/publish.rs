//! `bhatti publish <sandbox> -p PORT [-a ALIAS]`: a public URL for a port.

use serde::Serialize;
use serde_json::Value;

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Port to publish (required)
    #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Custom alias (optional, auto-generated if omitted)
    #[arg(short, long)]
    pub alias: Option<String>,
    /// Also print a web terminal link (as `bhatti share`; replaces an earlier one)
    #[arg(long)]
    pub shell: bool,
}

#[derive(Debug, Serialize)]
struct PublishBody<'a> {
    port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    alias: Option<&'a str>,
}

pub async fn run(ctx: Ctx, args: PublishArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let body = PublishBody {
        port: args.port,
        alias: args.alias.as_deref(),
    };
    let mut rule: Value = ctx
        .client
        .post_json(
            &["sandboxes", name, "publish"],
            &body,
            Target::Sandbox(name),
        )
        .await?;
    let share = if args.shell {
        Some(super::share::mint(&ctx.client, name).await?)
    } else {
        None
    };
    if ctx.json {
        if let (Some(obj), Some(share)) = (rule.as_object_mut(), share) {
            obj.insert("share".into(), share);
        }
        output::print_json(&rule)?;
        return Ok(0);
    }
    let url = rule
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow::anyhow!("the server's answer has no url: {rule}"))?;
    output::println(url)?;
    if let Some(share) = &share {
        output::println(&format!("shell: {}", super::share::share_url(share)?))?;
    }
    Ok(0)
}
