//! JSON shapes of the HTTP API, shared by `api`, `service` and `cli` (so they
//! live below all three). Field names follow the original bhatti v1 API.

pub mod images;
pub mod volumes;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Response header carrying the server version (`0.1.0`), on every answer
/// of the API and of the public proxy.
pub const VERSION_HEADER: &str = "x-bhatti-version";

/// `POST /sandboxes`. Numbers are signed so that negative values get a clear 400.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CreateSandboxRequest {
    pub name: Option<String>,
    pub cpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub env: Option<BTreeMap<String, String>>,
    pub init: Option<String>,
    pub secrets: Option<Vec<String>>,
    pub keep_hot: Option<bool>,
    /// At most 16 `key: value` labels; keys 1-63 characters of
    /// `a-z A-Z 0-9 . _ - /` starting with a letter or digit, values up to
    /// 255 characters without control characters.
    pub labels: Option<BTreeMap<String, String>>,
    /// Fork: id or name of one of the caller's sandboxes (running or
    /// stopped); the new sandbox starts from its current memory and disk,
    /// with an identity of its own. cpus and memory_mb are the source's.
    pub from: Option<String>,
    /// Egress posture: `public` (any public address) or `deny` (only the
    /// allowances below). Absent: the daemon's `egress_default`.
    pub egress: Option<crate::egress::Posture>,
    /// Host names (`api.example.com`) or `*.suffix` patterns the guest may
    /// resolve (through the daemon's resolver) and connect to; at most 64.
    /// Absent: the daemon's `egress_allow_hosts`.
    pub allow_hosts: Option<Vec<String>>,
    /// IPv4 networks (`10.1.0.0/16`, or one address) the guest may reach,
    /// private ranges included; link-local, loopback and multicast are
    /// refused (400); at most 64. Absent: the daemon's `egress_allow_cidrs`.
    pub allow_cidrs: Option<Vec<String>>,
    /// Volumes to attach, in this order; mounted before the init script runs.
    /// Not with `from` or a snapshot resume.
    pub volumes: Option<Vec<volumes::VolumeMountRequest>>,
    /// Name or id of a custom image (the caller's or an operator's) to boot
    /// instead of the default rootfs. Not with `from` or a snapshot resume.
    pub image: Option<String>,
    /// Boot a kernel even when a pre-booted template of this shape is ready
    /// (see docs/templates.md). Default false.
    pub cold_boot: Option<bool>,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub status: String,
    pub ip: String,
    pub cpus: u32,
    pub memory_mb: u32,
    pub keep_hot: bool,
    /// The owner's labels (possibly empty).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `hot` (running), `warm` (paused, RAM kept) or `cold` (saved to disk);
    /// absent while creating or destroying and after an error. Reading it
    /// never wakes the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub thermal: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// Where the guest may connect to (absent from older daemons).
    #[serde(default)]
    pub egress: crate::egress::EgressPolicy,
    /// How its VM came to be: `boot` (a kernel booted), `template`
    /// (restored from a pre-booted template), `fork` or `snapshot`.
    /// Absent while creating and for sandboxes of older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub born: Option<String>,
}

/// `PATCH /sandboxes/{id}`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct PatchSandboxRequest {
    pub keep_hot: Option<bool>,
    pub name: Option<String>,
    /// Labels to add or change (others are kept).
    pub labels: Option<BTreeMap<String, String>>,
    /// Label keys to remove.
    pub labels_delete: Option<Vec<String>>,
    /// Egress is fixed at create: these fields are refused (400), not
    /// ignored, so that a client never believes it changed the policy.
    #[serde(default, deserialize_with = "fixed_at_create")]
    #[schema(ignore)]
    pub egress: Option<()>,
    #[serde(default, deserialize_with = "fixed_at_create")]
    #[schema(ignore)]
    pub allow_hosts: Option<()>,
    #[serde(default, deserialize_with = "fixed_at_create")]
    #[schema(ignore)]
    pub allow_cidrs: Option<()>,
}

/// Refuses a field that only a create may set (the JSON extractor names
/// the field in its 400).
fn fixed_at_create<'de, D: serde::Deserializer<'de>>(_: D) -> Result<Option<()>, D::Error> {
    Err(serde::de::Error::custom(
        "egress cannot be changed after create (egress, allow_hosts and allow_cidrs are set by POST /sandboxes only)",
    ))
}

/// `POST /sandboxes/{id}/exec`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ExecBody {
    pub cmd: Vec<String>,
    pub env: Option<BTreeMap<String, String>>,
    pub cwd: Option<String>,
    /// Seconds; the command's process group is killed when it runs longer.
    /// Absent or 0: 300 s; at most 86,400 (24 h). `timeout` is an alias.
    #[serde(alias = "timeout")]
    pub timeout_sec: Option<u64>,
    /// Bytes fed to the command's stdin, base64. For stdin that streams as
    /// it arrives, use the exec WebSocket (`GET /sandboxes/{id}/exec/ws`).
    pub stdin_b64: Option<String>,
    /// Start the command in a session of its own and answer at once (202,
    /// [`ExecDetached`]); its stdout and stderr go to `output_file`. No
    /// timeout applies.
    #[serde(default)]
    pub detach: bool,
    /// Absolute path in the sandbox for a detached command's output
    /// (created or truncated). Default `/tmp/bhatti-exec-<random>.log`.
    pub output_file: Option<String>,
}

/// Answer to a detached exec (`detach: true`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecDetached {
    pub detached: bool,
    /// Process id of the command in the sandbox (it leads its own session).
    pub pid: u32,
    /// Where its stdout and stderr go; read it with the files API.
    pub output_file: String,
}

/// First message of the exec WebSocket (`GET /sandboxes/{id}/exec/ws`):
/// the command. After it, binary messages are stdin bytes and a text
/// `{"type":"eof"}` closes stdin; the server sends [`ExecEvent`]s as text.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecWsStart {
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// As in [`ExecBody`].
    #[serde(default, alias = "timeout", skip_serializing_if = "Option::is_none")]
    pub timeout_sec: Option<u64>,
    /// Seconds the command may stay detached: when the client goes away it
    /// keeps running, its output kept (1 MiB), and `?session=<id>` reattaches
    /// with a replay. Absent or 0: closing the socket kills the command. At
    /// most 86,400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle_sec: Option<u64>,
}

/// Query of the exec WebSocket.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
pub struct ExecWsQuery {
    /// Reattach to this session (no start message then).
    pub session: Option<String>,
    /// API key, for clients that cannot set headers.
    pub token: Option<String>,
}

/// Control messages a client sends on the exec WebSocket after the start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecWsControl {
    /// Close the command's stdin.
    Eof,
    /// SIGKILL the command's process group now.
    Kill,
}

/// Buffered exec result. Output that is not UTF-8 comes base64-encoded in `*_b64` instead.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub timed_out: bool,
    /// Output past 16 MiB per stream was dropped; stream the exec
    /// (`Accept: application/x-ndjson`) to get all of it.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub truncated: bool,
}

/// One line of a streamed (NDJSON) exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecEvent {
    Stdout {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        data_b64: Option<String>,
    },
    Stderr {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        data_b64: Option<String>,
    },
    Exit {
        exit_code: i32,
        /// The deadline (`timeout_sec`) killed the command.
        #[serde(skip_serializing_if = "std::ops::Not::not", default)]
        timed_out: bool,
    },
    /// The exec failed before an exit code; the text is in both `data` and
    /// `message` (clients of either dialect read one of them).
    Error {
        #[serde(default)]
        data: String,
        #[serde(default)]
        message: String,
    },
}

impl ExecEvent {
    /// An error event carrying `text` in both fields.
    pub fn error(text: impl Into<String>) -> Self {
        let text = text.into();
        ExecEvent::Error {
            data: text.clone(),
            message: text,
        }
    }
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub sandboxes: u64,
    pub uptime: String,
    /// The daemon's version (an addition to the original shape; `bhatti version` shows it).
    pub version: String,
}

/// `POST /secrets`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SecretBody {
    pub name: String,
    pub value: String,
}

/// A secret without its value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretInfo {
    pub name: String,
    pub created_at: String,
    pub updated_at: String,
}

/// Query of the file routes.
#[derive(Debug, Clone, Deserialize, IntoParams)]
pub struct FilesQuery {
    pub path: Option<String>,
    /// `true`: list the directory instead of reading.
    pub ls: Option<bool>,
    /// 1-based first line.
    pub offset: Option<u64>,
    /// Number of lines.
    pub limit: Option<u64>,
    pub max_bytes: Option<u64>,
    /// Octal mode for writes, e.g. 0644.
    pub mode: Option<String>,
}

/// Query of the WebSocket shell.
#[derive(Debug, Clone, Deserialize, IntoParams)]
pub struct ShellQuery {
    /// Attach to this session instead of a new/detached shell.
    pub session: Option<String>,
    /// API key, for clients that cannot set headers.
    pub token: Option<String>,
    pub rows: Option<u16>,
    pub cols: Option<u16>,
}

/// Text message of the shell WebSocket.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ShellControl {
    Resize { rows: u16, cols: u16 },
}

/// A TTY session inside a sandbox (same fields as the agent's SessionInfo).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub session_id: String,
    pub argv: String,
    pub tty: bool,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub attached: bool,
    pub created_at: i64,
}

impl From<bhatti_proto::SessionInfo> for Session {
    fn from(s: bhatti_proto::SessionInfo) -> Self {
        Session {
            session_id: s.session_id,
            argv: s.argv,
            tty: s.tty,
            running: s.running,
            exit_code: s.exit_code,
            attached: s.attached,
            created_at: s.created_at,
        }
    }
}

/// A file in a listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub mode: String,
    pub is_dir: bool,
    pub mtime: i64,
}

impl From<bhatti_proto::FileInfo> for FileEntry {
    fn from(f: bhatti_proto::FileInfo) -> Self {
        FileEntry {
            name: f.name,
            size: f.size,
            mode: f.mode,
            is_dir: f.is_dir,
            mtime: f.mtime,
        }
    }
}

/// `POST /sandboxes/{id}/publish`. The port is signed so that bad values get a clear 400.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PublishRequest {
    /// 1-65535.
    pub port: i64,
    /// A DNS label, unique across all users; `<sandbox-name>-<6 random>` when absent.
    pub alias: Option<String>,
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PublishedPort {
    pub id: i64,
    pub sandbox_id: String,
    pub port: u16,
    pub alias: String,
    /// `<public_url_scheme>://<alias>.<domain>`.
    pub url: String,
    /// RFC 3339.
    pub created_at: String,
}

/// A TCP port listening inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ListeningPort {
    pub port: u16,
    /// The address it is bound to, e.g. `0.0.0.0`, `127.0.0.1`, `::`.
    pub address: String,
    /// The same as `port` (the reference API's name for it).
    #[serde(default)]
    pub container_port: u16,
    /// The authenticated proxy URL that reaches this port:
    /// `<api>/sandboxes/<id>/proxy/<port>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_url: Option<String>,
}

/// `GET /sandboxes/{id}/inspect`: one sandbox and what it uses. Reading it
/// never wakes the sandbox: `sessions` is only filled while it is hot.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxDetail {
    pub sandbox: Sandbox,
    /// Host disk the sandbox takes (overlay, saved state), in bytes allocated.
    pub disk_bytes: Option<u64>,
    pub published: Vec<PublishedPort>,
    /// Sessions in the guest; absent unless the sandbox is hot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<Session>>,
    /// True when the daemon gives guests no route out at all (config
    /// `egress: false`): the sandbox then reaches nothing, whatever its
    /// `egress` policy says. Absent (older daemons): false.
    #[serde(default)]
    pub egress_off: bool,
    /// The custom image it was created from; absent: the default image
    /// (or a fork or snapshot of one made from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub image: Option<String>,
    /// Its volumes, in device order (absent from older daemons: none shown).
    #[serde(default)]
    pub volumes: Vec<volumes::SandboxVolume>,
}

/// `POST /sandboxes/{id}/checkpoint`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CheckpointRequest {
    /// Snapshot name, unique among the caller's snapshots (sandbox name rules).
    pub name: String,
}

/// `POST /snapshots`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CreateSnapshotRequest {
    /// Id or name of the sandbox to snapshot.
    pub sandbox: String,
    pub name: String,
}

/// A named snapshot: a sandbox's memory and disk at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    /// Name of the sandbox it was taken from.
    pub sandbox: String,
    pub cpus: u32,
    pub memory_mb: u32,
    /// Bytes of its memory file on the host.
    pub memory_bytes: u64,
    /// Bytes of its disk layer on the host (what the sandbox had written to its own disk).
    pub disk_bytes: u64,
    /// memory_bytes + disk_bytes.
    pub size_bytes: u64,
    /// RFC 3339.
    pub created_at: String,
    /// Only in the answer to a create: how long the running source was
    /// paused, ms (absent: it was stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
}
