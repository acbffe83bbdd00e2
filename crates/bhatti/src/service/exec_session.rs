//! Piped exec sessions that outlive their client: started over the exec
//! WebSocket with `max_idle_sec`, they keep running when the client goes
//! away, their output is kept in a bounded ring, and a client that comes
//! back with the session id gets the ring replayed, then live output.
//!
//! The daemon holds the command's agent connection, so a session lives as
//! long as the daemon (a restart ends it). A session detached for longer
//! than its `max_idle_sec` is killed and forgotten; a finished one is kept
//! (with its exit event) for the same time so a client can still collect it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::exec::ExecUpdate;
use super::{Result, Service, ServiceError};
use crate::store::User;

/// Output kept per session while nobody is attached, in bytes of events
/// (oldest dropped first).
pub const RING_BYTES: usize = 1 << 20;
/// Longest idle limit a client may ask for: 24 h (seconds).
pub const MAX_IDLE_SECS: u64 = 24 * 3600;
/// How often detached sessions are checked against their idle limit.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// The registry of detachable sessions, by id.
#[derive(Default)]
pub struct ExecSessions {
    map: Mutex<HashMap<String, Arc<ExecSession>>>,
}

/// One detachable command.
pub struct ExecSession {
    pub id: String,
    user_id: i64,
    sandbox_id: String,
    max_idle: Duration,
    /// Stdin of the command; `None` once closed.
    stdin: Mutex<Option<mpsc::Sender<Bytes>>>,
    state: Mutex<State>,
    /// Dropping it kills the command (the relay ends, the connection closes).
    kill: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

struct State {
    ring: VecDeque<ExecUpdateText>,
    ring_bytes: usize,
    /// Events dropped from the ring while detached.
    dropped: u64,
    attached: Option<mpsc::Sender<ExecUpdateText>>,
    /// When the last client left (or the session started detached).
    detached_since: Option<Instant>,
    finished: bool,
}

/// An event as the client receives it: its API JSON text, and whether it
/// is the last one.
#[derive(Debug, Clone)]
pub struct ExecUpdateText {
    pub json: String,
    pub last: bool,
}

/// A client attached to a session: the replay first, then live events.
pub struct Attachment {
    pub session: Arc<ExecSession>,
    pub replay: Vec<ExecUpdateText>,
    pub dropped: u64,
    pub live: mpsc::Receiver<ExecUpdateText>,
}

impl ExecSession {
    /// A sender for the command's stdin (`None` once closed), for a client
    /// that must not block on it.
    pub fn stdin_sender(&self) -> Option<mpsc::Sender<Bytes>> {
        self.stdin.lock().ok().and_then(|g| g.clone())
    }

    /// Whether the session ends when its client leaves (`max_idle_sec` 0).
    pub fn dies_with_client(&self) -> bool {
        self.max_idle.is_zero()
    }

    /// Closes the command's stdin.
    pub fn close_stdin(&self) {
        if let Ok(mut g) = self.stdin.lock() {
            g.take();
        }
    }

    /// Kills the command now (SIGKILL to its process group).
    pub fn kill(&self) {
        if let Ok(mut g) = self.kill.lock() {
            g.take();
        }
    }

    /// The client leaves; the command keeps running.
    pub fn detach(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.attached = None;
            st.detached_since = Some(Instant::now());
        }
    }

    fn push(&self, ev: ExecUpdateText) -> Option<mpsc::Sender<ExecUpdateText>> {
        let mut st = self.state.lock().ok()?;
        st.ring_bytes += ev.json.len();
        st.finished |= ev.last;
        st.ring.push_back(ev);
        while st.ring_bytes > RING_BYTES && st.ring.len() > 1 {
            if let Some(old) = st.ring.pop_front() {
                st.ring_bytes -= old.json.len();
                st.dropped += 1;
            }
        }
        st.attached.clone()
    }
}

impl ExecSessions {
    fn insert(&self, s: Arc<ExecSession>) {
        if let Ok(mut m) = self.map.lock() {
            m.insert(s.id.clone(), s);
        }
    }

    fn remove(&self, id: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(id);
        }
    }

    fn get(&self, id: &str) -> Option<Arc<ExecSession>> {
        self.map.lock().ok()?.get(id).cloned()
    }
}

impl Service {
    /// Runs `updates` as a detachable session (the caller is attached) and
    /// returns the attachment; see the module doc. `to_text` renders an
    /// update as the client's JSON.
    ///
    /// Errors: `Invalid` when `max_idle_sec` is over [`MAX_IDLE_SECS`].
    pub fn start_exec_session(
        self: &Arc<Self>,
        user: &User,
        sandbox_id: &str,
        max_idle_sec: u64,
        stdin: mpsc::Sender<Bytes>,
        mut updates: mpsc::Receiver<ExecUpdate>,
        to_text: fn(ExecUpdate) -> ExecUpdateText,
    ) -> Result<Attachment> {
        if max_idle_sec > MAX_IDLE_SECS {
            return Err(ServiceError::Invalid(format!(
                "invalid field `max_idle_sec`: {max_idle_sec} is over the maximum of {MAX_IDLE_SECS}"
            )));
        }
        let (kill_tx, mut kill_rx) = tokio::sync::oneshot::channel::<()>();
        let (live_tx, live) = mpsc::channel(64);
        let session = Arc::new(ExecSession {
            id: format!("es_{}", hex::encode(rand::random::<[u8; 8]>())),
            user_id: user.id,
            sandbox_id: sandbox_id.to_string(),
            max_idle: Duration::from_secs(max_idle_sec),
            stdin: Mutex::new(Some(stdin)),
            state: Mutex::new(State {
                ring: VecDeque::new(),
                ring_bytes: 0,
                dropped: 0,
                attached: Some(live_tx),
                detached_since: None,
                finished: false,
            }),
            kill: Mutex::new(Some(kill_tx)),
        });
        self.exec_sessions.insert(session.clone());
        // The relay: agent updates into the ring and to whoever is attached.
        let s = session.clone();
        tokio::spawn(async move {
            loop {
                let update = tokio::select! {
                    // Killed: dropping `updates` drops the agent connection.
                    _ = &mut kill_rx => {
                        let end = ExecUpdateText {
                            json: r#"{"type":"error","data":"killed","message":"killed"}"#.into(),
                            last: true,
                        };
                        if let Some(tx) = s.push(end.clone()) {
                            let _ = tx.send(end).await;
                        }
                        return;
                    }
                    u = updates.recv() => u,
                };
                let Some(update) = update else { return };
                let text = to_text(update);
                let last = text.last;
                if let Some(tx) = s.push(text.clone()) {
                    // A slow attached client slows the command, as a pipe would.
                    if tx.send(text).await.is_err() {
                        s.detach();
                    }
                }
                if last {
                    return;
                }
            }
        });
        // The reaper: a session detached past its limit is killed and forgotten.
        let (s, svc) = (session.clone(), Arc::downgrade(self));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REAP_EVERY).await;
                let expired = s
                    .state
                    .lock()
                    .map(|st| {
                        st.attached.is_none()
                            && st.detached_since.is_some_and(|t| t.elapsed() >= s.max_idle)
                    })
                    .unwrap_or(true);
                if expired {
                    s.kill();
                    if let Some(svc) = svc.upgrade() {
                        svc.exec_sessions.remove(&s.id);
                    }
                    return;
                }
            }
        });
        Ok(Attachment {
            session,
            replay: Vec::new(),
            dropped: 0,
            live,
        })
    }

    /// Attaches to a session of the caller in sandbox `sandbox`: its kept
    /// output, then live output. A client already attached is replaced.
    ///
    /// Errors: `NotFound` for an unknown session, or one of another user or
    /// another sandbox.
    pub async fn attach_exec_session(
        &self,
        user: &User,
        sandbox: &str,
        session_id: &str,
    ) -> Result<Attachment> {
        let rec = self.find(user, sandbox).await?;
        let session = self
            .exec_sessions
            .get(session_id)
            .filter(|s| s.user_id == user.id && s.sandbox_id == rec.id)
            .ok_or_else(|| ServiceError::NotFound(format!("no exec session {session_id}")))?;
        let (tx, live) = mpsc::channel(64);
        let (replay, dropped) = {
            let mut st = session
                .state
                .lock()
                .map_err(|_| ServiceError::Unavailable("exec session state poisoned".into()))?;
            st.attached = (!st.finished).then_some(tx);
            // A finished session is kept for its idle limit after each look.
            st.detached_since = st.finished.then(Instant::now);
            (st.ring.iter().cloned().collect(), st.dropped)
        };
        Ok(Attachment {
            session,
            replay,
            dropped,
            live,
        })
    }
}
