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

/// Drops from the host's page cache the pages of `path`'s holes that no
/// process maps (`posix_fadvise(DONTNEED)`); its data stays cached.
///
/// Why: a VM that maps a RAM file on disk privately and is saved in full
/// (its stop, its cooling) reads every page through the mapping, and each
/// hole it reads becomes a page of zeros in the page cache. They are clean
/// and the kernel could reclaim them, but a template's file would otherwise
/// sit at the guest's full size in memory (86 → 512 MiB measured) until it
/// did. Returns the bytes of holes advised. Errors: opening or seeking the
/// file.
pub fn drop_cached_holes(path: &Path) -> io::Result<u64> {
    let f = File::open(path)?;
    let holes = hole_ranges(&f, f.metadata()?.len())?;
    let mut advised = 0;
    for (start, n) in holes {
        let (Ok(off), Ok(n_i)) = (i64::try_from(start), i64::try_from(n)) else {
            continue;
        };
        // SAFETY: a plain advice call on an open descriptor.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), off, n_i, libc::POSIX_FADV_DONTNEED) };
        if r == 0 {
            advised += n;
        }
    }
    Ok(advised)
}

/// The hole ranges (offset, length) of `f`, up to `len`.
fn hole_ranges(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut holes = Vec::new();
    let mut pos = 0u64;
    for (start, n) in data_ranges(f, len)? {
        if start > pos {
            holes.push((pos, start - pos));
        }
        pos = start + n;
    }
    if pos < len {
        holes.push((pos, len - pos));
    }
    Ok(holes)
}

/// Has the kernel reclaim the pages with which process `pid` maps the
/// holes of the file `path` (`process_madvise(MADV_PAGEOUT)`), then drops
/// them from the page cache ([`drop_cached_holes`]). Pages the process
/// wrote (its own copies) stay: without swap they cannot be paged out.
///
/// Why: a running VM that maps a RAM file on disk privately and is
/// checkpointed by a stream (a fork of a template-born sandbox) reads every
/// page for the stream; each hole it reads stays mapped in the VM as a
/// page of zeros (measured: a template's 67 MiB file at 511 MiB resident).
/// Returns the bytes advised. Errors: reading `/proc/<pid>/maps`, opening
/// `path`, or the calls themselves (e.g. `ESRCH`: the process is gone).
pub fn page_out_holes(pid: u32, path: &Path) -> io::Result<u64> {
    let f = File::open(path)?;
    let holes = hole_ranges(&f, f.metadata()?.len())?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let want = path.to_string_lossy();
    let mut iov: Vec<libc::iovec> = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut it = line.split_whitespace();
        let (Some(range), _, Some(off)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let name = it.skip(2).collect::<Vec<_>>().join(" ");
        if name != want {
            continue;
        }
        let (Some((a, b)), Ok(off)) = (range.split_once('-'), u64::from_str_radix(off, 16)) else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        for &(h, n) in &holes {
            let (lo, hi) = (h.max(off), (h + n).min(off + (b - a)));
            if lo < hi {
                iov.push(libc::iovec {
                    iov_base: (a + (lo - off)) as *mut libc::c_void,
                    iov_len: (hi - lo) as usize,
                });
            }
        }
    }
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor pidfd_open just returned, owned from here on.
    let pidfd =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd as i32) };
    let mut advised = 0u64;
    // The kernel takes at most UIO_MAXIOV (1024) ranges a call.
    for chunk in iov.chunks(1024) {
        // SAFETY: the iovecs name ranges of the other process (the kernel
        // checks them); nothing in this process is read or written.
        let r = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd.as_raw_fd(),
                chunk.as_ptr(),
                chunk.len(),
                libc::MADV_PAGEOUT,
                0u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        advised += r as u64;
    }
    drop_cached_holes(path)?;
    Ok(advised)
}

/// Rewrites the ramfs file `path` without its pages of zeros, when it has
/// grown them: under a temporary name, renamed over `path` when whole
/// (processes that map the old file keep it until they unmap it).
///
/// Why: a ramfs keeps every page ever read, and a VM that maps the file
/// privately and is saved in full reads all of its pages (see
/// [`drop_cached_holes`] for a file on disk). Returns the bytes the file
/// took before and after, or `None` when it had nothing to give back.
/// Errors: any I/O error (`path` is then left as it was).
pub fn compact(path: &Path) -> io::Result<Option<(u64, u64)>> {
    let before = allocated(path);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".compact");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    copy_sparse(path, &tmp)?;
    let after = allocated(&tmp);
    // A page of slack: nothing worth a rename.
    if after + 4096 >= before {
        let _ = std::fs::remove_file(&tmp);
        return Ok(None);
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(Some((before, after)))
}

/// Bytes of `path` in the host's page cache (`mincore` over a read-only
/// mapping): what the file holds of host memory, holes it never read
/// excluded. Errors: opening or mapping the file.
pub fn resident(path: &Path) -> io::Result<u64> {
    let f = File::open(path)?;
    let len = usize::try_from(f.metadata()?.len()).map_err(io::Error::other)?;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped
    // below; nothing reads through it (mincore only looks at page tables
    // and the page cache).
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = 4096usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        let r = libc::mincore(addr, len, vec.as_mut_ptr());
        let err = io::Error::last_os_error();
        libc::munmap(addr, len);
        if r != 0 {
            return Err(err);
        }
        Ok(vec.iter().filter(|b| **b & 1 == 1).count() as u64 * page as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn holes_read_through_a_private_mapping_leave_the_page_cache() {
        // On disk (not /tmp, which may be a tmpfs that keeps what it reads).
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let path = dir.path().join("ram");
        let mut f = File::create(&path).expect("create");
        f.write_all(&vec![7u8; 1 << 20]).expect("write");
        f.set_len(16 << 20).expect("len");
        f.sync_all().expect("sync");
        drop(f);
        let f = File::open(&path).expect("open");
        // SAFETY: a private read-only mapping of an open file, read, then unmapped.
        unsafe {
            let len = 16 << 20;
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            let mut sum = 0u64;
            for off in (0..len).step_by(4096) {
                sum += u64::from(std::ptr::read_volatile((addr as *const u8).add(off)));
            }
            assert_eq!(sum, 7 * 256);
            libc::munmap(addr, len);
        }
        let before = resident(&path).expect("resident");
        assert!(before > 8 << 20, "every page read is cached: {before}");
        let advised = drop_cached_holes(&path).expect("drop");
        assert_eq!(advised, 15 << 20);
        let after = resident(&path).expect("resident");
        assert!(after >= 1 << 20, "the data stays: {after}");
        assert!(after < 2 << 20, "the holes' pages went: {after}");
    }

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
