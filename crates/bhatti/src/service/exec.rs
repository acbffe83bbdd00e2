//! Running a command in a sandbox: the one place that starts it, feeds its
//! stdin as it arrives, enforces its deadline and caps what is buffered.
//!
//! Every exec route (buffered JSON, NDJSON, the exec WebSocket) goes
//! `handler → Service::exec → agent client → lohar`; handlers only translate
//! the [`ExecUpdate`]s they receive into their own framing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bhatti_proto::ExecRequest;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Result, Service, ServiceError};
use crate::engine::agent_client::{AgentError, ErrorCode, ExecEvent, ExecReader, ExecWriter};
use crate::model::{ExecDetached, ExecResult};
use crate::store::User;

/// Deadline of an exec that names none (seconds): long builds fit, a hung
/// command does not live forever.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Longest deadline a request may ask for: 24 h (seconds).
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// Buffered exec keeps at most this many bytes of each of stdout and stderr;
/// the rest is read and dropped, and the result says `truncated`. Measured
/// before the cap: 4 s of `yes` took the daemon to 940 MB.
pub const MAX_BUFFERED_OUTPUT: usize = 16 << 20;
/// Exit code of a command that does not exist, as a shell reports it.
pub const EXIT_NOT_FOUND: i32 = 127;
/// Updates queued between the agent and a slow consumer.
const UPDATE_BUFFER: usize = 64;
/// How long a KILL may take to be written after the deadline before the
/// connection is dropped instead (lohar kills the group on disconnect).
const KILL_GRACE: Duration = Duration::from_secs(2);

/// A command to run, validated.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    pub env: Option<BTreeMap<String, String>>,
    pub cwd: Option<String>,
    /// Killed (SIGKILL to its process group) after this long.
    pub timeout: Duration,
}

impl ExecSpec {
    /// Checks `cmd` and resolves the timeout: `None` or `0` means the
    /// default, above [`MAX_TIMEOUT_SECS`] is refused.
    ///
    /// Errors: [`ServiceError::Invalid`] naming the field.
    pub fn new(
        cmd: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        cwd: Option<String>,
        timeout_secs: Option<u64>,
    ) -> Result<ExecSpec> {
        if cmd.first().is_none_or(|c| c.is_empty()) {
            return Err(ServiceError::Invalid(
                "invalid field `cmd`: must name a command".into(),
            ));
        }
        // The guest passes these to execve, which cannot carry a NUL byte
        // (nor an environment name holding '='): refuse them here rather
        // than let the guest fail to spawn.
        for arg in &cmd {
            no_nul("cmd", arg)?;
        }
        for (k, v) in env.iter().flatten() {
            check_env_pair("env", k, v)?;
        }
        if let Some(c) = &cwd {
            no_nul("cwd", c)?;
        }
        let secs = match timeout_secs {
            None | Some(0) => DEFAULT_TIMEOUT_SECS,
            Some(s) if s > MAX_TIMEOUT_SECS => {
                return Err(ServiceError::Invalid(format!(
                    "invalid field `timeout_sec`: {s} is over the maximum of {MAX_TIMEOUT_SECS} seconds (24 h)"
                )))
            }
            Some(s) => s,
        };
        Ok(ExecSpec {
            cmd,
            env,
            cwd: cwd.filter(|c| !c.is_empty()),
            timeout: Duration::from_secs(secs),
        })
    }
}

/// Refuses a string holding a NUL byte, naming `field`.
///
/// Errors: [`ServiceError::Invalid`].
pub fn no_nul(field: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(ServiceError::Invalid(format!(
            "invalid field `{field}`: must not contain a NUL byte"
        )));
    }
    Ok(())
}

/// Checks one environment variable: a non-empty name without `=`, and no
/// NUL byte in either part.
///
/// Errors: [`ServiceError::Invalid`] naming `field`.
pub fn check_env_pair(field: &str, name: &str, value: &str) -> Result<()> {
    if name.is_empty() || name.contains('=') {
        return Err(ServiceError::Invalid(format!(
            "invalid field `{field}`: {name:?} is not a variable name (empty or holding '=')"
        )));
    }
    no_nul(field, name)?;
    no_nul(field, value)
}

/// Where a command's stdin comes from.
pub enum Stdin {
    /// Closed at once: the command reads EOF.
    Closed,
    /// These bytes, then EOF.
    Bytes(Vec<u8>),
    /// Chunks as they arrive; an empty chunk or the sender going away is EOF.
    Stream(mpsc::Receiver<Bytes>),
}

/// What a running exec reports, in order; the last one is `Exit` or `Failed`.
#[derive(Debug)]
pub enum ExecUpdate {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended; `timed_out` when the deadline killed it.
    Exit {
        code: i32,
        timed_out: bool,
    },
    /// The agent or the connection failed before an exit code arrived.
    Failed(AgentError),
}

impl Service {
    /// Starts `spec` in the caller's sandbox (waking it if needed) and
    /// returns its updates. Dropping the receiver kills the command.
    ///
    /// Errors: the sandbox is unknown (`NotFound`) or cannot run it now; the
    /// agent refusing the request itself (a bad cwd…) arrives as the first
    /// update, [`ExecUpdate::Failed`].
    pub async fn exec(
        &self,
        user: &User,
        id: &str,
        spec: ExecSpec,
        stdin: Stdin,
    ) -> Result<mpsc::Receiver<ExecUpdate>> {
        let agent = self.agent(user, id).await?;
        let req = ExecRequest {
            argv: spec.cmd,
            env: spec.env,
            cwd: spec.cwd,
            ..Default::default()
        };
        let (stream, feed) = match stdin {
            Stdin::Closed => (agent.exec_with_input(req, &[]).await?, None),
            Stdin::Bytes(b) => (agent.exec_with_input(req, &b).await?, None),
            Stdin::Stream(rx) => (agent.exec(req).await?, Some(rx)),
        };
        let (tx, rx) = mpsc::channel(UPDATE_BUFFER);
        let deadline = Instant::now() + spec.timeout;
        tokio::spawn(drive(stream.reader, stream.writer, feed, deadline, tx));
        Ok(rx)
    }

    /// Runs `spec` to completion and collects its output, each stream capped
    /// at [`MAX_BUFFERED_OUTPUT`].
    ///
    /// Errors: as [`exec`](Self::exec); a failure before any output (the
    /// agent refusing the request) is returned as the error itself.
    pub async fn exec_buffered(
        &self,
        user: &User,
        id: &str,
        spec: ExecSpec,
        stdin: Stdin,
    ) -> Result<ExecResult> {
        let mut rx = self.exec(user, id, spec, stdin).await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut truncated = false;
        let mut first = true;
        loop {
            let Some(update) = rx.recv().await else {
                return Err(ServiceError::Unavailable(
                    "the exec ended without an exit code".into(),
                ));
            };
            match update {
                ExecUpdate::Stdout(b) => truncated |= append_capped(&mut out, &b),
                ExecUpdate::Stderr(b) => truncated |= append_capped(&mut err, &b),
                ExecUpdate::Exit { code, timed_out } => {
                    let (stdout, stdout_b64) = text_or_b64(out);
                    let (stderr, stderr_b64) = text_or_b64(err);
                    return Ok(ExecResult {
                        exit_code: code,
                        stdout,
                        stderr,
                        stdout_b64,
                        stderr_b64,
                        timed_out,
                        truncated,
                    });
                }
                ExecUpdate::Failed(e) if first => return Err(e.into()),
                ExecUpdate::Failed(e) => {
                    return Err(ServiceError::Unavailable(format!(
                        "the exec failed after it started: {e}"
                    )))
                }
            }
            first = false;
        }
    }
}

/// Starts a command detached from its caller: its own session (`setsid`),
/// stdin `/dev/null`, output to the file; the shell prints its pid.
/// Checked first, so that a bad output path or a missing program is an error
/// now rather than output lost later: exit 3 and 127 mean those.
const DETACH_SCRIPT: &str = r#"true >"$BHATTI_OUTPUT_FILE" || exit 3
command -v "$1" >/dev/null 2>&1 || { echo "$1: command not found" >&2; exit 127; }
setsid "$@" >"$BHATTI_OUTPUT_FILE" 2>&1 </dev/null & echo $!"#;

impl Service {
    /// Starts `spec` detached and answers with its pid at once; its output
    /// goes to `output_file` (absolute; default a new file under `/tmp`).
    ///
    /// Errors: `Invalid` for a relative output path; the agent's refusal (a
    /// bad cwd…); `Unavailable` when the shell did not print a pid.
    pub async fn exec_detached(
        &self,
        user: &User,
        id: &str,
        spec: ExecSpec,
        output_file: Option<String>,
    ) -> Result<ExecDetached> {
        let output_file = match output_file.filter(|p| !p.is_empty()) {
            Some(p) if !p.starts_with('/') => {
                return Err(ServiceError::Invalid(format!(
                    "invalid field `output_file`: {p:?} must be an absolute path"
                )))
            }
            Some(p) => {
                no_nul("output_file", &p)?;
                p
            }
            None => format!("/tmp/bhatti-exec-{}.log", random_suffix()),
        };
        let mut env = spec.env.unwrap_or_default();
        env.insert("BHATTI_OUTPUT_FILE".into(), output_file.clone());
        let mut argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            DETACH_SCRIPT.to_string(),
            "bhatti-detach".to_string(),
        ];
        argv.extend(spec.cmd);
        let launcher = ExecSpec {
            cmd: argv,
            env: Some(env),
            cwd: spec.cwd,
            timeout: Duration::from_secs(30),
        };
        let out = self
            .exec_buffered(user, id, launcher, Stdin::Closed)
            .await?;
        match out.exit_code {
            3 => {
                return Err(ServiceError::Invalid(format!(
                    "invalid field `output_file`: cannot write {output_file}: {}",
                    out.stderr.trim().rsplit(": ").next().unwrap_or("")
                )))
            }
            EXIT_NOT_FOUND => {
                return Err(ServiceError::Invalid(format!(
                    "invalid field `cmd`: {}",
                    out.stderr.trim()
                )))
            }
            _ => {}
        }
        let pid = out.stdout.trim().parse::<u32>().map_err(|_| {
            ServiceError::Unavailable(format!(
                "could not start the detached command (exit {}): {}",
                out.exit_code,
                out.stderr.trim()
            ))
        })?;
        Ok(ExecDetached {
            detached: true,
            pid,
            output_file,
        })
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(10)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect()
}

/// Appends what fits under the cap; `true` when something was dropped.
fn append_capped(buf: &mut Vec<u8>, b: &[u8]) -> bool {
    let room = MAX_BUFFERED_OUTPUT.saturating_sub(buf.len());
    buf.extend_from_slice(&b[..b.len().min(room)]);
    b.len() > room
}

/// UTF-8 text, or a lossy text plus the exact bytes in base64.
pub fn text_or_b64(bytes: Vec<u8>) -> (String, Option<String>) {
    use base64::Engine as _;
    match String::from_utf8(bytes) {
        Ok(s) => (s, None),
        Err(e) => {
            let b = e.into_bytes();
            (
                String::from_utf8_lossy(&b).into_owned(),
                Some(base64::engine::general_purpose::STANDARD.encode(&b)),
            )
        }
    }
}

/// Relays agent events to `tx` until the exit, the deadline or the consumer
/// leaving (which drops the connection: lohar then kills the process group).
async fn drive(
    mut reader: ExecReader,
    writer: ExecWriter,
    feed: Option<mpsc::Receiver<Bytes>>,
    deadline: Instant,
    tx: mpsc::Sender<ExecUpdate>,
) {
    // Stdin is pumped by its own task: a command that does not read its
    // stdin must not stall the relay of its output.
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let pump = feed.map(|rx| tokio::spawn(pump_stdin(rx, writer.clone())));
    let mut timed_out = false;
    let last = loop {
        let ev = tokio::select! {
            _ = tx.closed() => break None,
            _ = tokio::time::sleep_until(deadline), if !timed_out => {
                timed_out = true;
                let kill = tokio::time::timeout(KILL_GRACE, async {
                    writer.lock().await.kill().await
                });
                if !matches!(kill.await, Ok(Ok(()))) {
                    // 128 + SIGKILL, as lohar reports a killed command.
                    break Some(ExecUpdate::Exit { code: 137, timed_out });
                }
                continue;
            }
            ev = reader.next() => ev,
        };
        let update = match ev {
            Ok(ExecEvent::Stdout(b)) => ExecUpdate::Stdout(b),
            Ok(ExecEvent::Stderr(b)) => ExecUpdate::Stderr(b),
            Ok(ExecEvent::Exit(code)) => break Some(ExecUpdate::Exit { code, timed_out }),
            // The agent refuses a program that does not exist; users expect
            // what a shell does: the message on stderr and exit 127.
            Err(AgentError::Remote {
                code: ErrorCode::NotFound,
                message,
            }) => {
                let _ = tx
                    .send(ExecUpdate::Stderr(format!("{message}\n").into_bytes()))
                    .await;
                break Some(ExecUpdate::Exit {
                    code: EXIT_NOT_FOUND,
                    timed_out,
                });
            }
            Err(e) => break Some(ExecUpdate::Failed(e)),
        };
        if tx.send(update).await.is_err() {
            break None;
        }
    };
    if let Some(p) = pump {
        p.abort();
    }
    if let Some(u) = last {
        let _ = tx.send(u).await;
    }
}

async fn pump_stdin(mut rx: mpsc::Receiver<Bytes>, writer: Arc<tokio::sync::Mutex<ExecWriter>>) {
    while let Some(chunk) = rx.recv().await {
        if chunk.is_empty() {
            break;
        }
        if writer.lock().await.stdin(&chunk).await.is_err() {
            // The command closed its stdin or exited: nothing more to feed.
            return;
        }
    }
    let _ = writer.lock().await.close_stdin().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the API fuzz: a NUL in an env value reached the guest,
    /// which could not spawn the command (503 for a detached exec).
    #[test]
    fn nul_bytes_and_bad_env_names_are_refused() {
        let ok = || vec!["true".to_string()];
        let env = |k: &str, v: &str| Some([(k.to_string(), v.to_string())].into());
        let refused = |r: Result<ExecSpec>, field: &str| {
            let e = r.expect_err("refused").to_string();
            assert!(e.contains(&format!("`{field}`")), "{e}");
        };
        refused(ExecSpec::new(vec!["a\0b".into()], None, None, None), "cmd");
        refused(
            ExecSpec::new(
                vec!["sh".into(), "-c".into(), "\0".into()],
                None,
                None,
                None,
            ),
            "cmd",
        );
        refused(ExecSpec::new(ok(), env("K", "v\0"), None, None), "env");
        refused(ExecSpec::new(ok(), env("K\0", "v"), None, None), "env");
        refused(ExecSpec::new(ok(), env("A=B", "v"), None, None), "env");
        refused(ExecSpec::new(ok(), env("", "v"), None, None), "env");
        refused(
            ExecSpec::new(ok(), None, Some("/tmp\0".into()), None),
            "cwd",
        );
        // Anything else a variable may hold is passed as it is.
        ExecSpec::new(ok(), env("K", "ünï\u{7f} =\n"), Some("/tmp".into()), None).expect("ok");
    }

    #[test]
    fn timeout_default_max_and_past_max() {
        let cmd = vec!["true".to_string()];
        let s = ExecSpec::new(cmd.clone(), None, None, None).expect("default");
        assert_eq!(s.timeout, Duration::from_secs(DEFAULT_TIMEOUT_SECS));
        let s = ExecSpec::new(cmd.clone(), None, None, Some(0)).expect("zero");
        assert_eq!(s.timeout, Duration::from_secs(DEFAULT_TIMEOUT_SECS));
        let s = ExecSpec::new(cmd.clone(), None, None, Some(MAX_TIMEOUT_SECS)).expect("max");
        assert_eq!(s.timeout, Duration::from_secs(MAX_TIMEOUT_SECS));
        let e = ExecSpec::new(cmd, None, None, Some(MAX_TIMEOUT_SECS + 1)).expect_err("past max");
        assert!(e.to_string().contains("timeout_sec"), "{e}");
        assert!(ExecSpec::new(vec![], None, None, None).is_err());
        assert!(ExecSpec::new(vec![String::new()], None, None, None).is_err());
    }

    #[test]
    fn output_cap_at_and_past_the_limit() {
        let mut buf = Vec::new();
        assert!(!append_capped(&mut buf, &vec![b'x'; MAX_BUFFERED_OUTPUT]));
        assert_eq!(buf.len(), MAX_BUFFERED_OUTPUT);
        assert!(append_capped(&mut buf, b"y"));
        assert_eq!(buf.len(), MAX_BUFFERED_OUTPUT);
    }
}
