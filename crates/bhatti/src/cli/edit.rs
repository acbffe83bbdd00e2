//! `bhatti edit SANDBOX [--name NEW] [--keep-hot | --allow-cold]
//! [--label K=V]... [--label-delete K]...`: renames, relabels, and sets
//! whether the sandbox may cool down when idle (warm, then cold).
//! `--keep-hot` wakes it at once.

use std::collections::BTreeMap;

use reqwest::Method;
use serde::Serialize;

use super::client::Target;
use super::{output, Ctx};
use crate::model::Sandbox;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("thermal").args(["keep_hot", "allow_cold"])))]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true)
    .args(["keep_hot", "allow_cold", "new_name", "labels", "labels_delete"])))]
pub struct EditArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Rename it
    #[arg(long = "name", value_name = "NEW")]
    pub new_name: Option<String>,
    /// Never pause or save it when idle (wakes it now if it is warm or cold)
    #[arg(long)]
    pub keep_hot: bool,
    /// Let it go warm and then cold when idle (the default)
    #[arg(long)]
    pub allow_cold: bool,
    /// Add or change a label KEY=VALUE (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = super::create::parse_label)]
    pub labels: Vec<(String, String)>,
    /// Remove the label KEY (repeatable)
    #[arg(long = "label-delete", value_name = "KEY")]
    pub labels_delete: Vec<String>,
}

/// `PATCH /sandboxes/{id}` as the CLI sends it.
#[derive(Debug, Serialize)]
struct PatchBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_hot: Option<bool>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    labels_delete: Vec<String>,
}

pub async fn run(ctx: Ctx, args: EditArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let body = PatchBody {
        name: args.new_name.clone(),
        keep_hot: match (args.keep_hot, args.allow_cold) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        labels: args.labels.into_iter().collect(),
        labels_delete: args.labels_delete,
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
        let labels: Vec<String> = sb.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        output::println(&format!(
            "sandbox {} is {what} (now {}); labels: {}",
            sb.name,
            sb.thermal.as_deref().unwrap_or(&sb.status),
            if labels.is_empty() {
                "none".to_string()
            } else {
                labels.join(",")
            }
        ))?;
    }
    Ok(0)
}
