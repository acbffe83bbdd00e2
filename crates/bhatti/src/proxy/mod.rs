//! Reverse proxies into sandboxes.
//!
//! - `public`: the unauthenticated listener on `public_listen` that routes
//!   `Host: <alias>.<domain>` to a published port.
//! - `authed`: `ANY /sandboxes/:id/proxy/:port/*path` for API users.
//!
//! Both resolve a [`Target`] through the service and hand the request to
//! [`relay::relay`], which rewrites it as a reverse proxy should and sends
//! it through the service's [`UpstreamPool`] (handed to the proxies at
//! start-up), whose connections are forwards through the sandbox's agent:
//! proxy → service → agent client → lohar, never back up.

pub mod authed;
pub mod public;
pub mod relay;

pub use crate::service::upstream::{ProxyError, Target, UpstreamPool, MAX_REQUEST_BODY};
