//! Guest RAM files: copying one while its VM is paused (a checkpoint's
//! memory). The files are sparse: pages the guest never touched, or gave
//! back through free page reporting (QEMU punches a hole), cost nothing,
//! and a copy keeps them holes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Copies `src` to the new file `dst` (mode 0600), the same length, holes
/// kept: a reflink where the filesystem has them (one metadata operation),
/// else every data range by `copy_file_range` (in the kernel, no trip
/// through user space), or across filesystems through a buffer that skips
/// zero pages (a ramfs has no holes to report). Returns the bytes of data copied (the whole length
/// for a reflink).
///
/// Errors: any I/O error; `dst` is removed then.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<u64> {
    let from = File::open(src)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    let r = copy_open(&from, &to);
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r
}

fn copy_open(from: &File, to: &File) -> io::Result<u64> {
    let len = from.metadata()?.len();
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call.
    let cloned = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if cloned == 0 {
        return Ok(len);
    }
    to.set_len(len)?;
    let mut copied = 0u64;
    let mut pos: i64 = 0;
    let end = i64::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    while pos < end {
        let Some(data) = seek(from, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(from, data, libc::SEEK_HOLE)?.unwrap_or(end);
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX);
            // SAFETY: both descriptors are open; the offsets are valid
            // pointers to i64s that the kernel advances.
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                // Across filesystems (disk → ramfs) the kernel may refuse: copy by hand.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
                ) {
                    // By hand rather than `sendfile`: a ramfs reports no
                    // holes, and zero pages must not become data.
                    copied += copy_by_hand(from, to, off_in, hole)?;
                    break;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            copied += n as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

/// Copies `[start, end)` through a buffer; all-zero blocks stay holes.
/// Returns the bytes written.
fn copy_by_hand(from: &File, to: &File, start: i64, end: i64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let (mut pos, end) = (start as u64, end as u64);
    let mut copied = 0;
    while pos < end {
        let want = buf.len().min((end - pos) as usize);
        let n = from.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        for (i, c) in buf[..n].chunks(4096).enumerate() {
            if !c.iter().all(|b| *b == 0) {
                to.write_all_at(c, pos + (i * 4096) as u64)?;
                copied += c.len() as u64;
            }
        }
        pos += n as u64;
    }
    Ok(copied)
}

/// `lseek` with SEEK_DATA/SEEK_HOLE; `None` when there is no more data (ENXIO).
fn seek(f: &File, pos: i64, whence: libc::c_int) -> io::Result<Option<i64>> {
    // SAFETY: plain lseek on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r))
}

/// `statfs` magic of ramfs.
const RAMFS_MAGIC: libc::__fsword_t = 0x8584_58f6;

/// Mounts a ramfs (mode 0700) at `dir` unless one is there already.
///
/// Errors: the directory cannot be made, or the mount fails.
pub fn ensure_ramfs(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if is_ramfs(dir) {
        return Ok(());
    }
    nix::mount::mount(
        Some("ramfs"),
        dir,
        Some("ramfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .map_err(io::Error::from)
}

/// Whether `dir` is a ramfs mount.
pub fn is_ramfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type().0 == RAMFS_MAGIC)
}

/// Unmounts the ramfs at `dir` (lazily: a QEMU may still map a file), if it is one.
pub fn release_ramfs(dir: &Path) {
    if is_ramfs(dir) {
        let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Bytes a file takes on its filesystem (holes cost nothing).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn copy_by_hand_keeps_zero_blocks_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data = vec![0u8; 3 << 20];
        data[5000] = 1;
        data[(2 << 20) + 7] = 9;
        std::fs::write(&a, &data).expect("write");
        let to = File::create(&b).expect("create");
        to.set_len(data.len() as u64).expect("len");
        let from = File::open(&a).expect("open");
        copy_by_hand(&from, &to, 0, data.len() as i64).expect("copy");
        assert_eq!(std::fs::read(&b).expect("read"), data);
        assert!(allocated(&b) <= 64 << 10, "{}", allocated(&b));
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("a.ram");
        let mut f = File::create(&src).expect("create");
        f.set_len(64 << 20).expect("len");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(&[7u8; 8192]).expect("write");
        f.seek(SeekFrom::Start(40 << 20)).expect("seek");
        f.write_all(b"tail").expect("write");
        f.sync_all().expect("sync");
        let dst = dir.path().join("b.ram");
        copy_sparse(&src, &dst).expect("copy");
        assert_eq!(
            std::fs::read(&src).expect("a"),
            std::fs::read(&dst).expect("b")
        );
        assert!(allocated(&dst) < 4 << 20, "holes kept: {}", allocated(&dst));
        // The destination must be new.
        assert!(copy_sparse(&src, &dst).is_err());
        assert!(dst.exists(), "a failed copy leaves an existing file alone");
    }
}
