//! bhatti: microVM sandboxes. Daemon, CLI and operator commands in one crate.
//!
//! The exec path reads top to bottom through the modules: `cli` → HTTP →
//! `api` → `service` → `engine` → `engine::agent_client` → lohar in the guest.

// Tests may unwrap; shipped code handles every error (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod egress;
pub mod engine;
pub mod model;
pub mod oci;
pub mod proxy;
pub mod rate_limit;
pub mod registry;
pub mod secrets;
pub mod service;
pub mod status;
pub mod store;
