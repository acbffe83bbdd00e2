//! `bhatti snapshot create|list|delete|resume`: named snapshots of a
//! sandbox's memory and disk, and new sandboxes resumed from them.

use clap::Subcommand;
use serde::Serialize;

use crate::model::{Sandbox, Snapshot};

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a sandbox's memory and disk (a running sandbox runs on after a short pause)
    Create(CreateArgs),
    /// List your snapshots with their sizes
    #[command(visible_alias = "ls")]
    List,
    /// Delete a snapshot (sandboxes resumed from it keep working)
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    /// Start a new sandbox from a snapshot
    Resume(ResumeArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Sandbox name or id
    pub sandbox: String,
    /// Snapshot name
    #[arg(long)]
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Snapshot name or id
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// Snapshot name or id
    pub snapshot: String,
    /// Name of the new sandbox
    #[arg(long)]
    pub name: String,
}

#[derive(Serialize)]
struct NameBody<'a> {
    name: &'a str,
}

pub async fn run(ctx: Ctx, cmd: SnapshotCommand) -> anyhow::Result<i32> {
    match cmd {
        SnapshotCommand::Create(a) => {
            let s: Snapshot = ctx
                .client
                .post_json(
                    &["sandboxes", &a.sandbox, "checkpoint"],
                    &NameBody { name: &a.name },
                    Target::Sandbox(&a.sandbox),
                )
                .await?;
            if ctx.json {
                output::print_json(&s)?;
            } else {
                output::println(&format!(
                    "snapshot {} of {} taken ({})",
                    s.name,
                    s.sandbox,
                    output::human_size(s.size_bytes)
                ))?;
            }
        }
        SnapshotCommand::List => {
            let list: Vec<Snapshot> = ctx.client.get_json(&["snapshots"], Target::None).await?;
            if ctx.json {
                output::print_json(&list)?;
                return Ok(0);
            }
            if list.is_empty() {
                eprintln!(
                    "no snapshots; take one with `bhatti snapshot create SANDBOX --name NAME`"
                );
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.sandbox.clone(),
                        format!("{} MB", s.memory_mb),
                        output::human_size(s.size_bytes),
                        output::rfc3339(&s.created_at),
                    ]
                })
                .collect();
            output::print_table(&["NAME", "FROM", "MEMORY", "SIZE", "CREATED"], &rows)?;
        }
        SnapshotCommand::Delete(a) => {
            ctx.client
                .delete(&["snapshots", &a.name], Target::None)
                .await?;
            if !ctx.json {
                output::println(&format!("snapshot {} deleted", a.name))?;
            }
        }
        SnapshotCommand::Resume(a) => {
            let rb = ctx
                .client
                .request(reqwest::Method::POST, &["snapshots", &a.snapshot, "resume"])
                .json(&NameBody { name: &a.name });
            let resp = ctx.client.send(rb, Target::None).await?;
            // The daemon answers 200 with this header when the name is taken.
            let existed = resp.headers().contains_key("x-bhatti-existed");
            let sb: Sandbox = ctx.client.decode(resp).await?;
            if ctx.json {
                output::print_json(&sb)?;
            }
            if existed {
                // Not what was asked for: fail, as a fork onto a taken name does.
                eprintln!(
                    "error: sandbox {} already exists; nothing was created (it is {}; it was not resumed from snapshot {}). Destroy it first or pick another name",
                    sb.name, sb.status, a.snapshot
                );
                return Ok(1);
            } else if !ctx.json {
                output::println(&format!(
                    "created sandbox {} from snapshot {} (id {}, ip {})",
                    sb.name, a.snapshot, sb.id, sb.ip
                ))?;
            }
        }
    }
    Ok(0)
}
