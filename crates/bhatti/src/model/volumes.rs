//! JSON shapes of the volume routes (`/volumes`) and of a sandbox's volumes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /volumes`. Numbers are signed so that negative values get a clear 400.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CreateVolumeRequest {
    /// Unique among the caller's volumes (sandbox name rules).
    pub name: String,
    /// Size in MiB (1 to 1048576), counted against the caller's storage quota.
    pub size_mb: i64,
}

/// `POST /volumes/{name}/resize`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct ResizeVolumeRequest {
    /// New size in MiB; volumes only grow.
    pub size_mb: i64,
}

/// One volume of a new sandbox (`volumes` of `POST /sandboxes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeMountRequest {
    /// Name or id of one of the caller's volumes.
    pub volume: String,
    /// Absolute mount point in the guest: no `.` or `..` components, not a
    /// system directory (`/`, `/etc`, `/usr`, `/var`, `/tmp`, …) nor inside
    /// `/proc`, `/sys`, `/dev`, `/run`, `/etc`, `/usr`, `/boot`, `/bin`, `/lib`.
    pub mount: String,
    /// Mount read-only (default false). A read-write volume is attached to
    /// one sandbox at a time; a read-only one to any number of sandboxes.
    #[serde(default)]
    pub read_only: bool,
}

/// Where a volume is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeAttachmentInfo {
    /// Sandbox name.
    pub sandbox: String,
    pub mount: String,
    pub read_only: bool,
}

/// A volume as one sandbox has it (`inspect`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxVolume {
    /// Volume name.
    pub volume: String,
    /// Absolute mount point in the guest.
    pub mount: String,
    pub read_only: bool,
}

/// A persistent volume: an ext4 disk of its own that outlives sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub id: String,
    pub name: String,
    /// Size of the disk and its filesystem, MiB.
    pub size_mb: u64,
    /// Host bytes the (sparse) disk takes now.
    pub used_bytes: u64,
    /// Sandboxes that have it (empty: detached).
    pub attachments: Vec<VolumeAttachmentInfo>,
    /// RFC 3339.
    pub created_at: String,
}
