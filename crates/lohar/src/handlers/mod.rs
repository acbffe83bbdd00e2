//! One module per operation. A handler gets the request and the connection,
//! does the work, and returns [`HandlerError::Refused`] for a request it
//! cannot serve; the server turns that into ERROR_CODE + ERROR.

pub mod activity;
pub mod exec;
pub mod files;
pub mod forward;
pub mod identity;
pub mod session;
pub mod time;

use bhatti_proto::{io_phrase, ErrorCode, FrameError};

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The request cannot be served; the client is told the code and why.
    #[error("{1}")]
    Refused(ErrorCode, String),
    /// The connection broke; nothing more can be sent on it.
    #[error("connection lost: {0}")]
    Disconnected(#[from] FrameError),
}

impl From<std::io::Error> for HandlerError {
    fn from(e: std::io::Error) -> Self {
        HandlerError::Disconnected(FrameError::Io(e))
    }
}

/// Shorthand for refusing with a code and a message.
pub fn refuse<T>(code: ErrorCode, msg: impl std::fmt::Display) -> Result<T, HandlerError> {
    Err(HandlerError::Refused(code, msg.to_string()))
}

/// Refuses because of an I/O error on `path`: "open /x/y: no such file or
/// directory", with the code the error kind maps to.
pub fn refuse_io<T>(op: &str, path: &str, e: &std::io::Error) -> Result<T, HandlerError> {
    // ELOOP has no stable ErrorKind yet; a loop of links is the request's fault.
    let code = match e.raw_os_error() {
        Some(libc::ELOOP) => ErrorCode::Invalid,
        _ => ErrorCode::of_io(e.kind()),
    };
    refuse(code, format!("{op} {path}: {}", io_phrase(e)))
}
