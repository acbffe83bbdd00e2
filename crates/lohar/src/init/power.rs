//! Power-off: the last thing PID 1 does, on SIGTERM or a fatal error.

use std::io::Write;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

/// Prints `msg` (if any) on the console, stops every other process, flushes
/// the disks and powers the VM off. Outside PID 1 (tests) it just exits 1.
pub fn poweroff(msg: &str) -> ! {
    if !msg.is_empty() {
        super::say(msg);
    }
    if std::process::id() != 1 {
        std::process::exit(1);
    }
    // SAFETY: kill(-1) signals every process but ourselves (PID 1); no memory is touched.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(20));
    nix::unistd::sync();
    // Best effort: a read-only root needs no journal replay next boot. It
    // fails harmlessly if a file is still open for writing.
    let _ = nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    );
    nix::unistd::sync();
    let _ = std::io::stderr().flush();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only reached if the kernel refused; PID 1 must never exit (that panics
    // the kernel), so say why and wait for the host to stop the VM.
    super::say(&format!("power off failed: {err:?}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The signals that ask PID 1 to shut down.
fn shutdown_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGPWR);
    set
}

extern "C" fn ignore(_: libc::c_int) {}

/// Starts the thread that powers off on SIGTERM, SIGINT or SIGPWR.
///
/// Must run on the main thread before any other thread exists: it blocks
/// those signals and SIGCHLD there, so every later thread inherits the mask
/// and neither this thread nor any other swallows the reaper's SIGCHLD.
pub fn watch_shutdown_signals() -> Result<(), String> {
    let set = shutdown_signals();
    // The kernel drops signals to PID 1 whose disposition is the default,
    // even when blocked; a no-op handler makes them deliverable to sigwait.
    for sig in set.iter() {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(ignore),
            nix::sys::signal::SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        unsafe { nix::sys::signal::sigaction(sig, &action) }
            .map_err(|e| format!("sigaction {sig}: {e}"))?;
    }
    let mut blocked = set;
    blocked.add(Signal::SIGCHLD);
    blocked
        .thread_block()
        .map_err(|e| format!("block signals: {e}"))?;
    std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || match set.wait() {
            Ok(sig) => poweroff(&format!("{sig}: powering off")),
            Err(e) => super::say(&format!("waiting for shutdown signals: {e}")),
        })
        .map_err(|e| format!("start shutdown thread: {e}"))?;
    Ok(())
}
