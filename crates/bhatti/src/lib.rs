//! bhatti: microVM sandboxes. Daemon, CLI and operator commands in one crate.
//!
//! The exec path reads top to bottom through the modules: `cli` → HTTP →
//! `api` → `service` → `engine` → `engine::agent_client` → lohar in the guest.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod oci;
pub mod proxy;
pub mod registry;
pub mod secrets;
pub mod service;
pub mod store;
