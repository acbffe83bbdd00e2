//! `bhatti exec <sandbox> -- <cmd...>`: runs a command, streaming its output.
//!
//! The request asks for NDJSON; each event's bytes (`data`, or `data_b64`
//! when a chunk is not UTF-8) go to the matching fd as they arrive, byte for
//! byte. The remote exit code becomes ours. Piped stdin is sent along as
//! `stdin_b64`. Ctrl+C drops the connection, which makes the server kill the
//! command; we then exit 130.

use std::io::{self, IsTerminal, Read, Write};

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::Method;
use serde::Serialize;

use crate::api::types::ExecEvent;

use super::client::{ApiClient, Target};
use super::Ctx;

/// Exit code after Ctrl+C (128 + SIGINT), like a shell.
pub const EXIT_INTERRUPTED: i32 = 130;
/// Exit code when stdout's reader went away (128 + SIGPIPE), like a shell.
pub const EXIT_BROKEN_PIPE: i32 = 141;
/// An NDJSON line longer than this is not a line from bhatti.
const MAX_LINE: usize = 64 * 1024 * 1024;

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// The command and its arguments: everything after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// `POST /sandboxes/:id/exec` as the CLI sends it.
#[derive(Debug, Serialize)]
pub struct ExecBody<'a> {
    pub cmd: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
}

/// How a streamed exec ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command exited with this code.
    Exited(i32),
    /// Writing to our stdout failed with EPIPE (`… | head -1`).
    BrokenPipe,
}

pub async fn run(ctx: Ctx, args: ExecArgs) -> anyhow::Result<i32> {
    let stdin_b64 = read_piped_stdin()?;
    let body = ExecBody {
        cmd: &args.cmd,
        stdin_b64,
    };
    let (mut out, mut err) = (io::stdout(), io::stderr());
    tokio::select! {
        r = exec_to(&ctx.client, &args.sandbox, &body, &mut out, &mut err) => {
            match r? {
                Outcome::Exited(code) => Ok(code),
                Outcome::BrokenPipe => Ok(EXIT_BROKEN_PIPE),
            }
        }
        // Dropping the exec future closes the connection: the server kills
        // the command's process group.
        _ = tokio::signal::ctrl_c() => Ok(EXIT_INTERRUPTED),
    }
}

/// All of stdin, base64, when it is not a terminal (a pipe or a file);
/// `None` for a terminal or empty input.
fn read_piped_stdin() -> anyhow::Result<Option<String>> {
    let stdin = io::stdin();
    if stdin.is_terminal() {
        return Ok(None);
    }
    let mut buf = Vec::new();
    stdin
        .lock()
        .read_to_end(&mut buf)
        .context("cannot read stdin")?;
    Ok((!buf.is_empty()).then(|| base64::engine::general_purpose::STANDARD.encode(&buf)))
}

/// Runs `body` in `sandbox` and relays its output to `out`/`err`.
/// Public so that tests can capture the output of a real exec.
pub async fn exec_to(
    client: &ApiClient,
    sandbox: &str,
    body: &ExecBody<'_>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<Outcome> {
    let rb = ApiClient::accept_ndjson(
        client
            .request(Method::POST, &["sandboxes", sandbox, "exec"])
            .json(body),
    );
    let resp = client.send(rb, Target::Sandbox(sandbox)).await?;
    let stream = resp
        .bytes_stream()
        .map(|r| r.map_err(|e| client.transport_error(&e)));
    relay(stream, out, err).await
}

/// Decodes NDJSON exec events from `stream` and writes their bytes to
/// `out`/`err`, flushing after each chunk.
pub async fn relay<S>(
    stream: S,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<Outcome>
where
    S: Stream<Item = anyhow::Result<Bytes>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
            let line = &buf[start..start + nl];
            start += nl + 1;
            if let Some(outcome) = handle_line(line, out, err)? {
                return Ok(outcome);
            }
        }
        buf.drain(..start);
        if buf.len() > MAX_LINE {
            bail!("the server sent an exec event line over {MAX_LINE} bytes");
        }
    }
    // A last line without a newline.
    if let Some(outcome) = handle_line(&buf, out, err)? {
        return Ok(outcome);
    }
    bail!("the connection ended before the command finished (no exit code received)")
}

/// Handles one NDJSON line; `Some` when the exec is over.
fn handle_line(
    line: &[u8],
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<Option<Outcome>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let event = match serde_json::from_slice::<ExecEvent>(line) {
        Ok(ev) => ev,
        Err(e) => {
            // An event type this CLI does not know yet is skipped; anything
            // that is not JSON at all is an error.
            return match serde_json::from_slice::<serde_json::Value>(line) {
                Ok(v) if v.get("type").is_some_and(serde_json::Value::is_string) => Ok(None),
                _ => Err(anyhow!(
                    "garbled exec event from the server: {e}: {}",
                    String::from_utf8_lossy(&line[..line.len().min(200)])
                )),
            };
        }
    };
    let (data, data_b64, to_out) = match event {
        ExecEvent::Stdout { data, data_b64 } => (data, data_b64, true),
        ExecEvent::Stderr { data, data_b64 } => (data, data_b64, false),
        ExecEvent::Exit { exit_code } => return Ok(Some(Outcome::Exited(exit_code))),
        ExecEvent::Error { message } => bail!("exec failed: {message}"),
    };
    let bytes = match (data_b64, data) {
        (Some(b64), _) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .context("the server sent invalid base64 in data_b64")?,
        (None, Some(text)) => text.into_bytes(),
        (None, None) => return Ok(None),
    };
    let result = if to_out {
        out.write_all(&bytes).and_then(|()| out.flush())
    } else {
        err.write_all(&bytes).and_then(|()| err.flush())
    };
    match result {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe && to_out => Ok(Some(Outcome::BrokenPipe)),
        // Nobody reads our stderr any more: keep relaying stdout.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(None),
        Err(e) => Err(e).context(if to_out {
            "cannot write to stdout"
        } else {
            "cannot write to stderr"
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&[u8]]) -> impl Stream<Item = anyhow::Result<Bytes>> {
        let v: Vec<anyhow::Result<Bytes>> = parts
            .iter()
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        futures_util::stream::iter(v)
    }

    fn run_relay(parts: &[&[u8]]) -> (anyhow::Result<Outcome>, Vec<u8>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = rt.block_on(relay(chunks(parts), &mut out, &mut err));
        (r, out, err)
    }

    #[test]
    fn splits_streams_and_returns_exit_code() {
        let (r, out, err) = run_relay(&[
            b"{\"type\":\"stdout\",\"data\":\"hel",
            b"lo\\n\"}\n{\"type\":\"stderr\",\"data\":\"oops\\n\"}\n",
            b"{\"type\":\"stdout\",\"data_b64\":\"/wA=\"}\n{\"type\":\"exit\",\"exit_code\":3}\n",
        ]);
        assert_eq!(r.expect("ok"), Outcome::Exited(3));
        assert_eq!(out, b"hello\n\xff\x00");
        assert_eq!(err, b"oops\n");
    }

    #[test]
    fn last_line_without_newline_and_unknown_types() {
        let (r, out, _) = run_relay(&[
            b"{\"type\":\"progress\",\"pct\":5}\n\n",
            b"{\"type\":\"stdout\",\"data\":\"x\"}\n{\"type\":\"exit\",\"exit_code\":0}",
        ]);
        assert_eq!(r.expect("ok"), Outcome::Exited(0));
        assert_eq!(out, b"x");
    }

    #[test]
    fn missing_exit_and_errors_are_reported() {
        let (r, _, _) = run_relay(&[b"{\"type\":\"stdout\",\"data\":\"x\"}\n"]);
        assert!(r.expect_err("no exit").to_string().contains("no exit code"));
        let (r, _, _) = run_relay(&[b"{\"type\":\"error\",\"message\":\"agent gone\"}\n"]);
        assert!(r.expect_err("error").to_string().contains("agent gone"));
        let (r, _, _) = run_relay(&[b"not json\n"]);
        assert!(r.expect_err("garbled").to_string().contains("garbled"));
    }

    #[test]
    fn broken_stdout_pipe_stops() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut err = Vec::new();
        let r = rt.block_on(relay(
            chunks(&[
                b"{\"type\":\"stdout\",\"data\":\"x\"}\n{\"type\":\"exit\",\"exit_code\":0}\n",
            ]),
            &mut Closed,
            &mut err,
        ));
        assert_eq!(r.expect("ok"), Outcome::BrokenPipe);
    }
}
