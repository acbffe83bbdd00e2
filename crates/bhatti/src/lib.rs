//! bhatti: microVM sandboxes. Daemon, CLI and operator commands in one crate.
