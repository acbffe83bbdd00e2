//! TTY sessions on the wire: create, attach, list, kill.

use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use bhatti_proto::frame::{FrameType, MAX_PAYLOAD_LEN};
use bhatti_proto::{ErrorCode, ExecKill, ExecRequest, Message};
use nix::sys::signal::Signal;

use super::HandlerError;
use crate::server::Agent;
use crate::session::{Out, Session, SessionError, Spec};
use crate::spawn;
use crate::stream::Stream;
use crate::wire;

/// A client that stops reading for this long is detached.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

fn refused(e: SessionError) -> HandlerError {
    let code = match &e {
        SessionError::NotFound => ErrorCode::NotFound,
        SessionError::Exists(_) => ErrorCode::Exists,
        SessionError::Full | SessionError::Busy => ErrorCode::Busy,
        SessionError::Spawn(_) => ErrorCode::Invalid,
        SessionError::Io(_) => ErrorCode::Internal,
    };
    HandlerError::Refused(code, e.to_string())
}

/// EXEC_REQ with `tty`: a new session, attached to this connection.
pub fn create(agent: &Arc<Agent>, conn: &Stream, req: ExecRequest) -> Result<(), HandlerError> {
    let cwd = spawn::resolve_cwd(&agent.cfg, req.cwd.as_deref())?;
    agent.activity.touch();
    let spec = Spec {
        id: None,
        argv: &req.argv,
        env: req.env.as_ref(),
        cwd: cwd.as_deref(),
        rows: req.rows.unwrap_or(24),
        cols: req.cols.unwrap_or(80),
        max_idle: req.max_idle_sec.map(Duration::from_secs),
        claimed: true,
    };
    let session = match agent.sessions.create(&agent.cfg, &agent.reaper, spec) {
        Ok(s) => s,
        // A missing program is the program's failure, not the request's:
        // the client sees it like a shell would, with 127.
        Err(SessionError::Spawn(e)) if e.exit_code().is_some() => {
            wire::send(conn, &Message::Stderr(format!("lohar: {e}\n").into_bytes()))?;
            wire::send(conn, &Message::Exit(e.exit_code().unwrap_or(127)))?;
            return Ok(());
        }
        Err(e) => return Err(refused(e)),
    };
    serve(agent, conn, &session, false, None)
}

/// EXEC_REQ with `session_id`: attach to a running (or exited) session,
/// applying the request's `rows`/`cols` if it has both.
pub fn attach(agent: &Arc<Agent>, conn: &Stream, req: ExecRequest) -> Result<(), HandlerError> {
    let id = req.session_id.unwrap_or_default();
    let session = agent
        .sessions
        .get(&id)
        .ok_or_else(|| refused(SessionError::NotFound))?;
    agent.activity.touch();
    let size = match (req.rows, req.cols) {
        (Some(r), Some(c)) if r > 0 && c > 0 => Some((r, c)),
        _ => None,
    };
    serve(agent, conn, &session, req.if_detached, size)
}

/// EXEC_LIST_REQ.
pub fn list(agent: &Agent, conn: &Stream) -> Result<(), HandlerError> {
    wire::send(conn, &Message::ExecListResp(agent.sessions.list()))?;
    Ok(())
}

/// EXEC_KILL: SIGKILL to the session's process group, answered by EXIT 0.
pub fn kill(agent: &Agent, conn: &Stream, req: ExecKill) -> Result<(), HandlerError> {
    let session = agent
        .sessions
        .get(&req.session_id)
        .ok_or_else(|| refused(SessionError::NotFound))?;
    agent.activity.touch();
    session.signal(Signal::SIGKILL);
    wire::send(conn, &Message::Exit(0))?;
    Ok(())
}

/// Runs one attachment: SESSION_INFO, scrollback, then live output until
/// the process exits, another client displaces this one, or this client
/// goes away (which only detaches).
fn serve(
    agent: &Arc<Agent>,
    conn: &Stream,
    session: &Arc<Session>,
    if_detached: bool,
    size: Option<(u16, u16)>,
) -> Result<(), HandlerError> {
    let id = agent.sessions.attach_id();
    let att = session.attach(conn, id, if_detached).map_err(refused)?;
    // The new client's window, not the previous one's: the terminal is
    // resized (its foreground group gets SIGWINCH) as the client attaches.
    if let Some((rows, cols)) = size {
        session.resize(rows, cols);
    }
    conn.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT))?;
    let sent = (|| {
        wire::send(conn, &Message::SessionInfo(att.info.clone()))?;
        if !att.scrollback.is_empty() {
            wire::send_raw(conn, FrameType::Stdout, &att.scrollback)?;
        }
        if let Some(code) = att.exit_code {
            wire::send(conn, &Message::Exit(code))?;
        }
        Ok::<(), HandlerError>(())
    })();
    if sent.is_err() || att.exit_code.is_some() {
        session.detach(id);
        return sent;
    }

    let reader = conn.try_clone().and_then(|conn| {
        let session = session.clone();
        let agent = agent.clone();
        std::thread::Builder::new()
            .name("tty-input".into())
            .stack_size(128 * 1024)
            .spawn(move || read_input(&agent, &conn, &session, id))
    });
    // Not joined: the input thread ends on its own once the socket is shut
    // down, but may first sit in a write to a terminal nobody reads.
    match reader {
        Ok(_detached) => {}
        Err(e) => {
            session.detach(id);
            return Err(e.into());
        }
    };

    write_output(conn, att.rx);
    session.detach(id);
    // Wakes the input thread if the client is still connected.
    let _ = conn.shutdown(Shutdown::Both);
    Ok(())
}

/// Live output to the client, batching queued chunks into large frames.
fn write_output(conn: &Stream, rx: std::sync::mpsc::Receiver<Out>) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut exit = None;
        while let Some(out) = next.take() {
            match out {
                Out::Data(d) => {
                    if batch.len() + d.len() > MAX_PAYLOAD_LEN {
                        if wire::send_raw(conn, FrameType::Stdout, &batch).is_err() {
                            return;
                        }
                        batch.clear();
                    }
                    batch.extend_from_slice(&d);
                    next = rx.try_recv().ok();
                }
                Out::Exit(c) => exit = Some(c),
            }
        }
        if !batch.is_empty() {
            if wire::send_raw(conn, FrameType::Stdout, &batch).is_err() {
                return;
            }
            batch.clear();
        }
        if let Some(code) = exit {
            let _ = wire::send(conn, &Message::Exit(code));
            return;
        }
    }
}

/// Client frames into the session: STDIN, RESIZE, KILL. Ends (detaching)
/// when the client disconnects.
fn read_input(agent: &Agent, conn: &Stream, session: &Session, id: u64) {
    let mut buf = Vec::new();
    let mut r = conn;
    while let Ok(kind) = wire::read_frame_into(&mut r, &mut buf) {
        match kind {
            FrameType::Stdin => {
                agent.activity.touch();
                let _ = session.write_input(&buf);
            }
            // Anything but exactly 4 bytes is ignored, as the protocol says.
            FrameType::Resize if buf.len() == 4 => {
                session.resize(
                    u16::from_be_bytes([buf[0], buf[1]]),
                    u16::from_be_bytes([buf[2], buf[3]]),
                );
            }
            FrameType::Kill => session.signal(Signal::SIGTERM),
            _ => {}
        }
    }
    session.detach(id);
}
