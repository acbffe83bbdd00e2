//! TTY sessions: a process on a PTY that outlives its client connections.
//!
//! Each session has one pump thread that reads the PTY, appends to the
//! scrollback ring and forwards to the attached client, and learns the exit
//! code from the reaper. The ring append and the choice of the receiving
//! client happen under one lock, and so does an attach's snapshot of the
//! ring: every byte is either in the snapshot or sent live, never both.

pub mod pty;
pub mod ring;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bhatti_proto::{SessionInfo, SCROLLBACK_BYTES};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::activity::now_unix;
use crate::config::AgentConfig;
use crate::reaper::{ExitWatch, Reaper};
use crate::spawn::{self, SpawnError};
use crate::stream::Stream;
use ring::Ring;

/// Most sessions registered at once (exited ones are evicted first).
pub const MAX_SESSIONS: usize = 128;
/// Output chunks queued for a client before the pump waits for it.
const QUEUE_DEPTH: usize = 64;
/// After the process exits, how long background processes that still hold
/// the terminal may keep it open before the session is closed.
const EXIT_DRAIN: Duration = Duration::from_millis(100);
/// How often an attached session with `max_idle` rechecks (a detach does
/// not wake the pump).
const IDLE_RECHECK: Duration = Duration::from_millis(250);

/// Why a session operation failed; the message goes to the client.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session not found")]
    NotFound,
    #[error("session {0} already exists")]
    Exists(String),
    #[error("too many sessions ({MAX_SESSIONS}); kill or let some exit")]
    Full,
    #[error("session is attached to another client")]
    Busy,
    #[error("{0}")]
    Spawn(#[from] SpawnError),
    #[error("pty: {0}")]
    Io(#[from] io::Error),
}

/// What the pump hands to an attached client.
pub enum Out {
    Data(Vec<u8>),
    Exit(i32),
}

struct Attachment {
    id: u64,
    tx: SyncSender<Out>,
    /// Lets a displacing attach cut off a client that stopped reading.
    conn: Stream,
}

struct State {
    ring: Ring,
    exit_code: Option<i32>,
    attached: Option<Attachment>,
    /// Set from creation until the creating client attaches: a new session
    /// is its creator's, and must not look detached to another client's
    /// "attach to a detached shell" in between.
    claimed: bool,
    idle_since: Instant,
    idle_killed: bool,
}

/// One TTY session.
pub struct Session {
    pub id: String,
    seq: u64,
    argv: String,
    created_at: i64,
    pgid: Pid,
    max_idle: Option<Duration>,
    /// The PTY master for input and resizes; closed when the session ends.
    input: RwLock<Option<Arc<File>>>,
    state: Mutex<State>,
}

/// A client's view right after attaching.
pub struct Attached {
    pub info: SessionInfo,
    pub scrollback: Vec<u8>,
    /// Set when the session had already exited: nothing live will follow.
    pub exit_code: Option<i32>,
    pub rx: Receiver<Out>,
}

/// What a new session runs.
pub struct Spec<'a> {
    pub id: Option<String>,
    pub argv: &'a [String],
    pub env: Option<&'a BTreeMap<String, String>>,
    pub cwd: Option<&'a Path>,
    pub rows: u16,
    pub cols: u16,
    pub max_idle: Option<Duration>,
    /// Whether the client that asks for the session attaches to it next
    /// (it is not offered to others until then); `false` for the init script.
    pub claimed: bool,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn info(&self, st: &State) -> SessionInfo {
        SessionInfo {
            session_id: self.id.clone(),
            argv: self.argv.clone(),
            tty: true,
            running: st.exit_code.is_none(),
            exit_code: st.exit_code,
            attached: st.attached.is_some() || st.claimed,
            created_at: self.created_at,
        }
    }

    /// Attaches `conn`, displacing (EXIT 0, then dropped) any earlier client.
    pub fn attach(
        &self,
        conn: &Stream,
        id: u64,
        if_detached: bool,
    ) -> Result<Attached, SessionError> {
        let conn = conn.try_clone()?;
        let (tx, rx) = sync_channel(QUEUE_DEPTH);
        let (info, scrollback, exit_code, old) = {
            let mut st = self.lock();
            if if_detached && (st.attached.is_some() || st.claimed) {
                return Err(SessionError::Busy);
            }
            st.claimed = false;
            let old = st.attached.take();
            if st.exit_code.is_none() {
                st.attached = Some(Attachment { id, tx, conn });
            }
            (self.info(&st), st.ring.contents(), st.exit_code, old)
        };
        if let Some(old) = old {
            // A client that is not reading cannot take the EXIT: cut it off.
            if old.tx.try_send(Out::Exit(0)).is_err() {
                let _ = old.conn.shutdown(Shutdown::Both);
            }
        }
        Ok(Attached {
            info,
            scrollback,
            exit_code,
            rx,
        })
    }

    /// Detaches the client `id` if it is still the attached one.
    pub fn detach(&self, id: u64) {
        let mut st = self.lock();
        if st.attached.as_ref().is_some_and(|a| a.id == id) {
            st.attached = None;
            st.idle_since = Instant::now();
        }
    }

    /// Feeds the process's terminal.
    pub fn write_input(&self, data: &[u8]) -> io::Result<()> {
        let master = self.input.read().unwrap_or_else(|e| e.into_inner()).clone();
        match master {
            Some(m) => (&*m).write_all(data),
            None => Ok(()),
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) {
        let master = self.input.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(m) = master {
            let _ = pty::set_winsize(&*m, rows, cols);
        }
    }

    /// Signals the whole process group, if the session still runs.
    pub fn signal(&self, sig: Signal) {
        if self.lock().exit_code.is_none() {
            let _ = killpg(self.pgid, sig);
        }
    }

    fn output(&self, data: &[u8]) {
        let tx = {
            let mut st = self.lock();
            st.ring.push(data);
            st.attached.as_ref().map(|a| a.tx.clone())
        };
        if let Some(tx) = tx {
            // Blocks while the client's queue is full: backpressure. Client
            // writes have a timeout, so this wait is bounded.
            let _ = tx.send(Out::Data(data.to_vec()));
        }
    }

    fn check_idle(&self) -> Option<Duration> {
        let max = self.max_idle?;
        let mut st = self.lock();
        if st.exit_code.is_some() || st.idle_killed {
            return None;
        }
        if st.attached.is_some() {
            return Some(IDLE_RECHECK);
        }
        let idle = st.idle_since.elapsed();
        if idle >= max {
            st.idle_killed = true;
            let _ = killpg(self.pgid, Signal::SIGKILL);
            return None;
        }
        Some(max - idle)
    }

    /// The pump: PTY output to ring and client, until exit.
    fn pump(&self, mut master: File, watch: Arc<ExitWatch>) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut master_open = true;
        let mut code: Option<i32> = None;
        let mut drain_until: Option<Instant> = None;
        loop {
            let idle_wait = self.check_idle();
            if let Some(c) = code {
                if !master_open || drain_until.is_some_and(|d| Instant::now() >= d) {
                    self.finish(c);
                    return;
                }
            }
            let wait = match (drain_until, idle_wait) {
                (Some(d), _) => Some(d.saturating_duration_since(Instant::now())),
                (None, w) => w,
            };
            // Rounded up, so we never wake just before the deadline; clamped for
            // absurd idle limits.
            let timeout = wait.map_or(-1, |d| d.as_millis().min(i32::MAX as u128 - 1) as i32 + 1);
            let mut fds = [
                libc::pollfd {
                    fd: if master_open { master.as_raw_fd() } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if code.is_none() {
                        watch.fd().as_raw_fd()
                    } else {
                        -1
                    },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a valid array of two pollfds on the stack.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if n <= 0 {
                continue;
            }
            if fds[0].revents != 0 {
                match master.read(&mut buf) {
                    Ok(0) => master_open = false,
                    Ok(n) => self.output(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                        ) => {}
                    // EIO: every holder of the terminal has closed it.
                    Err(_) => master_open = false,
                }
            }
            if fds[1].revents != 0 {
                code = watch.code();
                if code.is_some() {
                    drain_until = Some(Instant::now() + EXIT_DRAIN);
                }
            }
        }
    }

    fn finish(&self, code: i32) {
        *self.input.write().unwrap_or_else(|e| e.into_inner()) = None;
        let att = {
            let mut st = self.lock();
            st.exit_code = Some(code);
            st.attached.take()
        };
        if let Some(a) = att {
            let _ = a.tx.send(Out::Exit(code));
        }
    }
}

struct Registry {
    by_id: HashMap<String, Arc<Session>>,
    next: u64,
    /// Slots taken by creations still spawning.
    reserved: usize,
}

/// Every TTY session of this agent.
pub struct Sessions {
    reg: Mutex<Registry>,
    next_attach: AtomicU64,
}

impl Sessions {
    pub fn new() -> Self {
        Sessions {
            reg: Mutex::new(Registry {
                by_id: HashMap::new(),
                next: 0,
                reserved: 0,
            }),
            next_attach: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh id for an attaching client.
    pub fn attach_id(&self) -> u64 {
        self.next_attach.fetch_add(1, Ordering::Relaxed)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().by_id.get(id).cloned()
    }

    /// Takes a slot and an id, evicting the oldest exited session if full.
    fn reserve(&self, id: Option<String>) -> Result<(String, u64), SessionError> {
        let mut reg = self.lock();
        if reg.by_id.len() + reg.reserved >= MAX_SESSIONS {
            let oldest_exited = reg
                .by_id
                .values()
                .filter(|s| s.lock().exit_code.is_some())
                .min_by_key(|s| s.seq)
                .map(|s| s.id.clone());
            match oldest_exited {
                Some(old) => {
                    reg.by_id.remove(&old);
                }
                None => return Err(SessionError::Full),
            }
        }
        reg.next += 1;
        let seq = reg.next;
        let id = id.unwrap_or_else(|| format!("s{seq}"));
        if reg.by_id.contains_key(&id) {
            return Err(SessionError::Exists(id));
        }
        reg.reserved += 1;
        Ok((id, seq))
    }

    /// Starts a process on a new PTY and registers it, detached.
    pub fn create(
        &self,
        cfg: &AgentConfig,
        reaper: &Reaper,
        spec: Spec<'_>,
    ) -> Result<Arc<Session>, SessionError> {
        let (id, seq) = self.reserve(spec.id.clone())?;
        let started = start_on_pty(cfg, reaper, &spec);
        let mut reg = self.lock();
        reg.reserved -= 1;
        let (master, pid, watch) = started?;
        let session = Arc::new(Session {
            id: id.clone(),
            seq,
            argv: spec.argv.join(" "),
            created_at: now_unix(),
            pgid: Pid::from_raw(pid as i32),
            max_idle: spec.max_idle.filter(|d| !d.is_zero()),
            input: RwLock::new(Some(Arc::new(master.try_clone()?))),
            state: Mutex::new(State {
                ring: Ring::new(SCROLLBACK_BYTES),
                exit_code: None,
                attached: None,
                claimed: spec.claimed,
                idle_since: Instant::now(),
                idle_killed: false,
            }),
        });
        reg.by_id.insert(id, session.clone());
        drop(reg);
        let s = session.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("session-{}", session.id))
            .stack_size(128 * 1024)
            .spawn(move || s.pump(master, watch));
        if let Err(e) = spawned {
            let _ = killpg(session.pgid, Signal::SIGKILL);
            self.lock().by_id.remove(&session.id);
            return Err(e.into());
        }
        Ok(session)
    }

    /// Every session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut all: Vec<Arc<Session>> = self.lock().by_id.values().cloned().collect();
        all.sort_by_key(|s| s.seq);
        all.iter().map(|s| s.info(&s.lock())).collect()
    }

    /// (running, attached) session counts.
    pub fn counts(&self) -> (u32, u32) {
        let all: Vec<Arc<Session>> = self.lock().by_id.values().cloned().collect();
        let mut running = 0;
        let mut attached = 0;
        for s in all {
            let st = s.lock();
            running += u32::from(st.exit_code.is_none());
            attached += u32::from(st.attached.is_some());
        }
        (running, attached)
    }
}

/// Opens a PTY and starts the process as leader of a new session on it.
fn start_on_pty(
    cfg: &AgentConfig,
    reaper: &Reaper,
    spec: &Spec<'_>,
) -> Result<(File, u32, Arc<ExitWatch>), SessionError> {
    let (master, slave) = pty::open(spec.rows, spec.cols)?;
    let mut cmd = spawn::command(cfg, spec.argv, spec.env, spec.cwd, spawn::Terminal::Pty)?;
    cmd.stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave);
    // `cmd` holds the slave copies; it is consumed (and they are closed)
    // here, so the master sees EOF once the process side closes them.
    let (child, watch) = spawn::start(reaper, cmd, &spec.argv[0])?;
    Ok((master, child.id(), watch))
}
