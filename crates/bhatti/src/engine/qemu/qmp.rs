//! QMP, QEMU's JSON control protocol, over the VM's `qmp.sock`.
//!
//! QEMU serves one QMP client per socket at a time (a second client gets no
//! greeting until the first leaves), so the engine keeps one persistent
//! [`Qmp`] per VM. Commands are serialized; a reader task drains the socket,
//! hands each reply to the waiting command and logs asynchronous events.
//!
//! Typed messages, written here once (issue 18): every command we send is a
//! type implementing [`Command`] (its wire name, arguments and reply type),
//! every event we read is an [`Event`]; no call site builds JSON by hand.
//! Not the `qapi` crate: its `qapi-qmp` types are generated from one, newer
//! QEMU schema than the 7.2 we run (Debian 12), and its clients cannot pass a
//! descriptor along with a command (SCM_RIGHTS for `getfd`), which the save
//! to disk and the restore depend on. The dozen commands we use are small.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

pub mod commands {
    //! The QMP commands the engine sends, as QEMU 7.2's schema defines them.

    use serde::{Deserialize, Serialize};

    use super::Command;

    /// Leaves capabilities negotiation mode (first command of a session).
    #[derive(Debug, Serialize)]
    pub struct QmpCapabilities;
    /// Ends QEMU at once, without a guest shutdown.
    #[derive(Debug, Serialize)]
    pub struct Quit;
    /// Stops all vCPUs.
    #[derive(Debug, Serialize)]
    pub struct Stop;
    /// Resumes all vCPUs.
    #[derive(Debug, Serialize)]
    pub struct Cont;
    /// Takes the descriptor sent with the command (SCM_RIGHTS) under `fdname`.
    #[derive(Debug, Serialize)]
    pub struct GetFd {
        pub fdname: String,
    }
    /// Sets migration parameters; only the ones we use.
    #[derive(Debug, Serialize)]
    pub struct MigrateSetParameters {
        /// Bytes per second.
        #[serde(rename = "max-bandwidth")]
        pub max_bandwidth: u64,
    }
    /// Copies the data of a drive's backing layers above `base` into its
    /// top image, which then backs onto `base` directly (a background job).
    #[derive(Debug, Serialize)]
    pub struct BlockStream {
        #[serde(rename = "job-id")]
        pub job_id: String,
        pub device: String,
        /// File name of the backing image to keep, as the chain records it.
        pub base: String,
    }
    /// The block jobs running.
    #[derive(Debug, Serialize)]
    pub struct QueryBlockJobs;
    /// One block job (fields we read).
    #[derive(Debug, Clone, Deserialize)]
    pub struct BlockJobInfo {
        pub device: String,
        #[serde(default)]
        pub status: Option<String>,
        #[serde(default)]
        pub error: Option<String>,
    }
    /// Sets migration capabilities; only the ones we use.
    #[derive(Debug, Serialize)]
    pub struct MigrateSetCapabilities {
        pub capabilities: Vec<CapabilityState>,
    }
    /// One capability and whether it is on.
    #[derive(Debug, Serialize)]
    pub struct CapabilityState {
        pub capability: String,
        pub state: bool,
    }
    /// Starts an outgoing migration to `uri`.
    #[derive(Debug, Serialize)]
    pub struct Migrate {
        pub uri: String,
    }
    /// Starts loading a migration from `uri` (QEMU started with `-incoming defer`).
    #[derive(Debug, Serialize)]
    pub struct MigrateIncoming {
        pub uri: String,
    }
    /// Cancels the outgoing migration.
    #[derive(Debug, Serialize)]
    pub struct MigrateCancel;
    /// Progress of the current migration.
    #[derive(Debug, Serialize)]
    pub struct QueryMigrate;
    /// The VM's run state.
    #[derive(Debug, Serialize)]
    pub struct QueryStatus;

    /// Adds the descriptor sent with the command (SCM_RIGHTS) to a new fd
    /// set; QEMU then opens `/dev/fdset/<id>` as that file (it cannot open
    /// files in the root-only sandbox dir itself).
    #[derive(Debug, Serialize)]
    pub struct AddFd {}
    /// Where `add-fd` put the descriptor.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    pub struct AddFdInfo {
        #[serde(rename = "fdset-id")]
        pub fdset_id: u64,
        pub fd: i64,
    }
    /// The file layer of a new block node.
    #[derive(Debug, Serialize)]
    pub struct BlockdevFile {
        /// "file".
        pub driver: String,
        pub filename: String,
        /// "off": the daemon keeps each image to one writer itself, and a
        /// frozen layer's writable node must not block the copies' readers.
        pub locking: String,
    }
    /// Opens a new qcow2 node without its backing (set by `blockdev-snapshot`).
    #[derive(Debug, Serialize)]
    pub struct BlockdevAdd {
        /// "qcow2".
        pub driver: String,
        #[serde(rename = "node-name")]
        pub node_name: String,
        pub file: BlockdevFile,
        /// Always `null`: no backing at open.
        pub backing: Option<String>,
        /// "unmap", as the root drive.
        pub discard: String,
        #[serde(rename = "detect-zeroes")]
        pub detect_zeroes: String,
    }
    /// Puts the node `overlay` on top of `node` (a drive id or node name):
    /// the old image becomes its backing, new writes go to the overlay.
    #[derive(Debug, Serialize)]
    pub struct BlockdevSnapshot {
        pub node: String,
        pub overlay: String,
    }

    /// Grows (or shrinks) the image of drive `device` to `size` bytes; the
    /// guest sees the new capacity at once.
    #[derive(Debug, Serialize)]
    pub struct BlockResize {
        pub device: String,
        pub size: u64,
    }

    /// An empty `return` (`{}`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    pub struct Empty {}

    /// What `query-migrate` reports (the fields we read).
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    pub struct MigrationInfo {
        /// Absent before the first migration.
        #[serde(default)]
        pub status: Option<MigrationStatus>,
        #[serde(rename = "error-desc", default)]
        pub error_desc: Option<String>,
        #[serde(default)]
        pub ram: Option<MigrationStats>,
    }

    /// RAM counters of a migration.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    pub struct MigrationStats {
        /// Guest RAM size in bytes as the migration counts it.
        pub total: u64,
    }

    /// QEMU's `MigrationStatus`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum MigrationStatus {
        None,
        Setup,
        Active,
        Completed,
        Failed,
        Cancelling,
        Cancelled,
        /// Any state we do not act on (postcopy, colo, pre-switchover, ...).
        #[serde(other)]
        Other,
    }

    /// What `query-status` reports.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    pub struct StatusInfo {
        pub status: RunState,
        pub running: bool,
    }

    /// QEMU's `RunState` (the ones we tell apart).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum RunState {
        Running,
        Paused,
        Inmigrate,
        Postmigrate,
        Suspended,
        Shutdown,
        InternalError,
        #[serde(other)]
        Other,
    }

    impl RunState {
        /// QEMU's name of the state ("other" for one we do not tell apart).
        pub fn as_str(self) -> &'static str {
            match self {
                RunState::Running => "running",
                RunState::Paused => "paused",
                RunState::Inmigrate => "inmigrate",
                RunState::Postmigrate => "postmigrate",
                RunState::Suspended => "suspended",
                RunState::Shutdown => "shutdown",
                RunState::InternalError => "internal-error",
                RunState::Other => "other",
            }
        }
    }

    impl PartialEq<&str> for RunState {
        fn eq(&self, other: &&str) -> bool {
            self.as_str() == *other
        }
    }

    macro_rules! command {
        ($ty:ty, $name:literal, $ret:ty, args: $args:literal) => {
            impl Command for $ty {
                const NAME: &'static str = $name;
                const HAS_ARGUMENTS: bool = $args;
                type Returns = $ret;
            }
        };
    }
    command!(QmpCapabilities, "qmp_capabilities", Empty, args: false);
    command!(Quit, "quit", Empty, args: false);
    command!(Stop, "stop", Empty, args: false);
    command!(Cont, "cont", Empty, args: false);
    command!(GetFd, "getfd", Empty, args: true);
    command!(MigrateSetParameters, "migrate-set-parameters", Empty, args: true);
    command!(MigrateSetCapabilities, "migrate-set-capabilities", Empty, args: true);
    command!(BlockStream, "block-stream", Empty, args: true);
    command!(QueryBlockJobs, "query-block-jobs", Vec<BlockJobInfo>, args: false);
    command!(Migrate, "migrate", Empty, args: true);
    command!(MigrateIncoming, "migrate-incoming", Empty, args: true);
    command!(MigrateCancel, "migrate_cancel", Empty, args: false);
    command!(QueryMigrate, "query-migrate", MigrationInfo, args: false);
    command!(QueryStatus, "query-status", StatusInfo, args: false);
    command!(AddFd, "add-fd", AddFdInfo, args: true);
    command!(BlockdevAdd, "blockdev-add", Empty, args: true);
    command!(BlockdevSnapshot, "blockdev-snapshot", Empty, args: true);
    command!(BlockResize, "block_resize", Empty, args: true);
}

use commands::*;

/// One QMP command: its wire name, its arguments (the type's fields) and
/// the type of its `return`.
pub trait Command: Serialize {
    const NAME: &'static str;
    /// Whether the command carries an `arguments` object.
    const HAS_ARGUMENTS: bool;
    type Returns: DeserializeOwned;
}

/// What goes on the wire for one command.
#[derive(Serialize)]
struct Request<'a, C: Command> {
    execute: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a C>,
}

/// An asynchronous QMP event (the ones we read; others fail to parse and
/// are only logged by name).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "event", content = "data")]
pub enum Event {
    #[serde(rename = "STOP")]
    Stop,
    #[serde(rename = "RESUME")]
    Resume,
    #[serde(rename = "SHUTDOWN")]
    Shutdown {
        #[serde(default)]
        reason: Option<String>,
    },
    #[serde(rename = "MIGRATION")]
    Migration { status: MigrationStatus },
    #[serde(rename = "BALLOON_CHANGE")]
    BalloonChange { actual: u64 },
}

/// A message from QEMU other than the greeting.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Incoming {
    Return {
        #[serde(rename = "return")]
        value: Value,
    },
    Error {
        error: ErrorBody,
    },
    Event {
        event: String,
        #[serde(default)]
        data: Value,
    },
}

/// The `error` object of a refused command.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    class: String,
    #[serde(default)]
    desc: String,
}

/// The greeting QEMU sends on connect.
#[derive(Debug, Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    _qmp: Value,
}

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
        serde_json::from_str::<Greeting>(&greeting)
            .map_err(|e| QmpError::Protocol(format!("unexpected greeting {greeting:?}: {e}")))?;
        let pending: Pending = Arc::new(Mutex::new(PendingState::default()));
        let reader = tokio::spawn(read_loop(lines, pending.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            reader,
        };
        qmp.execute(&QmpCapabilities).await?;
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

    /// Runs one command and returns its typed `return` value.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<C::Returns, QmpError> {
        self.execute_with_fd(command, None).await
    }

    /// Runs one command, passing `fd` along with it (SCM_RIGHTS), as
    /// `getfd` expects.
    async fn execute_with_fd<C: Command>(
        &self,
        command: &C,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<C::Returns, QmpError> {
        let name = C::NAME;
        let request = Request {
            execute: name,
            arguments: C::HAS_ARGUMENTS.then_some(command),
        };
        let mut line = serde_json::to_string(&request)
            .map_err(|e| QmpError::Protocol(format!("cannot encode {name}: {e}")))?;
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
            .map_err(|_| QmpError::Timeout(name.to_string()))?;
        let value = match reply {
            Ok(Ok(v)) => v,
            Ok(Err(QmpError::Command { class, desc, .. })) => {
                return Err(QmpError::Command {
                    command: name.to_string(),
                    class,
                    desc,
                })
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(QmpError::Closed),
        };
        serde_json::from_value(value)
            .map_err(|e| QmpError::Protocol(format!("unexpected reply to {name}: {e}")))
    }

    /// Asks QEMU to exit at once (no guest shutdown). A connection closed by
    /// the exit counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(&Quit).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops the vCPUs (thermal state "warm").
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute(&Stop).await.map(|_| ())
    }

    /// Resumes the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute(&Cont).await.map(|_| ())
    }

    /// Hands QEMU a file descriptor under `name` (for `fd:<name>` URIs).
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let cmd = GetFd {
            fdname: name.to_string(),
        };
        self.execute_with_fd(&cmd, Some(fd)).await.map(|_| ())
    }

    /// Hands QEMU a descriptor in a new fd set; returns the set's id
    /// (QEMU opens it as `/dev/fdset/<id>`).
    pub async fn add_fd(&self, fd: BorrowedFd<'_>) -> Result<u64, QmpError> {
        self.execute_with_fd(&AddFd {}, Some(fd))
            .await
            .map(|i| i.fdset_id)
    }

    /// Switches drive `device` to the existing qcow2 `file` (whose backing
    /// is the drive's current image; e.g. `/dev/fdset/1`), opened as node
    /// `node_name` without locking, while the VM keeps its state.
    pub async fn snapshot_onto(
        &self,
        device: &str,
        file: &str,
        node_name: &str,
    ) -> Result<(), QmpError> {
        let add = BlockdevAdd {
            driver: "qcow2".into(),
            node_name: node_name.to_string(),
            file: BlockdevFile {
                driver: "file".into(),
                filename: file.to_string(),
                locking: "off".into(),
            },
            backing: None,
            discard: "unmap".into(),
            detect_zeroes: "unmap".into(),
        };
        self.execute(&add).await?;
        let snap = BlockdevSnapshot {
            node: device.to_string(),
            overlay: node_name.to_string(),
        };
        self.execute(&snap).await.map(|_| ())
    }

    /// Resizes drive `device` (a `-drive id=`) to `size` bytes.
    pub async fn block_resize(&self, device: &str, size: u64) -> Result<(), QmpError> {
        let cmd = BlockResize {
            device: device.to_string(),
            size,
        };
        self.execute(&cmd).await.map(|_| ())
    }

    /// Caps the migration (snapshot) speed; QEMU 7.2's default of 128 MiB/s
    /// makes a save to disk about eight times slower than the disk allows.
    pub async fn set_migrate_max_bandwidth(&self, bytes_per_sec: u64) -> Result<(), QmpError> {
        let cmd = MigrateSetParameters {
            max_bandwidth: bytes_per_sec,
        };
        self.execute(&cmd).await.map(|_| ())
    }

    /// Starts streaming drive `device`'s layers above `base` into its top
    /// image (job `job_id`); poll [`block_jobs`](Self::block_jobs) for the end.
    pub async fn block_stream(
        &self,
        job_id: &str,
        device: &str,
        base: &str,
    ) -> Result<(), QmpError> {
        let cmd = BlockStream {
            job_id: job_id.to_string(),
            device: device.to_string(),
            base: base.to_string(),
        };
        self.execute(&cmd).await.map(|_| ())
    }

    /// The block jobs still running (a finished job disappears).
    pub async fn block_jobs(&self) -> Result<Vec<BlockJobInfo>, QmpError> {
        self.execute(&QueryBlockJobs).await
    }

    /// Whether migrations skip RAM that lives in a shared file
    /// (`x-ignore-shared`): the stream then carries device state only. Both
    /// ends of one stream must agree (the RAM section's layout depends on it).
    pub async fn set_ignore_shared(&self, on: bool) -> Result<(), QmpError> {
        let cmd = MigrateSetCapabilities {
            capabilities: vec![CapabilityState {
                capability: "x-ignore-shared".into(),
                state: on,
            }],
        };
        self.execute(&cmd).await.map(|_| ())
    }

    /// Starts sending the VM's state to `uri` (e.g. `fd:<name>`); poll
    /// [`query_migrate`](Self::query_migrate) for the end.
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        let cmd = Migrate {
            uri: uri.to_string(),
        };
        self.execute(&cmd).await.map(|_| ())
    }

    /// Starts loading the VM's state from `uri` into a QEMU started with
    /// `-incoming defer`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        let cmd = MigrateIncoming {
            uri: uri.to_string(),
        };
        self.execute(&cmd).await.map(|_| ())
    }

    /// Cancels an outgoing migration.
    pub async fn migrate_cancel(&self) -> Result<(), QmpError> {
        self.execute(&MigrateCancel).await.map(|_| ())
    }

    /// Progress of the current migration, outgoing or incoming.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.execute(&QueryMigrate).await
    }

    /// The VM's run state.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.execute(&QueryStatus).await
    }
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
        let msg: Incoming = match serde_json::from_str(&line) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("unexpected QMP message ({e}): {line}");
                continue;
            }
        };
        let result = match msg {
            Incoming::Return { value } => Ok(value),
            Incoming::Error { error } => Err(QmpError::Command {
                command: String::new(),
                class: error.class,
                desc: error.desc,
            }),
            Incoming::Event { event, data } => {
                match serde_json::from_str::<Event>(&line) {
                    Ok(e) => tracing::debug!(event = ?e, "QMP event"),
                    Err(_) => tracing::debug!(event, %data, "QMP event"),
                }
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn wire<C: Command>(c: &C) -> String {
        serde_json::to_string(&Request {
            execute: C::NAME,
            arguments: C::HAS_ARGUMENTS.then_some(c),
        })
        .expect("encode")
    }

    #[test]
    fn commands_on_the_wire() {
        assert_eq!(wire(&Stop), r#"{"execute":"stop"}"#);
        assert_eq!(wire(&QmpCapabilities), r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(
            wire(&GetFd { fdname: "x".into() }),
            r#"{"execute":"getfd","arguments":{"fdname":"x"}}"#
        );
        assert_eq!(
            wire(&MigrateSetParameters { max_bandwidth: 5 }),
            r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":5}}"#
        );
        assert_eq!(
            wire(&MigrateIncoming { uri: "fd:s".into() }),
            r#"{"execute":"migrate-incoming","arguments":{"uri":"fd:s"}}"#
        );
        assert_eq!(wire(&MigrateCancel), r#"{"execute":"migrate_cancel"}"#);
        assert_eq!(
            wire(&MigrateSetCapabilities {
                capabilities: vec![CapabilityState {
                    capability: "x-ignore-shared".into(),
                    state: true
                }]
            }),
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}"#
        );
        assert_eq!(wire(&AddFd {}), r#"{"execute":"add-fd","arguments":{}}"#);
        assert_eq!(
            wire(&BlockdevSnapshot {
                node: "root".into(),
                overlay: "ov1".into(),
            }),
            r#"{"execute":"blockdev-snapshot","arguments":{"node":"root","overlay":"ov1"}}"#
        );
        assert_eq!(
            wire(&BlockdevAdd {
                driver: "qcow2".into(),
                node_name: "ov1".into(),
                file: BlockdevFile {
                    driver: "file".into(),
                    filename: "/dev/fdset/1".into(),
                    locking: "off".into(),
                },
                backing: None,
                discard: "unmap".into(),
                detect_zeroes: "unmap".into(),
            }),
            r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"ov1","file":{"driver":"file","filename":"/dev/fdset/1","locking":"off"},"backing":null,"discard":"unmap","detect-zeroes":"unmap"}}"#
        );
        let a: AddFdInfo = serde_json::from_str(r#"{"fdset-id":1,"fd":33}"#).expect("add-fd");
        assert_eq!(a.fdset_id, 1);
    }

    #[test]
    fn replies_and_events_as_qemu_7_2_sends_them() {
        let m: MigrationInfo = serde_json::from_str(
            r#"{"status":"completed","ram":{"total":537133056,"transferred":1},"total-time":90}"#,
        )
        .expect("migration");
        assert_eq!(m.status, Some(MigrationStatus::Completed));
        assert_eq!(m.ram.map(|r| r.total), Some(537133056));
        let m: MigrationInfo = serde_json::from_str("{}").expect("no migration yet");
        assert_eq!(m.status, None);
        let m: MigrationInfo =
            serde_json::from_str(r#"{"status":"postcopy-active"}"#).expect("other");
        assert_eq!(m.status, Some(MigrationStatus::Other));
        let s: StatusInfo =
            serde_json::from_str(r#"{"status":"paused","singlestep":false,"running":false}"#)
                .expect("status");
        assert_eq!(s.status, RunState::Paused);
        assert!(!s.running);
        let s: StatusInfo =
            serde_json::from_str(r#"{"status":"colo","running":false}"#).expect("other state");
        assert_eq!(s.status, RunState::Other);
        let e: Event =
            serde_json::from_str(r#"{"timestamp":{"seconds":1,"microseconds":2},"event":"STOP"}"#)
                .expect("stop");
        assert_eq!(e, Event::Stop);
        let e: Event = serde_json::from_str(
            r#"{"timestamp":{"seconds":1,"microseconds":2},"event":"MIGRATION","data":{"status":"active"}}"#,
        )
        .expect("migration event");
        assert_eq!(
            e,
            Event::Migration {
                status: MigrationStatus::Active
            }
        );
        assert!(serde_json::from_str::<Event>(
            r#"{"event":"NIC_RX_FILTER_CHANGED","data":{"path":"x"},"timestamp":{"seconds":1,"microseconds":2}}"#,
        )
        .is_err());
        assert!(matches!(
            serde_json::from_str::<Incoming>(r#"{"error":{"class":"CommandNotFound","desc":"x"}}"#),
            Ok(Incoming::Error { .. })
        ));
        assert!(matches!(
            serde_json::from_str::<Incoming>(r#"{"return":{}}"#),
            Ok(Incoming::Return { .. })
        ));
    }
}
