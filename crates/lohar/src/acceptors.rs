//! Connection threads that accept for themselves.
//!
//! Idle threads all block in `accept` on the listener; the kernel hands a
//! new connection to exactly one of them, which then serves it. No thread
//! hands work to another, so a request costs no extra wake-up, and nobody
//! creates a thread per connection. When the last idle thread takes a
//! connection it starts a new one first, so there is always someone
//! accepting; threads beyond a few idle ones exit.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::stream::{Listener, Stream};

/// Idle threads kept per listener at most.
const KEEP_IDLE: usize = 16;
/// An idle thread wakes this often to see whether it is still needed.
const IDLE_CHECK: Duration = Duration::from_secs(10);

type Handler = dyn Fn(Stream) + Send + Sync;

/// The accepting threads of one listener.
pub struct Acceptors {
    listener: Listener,
    handler: Box<Handler>,
    idle: AtomicUsize,
    threads: AtomicUsize,
    max_threads: usize,
    stack: usize,
}

impl Acceptors {
    /// Starts accepting on `listener` with at most `max_threads` threads
    /// serving at once (a connection beyond that waits in the backlog).
    pub fn start(
        listener: Listener,
        max_threads: usize,
        stack: usize,
        handler: impl Fn(Stream) + Send + Sync + 'static,
    ) -> io::Result<Arc<Acceptors>> {
        // accept() honours SO_RCVTIMEO: idle threads wake now and then.
        let tv = libc::timeval {
            tv_sec: IDLE_CHECK.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads one timeval from the stack.
        unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let a = Arc::new(Acceptors {
            listener,
            handler: Box::new(handler),
            idle: AtomicUsize::new(0),
            threads: AtomicUsize::new(0),
            max_threads,
            stack,
        });
        a.grow()?;
        Ok(a)
    }

    fn grow(self: &Arc<Self>) -> io::Result<()> {
        if self.threads.fetch_add(1, Ordering::AcqRel) >= self.max_threads {
            self.threads.fetch_sub(1, Ordering::AcqRel);
            return Ok(());
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .stack_size(self.stack)
            .spawn(move || me.run());
        if let Err(e) = spawned {
            self.threads.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(())
    }

    fn run(self: Arc<Self>) {
        loop {
            self.idle.fetch_add(1, Ordering::AcqRel);
            let accepted = self.listener.accept();
            let idle_before = self.idle.fetch_sub(1, Ordering::AcqRel);
            let mut timed_out = false;
            match accepted {
                Ok(conn) => {
                    if idle_before == 1 {
                        // Nobody else is accepting now: start a thread that does.
                        if let Err(e) = self.grow() {
                            eprintln!("lohar: cannot start a connection thread: {e}");
                        }
                    }
                    (self.handler)(conn);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    timed_out = true;
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("lohar: accept: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // Leave only while another thread is accepting: when there are
            // plenty idle, or after a quiet spell (shrinking to one).
            let idle = self.idle.load(Ordering::Acquire);
            if idle >= KEEP_IDLE || (timed_out && idle >= 1) {
                self.threads.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }
}
