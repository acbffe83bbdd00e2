//! Guest RAM files: copying one while its VM is paused (a checkpoint's
//! memory). The files are sparse: pages the guest never touched, or gave
//! back through free page reporting (QEMU punches a hole), cost nothing,
//! and a copy keeps them holes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What a copy wrote: bytes of data, and the source's data ranges
/// (offset, length), which a second copy of the copy can follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    pub extents: Vec<(u64, u64)>,
}

/// Copies `src` to the new file `dst` (mode 0600), the same length, holes
/// kept: a reflink where the filesystem has them (one metadata operation),
/// else every data range by `copy_file_range` (in the kernel), or across
/// filesystems by `sendfile`, or, from a file that reports no holes at all
/// (a ramfs), through a buffer that skips zero pages.
///
/// Errors: any I/O error; `dst` is removed then.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<Copied> {
    with_new(src, dst, |from, to| copy_open(from, to, None))
}

/// Like [`copy_sparse`], into `to`, a file the caller made (empty or of
/// `src`'s length: e.g. created before the copy so that a reader can open
/// it at once). The caller removes it on error.
pub fn copy_sparse_to(src: &Path, to: &File) -> io::Result<Copied> {
    copy_open(&File::open(src)?, to, None)
}

/// Like [`copy_sparse`], but only the ranges `extents` of `src` (e.g. the
/// data ranges of the file `src` was copied from), zero pages skipped.
pub fn copy_extents(src: &Path, dst: &Path, extents: &[(u64, u64)]) -> io::Result<Copied> {
    with_new(src, dst, |from, to| copy_open(from, to, Some(extents)))
}

fn with_new(
    src: &Path,
    dst: &Path,
    f: impl FnOnce(&File, &File) -> io::Result<Copied>,
) -> io::Result<Copied> {
    let from = File::open(src)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    let r = f(&from, &to);
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r
}

/// The data ranges of `f` (`SEEK_DATA`/`SEEK_HOLE`), up to `len`.
fn data_ranges(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let end = i64::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while pos < end {
        let Some(data) = seek(f, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(f, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    Ok(out)
}

fn copy_open(from: &File, to: &File, given: Option<&[(u64, u64)]>) -> io::Result<Copied> {
    let len = from.metadata()?.len();
    if given.is_none() {
        // SAFETY: FICLONE takes the source descriptor as its argument; both
        // descriptors are open for the duration of the call.
        let cloned = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
        if cloned == 0 {
            return Ok(Copied {
                bytes: len,
                extents: vec![(0, len)],
            });
        }
    }
    to.set_len(len)?;
    let extents = match given {
        Some(e) => e.to_vec(),
        None => data_ranges(from, len)?,
    };
    // No holes reported at all: the filesystem does not know them (ramfs).
    let holeless = given.is_some() || (len > 0 && extents == [(0, len)]);
    let mut copied = 0u64;
    for &(start, n) in &extents {
        let (start, end) = (start as i64, (start + n).min(len) as i64);
        if holeless {
            copied += copy_by_hand(from, to, start, end)?;
            continue;
        }
        let (mut off_in, mut off_out) = (start, start);
        while off_in < end {
            let want = usize::try_from(end - off_in).unwrap_or(usize::MAX);
            // SAFETY: both descriptors are open; the offsets are valid
            // pointers to i64s that the kernel advances.
            let r = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                // Across filesystems (disk → ramfs) the kernel may refuse.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
                ) {
                    copied += copy_by_sendfile(from, to, off_in, end)?;
                    break;
                }
                return Err(e);
            }
            if r == 0 {
                break;
            }
            copied += r as u64;
        }
    }
    Ok(Copied {
        bytes: copied,
        extents,
    })
}

/// Copies `[start, end)` to the same offsets with `sendfile` (in the
/// kernel, any two filesystems). Returns the bytes copied.
fn copy_by_sendfile(from: &File, to: &File, start: i64, end: i64) -> io::Result<u64> {
    let off = u64::try_from(start).map_err(|_| io::Error::other("negative offset"))?;
    // sendfile writes at the output's file position.
    // SAFETY: plain lseek on an open descriptor.
    if unsafe { libc::lseek(to.as_raw_fd(), start, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut pos: libc::off_t = start;
    while pos < end {
        let want = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both descriptors are open; `pos` is a valid offset the kernel advances.
        let n = unsafe { libc::sendfile(to.as_raw_fd(), from.as_raw_fd(), &mut pos, want) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
                return copy_by_hand(from, to, pos, end).map(|n| n + (pos as u64 - off));
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
    }
    Ok(pos as u64 - off)
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
