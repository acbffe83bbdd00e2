//! `bhatti list` / `bhatti ls`: your sandboxes, optionally only those with
//! given labels; `-o wide` adds keep-hot and the labels.

use crate::model::Sandbox;

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only sandboxes with this label KEY=VALUE (repeatable: all must match)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = super::create::parse_label)]
    pub labels: Vec<(String, String)>,
    /// Output format: `wide` adds KEEP-HOT and LABELS columns
    #[arg(short = 'o', long = "output", value_name = "FORMAT", value_parser = ["wide"])]
    pub output: Option<String>,
}

pub async fn run(ctx: Ctx, args: ListArgs) -> anyhow::Result<i32> {
    let mut url = ctx.client.url(&["sandboxes"]);
    for (k, v) in &args.labels {
        url.query_pairs_mut()
            .append_pair("label", &format!("{k}={v}"));
    }
    let rb = ctx.client.request_url(reqwest::Method::GET, url);
    let resp = ctx.client.send(rb, Target::None).await?;
    let sandboxes: Vec<Sandbox> = ctx.client.decode(resp).await?;
    let wide = args.output.as_deref() == Some("wide");
    if ctx.json {
        output::print_json(&sandboxes)?;
        return Ok(0);
    }
    if sandboxes.is_empty() {
        if args.labels.is_empty() {
            eprintln!("no sandboxes; create one with `bhatti create`");
        } else {
            eprintln!("no sandboxes with those labels");
        }
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|s| {
            let mut row = vec![
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
            ];
            if wide {
                row.push(if s.keep_hot { "yes" } else { "no" }.into());
                let labels: Vec<String> =
                    s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                row.push(if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                });
            }
            row
        })
        .collect();
    let mut header = vec![
        "NAME", "ID", "STATUS", "THERMAL", "IP", "CPUS", "MEMORY", "CREATED",
    ];
    if wide {
        header.extend(["KEEP-HOT", "LABELS"]);
    }
    output::print_table(&header, &rows)?;
    Ok(0)
}
