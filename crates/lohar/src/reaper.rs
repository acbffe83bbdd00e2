//! The one and only caller of `waitpid(-1)`.
//!
//! As PID 1 lohar inherits every orphan in the VM and must reap them, yet
//! its own children's exit codes must reach the exec or session that started
//! them. A single thread waits for SIGCHLD, reaps everything, hands the exit
//! status of registered children to their [`ExitWatch`], and drops the rest.
//!
//! Registration and spawning happen under a read lock that the reaper's
//! write lock excludes, so a child that exits at once is never reaped before
//! it is registered (and std's own `waitpid` on a failed spawn can never
//! lose its child to us).
//!
//! For latency, the thread waiting on a child may also reap that one child
//! itself through its pidfd ([`Reaper::try_reap`]), saving the hop through
//! the reaper thread; whoever reaps first delivers the code, the other
//! finds nothing to reap. A pidfd names exactly one process, so a reused
//! pid can never be reaped by mistake.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use nix::errno::Errno;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The exit code of one child, delivered by the reaper. Its fd becomes
/// readable when the code is known, so it can sit in a `poll` set.
#[derive(Debug)]
pub struct ExitWatch {
    event: OwnedFd,
    /// Readable once the process has terminated (absent on old kernels).
    pidfd: Option<OwnedFd>,
    pid: i32,
    code: OnceLock<i32>,
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes two integers; the result is checked below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative result is a fresh descriptor we now own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl ExitWatch {
    fn deliver(&self, code: i32) {
        let _ = self.code.set(code);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        unsafe { libc::write(self.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Readable once the child has exited.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    /// Readable once the process has terminated, reaped or not.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|f| f.as_fd())
    }

    /// The exit code (128+n for a signal n), once known.
    pub fn code(&self) -> Option<i32> {
        self.code.get().copied()
    }
}

extern "C" fn on_sigchld(_: libc::c_int) {}

/// Converts a wait status into the protocol's exit code.
fn code_of(status: WaitStatus) -> Option<(Pid, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

/// Reaps every child of this process.
#[derive(Debug, Default)]
pub struct Reaper {
    gate: RwLock<()>,
    waiting: Mutex<HashMap<i32, Arc<ExitWatch>>>,
}

impl Reaper {
    /// Blocks SIGCHLD in the calling thread (and so in every thread it
    /// starts later) and starts the reaper thread. Call it from the main
    /// thread before any other thread exists that could swallow SIGCHLD.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        // PID 1 does not get signals whose disposition is the default; a
        // no-op handler makes SIGCHLD deliverable. It never runs: SIGCHLD
        // stays blocked in every thread and is taken by sigtimedwait.
        let action = SigAction::new(
            SigHandler::Handler(on_sigchld),
            SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP,
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        unsafe { sigaction(Signal::SIGCHLD, &action) }.map_err(io::Error::from)?;
        set.thread_block().map_err(io::Error::from)?;
        let reaper = Arc::new(Reaper::default());
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let timeout = libc::timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                };
                loop {
                    // Zombies that exited before we started, or whose signal
                    // coalesced with another, are swept on every wake-up; the
                    // timeout is a safety net should a SIGCHLD ever be lost.
                    r.reap_all();
                    // SAFETY: a valid signal set and timespec; no siginfo wanted.
                    unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
                }
            })?;
        Ok(reaper)
    }

    /// Runs `spawn` (which returns the child's pid) and registers the child,
    /// with the reaper held off so the exit cannot slip through unseen.
    pub fn spawn<T>(
        &self,
        spawn: impl FnOnce() -> io::Result<(T, u32)>,
    ) -> io::Result<(T, Arc<ExitWatch>)> {
        let event = eventfd()?;
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let (value, pid) = spawn()?;
        let pid = pid as i32;
        // Still under the gate: the child cannot have been reaped, so the
        // pidfd is surely this child's.
        let watch = Arc::new(ExitWatch {
            event,
            pidfd: pidfd_open(pid),
            pid,
            code: OnceLock::new(),
        });
        self.lock_waiting().insert(pid, watch.clone());
        Ok((value, watch))
    }

    /// Reaps `watch`'s child if it has exited and the reaper thread has not
    /// got to it yet; returns the exit code once known.
    pub fn try_reap(&self, watch: &ExitWatch) -> Option<i32> {
        if let Some(c) = watch.code() {
            return Some(c);
        }
        let fd = watch.pidfd.as_ref()?;
        // SAFETY: siginfo_t is plain data, valid when zeroed.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t we own; the pidfd is ours.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        // ECHILD: the reaper thread took it and delivers the code itself.
        // SAFETY: si_pid/si_status are valid to read for SIGCHLD siginfo.
        if r != 0 || unsafe { info.si_pid() } == 0 {
            return watch.code();
        }
        // SAFETY: as above.
        let status = unsafe { info.si_status() };
        let code = match info.si_code {
            libc::CLD_EXITED => status,
            _ => 128 + status,
        };
        self.lock_waiting().remove(&watch.pid);
        watch.deliver(code);
        Some(code)
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<ExitWatch>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap_all(&self) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        loop {
            match waitpid(
                Pid::from_raw(-1),
                Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
            ) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    if let Some((pid, code)) = code_of(status) {
                        // Unregistered pids are orphans (or helpers of the
                        // boot phase): reaped and forgotten.
                        if let Some(w) = self.lock_waiting().remove(&pid.as_raw()) {
                            w.deliver(code);
                        }
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    eprintln!("lohar: waitpid: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_codes_are_128_plus_n() {
        let pid = Pid::from_raw(5);
        assert_eq!(code_of(WaitStatus::Exited(pid, 3)), Some((pid, 3)));
        assert_eq!(
            code_of(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some((pid, 137))
        );
        assert_eq!(code_of(WaitStatus::StillAlive), None);
    }
}
