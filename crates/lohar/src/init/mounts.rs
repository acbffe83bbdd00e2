//! The filesystems PID 1 provides in the real root: /proc, /sys, /dev and
//! its pts/shm, /run, /tmp, cgroup2, and the /dev symlinks shells expect.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use nix::mount::MsFlags;

/// One mount: source, target, filesystem type, flags and options.
pub struct Mount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: &'static str,
}

impl Mount {
    /// A mount with the usual nosuid/nodev flags for kernel filesystems.
    pub const fn new(
        source: &'static str,
        target: &'static str,
        fstype: &'static str,
        data: &'static str,
    ) -> Self {
        Mount {
            source,
            target,
            fstype,
            flags: MsFlags::MS_NOSUID,
            data,
        }
    }

    const fn flags(mut self, flags: MsFlags) -> Self {
        self.flags = flags;
        self
    }
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// Needed: without any of these the agent cannot do its job.
const REQUIRED: &[Mount] = &[
    Mount::new("proc", "/proc", "proc", "").flags(NOSUID_NODEV_NOEXEC),
    Mount::new("sysfs", "/sys", "sysfs", "").flags(NOSUID_NODEV_NOEXEC),
    Mount::new("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
    // gid 5 is "tty" in Debian; ptmxmode lets every user open /dev/pts/ptmx.
    Mount::new(
        "devpts",
        "/dev/pts",
        "devpts",
        "gid=5,mode=0620,ptmxmode=0666",
    )
    .flags(MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC)),
    Mount::new("tmpfs", "/dev/shm", "tmpfs", "mode=1777").flags(NOSUID_NODEV),
    Mount::new("tmpfs", "/run", "tmpfs", "mode=0755").flags(NOSUID_NODEV),
    Mount::new("tmpfs", "/tmp", "tmpfs", "mode=1777").flags(NOSUID_NODEV),
];

/// Nice to have: failures are reported, not fatal.
const OPTIONAL: &[Mount] =
    &[Mount::new("cgroup2", "/sys/fs/cgroup", "cgroup2", "").flags(NOSUID_NODEV_NOEXEC)];

/// True when `path` is the root of a mount (its device differs from its parent's).
fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(parent)) = (std::fs::metadata(path), path.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != me.dev())
}

/// Mounts `m` unless something is mounted there already; creates the target.
pub fn mount_fs(m: &Mount) -> Result<(), String> {
    let target = Path::new(m.target);
    if is_mountpoint(target) {
        return Ok(());
    }
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {}: {e}", m.target))?;
    let data = (!m.data.is_empty()).then_some(m.data);
    nix::mount::mount(Some(m.source), m.target, Some(m.fstype), m.flags, data)
        .map_err(|e| format!("mount {} on {}: {e}", m.fstype, m.target))
}

/// Everything PID 1 mounts in the real root.
pub fn mount_all() -> Result<(), String> {
    for m in REQUIRED {
        mount_fs(m)?;
    }
    for m in OPTIONAL {
        if let Err(e) = mount_fs(m) {
            super::say(&format!("warning: {e}"));
        }
    }
    // devtmpfs has no /dev/fd & co; bash's <(…) and many scripts need them.
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            symlink(to, link).map_err(|e| format!("symlink {link}: {e}"))?;
        }
    }
    let lock = Path::new("/run/lock");
    std::fs::create_dir_all(lock).map_err(|e| format!("mkdir /run/lock: {e}"))?;
    std::fs::set_permissions(lock, std::fs::Permissions::from_mode(0o1777))
        .map_err(|e| format!("chmod /run/lock: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_is_a_mountpoint_and_its_subdir_is_not() {
        assert!(is_mountpoint(Path::new("/proc")));
        assert!(!is_mountpoint(Path::new("/proc/self")));
    }
}
