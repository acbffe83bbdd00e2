//! Payloads of the file operations.

use serde::{Deserialize, Serialize};

/// FILE_READ_REQ. `offset` is a 1-based line number, `limit` a number of
/// lines, `max_bytes` a byte cap; whichever is reached first ends the read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReadRequest {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

/// FILE_READ_RESP: the file's total size, whatever part of it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReadResponse {
    pub size: u64,
    /// Octal permission bits, e.g. "0644".
    pub mode: String,
}

/// FILE_WRITE_REQ, followed by exactly `size` bytes of STDIN frames.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWriteRequest {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Signed on the wire so that a negative size can be refused clearly.
    pub size: i64,
}

/// FILE_WRITE_RESP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWriteResponse {
    pub status: String,
}

impl FileWriteResponse {
    pub fn ok() -> Self {
        FileWriteResponse {
            status: "ok".into(),
        }
    }
}

/// FILE_STAT_REQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatRequest {
    pub path: String,
}

/// FILE_LS_REQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLsRequest {
    pub path: String,
}

/// One file, as stat and ls report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub name: String,
    pub size: u64,
    /// Octal permission bits, e.g. "0644".
    pub mode: String,
    pub is_dir: bool,
    /// Unix seconds.
    pub mtime: i64,
}

/// Formats permission bits the way the protocol carries them ("0644").
pub fn mode_string(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

/// Parses "0644", "644" or "0o644" into permission bits.
pub fn parse_mode(s: &str) -> Option<u32> {
    let t = s.trim_start_matches("0o");
    if t.is_empty() || t.len() > 5 {
        return None;
    }
    u32::from_str_radix(t, 8).ok().filter(|m| *m <= 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(mode_string(0o100644), "0644");
        assert_eq!(mode_string(0o4755), "4755");
        assert_eq!(parse_mode("0644"), Some(0o644));
        assert_eq!(parse_mode("755"), Some(0o755));
        assert_eq!(parse_mode("0o600"), Some(0o600));
        assert_eq!(parse_mode("0888"), None);
        assert_eq!(parse_mode("17777"), None);
        assert_eq!(parse_mode(""), None);
    }
}
