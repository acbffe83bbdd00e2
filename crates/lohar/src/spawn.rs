//! Building and starting child processes: environment, cwd, user, process
//! group, and registration with the reaper.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::config::AgentConfig;
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
    #[error("{0}: {1}")]
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

/// The directory a child starts in: the request's (which must exist), or
/// the default (falling back to `/` if the default has gone missing).
pub fn resolve_cwd(
    cfg: &AgentConfig,
    requested: Option<&str>,
) -> Result<Option<PathBuf>, SpawnError> {
    match requested.filter(|c| !c.is_empty()) {
        Some(c) => {
            let p = cfg.resolve(c);
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => Ok(Some(p)),
                Ok(_) => Err(SpawnError::Cwd(c.into(), "not a directory".into())),
                Err(e) => Err(SpawnError::Cwd(c.into(), e.to_string())),
            }
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

/// Finds `program` on the child's PATH, as execvp would. Resolving it here
/// lets std use posix_spawn (a vfork, not a fork) even though the child's
/// PATH differs from ours, and turns a missing program into a 127 without
/// starting anything.
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

/// A command with argv, env, cwd and user set; stdio is the caller's.
pub fn command(
    cfg: &AgentConfig,
    argv: &[String],
    env: Option<&BTreeMap<String, String>>,
    cwd: Option<&Path>,
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
    Ok(cmd)
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

/// A piped child: its own process group, all three stdio streams piped.
pub fn piped(
    cfg: &AgentConfig,
    reaper: &Reaper,
    argv: &[String],
    env: Option<&BTreeMap<String, String>>,
    cwd: Option<&Path>,
) -> Result<(std::process::Child, Arc<ExitWatch>), SpawnError> {
    let mut cmd = command(cfg, argv, env, cwd)?;
    cmd.process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    start(reaper, cmd, &argv[0])
}
