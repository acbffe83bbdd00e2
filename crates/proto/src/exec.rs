//! Payloads of exec and TTY sessions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

fn is_false(b: &bool) -> bool {
    !*b
}

/// EXEC_REQ: run a command, piped or on a PTY, or attach to a TTY session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Absent: a new command; present: attach to that TTY session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// A detached TTY session idle this long is killed; absent or 0: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle_sec: Option<u64>,
    /// Attach only when nobody else is attached.
    #[serde(default, skip_serializing_if = "is_false")]
    pub if_detached: bool,
}

impl ExecRequest {
    /// A piped command.
    pub fn command<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// A TTY session as `EXEC_LIST_RESP` and `SESSION_INFO` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: String,
    /// The command line, joined with spaces.
    pub argv: String,
    pub tty: bool,
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub attached: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// EXEC_KILL: SIGKILL a session's process group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecKill {
    pub session_id: String,
}
