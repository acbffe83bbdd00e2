//! Output pipes of an exec that outlive its EXIT.
//!
//! `sh -c 'server &'` returns at once, but `server` still holds the exec's
//! stdout and stderr. Closing our read ends would kill it with SIGPIPE at
//! its first write (and a full pipe would block it forever). So once EXIT
//! is queued the pipes are handed here: one thread reads and discards
//! whatever background processes write, until each pipe reaches EOF (every
//! writer has exited or closed it).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, OnceLock};

/// Pipes still held by background processes, and the eventfd that wakes
/// the thread when one is added.
struct Leftovers {
    fds: Mutex<Vec<OwnedFd>>,
    wake: OwnedFd,
}

static LEFTOVERS: OnceLock<Option<Leftovers>> = OnceLock::new();

fn start() -> Option<Leftovers> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let wake = unsafe { OwnedFd::from_raw_fd(fd) };
    let spawned = std::thread::Builder::new()
        .name("leftover-pipes".into())
        .stack_size(128 * 1024)
        .spawn(run);
    spawned.ok().map(|_| Leftovers {
        fds: Mutex::new(Vec::new()),
        wake,
    })
}

/// Keeps reading `pipe` (non-blocking) and dropping what comes, until EOF.
/// If the drain thread cannot exist, the pipe is closed as before.
pub fn adopt(pipe: OwnedFd) {
    let Some(l) = LEFTOVERS.get_or_init(start) else {
        return;
    };
    l.fds.lock().unwrap_or_else(|e| e.into_inner()).push(pipe);
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to our eventfd.
    unsafe { libc::write(l.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

fn run() {
    // The statics are set right after this thread starts: wait for them.
    let l = loop {
        match LEFTOVERS.get() {
            Some(Some(l)) => break l,
            Some(None) => return,
            None => std::thread::yield_now(),
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut pfds = vec![libc::pollfd {
            fd: l.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        {
            let fds = l.fds.lock().unwrap_or_else(|e| e.into_inner());
            pfds.extend(fds.iter().map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
        }
        // SAFETY: pfds is a live array of pollfds of the given length.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n <= 0 {
            continue;
        }
        if pfds[0].revents != 0 {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64 from our eventfd.
            unsafe { libc::read(l.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        let mut done = Vec::new();
        for p in pfds[1..].iter().filter(|p| p.revents != 0) {
            // SAFETY: reads into a live buffer of this length from a pipe
            // that stays open while it is in the list (only this thread
            // removes entries).
            let r = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
            let err = r < 0 && {
                let e = std::io::Error::last_os_error();
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                )
            };
            if r == 0 || err {
                done.push(p.fd);
            }
        }
        if !done.is_empty() {
            let mut fds = l.fds.lock().unwrap_or_else(|e| e.into_inner());
            fds.retain(|f| !done.contains(&f.as_raw_fd()));
        }
    }
}
