//! Last-activity tracking for the host's idle detection.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// When something last happened, and how many piped execs run right now.
#[derive(Debug)]
pub struct Activity {
    last: AtomicI64,
    piped: AtomicU32,
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            last: AtomicI64::new(now_unix()),
            piped: AtomicU32::new(0),
        }
    }

    /// Records activity (an exec, stdin, a file operation) now.
    pub fn touch(&self) {
        self.last.store(now_unix(), Ordering::Relaxed);
    }

    pub fn last_unix(&self) -> i64 {
        self.last.load(Ordering::Relaxed)
    }

    /// Piped execs in flight (each has a client attached by definition).
    pub fn piped_running(&self) -> u32 {
        self.piped.load(Ordering::Relaxed)
    }

    /// Counts one piped exec for as long as the guard lives.
    pub fn piped_guard(&self) -> PipedGuard<'_> {
        self.touch();
        self.piped.fetch_add(1, Ordering::Relaxed);
        PipedGuard(self)
    }
}

/// See [`Activity::piped_guard`].
pub struct PipedGuard<'a>(&'a Activity);

impl Drop for PipedGuard<'_> {
    fn drop(&mut self) {
        self.0.piped.fetch_sub(1, Ordering::Relaxed);
        // The end of a long command is activity too.
        self.0.touch();
    }
}
