//! QMP, QEMU's JSON control protocol, over the VM's `qmp.sock`.
//!
//! QEMU serves one QMP client per socket at a time (a second client gets no
//! greeting until the first leaves), so the engine keeps one persistent
//! [`Qmp`] per VM. Commands are serialized; a reader task drains the socket,
//! hands each reply to the waiting command and logs asynchronous events.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

/// How long one command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the greeting after connecting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    /// QEMU went away (it quit, died, or closed the connection).
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command {0} timed out")]
    Timeout(String),
}

/// The one command waiting for its reply, and whether the reader has ended.
#[derive(Default)]
struct PendingState {
    reply: Option<oneshot::Sender<Result<Value, QmpError>>>,
    closed: bool,
}

type Pending = Arc<Mutex<PendingState>>;

/// A connected, negotiated QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("closed", &self.reader.is_finished())
            .finish()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What `query-status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// QEMU's run state: "running", "paused", "inmigrate", "postmigrate", ...
    pub status: String,
    pub running: bool,
}

impl Qmp {
    /// Connects to the socket, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(GREETING_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| {
                QmpError::Protocol(
                    "no greeting from QEMU (is another QMP client connected?)".into(),
                )
            })??
            .ok_or(QmpError::Closed)?;
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Protocol(format!("bad greeting: {e}")))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting: {greeting}"
            )));
        }
        let pending: Pending = Arc::new(Mutex::new(PendingState::default()));
        let reader = tokio::spawn(read_loop(lines, pending.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            reader,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Connects, retrying until `timeout` (the socket appears while QEMU starts).
    pub async fn connect_retry(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match Qmp::connect(path).await {
                Ok(q) => return Ok(q),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(QmpError::Connect { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the connection is gone (QEMU exited or closed it).
    pub fn is_closed(&self) -> bool {
        self.pending.lock().map(|p| p.closed).unwrap_or(true)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_fd(command, arguments, None).await
    }

    /// Runs one command, passing `fd` along with it (SCM_RIGHTS), as
    /// `getfd` and `add-fd` expect.
    async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        // Holding the writer for the whole exchange serializes commands, so
        // the next reply always belongs to the one pending command.
        let mut writer = self.writer.lock().await;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self
                .pending
                .lock()
                .map_err(|_| QmpError::Protocol("QMP state poisoned".into()))?;
            if pending.closed {
                return Err(QmpError::Closed);
            }
            pending.reply = Some(tx);
        }
        let mut sent = 0;
        if let Some(fd) = fd {
            match send_with_fd(&writer, line.as_bytes(), fd).await {
                Ok(n) => sent = n,
                Err(e) => return Err(write_error(e)),
            }
        }
        if let Err(e) = writer.write_all(&line.as_bytes()[sent..]).await {
            return Err(write_error(e));
        }
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, rx)
            .await
            .map_err(|_| QmpError::Timeout(command.to_string()))?;
        match reply {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(QmpError::Command { class, desc, .. })) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(QmpError::Closed),
        }
    }

    /// Asks QEMU to exit at once (no guest shutdown). A connection closed by
    /// the exit counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops the vCPUs (thermal state "warm").
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(|_| ())
    }

    /// Resumes the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(|_| ())
    }

    /// Hands QEMU a file descriptor under `name` (for `fd:<name>` URIs).
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), Some(fd))
            .await
            .map(|_| ())
    }

    /// Caps the migration (snapshot) speed; QEMU 7.2's default of 128 MiB/s
    /// makes a save to disk about eight times slower than the disk allows.
    pub async fn set_migrate_max_bandwidth(&self, bytes_per_sec: u64) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": bytes_per_sec })),
        )
        .await
        .map(|_| ())
    }

    /// Starts sending the VM's state to `uri` (e.g. `fd:<name>`); poll
    /// [`query_migrate`](Self::query_migrate) for the end.
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(|_| ())
    }

    /// Starts loading the VM's state from `uri` into a QEMU started with
    /// `-incoming defer`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(|_| ())
    }

    /// Progress of the current migration, outgoing or incoming.
    pub async fn query_migrate(&self) -> Result<Migration, QmpError> {
        let v = self.execute("query-migrate", None).await?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Ok(Migration {
            status: s("status").unwrap_or_else(|| "none".into()),
            error: s("error-desc"),
            bytes: v
                .get("ram")
                .and_then(|r| r.get("total"))
                .and_then(Value::as_u64),
        })
    }

    pub async fn query_status(&self) -> Result<Status, QmpError> {
        let v = self.execute("query-status", None).await?;
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::Protocol(format!("query-status without status: {v}")))?;
        let running = v.get("running").and_then(Value::as_bool).unwrap_or(false);
        Ok(Status {
            status: status.to_string(),
            running,
        })
    }
}

/// What `query-migrate` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// "none", "setup", "active", "completed", "failed", "cancelled", ...
    pub status: String,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Guest RAM size as the migration counts it.
    pub bytes: Option<u64>,
}

fn write_error(e: std::io::Error) -> QmpError {
    // QEMU is gone; the reader may not have seen the EOF yet.
    match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => QmpError::Closed,
        _ => QmpError::Io(e),
    }
}

/// Sends the start of `bytes` with `fd` attached; returns how many bytes went.
async fn send_with_fd(
    writer: &OwnedWriteHalf,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let stream: &UnixStream = writer.as_ref();
    let fds = [fd.as_raw_fd()];
    stream
        .async_io(Interest::WRITABLE, || {
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &[IoSlice::new(bytes)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        })
        .await
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
) {
    let take = |pending: &Pending| pending.lock().ok().and_then(|mut p| p.reply.take());
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => break,
        };
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("unparsable QMP line ({e}): {line}");
                continue;
            }
        };
        if let Some(event) = v.get("event").and_then(Value::as_str) {
            let data = v.get("data").map(Value::to_string).unwrap_or_default();
            tracing::debug!(event, data, "QMP event");
            continue;
        }
        let result = if let Some(r) = v.get("return") {
            Ok(r.clone())
        } else if let Some(e) = v.get("error") {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            Err(QmpError::Command {
                command: String::new(),
                class: s("class"),
                desc: s("desc"),
            })
        } else {
            tracing::warn!("unexpected QMP message: {line}");
            continue;
        };
        match take(&pending) {
            Some(tx) => {
                let _ = tx.send(result);
            }
            None => tracing::warn!("QMP reply without a pending command: {line}"),
        }
    }
    if let Ok(mut p) = pending.lock() {
        p.closed = true;
        if let Some(tx) = p.reply.take() {
            let _ = tx.send(Err(QmpError::Closed));
        }
    }
}
