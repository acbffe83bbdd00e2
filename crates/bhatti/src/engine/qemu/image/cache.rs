//! Housekeeping of `images_dir`: the builder lock, scratch directories and
//! their safe removal, and `current.json`.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::{ImageError, ImagePaths, Progress};

/// Takes the builder lock, telling the user when another builder holds it.
pub(super) fn lock(dir: &Path, progress: &dyn Progress) -> Result<Flock<File>, ImageError> {
    let path = dir.join(".lock");
    let open = || {
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
    };
    let file = open().map_err(|e| ImageError::io(&path, e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((file, _)) => {
            progress.note(&format!(
                "waiting for another image build ({} is locked)",
                path.display()
            ));
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| ImageError::io(&path, std::io::Error::from(e)))
        }
    }
}

/// Leftovers of interrupted builds; safe to remove while we hold the lock.
pub(super) fn clean_stale_tmp(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            remove_any(&e.path());
        }
    }
}

/// Removes a build leftover, never crossing into a mount: an mmdebstrap that
/// was killed leaves the host's /dev entries and /sys bind-mounted in its
/// tree, and a plain recursive delete would remove host device nodes.
/// Mounts below `p` are detached first; if any remains, nothing is deleted.
pub(super) fn remove_any(p: &Path) {
    let mounts = mounts_below(p);
    for m in &mounts {
        // Deepest first (sorted by mounts_below); a failure is caught below.
        let _ = nix::mount::umount2(m.as_path(), nix::mount::MntFlags::MNT_DETACH);
    }
    if !mounts.is_empty() && !mounts_below(p).is_empty() {
        tracing::warn!(
            "not removing {}: something is still mounted below it",
            p.display()
        );
        return;
    }
    // Best effort: a leftover only costs disk space and is retried next build.
    let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
}

/// Mount points at or below `p`, deepest first, from /proc/self/mountinfo.
fn mounts_below(p: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(p))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A scratch directory in `images_dir` that is removed with [`remove_any`].
pub(super) struct WorkDir(PathBuf);

impl WorkDir {
    pub(super) fn new(dir: &Path, prefix: &str) -> Result<WorkDir, ImageError> {
        let t = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(dir)
            .map_err(|e| ImageError::io(dir, e))?;
        Ok(WorkDir(t.keep()))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        remove_any(&self.0);
    }
}

pub(super) fn read_current(dir: &Path) -> Option<ImagePaths> {
    let text = std::fs::read_to_string(dir.join("current.json")).ok()?;
    serde_json::from_str(&text).ok()
}

pub(super) fn write_current(dir: &Path, paths: &ImagePaths) -> Result<(), ImageError> {
    let p = dir.join("current.json");
    let tmp = dir.join(".tmp-current.json");
    let json = serde_json::to_string_pretty(paths)
        .map_err(|e| ImageError::io(&p, std::io::Error::other(e)))?;
    std::fs::write(&tmp, json + "\n").map_err(|e| ImageError::io(&tmp, e))?;
    std::fs::rename(&tmp, &p).map_err(|e| ImageError::io(&p, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn finds_mounts_below() {
        assert!(mounts_below(Path::new("/proc")).contains(&PathBuf::from("/proc")));
        assert!(mounts_below(Path::new("/no/such/dir")).is_empty());
    }

    #[test]
    fn remove_any_never_deletes_through_a_mount() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("needs root to bind-mount; covered by the CI run as root");
            return;
        }
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("precious"), b"x").expect("write");
        let leftover = tempfile::tempdir().expect("tempdir");
        let tree = leftover.path().join(".tmp-rootfs-work-x");
        let target = tree.join("tree/sys");
        std::fs::create_dir_all(&target).expect("mkdir");
        nix::mount::mount(
            Some(outside.path()),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind mount");
        remove_any(&tree);
        assert!(
            outside.path().join("precious").exists(),
            "deleted through a mount"
        );
        assert!(!tree.exists(), "leftover not removed");
    }

    #[test]
    fn current_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = ImagePaths {
            kernel: "/i/k".into(),
            initramfs: "/i/i".into(),
            rootfs: "/i/r".into(),
        };
        write_current(dir.path(), &p).expect("write");
        assert_eq!(read_current(dir.path()), Some(p));
    }
}
