//! Async client of the lohar wire protocol, used by the daemon and the bench.
//!
//! Every operation opens its own connection (the protocol allows one
//! operation per connection), authenticates, sends one request frame and
//! then speaks that operation's frames.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bhatti_proto::codec_async::{read_frame, write_frame};
use bhatti_proto::frame::{self, HEADER_LEN};
pub use bhatti_proto::ErrorCode;
use bhatti_proto::{
    ActivityInfo, ExecKill, ExecRequest, FileInfo, FileLsRequest, FileReadRequest,
    FileReadResponse, FileStatRequest, FileWriteRequest, FrameError, FrameType, FwdRequest,
    Message, SessionInfo, MAX_PAYLOAD_LEN,
};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};

/// How long to wait for the agent's refusal after an upload broke off.
const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Read buffer of a streaming operation: small frames (output chunks, EXIT)
/// come out of one read instead of two.
const READ_BUFFER: usize = 64 * 1024;

/// Which of the agent's two listeners to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Port 1024: exec, sessions, files, activity.
    Control,
    /// Port 1025: raw byte relay to a guest port.
    Forward,
}

/// A byte stream to the agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AgentStream for T {}

/// A boxed connection to the agent.
pub type BoxStream = Box<dyn AgentStream>;

/// Boxed future of a fresh connection.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;

/// Opens connections to one agent: TCP inside the daemon's network namespace
/// for a VM, Unix sockets for lohar in test mode.
pub trait Dialer: Send + Sync {
    fn dial(&self, channel: Channel) -> DialFuture;
}

/// Dials lohar in test mode (`LOHAR_SOCK` / `LOHAR_FWD_SOCK`).
pub struct UnixDialer {
    pub control: PathBuf,
    pub forward: PathBuf,
}

impl Dialer for UnixDialer {
    fn dial(&self, channel: Channel) -> DialFuture {
        let path = match channel {
            Channel::Control => self.control.clone(),
            Channel::Forward => self.forward.clone(),
        };
        Box::pin(async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok(Box::new(s) as BoxStream)
        })
    }
}

/// Errors talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent could not be reached.
    #[error("cannot reach the sandbox agent: {0}")]
    Connect(io::Error),
    /// The agent refused: its ERROR frame, with the machine code of the
    /// ERROR_CODE frame before it (`Invalid` from an agent that sends none).
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
    /// The agent sent something the protocol does not allow here.
    #[error("agent protocol error: {0}")]
    Protocol(String),
    /// The upload's own body failed or ended before its announced size
    /// (a client that broke off): the caller's fault, nothing was written.
    #[error("the request body ended early: {0}")]
    BodyEnded(String),
    /// The connection broke.
    #[error("lost the connection to the sandbox agent ({0}); if its VM died, the sandbox turns to status error within seconds")]
    Frame(#[from] FrameError),
}

impl AgentError {
    /// A refusal with a code.
    pub fn remote(code: ErrorCode, message: impl Into<String>) -> Self {
        AgentError::Remote {
            code,
            message: message.into(),
        }
    }

    fn unexpected(what: &str, got: &Message) -> Self {
        AgentError::Protocol(format!("expected {what}, got {:?}", got.kind()))
    }
}

/// Buffered result of a piped exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// One event of a running exec or TTY session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
}

/// Client of one agent. Cheap to clone; every operation uses its own connection.
#[derive(Clone)]
pub struct AgentClient {
    dialer: Arc<dyn Dialer>,
    token: Arc<Vec<u8>>,
}

/// A SET_TIME on its way; see [`AgentClient::send_time`].
pub struct TimeSent {
    conn: Conn,
    sent_ms: i64,
}

impl TimeSent {
    /// The agent's answer: how far the guest clock lagged, in ms.
    pub async fn lag_ms(mut self) -> Result<i64, AgentError> {
        match self.conn.recv().await? {
            Message::SetTimeResp(before) => Ok(self.sent_ms.saturating_sub(before)),
            m => Err(AgentError::unexpected("SET_TIME_RESP", &m)),
        }
    }
}

/// One connection, authenticated, ready for its request frame.
struct Conn {
    stream: BoxStream,
}

impl Conn {
    async fn recv(&mut self) -> Result<Message, AgentError> {
        recv_from(&mut self.stream).await
    }
}

/// The next message; ERROR (with the code of a preceding ERROR_CODE)
/// becomes [`AgentError::Remote`].
async fn recv_from<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Message, AgentError> {
    let mut code = None;
    loop {
        let frame = read_frame(r).await?;
        match Message::decode(&frame) {
            Ok(Message::ErrorCode(c)) => code = Some(c),
            Ok(Message::Error(e)) => {
                // Before codes existed every refusal was about the request.
                return Err(AgentError::remote(code.unwrap_or(ErrorCode::Invalid), e));
            }
            Ok(m) => return Ok(m),
            Err(e) => return Err(AgentError::Protocol(e.to_string())),
        }
    }
}

impl AgentClient {
    pub fn new(dialer: Arc<dyn Dialer>, token: impl Into<Vec<u8>>) -> Self {
        AgentClient {
            dialer,
            token: Arc::new(token.into()),
        }
    }

    /// The same client, dialing through `wrap(dialer)` (e.g. to count the
    /// connections it opens).
    pub fn wrap_dialer(self, wrap: impl FnOnce(Arc<dyn Dialer>) -> Arc<dyn Dialer>) -> Self {
        AgentClient {
            dialer: wrap(self.dialer),
            token: self.token,
        }
    }

    /// Dials `channel` and sends AUTH and `frames` in a single write: one
    /// syscall instead of several, and nothing left to write that could race
    /// with the agent closing the connection after a fast operation.
    async fn open(
        &self,
        channel: Channel,
        frames: &[(FrameType, &[u8])],
    ) -> Result<Conn, AgentError> {
        let mut stream = self
            .dialer
            .dial(channel)
            .await
            .map_err(AgentError::Connect)?;
        let len: usize = frames.iter().map(|(_, p)| HEADER_LEN + p.len()).sum();
        let mut buf = Vec::with_capacity(HEADER_LEN + self.token.len() + len);
        if !self.token.is_empty() {
            frame::encode_into(&mut buf, FrameType::Auth, &self.token)?;
        }
        for (kind, payload) in frames {
            frame::encode_into(&mut buf, *kind, payload)?;
        }
        if let Err(e) = stream.write_all(&buf).await {
            // The agent may already have answered and closed (a refused AUTH,
            // a command that exited without reading its stdin): what it said
            // is still there to read.
            if !matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                return Err(FrameError::Io(e).into());
            }
        }
        Ok(Conn { stream })
    }

    async fn request(&self, msg: &Message) -> Result<Conn, AgentError> {
        self.open(Channel::Control, &[(msg.kind(), &msg.payload())])
            .await
    }

    /// Last activity and session counts; also the cheapest "is it alive" probe.
    pub async fn activity(&self) -> Result<ActivityInfo, AgentError> {
        let mut c = self.request(&Message::ActivityReq).await?;
        match c.recv().await? {
            Message::ActivityResp(a) => Ok(a),
            m => Err(AgentError::unexpected("ACTIVITY_RESP", &m)),
        }
    }

    /// Sets the guest's wall clock to the host's (SET_TIME) and returns how
    /// far the guest lagged, in milliseconds (negative: it was ahead). The
    /// host's time is taken as late as possible, right before the send.
    pub async fn set_time(&self) -> Result<i64, AgentError> {
        self.send_time().await?.lag_ms().await
    }

    /// Sends SET_TIME and returns once it is written, before the agent
    /// answers; [`TimeSent::lag_ms`] waits for the answer. A request sent
    /// after this returns reaches the agent after the clock frame.
    pub async fn send_time(&self) -> Result<TimeSent, AgentError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let conn = self.request(&Message::SetTime(now)).await?;
        Ok(TimeSent { conn, sent_ms: now })
    }

    /// Gives a restored copy its own identity (IDENTITY) and waits for the
    /// answer; the connection is closed on return, which tells the agent to
    /// change its network (see [`bhatti_proto::IdentityResp`]).
    pub async fn identity(
        &self,
        id: &bhatti_proto::Identity,
    ) -> Result<bhatti_proto::IdentityResp, AgentError> {
        let mut c = self.request(&Message::Identity(id.clone())).await?;
        match c.recv().await? {
            Message::IdentityResp(r) => Ok(r),
            m => Err(AgentError::unexpected("IDENTITY_RESP", &m)),
        }
    }

    /// Starts a piped command or a TTY session with stdin left open; see [`ExecStream`].
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecStream, AgentError> {
        self.start_exec(req, None).await
    }

    /// Starts a piped command, feeds it `input` and closes its stdin, all in
    /// the same write as the request.
    pub async fn exec_with_input(
        &self,
        req: ExecRequest,
        input: &[u8],
    ) -> Result<ExecStream, AgentError> {
        self.start_exec(req, Some(input)).await
    }

    async fn start_exec(
        &self,
        req: ExecRequest,
        input: Option<&[u8]>,
    ) -> Result<ExecStream, AgentError> {
        let tty = req.tty;
        let req = Message::ExecReq(req).payload();
        let mut frames: Vec<(FrameType, &[u8])> = vec![(FrameType::ExecReq, &req)];
        if let Some(input) = input {
            frames.extend(input.chunks(MAX_PAYLOAD_LEN).map(|c| (FrameType::Stdin, c)));
            frames.push((FrameType::Stdin, &[]));
        }
        let mut c = self.open(Channel::Control, &frames).await?;
        let session = if tty {
            match c.recv().await? {
                Message::SessionInfo(s) => Some(s),
                m => return Err(AgentError::unexpected("SESSION_INFO", &m)),
            }
        } else {
            None
        };
        let (reader, writer) = tokio::io::split(c.stream);
        Ok(ExecStream {
            session,
            reader: ExecReader {
                inner: BufReader::with_capacity(READ_BUFFER, reader),
            },
            writer: ExecWriter { inner: writer },
        })
    }

    /// Runs a piped command to completion and collects its output.
    pub async fn exec_buffered(&self, req: ExecRequest) -> Result<ExecOutput, AgentError> {
        let mut reader = self.exec_with_input(req, &[]).await?.reader;
        let mut out = ExecOutput::default();
        loop {
            match reader.next().await? {
                ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Exit(code) => {
                    out.exit_code = code;
                    return Ok(out);
                }
            }
        }
    }

    /// TTY sessions, running and exited.
    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, AgentError> {
        let mut c = self.request(&Message::ExecListReq).await?;
        match c.recv().await? {
            Message::ExecListResp(l) => Ok(l),
            m => Err(AgentError::unexpected("EXEC_LIST_RESP", &m)),
        }
    }

    /// SIGKILLs a session's process group.
    pub async fn kill_session(&self, session_id: &str) -> Result<(), AgentError> {
        let mut c = self
            .request(&Message::ExecKill(ExecKill {
                session_id: session_id.to_string(),
            }))
            .await?;
        // The agent answers with EXIT (or ERROR) once the kill was delivered; EOF also means done.
        match c.recv().await {
            Ok(_) | Err(AgentError::Frame(FrameError::Eof)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens a file for reading: its total size and mode, then a stream of its bytes.
    pub async fn read_file(
        &self,
        req: FileReadRequest,
    ) -> Result<(FileReadResponse, FileStream), AgentError> {
        let mut c = self.request(&Message::FileReadReq(req)).await?;
        match c.recv().await? {
            Message::FileReadResp(r) => Ok((
                r,
                FileStream {
                    stream: c.stream,
                    done: false,
                },
            )),
            m => Err(AgentError::unexpected("FILE_READ_RESP", &m)),
        }
    }

    /// Reads a whole (part of a) file into memory.
    pub async fn read_file_all(
        &self,
        req: FileReadRequest,
    ) -> Result<(FileReadResponse, Vec<u8>), AgentError> {
        let (resp, mut s) = self.read_file(req).await?;
        let mut data = Vec::with_capacity(resp.size.min(64 << 20) as usize);
        while let Some(chunk) = s.next_chunk().await? {
            data.extend_from_slice(&chunk);
        }
        Ok((resp, data))
    }

    /// Writes `size` bytes from `body` atomically to `path`.
    ///
    /// The agent may refuse before it has the whole body (a directory, a
    /// full disk): its answer is read while the body is being sent, and a
    /// refusal ends the upload at once and is returned as
    /// [`AgentError::Remote`], never as the broken pipe the unsent rest
    /// would cause.
    pub async fn write_file<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        mode: Option<String>,
        size: u64,
        body: &mut R,
    ) -> Result<(), AgentError> {
        let size_i =
            i64::try_from(size).map_err(|_| AgentError::Protocol("file too large".into()))?;
        let c = self
            .request(&Message::FileWriteReq(FileWriteRequest {
                path: path.to_string(),
                mode,
                size: size_i,
            }))
            .await?;
        let (mut rd, mut wr) = tokio::io::split(c.stream);
        let reply = recv_from(&mut rd);
        tokio::pin!(reply);
        let send = async {
            let mut buf = vec![0u8; (256 * 1024).min(MAX_PAYLOAD_LEN)];
            let mut left = size;
            while left > 0 {
                let want = (left as usize).min(buf.len());
                let n = body
                    .read(&mut buf[..want])
                    .await
                    .map_err(|e| AgentError::BodyEnded(format!("{left} bytes missing ({e})")))?;
                if n == 0 {
                    return Err(AgentError::BodyEnded(format!("{left} bytes missing")));
                }
                write_frame(&mut wr, FrameType::Stdin, &buf[..n]).await?;
                left -= n as u64;
            }
            Ok(())
        };
        let answer = tokio::select! {
            // Only a refusal can come before the whole body is sent.
            early = &mut reply => early,
            sent = send => match sent {
                Ok(()) => reply.await,
                // The connection broke while sending: if the agent refused,
                // its answer is waiting to be read, and it is the real cause.
                Err(AgentError::Frame(e)) => {
                    match tokio::time::timeout(REFUSAL_WAIT, reply).await {
                        Ok(Err(remote @ AgentError::Remote { .. })) => Err(remote),
                        _ => Err(AgentError::Frame(e)),
                    }
                }
                Err(other) => Err(other),
            },
        };
        match answer? {
            Message::FileWriteResp(r) if r.status == "ok" => Ok(()),
            Message::FileWriteResp(r) => Err(AgentError::remote(ErrorCode::Internal, r.status)),
            m => Err(AgentError::unexpected("FILE_WRITE_RESP", &m)),
        }
    }

    /// Writes an in-memory buffer to `path`.
    pub async fn write_file_bytes(
        &self,
        path: &str,
        mode: Option<String>,
        data: &[u8],
    ) -> Result<(), AgentError> {
        let mut r = data;
        self.write_file(path, mode, data.len() as u64, &mut r).await
    }

    pub async fn stat(&self, path: &str) -> Result<FileInfo, AgentError> {
        let mut c = self
            .request(&Message::FileStatReq(FileStatRequest {
                path: path.to_string(),
            }))
            .await?;
        match c.recv().await? {
            Message::FileStatResp(i) => Ok(i),
            m => Err(AgentError::unexpected("FILE_STAT_RESP", &m)),
        }
    }

    pub async fn ls(&self, path: &str) -> Result<Vec<FileInfo>, AgentError> {
        let mut c = self
            .request(&Message::FileLsReq(FileLsRequest {
                path: path.to_string(),
            }))
            .await?;
        match c.recv().await? {
            Message::FileLsResp(l) => Ok(l),
            m => Err(AgentError::unexpected("FILE_LS_RESP", &m)),
        }
    }

    /// A raw byte stream to `127.0.0.1:port` inside the guest.
    pub async fn forward(&self, port: u16) -> Result<BoxStream, AgentError> {
        let req = Message::FwdReq(FwdRequest { port }).payload();
        let mut c = self
            .open(Channel::Forward, &[(FrameType::FwdReq, &req)])
            .await?;
        match c.recv().await? {
            Message::FwdResp(r) if r.is_ok() => Ok(c.stream),
            Message::FwdResp(r) => Err(AgentError::remote(
                ErrorCode::NotFound,
                r.message
                    .unwrap_or_else(|| format!("port {port} is not reachable")),
            )),
            m => Err(AgentError::unexpected("FWD_RESP", &m)),
        }
    }
}

/// A running exec or TTY session, split so input and output can be driven
/// from different tasks.
pub struct ExecStream {
    /// The session, for TTY requests.
    pub session: Option<SessionInfo>,
    pub reader: ExecReader,
    pub writer: ExecWriter,
}

/// Output side of an exec.
pub struct ExecReader {
    inner: BufReader<ReadHalf<BoxStream>>,
}

impl ExecReader {
    /// The next output chunk or the exit code. An ERROR frame becomes `AgentError::Remote`.
    pub async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        loop {
            match recv_from(&mut self.inner).await? {
                Message::Stdout(b) => return Ok(ExecEvent::Stdout(b)),
                Message::Stderr(b) => return Ok(ExecEvent::Stderr(b)),
                Message::Exit(c) => return Ok(ExecEvent::Exit(c)),
                // SESSION_INFO may be re-sent; nothing else is expected here.
                Message::SessionInfo(_) => continue,
                m => return Err(AgentError::unexpected("output or EXIT", &m)),
            }
        }
    }
}

/// Input side of an exec.
pub struct ExecWriter {
    inner: WriteHalf<BoxStream>,
}

impl ExecWriter {
    pub async fn send(&mut self, msg: &Message) -> Result<(), AgentError> {
        write_frame(&mut self.inner, msg.kind(), &msg.payload()).await?;
        Ok(())
    }

    /// Feeds bytes to the child's stdin, split into frames as needed.
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), AgentError> {
        for chunk in data.chunks(MAX_PAYLOAD_LEN) {
            write_frame(&mut self.inner, FrameType::Stdin, chunk).await?;
        }
        Ok(())
    }

    /// Closes the child's stdin (an empty STDIN frame).
    pub async fn close_stdin(&mut self) -> Result<(), AgentError> {
        write_frame(&mut self.inner, FrameType::Stdin, &[]).await?;
        Ok(())
    }

    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), AgentError> {
        self.send(&Message::Resize { rows, cols }).await
    }

    /// KILL: SIGKILL for a piped exec, SIGTERM for a TTY session.
    pub async fn kill(&mut self) -> Result<(), AgentError> {
        self.send(&Message::Kill).await
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }
}

/// The bytes of a file being read.
pub struct FileStream {
    stream: BoxStream,
    done: bool,
}

impl FileStream {
    /// The next chunk, or `None` after the final EXIT.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, AgentError> {
        if self.done {
            return Ok(None);
        }
        match recv_from(&mut self.stream).await? {
            Message::Stdout(b) => Ok(Some(b)),
            Message::Exit(0) => {
                self.done = true;
                Ok(None)
            }
            Message::Exit(c) => Err(AgentError::remote(
                ErrorCode::Internal,
                format!("file read ended with status {c}"),
            )),
            m => Err(AgentError::unexpected("file data", &m)),
        }
    }
}
