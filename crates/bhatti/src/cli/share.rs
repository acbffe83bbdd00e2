//! `bhatti share <sandbox> [--revoke]`: a link to the sandbox's terminal in
//! a browser, for someone without an API key.

use serde_json::{json, Value};

use super::client::{ApiClient, Target};
use super::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct ShareArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// End the share: the link stops working and open web terminals close
    #[arg(long)]
    pub revoke: bool,
}

pub async fn run(ctx: Ctx, args: ShareArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    if args.revoke {
        ctx.client
            .delete(&["sandboxes", name, "share"], Target::Sandbox(name))
            .await?;
        if ctx.json {
            output::print_json(&json!({"sandbox": name, "revoked": true}))?;
        } else {
            output::println(&format!(
                "share of {name} revoked; open web terminals are closed"
            ))?;
        }
        return Ok(0);
    }
    let share = mint(&ctx.client, name).await?;
    if ctx.json {
        output::print_json(&share)?;
    } else {
        output::println(share_url(&share)?)?;
    }
    Ok(0)
}

/// Mints a new share (the previous link stops working) and returns the
/// server's answer with `url` added: `<api>/_shell/<id>#token=…`.
pub async fn mint(client: &ApiClient, sandbox: &str) -> anyhow::Result<Value> {
    let mut share: Value = client
        .post_json(
            &["sandboxes", sandbox, "share"],
            &json!({}),
            Target::Sandbox(sandbox),
        )
        .await?;
    let path = share
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow::anyhow!("the server's answer has no path: {share}"))?;
    let url = format!("{}{path}", client.api_url().trim_end_matches('/'));
    if let Some(obj) = share.as_object_mut() {
        obj.insert("url".into(), Value::String(url));
    }
    Ok(share)
}

/// The `url` that [`mint`] added.
pub fn share_url(share: &Value) -> anyhow::Result<&str> {
    share
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow::anyhow!("no share URL in {share}"))
}
