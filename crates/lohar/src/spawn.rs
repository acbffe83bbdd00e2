//! Building and starting child processes: environment, cwd, user, process
//! group, and registration with the reaper.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use bhatti_proto::{io_phrase, ErrorCode};

use crate::config::AgentConfig;
use crate::handlers::HandlerError;
use crate::reaper::{ExitWatch, Reaper};

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The requested working directory is unusable (no EXIT is sent).
    #[error("cwd {0}: {1}")]
    Cwd(String, String),
    /// The program does not exist: exit code 127.
    #[error("{0}: command not found")]
    NotFound(String),
    /// The program exists but cannot be run: exit code 126.
    #[error("{0}: {msg}", msg = io_phrase(.1))]
    CannotRun(String, io::Error),
}

impl SpawnError {
    /// The shell-style exit code for a failure the command itself caused.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            SpawnError::Cwd(..) => None,
            SpawnError::NotFound(_) => Some(127),
            SpawnError::CannotRun(..) => Some(126),
        }
    }
}

impl From<SpawnError> for HandlerError {
    /// A request that cannot start its child at all is an invalid request.
    fn from(e: SpawnError) -> Self {
        HandlerError::Refused(ErrorCode::Invalid, e.to_string())
    }
}

/// The directory a child starts in: the request's (which must exist and be
/// enterable by the user the child runs as), or the default (falling back
/// to `/` if the default has gone missing).
pub fn resolve_cwd(
    cfg: &AgentConfig,
    requested: Option<&str>,
) -> Result<Option<PathBuf>, SpawnError> {
    match requested.filter(|c| !c.is_empty()) {
        Some(c) => {
            let p = cfg.resolve(c);
            let bad = |why: &str| SpawnError::Cwd(c.into(), why.into());
            match std::fs::metadata(&p) {
                Ok(m) if !m.is_dir() => return Err(bad("not a directory")),
                Ok(_) => {}
                Err(e) => return Err(bad(&io_phrase(&e))),
            }
            if !enterable(&p, cfg.run_as) {
                return Err(bad("permission denied"));
            }
            Ok(Some(p))
        }
        None => Ok(cfg.default_cwd.as_ref().map(|d| {
            if d.is_dir() {
                d.clone()
            } else {
                PathBuf::from("/")
            }
        })),
    }
}

/// Whether a process running as `user` (or as this process, for `None`)
/// may make `dir` its cwd and list it: search permission on every
/// ancestor, search and read permission on `dir` itself. Supplementary
/// groups are not considered: children run without them.
fn enterable(dir: &Path, user: Option<(u32, u32)>) -> bool {
    let Some((uid, gid)) = user else {
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: access reads a NUL-terminated path that lives on the stack.
        return unsafe { libc::access(c.as_ptr(), libc::X_OK | libc::R_OK) } == 0;
    };
    if uid == 0 {
        return true;
    }
    let allowed = |p: &Path, want: u32| {
        std::fs::metadata(p).is_ok_and(|m| {
            let bits = if m.uid() == uid {
                m.mode() >> 6
            } else if m.gid() == gid {
                m.mode() >> 3
            } else {
                m.mode()
            };
            bits & want == want
        })
    };
    dir.ancestors().skip(1).all(|a| allowed(a, 0o1)) && allowed(dir, 0o5)
}

/// Finds `program` on the child's PATH, as execvp would: the child's PATH
/// differs from ours, and a missing program becomes a 127 without starting
/// anything.
fn resolve_program(program: &str, env: &BTreeMap<String, String>) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path = env
        .get("PATH")
        .map_or("/usr/local/bin:/usr/bin:/bin", String::as_str);
    path.split(':').find_map(|dir| {
        let candidate = Path::new(if dir.is_empty() { "." } else { dir }).join(program);
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

/// What a child gets besides a clean signal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// No terminal: a new session without one (so also its own group).
    None,
    /// fd 0 is a PTY slave that becomes the new session's controlling terminal.
    Pty,
}

/// A command with argv, env, cwd and user set, whose child starts in a new
/// session with the agent's own process state undone (see [`reset_child`]);
/// stdio is the caller's.
pub fn command(
    cfg: &AgentConfig,
    argv: &[String],
    env: Option<&BTreeMap<String, String>>,
    cwd: Option<&Path>,
    terminal: Terminal,
) -> Result<Command, SpawnError> {
    let env = cfg.child_env(env);
    let program =
        resolve_program(&argv[0], &env).ok_or_else(|| SpawnError::NotFound(argv[0].clone()))?;
    let mut cmd = Command::new(program);
    cmd.arg0(&argv[0]).args(&argv[1..]).env_clear().envs(env);
    if let Some(c) = cwd {
        cmd.current_dir(c);
    }
    if let Some((uid, gid)) = cfg.run_as {
        cmd.gid(gid).uid(uid);
    }
    // SAFETY: reset_child only makes async-signal-safe system calls, as
    // required between fork and exec.
    unsafe {
        cmd.pre_exec(move || reset_child(terminal));
    }
    Ok(cmd)
}

/// `struct sigaction` as the rt_sigaction system call takes it (x86_64 and
/// aarch64 layout: handler, flags, restorer, 64-bit mask).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Runs in every child between fork and exec (async-signal-safe calls
/// only) and undoes what the agent changed for itself, so a command sees
/// what it would see started from a login shell:
/// - the signal mask: lohar blocks SIGCHLD (and, as PID 1, SIGTERM, SIGINT
///   and SIGPWR) for its signal threads; a child inheriting that could not
///   be interrupted or terminated;
/// - signal dispositions: every signal back to SIG_DFL (exec resets caught
///   signals but keeps ignored ones, e.g. the SIGPIPE Rust ignores);
/// - open descriptors: anything above stdio is marked close-on-exec, in
///   case a descriptor was ever opened without it;
/// - the session: a new one (so a new process group, which KILL signals as a
///   whole), with the PTY as controlling terminal for TTY sessions.
///
/// lohar sets no rlimits, umask or nice value, so there is nothing to undo
/// there.
fn reset_child(terminal: Terminal) -> io::Result<()> {
    // SAFETY: sigemptyset/sigprocmask/sigaction/close_range/setsid/ioctl are
    // async-signal-safe; every pointer refers to this stack frame.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) < 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel's own call: libc's wrapper refuses the real-time
        // signals it reserves for itself, which may still be ignored.
        let dfl = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    std::mem::size_of::<u64>(),
                );
            }
        }
        // Best effort: older kernels lack close_range, and std's own
        // descriptors are close-on-exec already.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if terminal == Terminal::Pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts `cmd` and registers it with the reaper.
pub fn start(
    reaper: &Reaper,
    mut cmd: Command,
    program: &str,
) -> Result<(std::process::Child, Arc<ExitWatch>), SpawnError> {
    reaper
        .spawn(|| {
            let child = cmd.spawn()?;
            let pid = child.id();
            Ok((child, pid))
        })
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SpawnError::NotFound(program.into()),
            _ => SpawnError::CannotRun(program.into(), e),
        })
}

/// A piped child: its own session and process group, all three stdio
/// streams piped.
pub fn piped(
    cfg: &AgentConfig,
    reaper: &Reaper,
    argv: &[String],
    env: Option<&BTreeMap<String, String>>,
    cwd: Option<&Path>,
) -> Result<(std::process::Child, Arc<ExitWatch>), SpawnError> {
    let mut cmd = command(cfg, argv, env, cwd, Terminal::None)?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    start(reaper, cmd, &argv[0])
}
