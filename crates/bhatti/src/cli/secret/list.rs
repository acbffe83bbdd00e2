//! `bhatti secret list`: names and timestamps, never values.

use crate::cli::client::Target;
use crate::cli::{output, Ctx};
use crate::model::SecretInfo;

pub async fn run(ctx: Ctx) -> anyhow::Result<i32> {
    let secrets: Vec<SecretInfo> = ctx.client.get_json(&["secrets"], Target::None).await?;
    if ctx.json {
        output::print_json(&secrets)?;
        return Ok(0);
    }
    if secrets.is_empty() {
        eprintln!("no secrets; add one with `bhatti secret set NAME VALUE`");
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = secrets
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                output::rfc3339(&s.created_at),
                output::rfc3339(&s.updated_at),
            ]
        })
        .collect();
    output::print_table(&["NAME", "CREATED", "UPDATED"], &rows)?;
    Ok(0)
}
