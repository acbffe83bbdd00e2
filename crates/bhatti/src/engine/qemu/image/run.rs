//! Running the external tools of the image build (apt, dpkg-deb, mmdebstrap,
//! mke2fs) with errors that carry the tool's own last words.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// A tool that could not run or exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program could not be started at all.
    #[error("{what} could not start: {source} (is it installed? see scripts/setup.sh)")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("{what} failed ({status}): {tail}")]
    Failed {
        what: String,
        status: String,
        tail: String,
    },
}

/// How many lines of output an error keeps.
const TAIL_LINES: usize = 15;

fn tail_of(lines: &VecDeque<String>) -> String {
    let t: Vec<_> = lines.iter().map(String::as_str).collect();
    if t.is_empty() {
        "(no output)".into()
    } else {
        t.join("\n")
    }
}

/// Runs `cmd` to completion; returns stdout, or an error with stderr's tail.
pub fn run_checked(cmd: &mut Command, what: &str) -> Result<String, RunError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RunError::Spawn {
            what: what.to_string(),
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut tail: VecDeque<String> = stderr.lines().map(str::to_string).collect();
    while tail.len() > TAIL_LINES {
        tail.pop_front();
    }
    Err(RunError::Failed {
        what: what.to_string(),
        status: out.status.to_string(),
        tail: tail_of(&tail),
    })
}

/// Runs `cmd`, handing every line it prints (stdout or stderr) to `on_line`
/// as it comes; on failure the error carries the last lines.
///
/// The child gets SIGTERM if the calling thread dies first, so a killed
/// builder does not leave a long build (mmdebstrap, with its mounts) running
/// unsupervised; mmdebstrap cleans up its mounts on SIGTERM.
pub fn run_streaming(
    cmd: &mut Command,
    what: &str,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), RunError> {
    crate::engine::qemu::process::die_with_caller(cmd, libc::SIGTERM);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RunError::Spawn {
            what: what.to_string(),
            source,
        })?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);
    let mut tail = VecDeque::with_capacity(TAIL_LINES + 1);
    for line in rx {
        on_line(&line);
        tail.push_back(line);
        if tail.len() > TAIL_LINES {
            tail.pop_front();
        }
    }
    for r in readers {
        // A reader thread only ends by EOF or a closed channel; it cannot panic on input.
        let _ = r.join();
    }
    let status = child.wait().map_err(|source| RunError::Spawn {
        what: what.to_string(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(RunError::Failed {
            what: what.to_string(),
            status: status.to_string(),
            tail: tail_of(&tail),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_stderr_tail() {
        let err = run_checked(
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            "sh test",
        )
        .expect_err("must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("sh test failed") && msg.contains("boom"),
            "{msg}"
        );
    }

    #[test]
    fn streaming_sees_both_streams() {
        let mut seen = Vec::new();
        run_streaming(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            "sh test",
            &mut |l| seen.push(l.to_string()),
        )
        .expect("runs");
        seen.sort();
        assert_eq!(seen, ["err", "out"]);
    }

    #[test]
    fn missing_program_is_named() {
        let err =
            run_checked(&mut Command::new("/nonexistent/tool"), "tool").expect_err("must fail");
        assert!(err.to_string().contains("tool could not start"));
    }
}
