//! The guest's boot configuration, handed to lohar through QEMU's fw_cfg
//! (`opt/bhatti/config`) before the agent listens.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Name of the fw_cfg entry that carries the [`BootConfig`] as JSON.
pub const FW_CFG_NAME: &str = "opt/bhatti/config";
/// Where the guest kernel exposes that entry.
pub const FW_CFG_PATH: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/bhatti/config/raw";

/// Everything the guest needs to know about itself at boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    /// Also the sandbox name.
    pub hostname: String,
    /// The per-sandbox token every connection must present in AUTH.
    pub token: String,
    /// Guest address with prefix length, e.g. "192.168.137.5/24".
    pub ip: String,
    /// Default gateway (the bridge address), e.g. "192.168.137.1".
    pub gateway: String,
    /// Name servers for /etc/resolv.conf.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Sandbox env, secrets included; applied to every child.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Script run as the TTY session "init".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// Host wall clock at boot, unix milliseconds; the guest sets its clock from it.
    #[serde(default)]
    pub time_unix_ms: i64,
    /// Volumes to mount before the init script runs, in device order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Fresh host entropy, lowercase hex of [`BOOT_ENTROPY_BYTES`] bytes
    /// (empty: none). The guest credits it to its RNG before anything reads
    /// randomness: without it the guest kernel's CRNG is not ready this early,
    /// and a read of /dev/urandom then runs the kernel's jitter entropy
    /// collection, which takes over a second under TCG.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub entropy_hex: String,
}

/// Entropy bytes the host puts into [`BootConfig::entropy_hex`] (512 bits,
/// twice what the guest kernel needs to call its CRNG ready).
pub const BOOT_ENTROPY_BYTES: usize = 64;

/// One volume: a virtio-blk disk the guest finds by its serial and mounts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The disk's virtio serial (`/sys/block/vdX/serial`), at most 20 bytes.
    pub serial: String,
    /// Absolute mount point in the guest (created if missing).
    pub path: String,
    /// Mounted read-only (the host also opens the disk read-only).
    #[serde(default)]
    pub read_only: bool,
}

/// Directory of the initramfs that holds the kernel modules lohar loads in
/// stage 1 (written by the host's image builder, read by lohar as `/init`).
pub const INITRAMFS_MODULES_DIR: &str = "/bhatti/modules";
/// The initramfs file listing module file names (relative to
/// [`INITRAMFS_MODULES_DIR`]), one per line, in load order. Its presence also
/// tells lohar it runs as stage 1 inside the initramfs.
pub const INITRAMFS_MODULES_ORDER: &str = "/bhatti/modules.order";
