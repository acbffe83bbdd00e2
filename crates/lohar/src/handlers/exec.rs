//! Piped exec: one child in its own process group, its stdio relayed as
//! frames until it exits.
//!
//! One thread runs one `poll` loop over the connection, the child's stdin,
//! stdout and stderr pipes and its exit notification. Everything is
//! non-blocking with bounded buffers, so a child that neither reads its
//! stdin nor stops writing, or a client that is slow to read, can never
//! deadlock the relay.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti_proto::frame::{self, FrameType, HEADER_LEN};
use bhatti_proto::{ErrorCode, ExecRequest, Message};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::HandlerError;
use crate::reaper::ExitWatch;
use crate::server::Agent;
use crate::spawn;
use crate::stream::Stream;
use crate::wire::{self, FrameDecoder};

/// Largest read from a pipe; pipes hold 64 KiB by default.
const PIPE_READ: usize = 64 * 1024;
/// Stop reading the child's output while this much waits for the client.
const OUT_HIGH_WATER: usize = 1024 * 1024;
/// Stop reading client frames while this much waits for the child's stdin.
const IN_HIGH_WATER: usize = 1024 * 1024;
/// After the child exits, how long background processes that inherited
/// its pipes may keep them open before EXIT is sent anyway (their later
/// output is read and dropped by [`crate::leftover`]).
const EXIT_DRAIN: Duration = Duration::from_millis(50);
/// In the final drain, at most this much is read from each pipe.
const FINAL_DRAIN_MAX: usize = 1024 * 1024;

/// EXEC_REQ without `tty`.
pub fn run(agent: &Agent, conn: &Stream, req: ExecRequest) -> Result<(), HandlerError> {
    let cwd = spawn::resolve_cwd(&agent.cfg, req.cwd.as_deref())?;
    let _running = agent.activity.piped_guard();
    let (mut child, watch) = match spawn::piped(
        &agent.cfg,
        &agent.reaper,
        &req.argv,
        req.env.as_ref(),
        cwd.as_deref(),
    ) {
        Ok(c) => c,
        // A program that does not exist is an ERROR (code not_found), as the
        // reference agent's client tests expect; the host turns it into
        // exit 127 with the message on stderr.
        Err(e @ spawn::SpawnError::NotFound(_)) => {
            return Err(HandlerError::Refused(ErrorCode::NotFound, e.to_string()))
        }
        Err(e) => match e.exit_code() {
            // Exists but cannot run: like a shell, a message on stderr and 126.
            Some(code) => {
                wire::send(conn, &Message::Stderr(format!("lohar: {e}\n").into_bytes()))?;
                wire::send(conn, &Message::Exit(code))?;
                return Ok(());
            }
            None => return Err(e.into()),
        },
    };
    let pgid = Pid::from_raw(child.id() as i32);
    let stdin = child.stdin.take().map(OwnedFd::from);
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    for fd in [&stdin, &stdout, &stderr].into_iter().flatten() {
        set_nonblocking(fd)?;
    }
    conn.set_nonblocking(true)?;
    let mut relay = Relay {
        conn,
        agent,
        dec: FrameDecoder::new(64 * 1024),
        out: Vec::with_capacity(PIPE_READ + HEADER_LEN),
        out_pos: 0,
        stdin,
        stdin_buf: Vec::new(),
        stdin_pos: 0,
        stdin_eof: false,
        pipes: [stdout, stderr],
        watch,
        pgid,
        code: None,
        pid_gone: false,
        drain_until: None,
        host_reading: true,
        exit_queued: false,
        // Grows to PIPE_READ for chatty commands; most print little.
        buf: vec![0u8; 4096],
        last_read_full: false,
    };
    relay.run()
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// The state of one exec's relay loop.
struct Relay<'a> {
    conn: &'a Stream,
    agent: &'a Agent,
    dec: FrameDecoder,
    /// Encoded frames waiting for the client, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    stdin: Option<OwnedFd>,
    stdin_buf: Vec<u8>,
    stdin_pos: usize,
    /// The client ended stdin (half-close or empty STDIN frame).
    stdin_eof: bool,
    /// stdout, stderr; `None` once at EOF.
    pipes: [Option<OwnedFd>; 2],
    watch: Arc<ExitWatch>,
    pgid: Pid,
    code: Option<i32>,
    /// The pidfd fired: the process is gone, its code comes by `watch`.
    pid_gone: bool,
    drain_until: Option<Instant>,
    /// The client may still send frames.
    host_reading: bool,
    exit_queued: bool,
    buf: Vec<u8>,
    /// The last pipe read filled `buf`: more output is coming.
    last_read_full: bool,
}

/// What ended the loop early.
enum Gone {
    /// The client closed the connection or it broke.
    Host,
}

impl Relay<'_> {
    fn run(&mut self) -> Result<(), HandlerError> {
        match self.relay() {
            Ok(()) => Ok(()),
            Err(Gone::Host) => {
                // The host hung up before EXIT: the whole group dies.
                if !self.exit_queued {
                    let _ = killpg(self.pgid, Signal::SIGKILL);
                }
                let _ = self.conn.shutdown(Shutdown::Both);
                Ok(())
            }
        }
    }

    fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn relay(&mut self) -> Result<(), Gone> {
        loop {
            self.maybe_finish();
            if self.exit_queued && self.pending_out() == 0 {
                return Ok(());
            }
            self.close_stdin_if_done();

            let sock_events = {
                let mut ev = 0;
                if self.host_reading && self.stdin_buf.len() - self.stdin_pos < IN_HIGH_WATER {
                    ev |= libc::POLLIN;
                }
                if self.pending_out() > 0 {
                    ev |= libc::POLLOUT;
                }
                ev
            };
            let room = self.pending_out() < OUT_HIGH_WATER;
            let fd = |o: &Option<OwnedFd>, on: bool| match o {
                Some(f) if on => f.as_raw_fd(),
                _ => -1,
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.conn.as_raw_fd(),
                    events: sock_events,
                    revents: 0,
                },
                libc::pollfd {
                    fd: fd(&self.pipes[0], room),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: fd(&self.pipes[1], room),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: fd(&self.stdin, self.stdin_pos < self.stdin_buf.len()),
                    events: libc::POLLOUT,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if self.code.is_none() {
                        self.watch.fd().as_raw_fd()
                    } else {
                        -1
                    },
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: match self.watch.pidfd() {
                        Some(p) if self.code.is_none() && !self.pid_gone => p.as_raw_fd(),
                        _ => -1,
                    },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let timeout = match self.drain_until {
                Some(d) => (d.saturating_duration_since(Instant::now()).as_millis() as i32)
                    .saturating_add(1),
                None => -1,
            };
            // SAFETY: fds is a valid array of pollfds on the stack.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                continue; // EINTR
            }

            let sock = fds[0].revents;
            if sock & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(Gone::Host);
            }
            if sock & libc::POLLIN != 0 {
                self.read_host()?;
            }
            for i in 0..2 {
                if fds[1 + i].revents != 0 {
                    self.read_pipe(i, PIPE_READ);
                }
            }
            if fds[3].revents != 0 {
                self.write_stdin();
            }
            if fds[5].revents != 0 {
                // Reap it here rather than wait for the reaper thread.
                self.pid_gone = true;
                self.code = self.agent.reaper.try_reap(&self.watch);
            } else if fds[4].revents != 0 {
                self.code = self.watch.code();
            }
            if self.code.is_some() && self.drain_until.is_none() {
                self.drain_until = Some(Instant::now() + EXIT_DRAIN);
            }
            self.flush()?;
        }
    }

    /// Once the child has exited and its output is in (or the grace time
    /// for background holders of the pipes is over), queue EXIT.
    fn maybe_finish(&mut self) {
        let Some(code) = self.code else { return };
        if self.exit_queued {
            return;
        }
        let pipes_done = self.pipes.iter().all(Option::is_none);
        let late = self.drain_until.is_some_and(|d| Instant::now() >= d);
        if !pipes_done && !late {
            return;
        }
        for i in 0..2 {
            // Whatever is still buffered in the pipe belongs to this run.
            let mut taken = 0;
            while self.pipes[i].is_some() && taken < FINAL_DRAIN_MAX {
                match self.read_pipe(i, PIPE_READ) {
                    0 => break,
                    n => taken += n,
                }
            }
            // Background processes still hold the pipe: keep reading it
            // (and dropping the bytes) so they neither get SIGPIPE nor block.
            if let Some(p) = self.pipes[i].take() {
                crate::leftover::adopt(p);
            }
        }
        self.stdin = None;
        self.push_frame(FrameType::Exit, &code.to_be_bytes());
        self.exit_queued = true;
    }

    fn close_stdin_if_done(&mut self) {
        if self.stdin_eof && self.stdin_pos >= self.stdin_buf.len() {
            self.stdin = None;
        }
    }

    fn push_frame(&mut self, kind: FrameType, payload: &[u8]) {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        // Payloads here are at most PIPE_READ bytes, far below the limit.
        let _ = frame::encode_into(&mut self.out, kind, payload);
    }

    /// Reads once from stdout (0) or stderr (1) into an output frame;
    /// returns the bytes read (0 on EOF or nothing available).
    fn read_pipe(&mut self, i: usize, max: usize) -> usize {
        let Some(fd) = &self.pipes[i] else { return 0 };
        if self.buf.len() < max && self.buf.len() < PIPE_READ && self.last_read_full {
            self.buf.resize(PIPE_READ, 0);
        }
        let max = max.min(self.buf.len());
        // SAFETY: reads at most `max` bytes into a live buffer that long,
        // from a pipe fd we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), max) };
        let res = if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        };
        match res {
            Ok(0) => {
                self.pipes[i] = None;
                0
            }
            Ok(n) => {
                self.last_read_full = n == self.buf.len();
                let kind = if i == 0 {
                    FrameType::Stdout
                } else {
                    FrameType::Stderr
                };
                let data = std::mem::take(&mut self.buf);
                self.push_frame(kind, &data[..n]);
                self.buf = data;
                n
            }
            Err(e) if would_block(&e) => 0,
            Err(_) => {
                self.pipes[i] = None;
                0
            }
        }
    }

    fn read_host(&mut self) -> Result<(), Gone> {
        let mut r = self.conn;
        match self.dec.fill_from(&mut r) {
            Ok(0) => {
                // Half-close: the client is done sending; stdin ends.
                self.host_reading = false;
                self.stdin_eof = true;
                if self.conn.needs_close_probe() && !self.exit_queued {
                    // An empty STDOUT frame is harmless to a live client and
                    // makes TCP report a client that closed completely.
                    self.push_frame(FrameType::Stdout, &[]);
                }
            }
            Ok(_) => {}
            Err(e) if would_block(&e) => {}
            Err(_) => return Err(Gone::Host),
        }
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => self.on_frame(f.kind, f.payload),
                Ok(None) => return Ok(()),
                // A broken frame ends the connection; the group dies with it.
                Err(_) => return Err(Gone::Host),
            }
        }
    }

    fn on_frame(&mut self, kind: FrameType, payload: Vec<u8>) {
        match kind {
            FrameType::Stdin if payload.is_empty() => self.stdin_eof = true,
            FrameType::Stdin => {
                self.agent.activity.touch();
                if self.stdin.is_some() && !self.stdin_eof {
                    if self.stdin_pos == self.stdin_buf.len() {
                        self.stdin_buf.clear();
                        self.stdin_pos = 0;
                    }
                    if self.stdin_buf.is_empty() {
                        self.stdin_buf = payload;
                    } else {
                        self.stdin_buf.extend_from_slice(&payload);
                    }
                    self.write_stdin();
                }
            }
            FrameType::Kill => {
                let _ = killpg(self.pgid, Signal::SIGKILL);
            }
            _ => {}
        }
    }

    fn write_stdin(&mut self) {
        let Some(fd) = &self.stdin else {
            self.stdin_buf.clear();
            self.stdin_pos = 0;
            return;
        };
        while self.stdin_pos < self.stdin_buf.len() {
            // SAFETY: writes from a live slice to a pipe fd we own.
            let n = unsafe {
                libc::write(
                    fd.as_raw_fd(),
                    self.stdin_buf[self.stdin_pos..].as_ptr().cast(),
                    self.stdin_buf.len() - self.stdin_pos,
                )
            };
            if n >= 0 {
                self.stdin_pos += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if would_block(&e) {
                return;
            }
            // EPIPE: the child closed its stdin; drop what it won't read.
            self.stdin = None;
            self.stdin_buf.clear();
            self.stdin_pos = 0;
            return;
        }
    }

    /// Writes as much pending output as the socket takes right now.
    fn flush(&mut self) -> Result<(), Gone> {
        let mut w = self.conn;
        while self.out_pos < self.out.len() {
            match w.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(Gone::Host),
                Ok(n) => self.out_pos += n,
                Err(e) if would_block(&e) => break,
                Err(_) => return Err(Gone::Host),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > OUT_HIGH_WATER {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
    }
}
