//! Listeners, the connection cap, AUTH, and dispatch of the first request
//! frame to its handler. One thread per connection: each operation is one
//! connection, and blocking I/O on its own thread is the cheapest way to
//! serve it.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti_proto::frame::FrameType;
use bhatti_proto::{
    codec, ErrorCode, ExecRequest, Frame, FrameError, Message, AUTH_DEADLINE, AUTH_REQUIRED,
};

use crate::acceptors::Acceptors;
use crate::activity::Activity;
use crate::config::{AgentConfig, Endpoints};
use crate::handlers::{self, HandlerError};
use crate::reaper::Reaper;
use crate::session::{Sessions, Spec};
use crate::stream::{Listener, Stream};
use crate::wire::{self, DeadlineReader};

/// Connections served at once (control and forward together); one more is
/// answered with an ERROR frame and closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// A connection must send its request within this time (after AUTH).
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Stack of connection threads: handlers keep their buffers on the heap.
const CONN_STACK: usize = 256 * 1024;

/// The state every handler shares.
pub struct Agent {
    pub cfg: AgentConfig,
    pub reaper: Arc<Reaper>,
    pub sessions: Sessions,
    pub activity: Activity,
    conns: AtomicUsize,
}

impl Agent {
    pub fn new(cfg: AgentConfig, reaper: Arc<Reaper>) -> Arc<Agent> {
        Arc::new(Agent {
            cfg,
            reaper,
            sessions: Sessions::new(),
            activity: Activity::new(),
            conns: AtomicUsize::new(0),
        })
    }

    /// Starts the init script as the detached TTY session "init".
    pub fn start_init(&self) -> Result<(), String> {
        let Some(argv) = self.cfg.init_argv() else {
            return Ok(());
        };
        self.start_init_argv(&argv)
    }

    /// Starts TTY session "init" running `argv` (boot, or IDENTITY of a
    /// template-born sandbox).
    pub fn start_init_argv(&self, argv: &[String]) -> Result<(), String> {
        let cwd = crate::spawn::resolve_cwd(&self.cfg, None).map_err(|e| e.to_string())?;
        let spec = Spec {
            id: Some("init".into()),
            argv,
            env: None,
            cwd: cwd.as_deref(),
            rows: 24,
            cols: 80,
            max_idle: None,
            claimed: false,
        };
        self.sessions
            .create(&self.cfg, &self.reaper, spec)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The two bound listeners.
pub struct Listeners {
    pub control: Listener,
    pub forward: Listener,
}

/// Binds both endpoints (a stale Unix socket file is replaced).
pub fn bind(ep: &Endpoints) -> io::Result<Listeners> {
    Ok(match ep {
        Endpoints::Unix { control, forward } => {
            let bind = |p: &std::path::Path| {
                let _ = std::fs::remove_file(p);
                UnixListener::bind(p)
            };
            Listeners {
                control: Listener::Unix(bind(control)?),
                forward: Listener::Unix(bind(forward)?),
            }
        }
        Endpoints::Tcp { control, forward } => Listeners {
            control: Listener::Tcp(TcpListener::bind(control)?),
            forward: Listener::Tcp(TcpListener::bind(forward)?),
        },
    })
}

#[derive(Clone, Copy)]
enum Channel {
    Control,
    Forward,
}

/// Serves both listeners; returns once their threads run.
pub fn serve(agent: Arc<Agent>, listeners: Listeners) -> io::Result<()> {
    for (listener, channel) in [
        (listeners.control, Channel::Control),
        (listeners.forward, Channel::Forward),
    ] {
        let a = agent.clone();
        // One thread more than the cap, to answer the connection over it.
        Acceptors::start(listener, MAX_CONNECTIONS + 1, CONN_STACK, move |conn| {
            if a.conns.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                a.conns.fetch_sub(1, Ordering::AcqRel);
                refuse_busy(&conn);
                return;
            }
            let slot = Slot(a.clone());
            handle(&slot.0, conn, channel);
        })?;
    }
    Ok(())
}

/// Holds one connection slot; releases it on drop.
struct Slot(Arc<Agent>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.conns.fetch_sub(1, Ordering::AcqRel);
    }
}

fn refuse_busy(conn: &Stream) {
    let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = wire::send_error(conn, ErrorCode::Busy, "too many connections");
    conn.close_gracefully();
}

fn handle(agent: &Arc<Agent>, conn: Stream, channel: Channel) {
    let result = serve_conn(agent, &conn, channel);
    if let Err(HandlerError::Refused(code, msg)) = result {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = wire::send_error(&conn, code, &msg);
    }
    conn.close_gracefully();
}

/// Constant-time comparison: the time taken does not depend on where the
/// first difference is.
fn token_matches(given: &[u8], want: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != want.len());
    for (i, w) in want.iter().enumerate() {
        diff |= w ^ given.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

fn read_first(conn: &Stream, deadline: Instant) -> Result<Frame, FrameError> {
    codec::read_frame(&mut DeadlineReader {
        stream: conn,
        deadline,
    })
}

/// A frame error on the first frames, as the client should hear it.
fn bad_frame(e: FrameError) -> HandlerError {
    match e {
        FrameError::Eof => HandlerError::Disconnected(e),
        FrameError::Io(ref io) if io.kind() == io::ErrorKind::TimedOut => {
            HandlerError::Refused(ErrorCode::Invalid, "no request received in time".into())
        }
        FrameError::Io(_) => HandlerError::Disconnected(e),
        other => HandlerError::Refused(ErrorCode::Invalid, format!("bad frame: {other}")),
    }
}

fn serve_conn(agent: &Arc<Agent>, conn: &Stream, channel: Channel) -> Result<(), HandlerError> {
    let start = Instant::now();
    let token = agent.cfg.current_token();
    if let Some(token) = &token {
        match read_first(conn, start + AUTH_DEADLINE) {
            Ok(f) if f.kind == FrameType::Auth && token_matches(&f.payload, token) => {}
            _ => {
                return Err(HandlerError::Refused(
                    ErrorCode::PermissionDenied,
                    AUTH_REQUIRED.into(),
                ))
            }
        }
    }
    let mut first = read_first(conn, start + REQUEST_DEADLINE).map_err(bad_frame)?;
    if first.kind == FrameType::Auth && token.is_none() {
        // Clients always authenticate; without a token it is a no-op.
        first = read_first(conn, start + REQUEST_DEADLINE).map_err(bad_frame)?;
    }
    conn.set_read_timeout(None)?;
    let msg = Message::decode(&first)
        .map_err(|e| HandlerError::Refused(ErrorCode::Invalid, format!("bad request: {e}")))?;
    match (channel, msg) {
        (Channel::Forward, Message::FwdReq(req)) => handlers::forward::handle(agent, conn, req),
        (Channel::Control, Message::ExecReq(req)) => exec(agent, conn, req),
        (Channel::Control, Message::ExecListReq) => handlers::session::list(agent, conn),
        (Channel::Control, Message::ExecKill(req)) => handlers::session::kill(agent, conn, req),
        (Channel::Control, Message::ActivityReq) => handlers::activity::handle(agent, conn),
        (Channel::Control, Message::SetTime(ms)) => handlers::time::set(agent, conn, ms),
        (Channel::Control, Message::Identity(id)) => handlers::identity::apply(agent, conn, id),
        (Channel::Control, Message::FileReadReq(req)) => handlers::files::read(agent, conn, req),
        (Channel::Control, Message::FileWriteReq(req)) => handlers::files::write(agent, conn, req),
        (Channel::Control, Message::FileStatReq(req)) => handlers::files::stat(agent, conn, req),
        (Channel::Control, Message::FileLsReq(req)) => handlers::files::ls(agent, conn, req),
        (_, other) => Err(HandlerError::Refused(
            ErrorCode::Invalid,
            format!("unexpected frame type 0x{:02x}", other.kind() as u8),
        )),
    }
}

fn exec(agent: &Arc<Agent>, conn: &Stream, req: ExecRequest) -> Result<(), HandlerError> {
    if req.session_id.is_some() {
        return handlers::session::attach(agent, conn, req);
    }
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(HandlerError::Refused(
            ErrorCode::Invalid,
            "empty argv".into(),
        ));
    }
    if req.tty {
        handlers::session::create(agent, conn, req)
    } else {
        handlers::exec::run(agent, conn, req)
    }
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn token_compare() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret1", b"secret"));
        assert!(!token_matches(b"secre", b"secret"));
        assert!(!token_matches(b"", b"secret"));
        assert!(!token_matches(&[0; 6], &[0; 7]));
    }
}
