//! `bhatti list` / `bhatti ls`: your sandboxes.

use crate::api::types::Sandbox;

use super::client::Target;
use super::{output, Ctx};

pub async fn run(ctx: Ctx) -> anyhow::Result<i32> {
    let sandboxes: Vec<Sandbox> = ctx.client.get_json(&["sandboxes"], Target::None).await?;
    if ctx.json {
        output::print_json(&sandboxes)?;
        return Ok(0);
    }
    if sandboxes.is_empty() {
        eprintln!("no sandboxes; create one with `bhatti create`");
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.id.clone(),
                s.status.clone(),
                s.thermal.clone().unwrap_or_else(|| "-".into()),
                if s.ip.is_empty() {
                    "-".into()
                } else {
                    s.ip.clone()
                },
                s.cpus.to_string(),
                format!("{} MB", s.memory_mb),
                output::rfc3339(&s.created_at),
            ]
        })
        .collect();
    output::print_table(
        &[
            "NAME", "ID", "STATUS", "THERMAL", "IP", "CPUS", "MEMORY", "CREATED",
        ],
        &rows,
    )?;
    Ok(0)
}
