//! `bhatti ports <sandbox>`: TCP ports listening inside a sandbox, with the
//! authenticated proxy URL that reaches each.

use crate::model::ListeningPort;

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct PortsArgs {
    /// Sandbox name or ID
    pub sandbox: String,
}

pub async fn run(ctx: Ctx, args: PortsArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let ports: Vec<ListeningPort> = ctx
        .client
        .get_json(&["sandboxes", name, "ports"], Target::Sandbox(name))
        .await?;
    if ctx.json {
        output::print_json(&ports)?;
        return Ok(0);
    }
    if ports.is_empty() {
        eprintln!("no listening ports in {name}");
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            vec![
                p.port.to_string(),
                p.address.clone(),
                p.proxy_url.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::print_table(&["PORT", "ADDRESS", "PROXY URL"], &rows)?;
    Ok(0)
}
