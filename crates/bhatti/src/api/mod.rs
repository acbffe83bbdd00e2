//! The HTTP API: routes, auth and the one error type. It translates HTTP and
//! WebSockets to [`crate::service`] calls and nothing else: it never speaks
//! the guest protocol nor touches the engine.

pub mod auth;
pub mod error;
pub mod handlers;
pub mod json;
pub mod router;
/// The JSON shapes live in [`crate::model`], below the service; this name stays for old imports.
pub use crate::model as types;
