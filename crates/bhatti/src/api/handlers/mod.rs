//! One file per API resource; each handler is a small async fn.

pub mod exec;
pub mod files;
pub mod health;
pub mod images;
pub mod ports;
pub mod proxy;
pub mod publish;
pub mod sandboxes;
pub mod secrets;
pub mod sessions;
pub mod share;
pub mod shell;
pub mod snapshots;
pub mod volumes;
