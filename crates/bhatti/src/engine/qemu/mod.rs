//! The QEMU `microvm` engine.

pub mod image;
