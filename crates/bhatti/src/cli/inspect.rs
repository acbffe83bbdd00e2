//! `bhatti inspect <sandbox>`: everything about one sandbox (state, thermal
//! state, IP, resources, disk use, labels, published URLs, sessions),
//! without waking it.

use crate::model::SandboxDetail;

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Sandbox name or ID
    pub sandbox: String,
}

pub async fn run(ctx: Ctx, args: InspectArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let d: SandboxDetail = ctx
        .client
        .get_json(&["sandboxes", name, "inspect"], Target::Sandbox(name))
        .await?;
    if ctx.json {
        output::print_json(&d)?;
        return Ok(0);
    }
    let s = &d.sandbox;
    let mut lines = vec![
        format!("name:      {}", s.name),
        format!("id:        {}", s.id),
        format!("status:    {}", s.status),
        format!("thermal:   {}", s.thermal.as_deref().unwrap_or("-")),
        format!("keep hot:  {}", if s.keep_hot { "yes" } else { "no" }),
        format!("ip:        {}", if s.ip.is_empty() { "-" } else { &s.ip }),
        format!("resources: {} vCPU, {} MB", s.cpus, s.memory_mb),
        format!(
            "disk:      {}",
            d.disk_bytes
                .map(crate::engine::qemu::image::human_size)
                .unwrap_or_else(|| "-".into())
        ),
        format!("created:   {}", output::rfc3339(&s.created_at)),
    ];
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    lines.push(format!(
        "labels:    {}",
        if labels.is_empty() {
            "-".into()
        } else {
            labels.join(", ")
        }
    ));
    let e = &s.egress;
    let allow: Vec<String> = e
        .allow_hosts
        .iter()
        .cloned()
        .chain(e.allow_cidrs.iter().map(|n| n.to_string()))
        .collect();
    lines.push(format!(
        "egress:    {}{}",
        e.mode.as_str(),
        if allow.is_empty() {
            String::new()
        } else {
            format!(", allow {}", allow.join(", "))
        }
    ));
    if d.published.is_empty() {
        lines.push("published: -".into());
    } else {
        lines.push("published:".into());
        for p in &d.published {
            lines.push(format!("  {} -> {}", p.port, p.url));
        }
    }
    match &d.sessions {
        None => lines.push("sessions:  (not shown while the sandbox is not hot)".into()),
        Some(list) if list.is_empty() => lines.push("sessions:  -".into()),
        Some(list) => {
            lines.push("sessions:".into());
            for ss in list {
                let state = if ss.running { "running" } else { "exited" };
                lines.push(format!("  {} {state} {}", ss.session_id, ss.argv));
            }
        }
    }
    output::println(&lines.join("\n"))?;
    Ok(0)
}
