//! `bhatti doctor`: every host prerequisite of the daemon, with ok/missing
//! and the fix. Exits 1 when a required one is missing (what `bhatti serve`
//! would refuse to start on).

use std::path::PathBuf;

use crate::config::DaemonConfig;
use crate::engine::qemu::prereq::{self, Host};

use super::output;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Daemon config to check against [default: $BHATTI_CONFIG, then /var/lib/bhatti/config.yaml]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

pub fn run(args: DoctorArgs, json: bool) -> anyhow::Result<i32> {
    let cfg = DaemonConfig::load(args.config.as_deref())?.config;
    let checks = prereq::check_all(&Host {
        accel: cfg.accel,
        data_dir: &cfg.data_dir,
        images_dir: &cfg.images_dir,
    });
    let failed = checks.iter().any(|c| c.required && !c.ok);
    if json {
        output::print_json(&checks)?;
    } else {
        for c in &checks {
            let mark = match (c.ok, c.required) {
                (true, _) => "ok",
                (false, true) => "MISSING",
                (false, false) => "warn",
            };
            output::println(&format!("{mark:<8} {:<20} {}", c.name, c.detail))?;
            if !c.ok {
                output::println(&format!("{:<8} {:<20} fix: {}", "", "", c.fix))?;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}
