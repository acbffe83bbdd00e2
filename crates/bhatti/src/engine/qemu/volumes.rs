//! Volume disks: `<data_dir>/volumes/<id>.img`, sparse raw files holding an
//! ext4 filesystem whose root belongs to uid/gid 1000 (the guest's `lohar`).
//!
//! A VM gets each of its volumes as a virtio-blk disk whose serial is the
//! volume id (see `process::qemu_argv`); lohar mounts it by that serial.
//! Raw rather than qcow2: a volume has no backing chain, the file is sparse
//! anyway, and growing it is a truncate plus `resize2fs`.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bhatti_proto::ExecRequest;

use super::{blocking, check_id, QemuEngine};
use crate::engine::{EngineError, VmRuntime};

/// The guest user a new volume's root directory belongs to.
const GUEST_UID: u32 = 1000;
/// How long the guest may take to grow a mounted filesystem.
const GUEST_RESIZE_TIMEOUT: Duration = Duration::from_secs(120);
/// How many 50 ms polls the guest waits for a grown disk's new size to show
/// (10 s; the config-change interrupt normally lands within milliseconds).
const GUEST_SIZE_POLLS: u32 = 200;

const MIB: u64 = 1024 * 1024;

/// Runs a host tool; its stderr (or stdout) is the error.
fn run(cmd: &mut Command, what: &str) -> Result<(), EngineError> {
    let out = cmd.output().map_err(|e| {
        EngineError::Storage(format!("cannot run {what}: {e} (is e2fsprogs installed?)"))
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if msg.is_empty() {
        msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(EngineError::Storage(format!(
        "{what} failed ({}): {msg}",
        out.status
    )))
}

/// Makes `path` a sparse `size_mb` MiB file with an ext4 filesystem owned by the guest user.
pub fn make_volume(path: &Path, size_mb: u64) -> Result<(), EngineError> {
    let tmp = path.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.set_len(size_mb * MIB)?;
    drop(f);
    let made = run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-m", "0", "-E"])
            .arg(format!("root_owner={GUEST_UID}:{GUEST_UID}"))
            .arg(&tmp),
        "mke2fs",
    );
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Replays the journal of the volume at `path` if its last writer did not
/// unmount it (a destroyed sandbox never does), so that a read-only mount
/// finds a clean filesystem: ext4 refuses to mount read-only a disk it may
/// not replay. Only called with no writer attached; on a clean filesystem
/// `e2fsck -p` writes nothing.
pub fn make_clean(path: &Path) -> Result<(), EngineError> {
    let out = Command::new("e2fsck")
        .arg("-p")
        .arg(path)
        .output()
        .map_err(|e| EngineError::Storage(format!("cannot run e2fsck: {e}")))?;
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(EngineError::Storage(format!(
            "the volume's filesystem needs a manual check: e2fsck {} ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(())
}

/// Whether a disk of `current` bytes must be grown to reach `size_mb` MiB
/// (never to shrink it).
fn needs_block_resize(current: u64, size_mb: u64) -> bool {
    current < size_mb.saturating_mul(MIB)
}

/// Grows the (unused) volume file at `path` and its filesystem to `size_mb` MiB.
pub fn grow_offline(path: &Path, size_mb: u64) -> Result<(), EngineError> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    if f.metadata()?.len() < size_mb * MIB {
        f.set_len(size_mb * MIB)?;
    }
    drop(f);
    // resize2fs wants a freshly checked filesystem; -p fixes only what is safe.
    let out = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(path)
        .output()
        .map_err(|e| EngineError::Storage(format!("cannot run e2fsck: {e}")))?;
    // 0: clean, 1: errors fixed; anything else needs a human.
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(EngineError::Storage(format!(
            "e2fsck of the volume failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    run(Command::new("resize2fs").arg(path), "resize2fs")
}

impl QemuEngine {
    /// Where volumes' disks live.
    fn volumes_dir(&self) -> PathBuf {
        self.sandboxes_dir.with_file_name("volumes")
    }

    /// The disk of volume `id`.
    pub fn volume_path(&self, id: &str) -> PathBuf {
        self.volumes_dir().join(format!("{id}.img"))
    }

    pub(super) async fn make_volume(&self, id: &str, size_mb: u64) -> Result<(), EngineError> {
        check_id(id)?;
        let (dir, path) = (self.volumes_dir(), self.volume_path(id));
        blocking(move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            if path.exists() {
                return Err(EngineError::Storage(format!(
                    "volume disk {} exists already",
                    path.display()
                )));
            }
            make_volume(&path, size_mb)
        })
        .await?
    }

    pub(super) async fn remove_volume(&self, id: &str) -> Result<(), EngineError> {
        check_id(id)?;
        match std::fs::remove_file(self.volume_path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn grow(
        &self,
        id: &str,
        size_mb: u64,
        attached: Option<(&str, &VmRuntime)>,
    ) -> Result<(), EngineError> {
        check_id(id)?;
        let path = self.volume_path(id);
        if !path.is_file() {
            return Err(EngineError::NotFound(format!(
                "volume disk {}",
                path.display()
            )));
        }
        let Some((vm, rt)) = attached else {
            return blocking(move || grow_offline(&path, size_mb)).await?;
        };
        // QEMU grows the file and tells the guest; the guest grows the
        // mounted filesystem (ext4 grows online). The device never shrinks:
        // an earlier grow whose guest half failed left the file larger than
        // the record, and `block_resize` to a smaller size would cut the
        // filesystem's tail off. Then only the guest half is redone.
        let current = std::fs::metadata(&path)?.len();
        if needs_block_resize(current, size_mb) {
            self.qmp_of(vm)
                .await?
                .block_resize(id, size_mb * MIB)
                .await
                .map_err(|e| EngineError::Storage(format!("cannot grow the volume's disk: {e}")))?;
        }
        // `block_resize` returns before the guest kernel has taken the new
        // capacity (a config-change interrupt, handled later): resize2fs run
        // too early finds "nothing to do" and exits 0 with the old size. So
        // the guest first waits until the device shows the new size
        // (`size` is in 512-byte sectors).
        let sectors = size_mb * MIB / 512;
        let script = format!(
            "for d in /sys/block/*; do if [ \"$(cat $d/serial 2>/dev/null)\" = {id} ]; then \
             i=0; while [ \"$(cat $d/size)\" -lt {sectors} ]; do i=$((i+1)); \
             if [ $i -gt {GUEST_SIZE_POLLS} ]; then echo \"the disk still has $(cat $d/size) sectors, not {sectors}\" >&2; exit 1; fi; \
             sleep 0.05; done; exec resize2fs /dev/${{d##*/}}; fi; done; \
             echo 'no disk with serial {id}' >&2; exit 1"
        );
        // From here on the disk has its new size: a failure says so, and
        // the caller records the new size all the same.
        let grown = EngineError::FilesystemNotGrown;
        let agent = crate::engine::Engine::agent(self, vm, rt);
        let out = tokio::time::timeout(
            GUEST_RESIZE_TIMEOUT,
            agent.exec_buffered(ExecRequest::command(["sudo", "-n", "sh", "-c", &script])),
        )
        .await
        .map_err(|_| grown("the guest did not finish resize2fs in time".into()))?
        .map_err(|e| grown(format!("cannot run resize2fs in the guest: {e}")))?;
        if out.exit_code != 0 {
            return Err(grown(format!(
                "resize2fs in the guest failed (exit {}): {}",
                out.exit_code,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    pub(super) fn volume_bytes(&self, id: &str) -> Result<u64, EngineError> {
        check_id(id)?;
        let meta = std::fs::metadata(self.volume_path(id))?;
        Ok(meta.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("-V").output().is_ok()
    }

    #[test]
    fn a_live_grow_never_shrinks_the_device() {
        assert!(needs_block_resize(16 * MIB, 32));
        // A file left at 64 MiB by a grow whose guest half failed: a later
        // grow to 48 MiB (above the recorded 32) must not resize the device.
        assert!(!needs_block_resize(64 * MIB, 48));
        assert!(!needs_block_resize(64 * MIB, 64));
    }

    #[test]
    fn make_and_grow_a_volume() {
        if !have("mke2fs") || !have("dumpe2fs") {
            eprintln!("e2fsprogs missing; skipping");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("v.img");
        make_volume(&p, 16).expect("make");
        assert_eq!(std::fs::metadata(&p).expect("meta").len(), 16 * MIB);
        // Sparse: far less than the size is allocated.
        assert!(std::fs::metadata(&p).expect("meta").blocks() * 512 < 16 * MIB);
        let stat = Command::new("debugfs")
            .args(["-R", "stat /"])
            .arg(&p)
            .output()
            .expect("debugfs");
        let text = String::from_utf8_lossy(&stat.stdout);
        assert!(
            text.contains("User:  1000") && text.contains("Group:  1000"),
            "{text}"
        );
        let blocks = |p: &Path| {
            let out = Command::new("dumpe2fs")
                .arg("-h")
                .arg(p)
                .output()
                .expect("dumpe2fs");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let count = |key: &str| -> u64 {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("field")
            };
            count("Block count:") * count("Block size:")
        };
        assert_eq!(blocks(&p), 16 * MIB);
        grow_offline(&p, 40).expect("grow");
        assert_eq!(blocks(&p), 40 * MIB);
        make_clean(&p).expect("clean");
    }
}
