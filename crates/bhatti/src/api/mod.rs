//! The HTTP API: routes, auth, JSON shapes and the one error type.

pub mod auth;
pub mod error;
pub mod handlers;
pub mod image_types;
pub mod json;
pub mod router;
pub mod types;
pub mod volume_types;
