//! The bhatti host <-> lohar wire protocol.
//!
//! A frame is `| length: u32 BE | type: u8 | payload |`, where `length`
//! counts the type byte and the payload and is at most [`MAX_FRAME_LEN`].
//! This crate owns the framing ([`frame`], [`codec`]), the typed messages
//! ([`message`]) and their JSON payloads ([`exec`], [`fs`], [`forward`],
//! [`activity`]). It holds no I/O policy: callers decide about sockets,
//! timeouts and concurrency.

// Tests may unwrap; shipped code handles every error (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod activity;
pub mod boot;
pub mod codec;
#[cfg(feature = "tokio")]
pub mod codec_async;
pub mod error;
pub mod exec;
pub mod forward;
pub mod frame;
pub mod fs;
pub mod identity;
pub mod message;

pub use activity::ActivityInfo;
pub use boot::{BootConfig, VolumeMount, BOOT_ENTROPY_BYTES};
pub use error::{io_phrase, ErrorCode, ErrorCodeInfo};
pub use exec::{ExecKill, ExecRequest, SessionInfo};
pub use forward::{FwdRequest, FwdResponse};
pub use frame::{Frame, FrameError, FrameType, HEADER_LEN, MAX_FRAME_LEN, MAX_PAYLOAD_LEN};
pub use fs::{
    FileInfo, FileLsRequest, FileReadRequest, FileReadResponse, FileStatRequest, FileWriteRequest,
    FileWriteResponse,
};
pub use identity::{Identity, IdentityResp, IDENTITY_ENTROPY_BYTES};
pub use message::{DecodeError, Message};

/// TCP port of the control channel inside the guest.
pub const CONTROL_PORT: u16 = 1024;
/// TCP port of the forward channel inside the guest.
pub const FORWARD_PORT: u16 = 1025;
/// Maximum number of entries a directory listing returns.
pub const MAX_LS_ENTRIES: usize = 10_000;
/// Size of a TTY session's scrollback ring.
pub const SCROLLBACK_BYTES: usize = 64 * 1024;
/// How long a connection may take to present its AUTH frame.
pub const AUTH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Message of the ERROR frame sent when AUTH fails.
pub const AUTH_REQUIRED: &str = "auth required";
