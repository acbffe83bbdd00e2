//! Payloads of the forward channel (port 1025).

use serde::{Deserialize, Serialize};

/// FWD_REQ: dial `127.0.0.1:port` inside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwdRequest {
    pub port: u16,
}

/// FWD_RESP: `{"status":"ok"}` or `{"status":"error","message":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwdResponse {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl FwdResponse {
    pub fn ok() -> Self {
        FwdResponse {
            status: "ok".into(),
            message: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        FwdResponse {
            status: "error".into(),
            message: Some(message.into()),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == "ok"
    }
}
