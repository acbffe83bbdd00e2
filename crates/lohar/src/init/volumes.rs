//! Volumes: virtio-blk disks of their own (ext4), found by their virtio
//! serial and mounted before the init script runs.
//!
//! The host names each disk by a serial (`-device virtio-blk-device,serial=…`)
//! rather than by position, so a mount never lands on the wrong disk whatever
//! order the kernel probes them in.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bhatti_proto::VolumeMount;
use nix::mount::MsFlags;

/// How long the volume disks may take to show up after boot.
const DISK_WAIT: Duration = Duration::from_secs(10);

/// The block device (`/dev/vdX`) whose virtio serial is `serial`, looked up in `sys_block`.
fn device_of(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    for e in entries.flatten() {
        let name = e.file_name();
        let Ok(found) = std::fs::read_to_string(e.path().join("serial")) else {
            continue;
        };
        if found.trim_end_matches(['\n', '\0']) == serial {
            return Some(Path::new("/dev").join(name));
        }
    }
    None
}

/// The volumes in the order to mount them: fewest path components first,
/// so a volume mounted inside another's path (`/mnt/a/b` in `/mnt/a`) is
/// mounted on top of it, not hidden under it, whatever order they came in.
fn mount_order(volumes: &[VolumeMount]) -> Vec<&VolumeMount> {
    let mut order: Vec<&VolumeMount> = volumes.iter().collect();
    order.sort_by_key(|v| Path::new(&v.path).components().count());
    order
}

/// Mounts every volume of the boot config (outer paths before the paths
/// inside them); a missing disk or a failed mount is fatal.
pub fn mount_all(volumes: &[VolumeMount]) -> Result<(), String> {
    let sys_block = Path::new("/sys/block");
    for v in mount_order(volumes) {
        let start = Instant::now();
        let dev = loop {
            if let Some(d) = device_of(sys_block, &v.serial) {
                break d;
            }
            if start.elapsed() >= DISK_WAIT {
                return Err(format!(
                    "volume disk with serial {:?} did not appear within {DISK_WAIT:?}",
                    v.serial
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        mount_one(&dev, v)?;
    }
    Ok(())
}

fn mount_one(dev: &Path, v: &VolumeMount) -> Result<(), String> {
    let target = Path::new(&v.path);
    if !target.is_absolute() {
        return Err(format!("volume mount path {:?} is not absolute", v.path));
    }
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {}: {e}", v.path))?;
    let mut flags = MsFlags::MS_NOATIME | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if v.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(Some(dev), target, Some("ext4"), flags, None::<&str>)
        .map_err(|e| format!("mount volume {} on {}: {e}", dev.display(), v.path))?;
    super::say(&format!(
        "volume {} on {}{}",
        dev.display(),
        v.path,
        if v.read_only { " (read-only)" } else { "" }
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Given inner-first, the outer volume is still mounted first.
    #[test]
    fn outer_mounts_come_first() {
        let m = |serial: &str, path: &str| VolumeMount {
            serial: serial.into(),
            path: path.into(),
            read_only: false,
        };
        let given = [
            m("n1", "/mnt/a/b"),
            m("n2", "/mnt/a"),
            m("n3", "/data//x/"),
            m("n4", "/srv"),
        ];
        let order: Vec<&str> = mount_order(&given)
            .iter()
            .map(|v| v.serial.as_str())
            .collect();
        assert_eq!(order, ["n4", "n2", "n3", "n1"]);
    }

    #[test]
    fn finds_the_device_by_serial() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (dev, serial) in [("vda", ""), ("vdb", "vol-abc\n"), ("vdc", "vol-def")] {
            std::fs::create_dir(dir.path().join(dev)).expect("mkdir");
            std::fs::write(dir.path().join(dev).join("serial"), serial).expect("write");
        }
        std::fs::create_dir(dir.path().join("loop0")).expect("mkdir");
        assert_eq!(
            device_of(dir.path(), "vol-abc"),
            Some(PathBuf::from("/dev/vdb"))
        );
        assert_eq!(
            device_of(dir.path(), "vol-def"),
            Some(PathBuf::from("/dev/vdc"))
        );
        assert_eq!(device_of(dir.path(), "vol-x"), None);
    }
}
