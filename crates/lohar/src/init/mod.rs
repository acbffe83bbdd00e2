//! PID 1 duties inside the VM: stage-1 (modules, root disk, switch_root),
//! then mounts, hostname, network, clock, and power-off.

use bhatti_proto::BootConfig;

/// What the boot phase hands to the server.
pub struct Booted {
    pub config: BootConfig,
}

/// Runs every boot step; on error the caller prints it on the console and powers off.
pub fn boot() -> Result<Booted, String> {
    Err("init is not built yet".into())
}
