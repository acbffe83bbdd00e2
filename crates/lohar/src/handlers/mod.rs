//! One module per operation. A handler gets the request and the connection,
//! does the work, and returns [`HandlerError::Refused`] for a request it
//! cannot serve; the server turns that into the one ERROR frame.

pub mod activity;
pub mod exec;
pub mod files;
pub mod forward;
pub mod session;
pub mod time;

use bhatti_proto::FrameError;

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The request cannot be served; the client is told why in an ERROR frame.
    #[error("{0}")]
    Refused(String),
    /// The connection broke; nothing more can be sent on it.
    #[error("connection lost: {0}")]
    Disconnected(#[from] FrameError),
}

impl From<std::io::Error> for HandlerError {
    fn from(e: std::io::Error) -> Self {
        HandlerError::Disconnected(FrameError::Io(e))
    }
}

/// Shorthand for refusing with a message.
pub fn refuse<T>(msg: impl std::fmt::Display) -> Result<T, HandlerError> {
    Err(HandlerError::Refused(msg.to_string()))
}
