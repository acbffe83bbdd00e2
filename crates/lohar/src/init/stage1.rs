//! Stage 1, inside the initramfs: load the kernel modules, find and mount the
//! root disk, and switch root to it. Afterwards the same process carries on
//! as PID 1 of the real system (there is no second init to exec).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use bhatti_proto::boot::{INITRAMFS_MODULES_DIR, INITRAMFS_MODULES_ORDER};
use nix::mount::MsFlags;

use super::mounts::{mount_fs, Mount};

/// Where the root disk is mounted before it becomes `/`.
const NEWROOT: &str = "/newroot";
/// How long the root disk may take to appear after its driver loads.
const ROOT_WAIT: Duration = Duration::from_secs(10);

/// True when lohar runs as `/init` from a bhatti initramfs.
pub fn in_initramfs() -> bool {
    Path::new(INITRAMFS_MODULES_ORDER).is_file()
}

/// The kernel-visible filesystems stage 1 needs, moved into the new root later.
const EARLY: &[Mount] = &[
    Mount::new("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
    Mount::new("proc", "/proc", "proc", ""),
    Mount::new("sysfs", "/sys", "sysfs", ""),
];

/// Mounts /dev, /proc and /sys and loads the modules in manifest order.
pub fn prepare() -> Result<(), String> {
    for m in EARLY {
        mount_fs(m)?;
    }
    load_modules()
}

/// Mounts the root disk and makes it `/`, carrying /dev, /proc and /sys along.
pub fn switch_root() -> Result<(), String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let root = cmdline_value(&cmdline, "root").unwrap_or("/dev/vda");
    let fstype = cmdline_value(&cmdline, "rootfstype").unwrap_or("ext4");
    let read_only = cmdline.split_whitespace().any(|w| w == "ro");

    wait_for(Path::new(root), ROOT_WAIT).map_err(|waited| {
        format!(
            "root disk {root} did not appear within {waited:?} (is a virtio-blk-device attached?)"
        )
    })?;
    std::fs::create_dir_all(NEWROOT).map_err(|e| format!("mkdir {NEWROOT}: {e}"))?;
    let mut flags = MsFlags::MS_NOATIME;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(Some(root), NEWROOT, Some(fstype), flags, None::<&str>)
        .map_err(|e| format!("mount {root} ({fstype}) on {NEWROOT}: {e}"))?;

    for m in EARLY {
        let target = format!("{NEWROOT}{}", m.target);
        std::fs::create_dir_all(&target).map_err(|e| format!("mkdir {target}: {e}"))?;
        nix::mount::mount(
            Some(m.target),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| format!("move {} to {target}: {e}", m.target))?;
    }
    // The modules are loaded: free their copies in the initramfs (RAM).
    // Best effort; failing only costs a few hundred KiB.
    let _ = std::fs::remove_dir_all(
        Path::new(INITRAMFS_MODULES_DIR)
            .parent()
            .unwrap_or(Path::new("/bhatti")),
    );

    // The classic switch_root: the initramfs cannot be pivot_root'ed away.
    nix::unistd::chdir(NEWROOT).map_err(|e| format!("chdir {NEWROOT}: {e}"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move {NEWROOT} to /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// `key=value` from the kernel command line.
fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
}

/// Polls for `path`; on timeout returns how long it waited.
pub fn wait_for(path: &Path, limit: Duration) -> Result<(), Duration> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() >= limit {
            return Err(limit);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn load_modules() -> Result<(), String> {
    let order = std::fs::read_to_string(INITRAMFS_MODULES_ORDER)
        .map_err(|e| format!("read {INITRAMFS_MODULES_ORDER}: {e}"))?;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(INITRAMFS_MODULES_DIR).join(name);
        load_module(&path).map_err(|e| format!("load module {}: {e}", path.display()))?;
    }
    Ok(())
}

/// finit_module(2) with no parameters; "already loaded" is success.
fn load_module(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let params = CString::default();
    // SAFETY: finit_module reads the open fd and the NUL-terminated (empty)
    // parameter string, both valid for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_values() {
        let c = "console=ttyS0 quiet root=/dev/vdb rootfstype=ext4 ro root2=x";
        assert_eq!(cmdline_value(c, "root"), Some("/dev/vdb"));
        assert_eq!(cmdline_value(c, "rootfstype"), Some("ext4"));
        assert_eq!(cmdline_value(c, "init"), None);
        assert_eq!(cmdline_value("root=", "root"), None);
    }

    #[test]
    fn wait_for_times_out() {
        assert!(wait_for(Path::new("/"), Duration::ZERO).is_ok());
        assert_eq!(
            wait_for(Path::new("/no/such/path"), Duration::from_millis(10)),
            Err(Duration::from_millis(10))
        );
    }
}
