//! Reverse proxies into sandboxes.
//!
//! - `public`: the unauthenticated listener on `public_listen` that routes
//!   `Host: <alias>.<domain>` to a published port.
//! - `authed`: `ANY /sandboxes/:id/proxy/:port/*path` for API users.
//!
//! Both resolve a [`Target`] through the service and hand the request to
//! [`relay::relay`], which speaks HTTP/1.1 to the guest port over the
//! agent's forward channel (streaming both ways, WebSocket upgrades relayed).

pub mod authed;
pub mod pool;
pub mod public;
pub mod relay;
pub mod routes;

use axum::http::StatusCode;

use crate::engine::agent_client::AgentClient;

pub use pool::UpstreamPool;
pub use routes::{Route, RouteCache};

/// Largest request body either proxy forwards.
pub const MAX_REQUEST_BODY: u64 = 50 * 1024 * 1024;

/// A port inside one sandbox, and how to reach it.
#[derive(Clone)]
pub struct Target {
    pub sandbox_id: String,
    pub port: u16,
    pub agent: AgentClient,
}

/// Shared proxy state owned by the service, so that sandbox lifecycle
/// changes (unpublish, destroy) can invalidate it at once.
#[derive(Default)]
pub struct ProxyState {
    /// `alias` → published target, for the public proxy.
    pub routes: RouteCache,
    /// Idle keep-alive connections to guest ports.
    pub pool: UpstreamPool,
}

impl ProxyState {
    /// Forgets every route and idle connection of a sandbox.
    pub fn forget_sandbox(&self, sandbox_id: &str) {
        self.routes.forget_sandbox(sandbox_id);
        self.pool.forget_sandbox(sandbox_id);
    }
}

/// Why a request could not be relayed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// Nothing accepts connections on the port inside the guest.
    #[error("the app is not listening on port {port} in the sandbox")]
    NotListening { port: u16 },
    /// The sandbox's agent could not be reached.
    #[error("the sandbox cannot be reached: {0}")]
    Unreachable(String),
    /// The request body is over [`MAX_REQUEST_BODY`].
    #[error("request body is larger than {} MiB", MAX_REQUEST_BODY >> 20)]
    TooLarge,
    /// The app accepted the connection but did not answer with valid HTTP.
    #[error("the app on port {port} did not answer: {detail}")]
    Upstream { port: u16, detail: String },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NotListening { .. } | ProxyError::Upstream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}
