//! `bhatti file ls <sandbox> <path>`: names, sizes and modes.

use reqwest::Method;

use crate::cli::client::Target;
use crate::cli::{output, Ctx};
use crate::model::FileEntry;

#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Directory inside the sandbox
    pub path: String,
}

pub async fn run(ctx: Ctx, args: LsArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let rb = ctx
        .client
        .request(Method::GET, &["sandboxes", name, "files"])
        .query(&[("path", args.path.as_str()), ("ls", "true")]);
    let resp = ctx.client.send(rb, Target::Sandbox(name)).await?;
    let entries: Vec<FileEntry> = ctx.client.decode(resp).await?;
    if ctx.json {
        output::print_json(&entries)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|f| {
            vec![
                f.mode.clone(),
                f.size.to_string(),
                output::unix_time(f.mtime),
                if f.is_dir {
                    format!("{}/", f.name)
                } else {
                    f.name.clone()
                },
            ]
        })
        .collect();
    output::print_table(&["MODE", "SIZE", "MODIFIED", "NAME"], &rows)?;
    Ok(0)
}
