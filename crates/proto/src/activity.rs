//! Payload of the activity query, used for idle detection.

use serde::{Deserialize, Serialize};

/// ACTIVITY_RESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityInfo {
    /// Unix seconds of the last exec, stdin or file operation.
    pub last_activity_unix: i64,
    pub active_sessions: u32,
    pub attached_sessions: u32,
}
