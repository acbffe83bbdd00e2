//! `bhatti inspect <sandbox>`: everything about one sandbox (state, thermal
//! state, IP, resources, disk use, labels, image, volumes, published URLs,
//! sessions),
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
        format!("born:      {}", s.born.as_deref().unwrap_or("-")),
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
    lines.push(format!("egress:    {}", egress_line(&d)));
    lines.push(format!(
        "image:     {}",
        d.image.as_deref().unwrap_or("(default)")
    ));
    if d.volumes.is_empty() {
        lines.push("volumes:   -".into());
    } else {
        lines.push("volumes:".into());
        for v in &d.volumes {
            let ro = if v.read_only { " (read-only)" } else { "" };
            lines.push(format!("  {} on {}{ro}", v.volume, v.mount));
        }
    }
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

/// The policy, its allowances, and whether the daemon lets anything out at all.
fn egress_line(d: &SandboxDetail) -> String {
    let e = &d.sandbox.egress;
    let allow: Vec<String> = e
        .allow_hosts
        .iter()
        .cloned()
        .chain(e.allow_cidrs.iter().map(|n| n.to_string()))
        .collect();
    let mut line = e.mode.as_str().to_string();
    if !allow.is_empty() {
        line.push_str(&format!(", allow {}", allow.join(", ")));
    }
    if d.egress_off {
        line.push_str(" (egress is off on this daemon: no route out)");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_says_when_the_daemon_has_none() {
        let mut d: SandboxDetail = serde_json::from_value(serde_json::json!({
            "sandbox": {
                "id": "i", "name": "n", "status": "running", "ip": "", "cpus": 1,
                "memory_mb": 512, "keep_hot": false, "created_at": "",
                "egress": {"mode": "deny", "allow_hosts": ["a.com"], "allow_cidrs": ["10.0.0.0/8"]},
            },
            "disk_bytes": null,
            "published": [],
        }))
        .expect("detail");
        assert!(!d.egress_off, "absent: an older daemon");
        assert_eq!(egress_line(&d), "deny, allow a.com, 10.0.0.0/8");
        d.egress_off = true;
        d.sandbox.egress = Default::default();
        assert_eq!(
            egress_line(&d),
            "public (egress is off on this daemon: no route out)"
        );
    }
}
