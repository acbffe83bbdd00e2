//! Idle keep-alive HTTP/1.1 connections to guest ports, shared by both
//! proxies. Opening a forward costs a TCP connect, an AUTH frame and a dial
//! inside the guest, so an app that keeps connections alive is reused.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

use super::relay::UpstreamBody;

/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per (sandbox, port).
const MAX_IDLE_PER_TARGET: usize = 8;
/// How often the whole pool is swept for expired connections.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

type Key = (String, u16);

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

struct Inner {
    idle: HashMap<Key, Vec<Idle>>,
    last_sweep: Instant,
}

/// Keep-alive connections by (sandbox id, port).
pub struct UpstreamPool {
    inner: Mutex<Inner>,
}

impl Default for UpstreamPool {
    fn default() -> Self {
        UpstreamPool {
            inner: Mutex::new(Inner {
                idle: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }
}

impl UpstreamPool {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map holds no invariant a panic could break.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection ready for a new request, if one is idle. Connections
    /// still streaming a response stay in the pool for later.
    pub fn take(&self, sandbox_id: &str, port: u16) -> Option<SendRequest<UpstreamBody>> {
        let now = Instant::now();
        let mut g = self.lock();
        g.sweep(now);
        let list = g.idle.get_mut(&(sandbox_id.to_string(), port))?;
        list.retain(|i| !i.sender.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
        let pos = list.iter().rposition(|i| i.sender.is_ready())?;
        Some(list.swap_remove(pos).sender)
    }

    /// Offers a connection for reuse once its current response is done.
    pub fn put(&self, sandbox_id: &str, port: u16, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut g = self.lock();
        g.sweep(now);
        let list = g.idle.entry((sandbox_id.to_string(), port)).or_default();
        if list.len() >= MAX_IDLE_PER_TARGET {
            // Dropping a sender lets its in-flight response finish, then closes it.
            list.remove(0);
        }
        list.push(Idle { sender, since: now });
    }

    /// Closes every idle connection to a sandbox.
    pub fn forget_sandbox(&self, sandbox_id: &str) {
        self.lock().idle.retain(|(id, _), _| id != sandbox_id);
    }

    /// Closes expired and dead idle connections now.
    pub fn sweep(&self) {
        let mut g = self.lock();
        g.last_sweep = Instant::now() - SWEEP_EVERY;
        g.sweep(Instant::now());
    }

    /// Idle connections held, all targets together.
    pub fn idle_count(&self) -> usize {
        self.lock().idle.values().map(Vec::len).sum()
    }
}

impl Inner {
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        for list in self.idle.values_mut() {
            list.retain(|i| !i.sender.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
        }
        self.idle.retain(|_, l| !l.is_empty());
    }
}
