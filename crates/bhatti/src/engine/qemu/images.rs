//! Custom base images: `<data_dir>/custom-images/<id>.ext4`, sparse raw ext4
//! files a sandbox's overlay can back onto instead of the built rootfs.
//!
//! An image is made by flattening a sandbox's disk (its overlay and every
//! layer below it) into a new raw file, or from an OCI/Docker image's
//! layers (see `crate::oci`). It is in use while any sandbox overlay or
//! disk layer backs onto it directly (layers carry the chain further).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bhatti_proto::ExecRequest;

use super::process::VmFiles;
use super::{blocking, check_id, QemuEngine};
use crate::engine::{EngineError, VmRuntime, LAYER_USER};

/// How long the guest may take to write its page cache out before a save.
const GUEST_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The backing file named in a qcow2 header, if any (no other format has one).
pub fn qcow2_backing(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 20];
    f.read_exact(&mut head).ok()?;
    if &head[..4] != b"QFI\xfb" {
        return None;
    }
    let off = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(head[16..20].try_into().ok()?) as usize;
    if off == 0 || len == 0 || len > 4096 {
        return None;
    }
    let mut name = vec![0u8; len];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(off)).ok()?;
    f.read_exact(&mut name).ok()?;
    String::from_utf8(name).ok()
}

/// Runs `qemu-img convert` of `src` (and its backing chain) into the sparse raw `dst`.
fn flatten(src: &Path, dst: &Path) -> Result<(), EngineError> {
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw", "-S", "4k"])
        .arg(src)
        .arg(dst)
        .output()
        .map_err(|e| EngineError::Storage(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(EngineError::Storage(format!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl QemuEngine {
    fn images_dir(&self) -> PathBuf {
        self.sandboxes_dir.with_file_name("custom-images")
    }

    /// The file of custom image `id`.
    pub fn image_path(&self, id: &str) -> PathBuf {
        self.images_dir().join(format!("{id}.ext4"))
    }

    /// Makes the custom-images dir; returns where image `id` goes and its temp name.
    pub(super) fn image_target(&self, id: &str) -> Result<(PathBuf, PathBuf), EngineError> {
        check_id(id)?;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.images_dir())?;
        let path = self.image_path(id);
        if path.exists() {
            return Err(EngineError::Storage(format!(
                "image file {} exists already",
                path.display()
            )));
        }
        Ok((path.clone(), path.with_extension("ext4.tmp")))
    }

    /// Flattens VM `vm`'s disk into image `image`; a running VM writes its
    /// page cache out first and is paused while its disk is copied.
    /// Returns the host bytes the image takes.
    pub(super) async fn save_disk(
        &self,
        vm: &str,
        rt: &VmRuntime,
        image: &str,
    ) -> Result<u64, EngineError> {
        check_id(vm)?;
        let (path, tmp) = self.image_target(image)?;
        let files = VmFiles::new(self.sandbox_dir(vm));
        let running = self.vm(vm).is_some();
        let qmp = if running {
            let agent = crate::engine::Engine::agent(self, vm, rt);
            let synced = tokio::time::timeout(
                GUEST_SYNC_TIMEOUT,
                agent.exec_buffered(ExecRequest::command(["sync"])),
            )
            .await
            .map_err(|_| EngineError::Storage("the guest did not finish `sync`".into()))?
            .map_err(|e| EngineError::Storage(format!("cannot sync the guest's disk: {e}")))?;
            if synced.exit_code != 0 {
                return Err(EngineError::Storage("`sync` failed in the guest".into()));
            }
            let q = self.qmp_of(vm).await?;
            // `stop` also flushes QEMU's own caches to the overlay.
            q.stop()
                .await
                .map_err(|e| EngineError::Storage(format!("cannot pause {vm}: {e}")))?;
            Some(q)
        } else {
            None
        };
        let (src, t) = (files.overlay.clone(), tmp.clone());
        let started = std::time::Instant::now();
        let copied = blocking(move || flatten(&src, &t)).await;
        if let Some(q) = &qmp {
            if let Err(e) = q.cont().await {
                tracing::error!(vm, error = %e, "cannot resume a VM after saving its disk");
            }
        }
        tracing::info!(
            vm,
            image,
            paused = running,
            copy_ms = started.elapsed().as_millis() as u64,
            "disk flattened into an image"
        );
        let finish = move || -> Result<u64, EngineError> {
            copied??;
            // The copy is of a mounted filesystem: replay its journal now.
            super::volumes::make_clean(&tmp)?;
            std::fs::rename(&tmp, &path)?;
            Ok(std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path)?) * 512)
        };
        let tmp2 = self.image_path(image).with_extension("ext4.tmp");
        match blocking(finish).await? {
            Ok(n) => Ok(n),
            Err(e) => {
                let _ = std::fs::remove_file(tmp2);
                Err(e)
            }
        }
    }

    /// Makes image `id` from the root filesystem tree `tree`: a sparse
    /// `size_mb` MiB ext4 with the tree's files, owners and modes.
    pub(super) async fn image_from_tree(
        &self,
        id: &str,
        tree: &Path,
        size_mb: u64,
    ) -> Result<u64, EngineError> {
        let (path, tmp) = self.image_target(id)?;
        let tree = tree.to_path_buf();
        blocking(move || -> Result<u64, EngineError> {
            let made = (|| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)?;
                f.set_len(size_mb * 1024 * 1024)?;
                drop(f);
                let out = Command::new("mke2fs")
                    .args(["-q", "-F", "-t", "ext4", "-m", "0", "-d"])
                    .arg(&tree)
                    .arg(&tmp)
                    .output()
                    .map_err(|e| EngineError::Storage(format!("cannot run mke2fs: {e}")))?;
                if !out.status.success() {
                    return Err(EngineError::Storage(format!(
                        "mke2fs -d failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                std::fs::rename(&tmp, &path)?;
                Ok(std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path)?) * 512)
            })();
            if made.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            made
        })
        .await?
    }

    /// Removes image `id`'s file.
    pub(super) fn remove_image(&self, id: &str) -> Result<(), EngineError> {
        check_id(id)?;
        match std::fs::remove_file(self.image_path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sandboxes (by id) and layers (their id after [`LAYER_USER`])
    /// whose disk backs onto image `id` directly.
    pub(super) fn image_backers(&self, id: &str) -> Result<Vec<String>, EngineError> {
        check_id(id)?;
        let target = self.image_path(id).display().to_string();
        let mut users = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.sandboxes_dir) {
            for e in rd.flatten() {
                let disk = e.path().join("disk.qcow2");
                if qcow2_backing(&disk).as_deref() == Some(target.as_str()) {
                    users.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.sandboxes_dir.with_file_name("layers")) {
            for e in rd.flatten() {
                if qcow2_backing(&e.path()).as_deref() == Some(target.as_str()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    users.push(format!("{LAYER_USER}{}", name.trim_end_matches(".qcow2")));
                }
            }
        }
        Ok(users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_of_an_overlay() {
        if Command::new("qemu-img").arg("--version").output().is_err() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.ext4");
        std::fs::write(&base, vec![0u8; 1 << 20]).expect("base");
        let ov = dir.path().join("ov.qcow2");
        super::super::disks::create_overlay(&base, &ov).expect("overlay");
        assert_eq!(
            qcow2_backing(&ov),
            Some(base.canonicalize().expect("canon").display().to_string())
        );
        assert_eq!(qcow2_backing(&base), None);
        assert_eq!(qcow2_backing(&dir.path().join("none")), None);
        let flat = dir.path().join("flat.raw");
        flatten(&ov, &flat).expect("flatten");
        assert_eq!(std::fs::metadata(&flat).expect("meta").len(), 1 << 20);
    }
}
