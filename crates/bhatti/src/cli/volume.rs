//! `bhatti volume create|list|delete|resize`: persistent volumes, attached
//! with `bhatti create --volume NAME:/mount[:ro]`.

use clap::Subcommand;
use serde::Serialize;

use crate::model::volumes::Volume;

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create an empty volume (ext4, owned by the sandbox user)
    Create(CreateArgs),
    /// List your volumes and where they are attached
    #[command(visible_alias = "ls")]
    List,
    /// Delete a volume and its data (refused while a sandbox has it)
    #[command(visible_alias = "rm")]
    Delete(NameArg),
    /// Grow a volume and its filesystem (also while attached read-write)
    Resize(ResizeArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Volume name (must match [a-zA-Z0-9][a-zA-Z0-9._-]{0,62})
    #[arg(long)]
    pub name: String,
    /// Size in MB (counts against your storage quota)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub size: u64,
}

#[derive(Debug, clap::Args)]
pub struct NameArg {
    /// Volume name or id
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    /// Volume name or id
    pub name: String,
    /// New size in MB (larger than the current one)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub size: u64,
}

#[derive(Serialize)]
struct CreateBody<'a> {
    name: &'a str,
    size_mb: u64,
}

#[derive(Serialize)]
struct ResizeBody {
    size_mb: u64,
}

fn attached(v: &Volume) -> String {
    if v.attachments.is_empty() {
        return "-".into();
    }
    v.attachments
        .iter()
        .map(|a| {
            format!(
                "{}:{}{}",
                a.sandbox,
                a.mount,
                if a.read_only { ":ro" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn run(ctx: Ctx, cmd: VolumeCommand) -> anyhow::Result<i32> {
    match cmd {
        VolumeCommand::Create(a) => {
            let v: Volume = ctx
                .client
                .post_json(
                    &["volumes"],
                    &CreateBody {
                        name: &a.name,
                        size_mb: a.size,
                    },
                    Target::None,
                )
                .await?;
            if ctx.json {
                output::print_json(&v)?;
            } else {
                output::println(&format!(
                    "volume {} created ({} MB); attach it with `bhatti create --volume {}:/data`",
                    v.name, v.size_mb, v.name
                ))?;
            }
        }
        VolumeCommand::List => {
            let list: Vec<Volume> = ctx.client.get_json(&["volumes"], Target::None).await?;
            if ctx.json {
                output::print_json(&list)?;
                return Ok(0);
            }
            if list.is_empty() {
                eprintln!("no volumes; make one with `bhatti volume create --name NAME --size MB`");
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        format!("{} MB", v.size_mb),
                        output::human_size(v.used_bytes),
                        attached(v),
                        output::rfc3339(&v.created_at),
                    ]
                })
                .collect();
            output::print_table(&["NAME", "SIZE", "USED", "ATTACHED", "CREATED"], &rows)?;
        }
        VolumeCommand::Delete(a) => {
            ctx.client
                .delete(&["volumes", &a.name], Target::None)
                .await?;
            if !ctx.json {
                output::println(&format!("volume {} deleted", a.name))?;
            }
        }
        VolumeCommand::Resize(a) => {
            let v: Volume = ctx
                .client
                .post_json(
                    &["volumes", &a.name, "resize"],
                    &ResizeBody { size_mb: a.size },
                    Target::None,
                )
                .await?;
            if ctx.json {
                output::print_json(&v)?;
            } else {
                output::println(&format!("volume {} is now {} MB", v.name, v.size_mb))?;
            }
        }
    }
    Ok(0)
}
