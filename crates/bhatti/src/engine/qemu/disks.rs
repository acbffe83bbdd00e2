//! Per-sandbox disks: a qcow2 overlay on the shared, read-only base rootfs.
//!
//! Creating one copies nothing (≈ 8 ms); the sandbox's writes stay in its
//! overlay. QEMU stores the backing path as given, so it must be absolute.

use std::path::Path;
use std::process::Command;

/// Errors of creating an overlay.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The base image is missing.
    #[error("base rootfs {0} does not exist (build the images first)")]
    MissingBase(String),
    /// `qemu-img` could not be started.
    #[error("cannot run qemu-img: {0} (is qemu-utils installed?)")]
    Spawn(std::io::Error),
    /// `qemu-img` failed.
    #[error("qemu-img failed: {0}")]
    Failed(String),
    #[error("cannot resolve the base rootfs path {path}: {source}")]
    Resolve {
        path: String,
        source: std::io::Error,
    },
}

/// Runs one `qemu-img` command; its stdout, or its stderr as the error.
fn qemu_img(cmd: &mut Command) -> Result<Vec<u8>, DiskError> {
    let out = cmd.output().map_err(DiskError::Spawn)?;
    if !out.status.success() {
        return Err(DiskError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(out.stdout)
}

/// Creates `overlay` as a qcow2 whose backing file is the raw `base`.
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<(), DiskError> {
    if !base.is_file() {
        return Err(DiskError::MissingBase(base.display().to_string()));
    }
    let base = std::fs::canonicalize(base).map_err(|source| DiskError::Resolve {
        path: base.display().to_string(),
        source,
    })?;
    qemu_img(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(overlay),
    )?;
    Ok(())
}

/// Creates `overlay` as a qcow2 on the read-only qcow2 `layer` (absolute
/// path), of `size` bytes. `-u`: the layer may be held by a running QEMU;
/// its size is given, not probed.
pub fn create_overlay_on_layer(layer: &Path, overlay: &Path, size: u64) -> Result<(), DiskError> {
    if !layer.is_absolute() {
        return Err(DiskError::Failed(format!(
            "layer path {} must be absolute",
            layer.display()
        )));
    }
    qemu_img(
        Command::new("qemu-img")
            .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(layer)
            .arg(overlay)
            .arg(size.to_string()),
    )?;
    Ok(())
}

/// Makes qcow2 `overlay` (no process may have it open) back onto the raw
/// `base` at the bottom of its chain, copying into it whatever its layers
/// hold (`qemu-img rebase` in safe mode: only ranges the layers above the
/// base have allocated are read). Crash-safe: the backing file changes last,
/// after the data it needs is in the overlay.
///
/// The child dies with the calling thread: a rebase left running by a
/// killed daemon would go on writing the overlay while the next daemon
/// starts the VM on it (no image locks), and a cut rebase is harmless.
pub fn rebase_onto_base(overlay: &Path, base: &Path) -> Result<(), DiskError> {
    let mut cmd = Command::new("qemu-img");
    super::process::die_with_caller(&mut cmd, libc::SIGKILL);
    qemu_img(
        cmd.args(["rebase", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(overlay),
    )?;
    Ok(())
}

/// What `qemu-img info` says about an image (the fields we read).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ImageInfo {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

/// `qemu-img info` of `image` alone; `-U`: a running QEMU may hold it.
pub fn info(image: &Path) -> Result<ImageInfo, DiskError> {
    let out = qemu_img(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(image),
    )?;
    serde_json::from_slice(&out).map_err(|e| DiskError::Failed(e.to_string()))
}

/// Whether `image` (a qcow2 overlay) holds no data of its own: every range
/// of `qemu-img map` comes from a backing file. `-U`: QEMU may hold it
/// (stopped, so flushed).
pub fn overlay_is_empty(image: &Path) -> Result<bool, DiskError> {
    #[derive(serde::Deserialize)]
    struct Extent {
        depth: u64,
    }
    let out = qemu_img(
        Command::new("qemu-img")
            .args(["map", "-U", "--output=json"])
            .arg(image),
    )?;
    let map: Vec<Extent> =
        serde_json::from_slice(&out).map_err(|e| DiskError::Failed(e.to_string()))?;
    Ok(map.iter().all(|e| e.depth > 0))
}

/// Number of images in `image`'s backing chain, itself and the base included.
pub fn chain_depth(image: &Path) -> Result<usize, DiskError> {
    backing_chain(image).map(|c| c.len())
}

/// The file names of `image`'s chain, top first, the base last.
pub fn backing_chain(image: &Path) -> Result<Vec<String>, DiskError> {
    let out = qemu_img(
        Command::new("qemu-img")
            .args(["info", "-U", "--backing-chain", "--output=json"])
            .arg(image),
    )?;
    let v: Vec<serde_json::Value> =
        serde_json::from_slice(&out).map_err(|e| DiskError::Failed(e.to_string()))?;
    Ok(v.iter()
        .map(|i| i["filename"].as_str().unwrap_or_default().to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_backs_onto_absolute_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.ext4");
        std::fs::write(&base, vec![0u8; 1 << 20]).expect("write base");
        let overlay = dir.path().join("disk.qcow2");
        if Command::new("qemu-img").arg("--version").output().is_err() {
            eprintln!("qemu-img not installed; skipping");
            return;
        }
        create_overlay(&base, &overlay).expect("create");
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&overlay)
            .output()
            .expect("info");
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(v["format"], "qcow2");
        assert_eq!(
            v["backing-filename"],
            base.canonicalize().expect("canon").display().to_string()
        );
        assert_eq!(v["backing-filename-format"], "raw");
        assert!(matches!(
            create_overlay(&dir.path().join("nope"), &overlay),
            Err(DiskError::MissingBase(_))
        ));
    }

    /// A rebase whose caller dies (a daemon killed mid-flatten) stops with
    /// it instead of writing the overlay on, unsupervised.
    #[test]
    fn rebase_dies_with_its_caller() {
        const CHILD: &str = "BHATTI_TEST_REBASE_CHILD";
        if let Ok(v) = std::env::var(CHILD) {
            if let Some((overlay, base)) = v.split_once('\n') {
                let _ = rebase_onto_base(Path::new(overlay), Path::new(base));
            }
            return;
        }
        if Command::new("qemu-io").arg("--version").output().is_err() {
            eprintln!("qemu-io not installed; skipping");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::File::create(&base)
            .and_then(|f| f.set_len(1 << 30))
            .expect("base");
        let (layer, overlay) = (dir.path().join("l.qcow2"), dir.path().join("o.qcow2"));
        create_overlay(&base, &layer).expect("layer");
        let w = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xab 0 768M"])
            .arg(&layer)
            .output()
            .expect("qemu-io");
        assert!(w.status.success(), "{w:?}");
        create_overlay_on_layer(&layer, &overlay, 1 << 30).expect("overlay");
        let running = || {
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .any(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("rebase") && c.contains(&*overlay.to_string_lossy())
                })
        };
        let mut child = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "engine::qemu::disks::tests::rebase_dies_with_its_caller",
            ])
            .env(CHILD, format!("{}\n{}", overlay.display(), base.display()))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("child");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !running() {
            assert!(
                std::time::Instant::now() < deadline,
                "the rebase never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().expect("kill");
        child.wait().expect("wait");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!running(), "qemu-img rebase outlived its caller");
    }
}
