//! Async client of the lohar wire protocol, used by the daemon and the bench.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

/// Which of the agent's two listeners to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Port 1024: exec, sessions, files, activity.
    Control,
    /// Port 1025: raw byte relay to a guest port.
    Forward,
}

/// A byte stream to the agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AgentStream for T {}

/// Boxed future of a fresh connection.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<Box<dyn AgentStream>>> + Send>>;

/// Opens connections to one agent: TCP inside the daemon's network namespace
/// for a VM, Unix sockets for lohar in test mode.
pub trait Dialer: Send + Sync {
    fn dial(&self, channel: Channel) -> DialFuture;
}

/// Client of one agent. Cheap to clone; every operation uses its own connection.
#[derive(Clone)]
pub struct AgentClient {
    dialer: Arc<dyn Dialer>,
    token: Arc<Vec<u8>>,
}

impl AgentClient {
    pub fn new(dialer: Arc<dyn Dialer>, token: impl Into<Vec<u8>>) -> Self {
        AgentClient { dialer, token: Arc::new(token.into()) }
    }
}
