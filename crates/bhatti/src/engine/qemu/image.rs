//! Guest images: kernel, initramfs with lohar, base rootfs.

use std::path::PathBuf;

/// The files a VM boots from, all inside `images_dir`.
#[derive(Debug, Clone)]
pub struct ImagePaths {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Raw ext4 image, the read-only backing file of every sandbox overlay.
    pub rootfs: PathBuf,
}
