//! Files inside a sandbox: read (streamed, with truncation), list, stat and
//! atomic write. Each call wakes a warm or cold sandbox and keeps it hot
//! (in flight) until the agent connection it opened is closed.

use bhatti_proto::{FileInfo, FileReadRequest};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::{Result, Service, ServiceError};
use crate::model::FileEntry;
use crate::store::User;

/// Largest file one write may carry, bytes (100 MiB).
pub const MAX_WRITE_BYTES: u64 = 100 * 1024 * 1024;

/// Chunks of a file read queued between the agent and the client.
const READ_QUEUE: usize = 8;

/// Which part of a file to read (all `None`: the whole file).
#[derive(Debug, Clone, Default)]
pub struct ReadRange {
    /// 1-based first line.
    pub offset: Option<u64>,
    /// Number of lines.
    pub limit: Option<u64>,
    /// At most this many bytes.
    pub max_bytes: Option<u64>,
}

/// A file being read: its total size and mode, then its bytes as the agent
/// sends them. Dropping the receiver ends the read.
pub struct FileRead {
    /// Size of the whole file in bytes, whatever part is sent.
    pub size: u64,
    /// Octal mode, e.g. `0644`.
    pub mode: String,
    /// The bytes, in order; an `Err` is the last item.
    pub chunks: mpsc::Receiver<std::io::Result<bytes::Bytes>>,
}

/// Refuses a write over [`MAX_WRITE_BYTES`] by its announced length, so a
/// caller can answer before reading any of the body.
///
/// Errors: `TooLarge`, naming the cap.
pub fn check_write_size(len: u64) -> Result<()> {
    if len > MAX_WRITE_BYTES {
        return Err(ServiceError::TooLarge(format!(
            "file is {len} bytes; writes are capped at {MAX_WRITE_BYTES} bytes (100 MiB)"
        )));
    }
    Ok(())
}

fn entry(f: FileInfo) -> FileEntry {
    FileEntry {
        name: f.name,
        size: f.size,
        mode: f.mode,
        is_dir: f.is_dir,
        mtime: f.mtime,
    }
}

impl Service {
    /// Opens `path` in the sandbox for reading.
    ///
    /// Errors: `NotFound` for an unknown sandbox; the agent's refusal with
    /// its code (not found, is a directory, permission denied, ...).
    pub async fn read_file(
        &self,
        user: &User,
        id: &str,
        path: &str,
        range: ReadRange,
    ) -> Result<FileRead> {
        let agent = self.agent(user, id).await?;
        let (info, mut file) = agent
            .read_file(FileReadRequest {
                path: path.to_string(),
                offset: range.offset,
                limit: range.limit,
                max_bytes: range.max_bytes,
            })
            .await?;
        let (tx, rx) = mpsc::channel(READ_QUEUE);
        tokio::spawn(async move {
            loop {
                let chunk = tokio::select! {
                    _ = tx.closed() => return,
                    c = file.next_chunk() => c,
                };
                let item = match chunk {
                    Ok(Some(b)) => Ok(bytes::Bytes::from(b)),
                    Ok(None) => return,
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(FileRead {
            size: info.size,
            mode: info.mode,
            chunks: rx,
        })
    }

    /// The entries of directory `path`.
    ///
    /// Errors: as [`read_file`](Self::read_file); not a directory.
    pub async fn list_dir(&self, user: &User, id: &str, path: &str) -> Result<Vec<FileEntry>> {
        let agent = self.agent(user, id).await?;
        Ok(agent.ls(path).await?.into_iter().map(entry).collect())
    }

    /// Size, mode and kind of `path`.
    pub async fn stat_file(&self, user: &User, id: &str, path: &str) -> Result<FileEntry> {
        let agent = self.agent(user, id).await?;
        Ok(entry(agent.stat(path).await?))
    }

    /// Writes `len` bytes from `body` atomically to `path`, with octal
    /// `mode` (e.g. `"644"`, `"0755"`; `None`: the agent's default).
    ///
    /// Errors: `Invalid` for a bad mode (checked before the sandbox is
    /// looked up); `TooLarge` over [`MAX_WRITE_BYTES`]; the agent's refusal
    /// (is a directory, no space, ...). On error `body` may be partly read.
    pub async fn write_file<R: AsyncRead + Unpin>(
        &self,
        user: &User,
        id: &str,
        path: &str,
        mode: Option<&str>,
        len: u64,
        body: &mut R,
    ) -> Result<()> {
        check_write_size(len)?;
        let mode = match mode {
            Some(m) => Some(
                bhatti_proto::fs::parse_mode(m)
                    .map(bhatti_proto::fs::mode_string)
                    .ok_or_else(|| {
                        ServiceError::Invalid(format!(
                            "invalid query parameter `mode`: {m:?} is not an octal mode like 0644"
                        ))
                    })?,
            ),
            None => None,
        };
        let agent = self.agent(user, id).await?;
        agent.write_file(path, mode, len, body).await?;
        Ok(())
    }
}
