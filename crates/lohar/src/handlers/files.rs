//! File operations: read (with line offset/limit and byte cap), atomic
//! write, stat and ls.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bhatti_proto::frame::{self as pframe, FrameType, HEADER_LEN, MAX_PAYLOAD_LEN};
use bhatti_proto::fs::{mode_string, parse_mode};
use bhatti_proto::{
    ErrorCode, FileInfo, FileLsRequest, FileReadRequest, FileReadResponse, FileStatRequest,
    FileWriteRequest, FileWriteResponse, Message, MAX_LS_ENTRIES,
};

use super::{refuse, refuse_io, HandlerError};
use crate::server::Agent;
use crate::stream::Stream;
use crate::wire;

/// An upload that stalls this long between frames is abandoned.
const UPLOAD_STALL: Duration = Duration::from_secs(60);
/// After refusing an upload, how long the rest of its body is read and
/// discarded at most (so that the refusal is not lost to a TCP reset).
const REFUSED_DRAIN: Duration = Duration::from_secs(30);
/// While draining a refused upload, a stall this long ends the drain.
const REFUSED_DRAIN_STALL: Duration = Duration::from_secs(5);
/// Most symlinks followed from a written path to its final target.
const MAX_SYMLINK_HOPS: usize = 40;

/// FILE_READ_REQ.
pub fn read(agent: &Agent, conn: &Stream, req: FileReadRequest) -> Result<(), HandlerError> {
    agent.activity.touch();
    let path = agent.cfg.resolve(&req.path);
    // O_NONBLOCK so that opening a FIFO cannot hang; regular files ignore it.
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => return refuse_io("open", &req.path, &e),
    };
    let meta = file
        .metadata()
        .or_else(|e| refuse_io("stat", &req.path, &e))?;
    if meta.is_dir() {
        return refuse(
            ErrorCode::IsADirectory,
            format!("read {}: is a directory", req.path),
        );
    }
    if !meta.is_file() {
        return refuse(
            ErrorCode::Invalid,
            format!("read {}: not a regular file", req.path),
        );
    }
    // Some regular files fail on their first read (/proc/self/mem, files of
    // some drivers): find out before FILE_READ_RESP, after which the only
    // way left to fail is a broken stream (a 200 cut short over HTTP).
    // The kernel refusing a file is the request's problem, not the agent's.
    // (A file that cannot be read at an offset, ESPIPE, is only read in order.)
    let mut probe = [0u8; 1];
    match std::os::unix::fs::FileExt::read_at(&file, &mut probe, 0) {
        Err(e) if e.raw_os_error() != Some(libc::ESPIPE) => {
            let code = match ErrorCode::of_io(e.kind()) {
                ErrorCode::Internal => ErrorCode::Invalid,
                c => c,
            };
            return refuse(
                code,
                format!("read {}: {}", req.path, bhatti_proto::io_phrase(&e)),
            );
        }
        _ => {}
    }
    wire::send(
        conn,
        &Message::FileReadResp(FileReadResponse {
            size: meta.len(),
            mode: mode_string(meta.mode()),
        }),
    )?;
    let window = Window {
        skip_lines: req.offset.unwrap_or(1).saturating_sub(1),
        lines: req.limit.filter(|l| *l > 0),
        bytes: req.max_bytes.filter(|b| *b > 0).unwrap_or(u64::MAX),
    };
    stream_file(conn, &file, meta.len(), window)?;
    wire::send(conn, &Message::Exit(0))?;
    Ok(())
}

/// Which part of a file to send: lines to skip, then at most `lines` lines
/// and at most `bytes` bytes, whichever ends first.
#[derive(Debug, Clone, Copy)]
struct Window {
    skip_lines: u64,
    lines: Option<u64>,
    bytes: u64,
}

/// Frame buffers kept for reuse: allocating and zeroing 1 MiB per read
/// costs more than reading a small file.
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// How many spare 1 MiB buffers are kept at most.
const SPARE_BUFFERS: usize = 4;
/// Files at least this big get a larger socket send buffer.
const BIG_READ: u64 = 256 * 1024;

/// A frame buffer, returned to [`BUFFERS`] on drop.
struct FrameBuf(Vec<u8>);

impl FrameBuf {
    fn get(payload: usize) -> FrameBuf {
        let len = HEADER_LEN + payload;
        if payload == MAX_PAYLOAD_LEN {
            if let Some(b) = BUFFERS.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                return FrameBuf(b);
            }
        }
        FrameBuf(vec![0u8; len])
    }
}

impl Drop for FrameBuf {
    fn drop(&mut self) {
        if self.0.len() == HEADER_LEN + MAX_PAYLOAD_LEN {
            let mut spare = BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < SPARE_BUFFERS {
                spare.push(std::mem::take(&mut self.0));
            }
        }
    }
}

/// Lets the kernel take a whole 1 MiB frame in one write instead of
/// waking us several times per frame (root only; best effort).
fn widen_send_buffer(conn: &Stream) {
    let size: libc::c_int = 4 * 1024 * 1024;
    // SAFETY: setsockopt reads one c_int from the stack.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Sends the window of `file` as STDOUT frames of up to 1 MiB. Bytes are
/// read straight into the frame buffer behind a header gap: one copy in,
/// one copy out.
fn stream_file(conn: &Stream, file: &File, size: u64, mut w: Window) -> Result<(), HandlerError> {
    use std::io::Read;
    if w.bytes == 0 {
        return Ok(());
    }
    if size.min(w.bytes) >= BIG_READ {
        widen_send_buffer(conn);
    }
    // Sized for the file, plus one byte to see EOF in one read. Files in
    // /proc and /sys claim size 0 yet have content: give them a page or so.
    let want = if size == 0 {
        64 * 1024
    } else {
        size.saturating_add(1)
    };
    let payload = want.min(MAX_PAYLOAD_LEN as u64) as usize;
    let mut frame = FrameBuf::get(payload);
    let buf = &mut frame.0;
    let mut r = file;
    while w.bytes > 0 && w.lines != Some(0) {
        let n = match r.read(&mut buf[HEADER_LEN..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let mut start = HEADER_LEN;
        let mut end = HEADER_LEN + n;
        while w.skip_lines > 0 && start < end {
            match memchr::memchr(b'\n', &buf[start..end]) {
                Some(i) => {
                    start += i + 1;
                    w.skip_lines -= 1;
                }
                None => start = end,
            }
        }
        if let Some(left) = w.lines.as_mut() {
            let mut pos = start;
            while *left > 0 && pos < end {
                match memchr::memchr(b'\n', &buf[pos..end]) {
                    Some(i) => {
                        pos += i + 1;
                        *left -= 1;
                    }
                    None => pos = end,
                }
            }
            end = pos;
        }
        let len = ((end - start) as u64).min(w.bytes) as usize;
        end = start + len;
        w.bytes -= len as u64;
        if len > 0 {
            let head = pframe::header(FrameType::Stdout, len)?;
            buf[start - HEADER_LEN..start].copy_from_slice(&head);
            let mut c = conn;
            // A failed write (client gone) ends the read at once.
            c.write_all(&buf[start - HEADER_LEN..end])?;
        }
    }
    Ok(())
}

/// Removes a temp file unless the write completed.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// FILE_WRITE_REQ: exactly `size` bytes of STDIN frames into a temp file
/// beside the final target (a symlink is followed, as a shell's `>` would),
/// fsync, chmod/chown, rename over the target. Readers see the old or the
/// new file, never a part; a broken upload leaves the old file and no temp
/// file.
///
/// A refusal for the target's sake (a directory, no space, no permission)
/// can come before the body is read: the ERROR is sent at once, then the
/// rest of the declared body is read and discarded (bounded in time) so
/// the client can finish sending and read the refusal instead of failing
/// on a reset connection.
pub fn write(agent: &Agent, conn: &Stream, req: FileWriteRequest) -> Result<(), HandlerError> {
    agent.activity.touch();
    let Ok(size) = u64::try_from(req.size) else {
        return refuse(
            ErrorCode::Invalid,
            format!("invalid size {}: must not be negative", req.size),
        );
    };
    let mut left = size;
    match receive(agent, conn, &req, &mut left) {
        Err(Upload::Target(HandlerError::Refused(code, msg))) if left > 0 => {
            // The temp file is gone by now (dropped in `receive`).
            wire::send_error(conn, code, &msg)?;
            let _ = conn.shutdown(std::net::Shutdown::Write);
            discard_upload(conn, left);
            Ok(())
        }
        Err(Upload::Target(e) | Upload::Stream(e)) => Err(e),
        Ok(()) => Ok(()),
    }
}

/// Why an upload failed: because of its target (the client may still be
/// sending the body) or because of the stream itself.
enum Upload {
    Target(HandlerError),
    Stream(HandlerError),
}

impl From<bhatti_proto::FrameError> for Upload {
    fn from(e: bhatti_proto::FrameError) -> Self {
        Upload::Stream(e.into())
    }
}

impl From<io::Error> for Upload {
    fn from(e: io::Error) -> Self {
        Upload::Stream(e.into())
    }
}

fn target_err<T>(r: Result<T, HandlerError>) -> Result<T, Upload> {
    r.map_err(Upload::Target)
}

fn stream_err<T>(r: Result<T, HandlerError>) -> Result<T, Upload> {
    r.map_err(Upload::Stream)
}

/// The path a write to `path` lands on: `path` itself, or the end of the
/// chain of symlinks it starts (which need not exist yet).
fn final_target(path: &Path) -> io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_SYMLINK_HOPS {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

/// Receives the body into a temp file and renames it over the target;
/// `left` counts the body bytes not yet read.
fn receive(
    agent: &Agent,
    conn: &Stream,
    req: &FileWriteRequest,
    left: &mut u64,
) -> Result<(), Upload> {
    let mode = match req.mode.as_deref() {
        Some(m) => Some(parse_mode(m).ok_or_else(|| {
            Upload::Target(HandlerError::Refused(
                ErrorCode::Invalid,
                format!("invalid mode {m:?}"),
            ))
        })?),
        None => None,
    };
    let p = &req.path;
    let path =
        target_err(final_target(&agent.cfg.resolve(p)).or_else(|e| refuse_io("write", p, &e)))?;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return target_err(refuse(
            ErrorCode::Invalid,
            format!("write {p}: not a file path"),
        ));
    };
    let existing = fs::metadata(&path).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return target_err(refuse(
            ErrorCode::IsADirectory,
            format!("write {p}: is a directory"),
        ));
    }
    target_err(create_dirs(dir, agent.cfg.file_owner).or_else(|e| refuse_io("write", p, &e)))?;
    let tmp = TempFile {
        path: dir.join(format!(
            ".{}.lohar-{}-{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        )),
        keep: false,
    };
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp.path)
    {
        Ok(f) => f,
        Err(e) => return target_err(refuse_io("write", p, &e)),
    };

    conn.set_read_timeout(Some(UPLOAD_STALL))?;
    let mut buf = Vec::new();
    let mut r = conn;
    while *left > 0 {
        match wire::read_frame_into(&mut r, &mut buf)? {
            FrameType::Stdin if buf.is_empty() => {
                return stream_err(refuse(
                    ErrorCode::Invalid,
                    format!(
                        "upload ended after {} of {} bytes",
                        req.size as u64 - *left,
                        req.size
                    ),
                ));
            }
            FrameType::Stdin => {
                if buf.len() as u64 > *left {
                    return stream_err(refuse(
                        ErrorCode::Invalid,
                        format!("upload is longer than its size of {} bytes", req.size),
                    ));
                }
                *left -= buf.len() as u64;
                if let Err(e) = file.write_all(&buf) {
                    return target_err(refuse_io("write", p, &e));
                }
            }
            FrameType::Kill => return stream_err(refuse(ErrorCode::Invalid, "upload cancelled")),
            other => {
                return stream_err(refuse(
                    ErrorCode::Invalid,
                    format!("unexpected frame {other:?} during upload"),
                ))
            }
        }
    }

    let mode = mode.unwrap_or_else(|| existing.as_ref().map_or(0o644, |m| m.mode() & 0o7777));
    let tmp_path = tmp.path.clone();
    let finish = || -> io::Result<()> {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(owner) = agent.cfg.file_owner {
            // A replaced file keeps its owner; a new one belongs to the user.
            let (uid, gid) = existing.as_ref().map_or(owner, |m| (m.uid(), m.gid()));
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.sync_all()?;
        // Closed before the rename and the reply: a client that runs the
        // file right away must not get "text file busy".
        drop(file);
        fs::rename(&tmp_path, &path)
    };
    target_err(finish().or_else(|e| refuse_io("write", p, &e)))?;
    let mut tmp = tmp;
    tmp.keep = true;
    wire::send(conn, &Message::FileWriteResp(FileWriteResponse::ok()))?;
    Ok(())
}

/// Reads and drops up to `left` bytes of a refused upload's STDIN frames,
/// until the client stops, cancels, stalls, or the time is up.
fn discard_upload(conn: &Stream, mut left: u64) {
    let deadline = std::time::Instant::now() + REFUSED_DRAIN;
    let _ = conn.set_read_timeout(Some(REFUSED_DRAIN_STALL));
    let mut buf = Vec::new();
    let mut r = conn;
    while left > 0 && std::time::Instant::now() < deadline {
        match wire::read_frame_into(&mut r, &mut buf) {
            Ok(FrameType::Stdin) if !buf.is_empty() => {
                left = left.saturating_sub(buf.len() as u64);
            }
            _ => return,
        }
    }
}

/// Creates `dir` and its missing parents, owned by `owner` if given.
fn create_dirs(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(d, Some(uid), Some(gid))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn info(name: String, m: &fs::Metadata) -> FileInfo {
    FileInfo {
        name,
        size: m.len(),
        mode: mode_string(m.mode()),
        is_dir: m.is_dir(),
        mtime: m.mtime(),
    }
}

/// FILE_STAT_REQ (follows symlinks, like `stat -L`).
pub fn stat(agent: &Agent, conn: &Stream, req: FileStatRequest) -> Result<(), HandlerError> {
    agent.activity.touch();
    let path = agent.cfg.resolve(&req.path);
    let meta = fs::metadata(&path).or_else(|e| refuse_io("stat", &req.path, &e))?;
    let name = path
        .file_name()
        .map_or_else(|| req.path.clone(), |n| n.to_string_lossy().into_owned());
    wire::send(conn, &Message::FileStatResp(info(name, &meta)))?;
    Ok(())
}

/// FILE_LS_REQ: at most MAX_LS_ENTRIES entries, sorted by name.
pub fn ls(agent: &Agent, conn: &Stream, req: FileLsRequest) -> Result<(), HandlerError> {
    agent.activity.touch();
    let path = agent.cfg.resolve(&req.path);
    let dir = fs::read_dir(&path).or_else(|e| refuse_io("ls", &req.path, &e))?;
    let mut out = Vec::new();
    for entry in dir.flatten().take(MAX_LS_ENTRIES) {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Follow symlinks; a dangling one is listed as itself.
        let meta = match fs::metadata(entry.path()) {
            Ok(m) => m,
            Err(_) => match entry.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            },
        };
        out.push(info(name, &meta));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    wire::send(conn, &Message::FileLsResp(out))?;
    Ok(())
}
