//! `bhatti exec <sandbox> -- <cmd...>`: runs a command, streaming its output.
//!
//! Output arrives as exec events (`data`, or `data_b64` when a chunk is not
//! UTF-8) and goes to the matching fd as it arrives, byte for byte. The
//! remote exit code becomes ours.
//!
//! Stdin: when ours is a pipe or a file (and `--no-stdin` is not given) the
//! command runs over the exec WebSocket and stdin streams to it as it
//! arrives, a few 64 KiB chunks in flight at most, so neither side holds the
//! whole input and a command that never reads its stdin is not held up by
//! it (`sleep 60 | bhatti exec dev -- echo hi` returns at once). A terminal
//! is never read: the command gets EOF. Without stdin the request is a plain
//! POST with NDJSON output. Ctrl+C drops the connection, which makes the
//! server kill the command; we then exit 130.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use reqwest::Method;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::model::{ExecEvent, ExecWsControl, ExecWsStart};

use super::client::{ApiClient, Target};
use super::Ctx;

/// Exit code after Ctrl+C (128 + SIGINT), like a shell.
pub const EXIT_INTERRUPTED: i32 = 130;
/// Exit code when stdout's reader went away (128 + SIGPIPE), like a shell.
pub const EXIT_BROKEN_PIPE: i32 = 141;
/// An NDJSON line longer than this is not a line from bhatti.
const MAX_LINE: usize = 64 * 1024 * 1024;
/// Stdin is sent in chunks of at most this many bytes.
const STDIN_CHUNK: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Working directory inside the sandbox [default: /workspace]
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Set an environment variable for the command (repeatable)
    #[arg(long, short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Kill the command after this many seconds [default: 300; at most 86400]
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Never send our stdin to the command, even when it is a pipe or a file
    #[arg(long)]
    pub no_stdin: bool,
    /// The command and its arguments: everything after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// `POST /sandboxes/:id/exec` as the CLI sends it.
#[derive(Debug, Serialize)]
pub struct ExecBody<'a> {
    pub cmd: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_sec: Option<u64>,
}

/// How a streamed exec ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command exited with this code.
    Exited(i32),
    /// Writing to our stdout failed with EPIPE (`… | head -1`).
    BrokenPipe,
}

/// `KEY=VALUE` pairs into a map; a pair without `=` or with an empty key is an error.
fn parse_env(pairs: &[String]) -> anyhow::Result<Option<BTreeMap<String, String>>> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut env = BTreeMap::new();
    for p in pairs {
        match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                env.insert(k.to_string(), v.to_string());
            }
            _ => bail!("--env takes KEY=VALUE, got {p:?}"),
        }
    }
    Ok(Some(env))
}

pub async fn run(ctx: Ctx, args: ExecArgs) -> anyhow::Result<i32> {
    let body = ExecBody {
        cmd: &args.cmd,
        env: parse_env(&args.env)?,
        cwd: args.cwd.clone(),
        timeout_sec: args.timeout,
    };
    let streams_stdin = !args.no_stdin && !io::stdin().is_terminal();
    // `--json`: wait, then print {exit_code, stdout, stderr}; piped stdin is
    // streamed to the command as without `--json`.
    if ctx.json {
        if streams_stdin {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = match exec_with_stdin(&ctx.client, &args.sandbox, &body, &mut out, &mut err)
                .await?
            {
                Outcome::Exited(c) => c,
                Outcome::BrokenPipe => EXIT_BROKEN_PIPE,
            };
            let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
            super::output::print_json(&serde_json::json!({
                "exit_code": code, "stdout": text(out), "stderr": text(err),
            }))?;
            return Ok(code);
        }
        let result: serde_json::Value = ctx
            .client
            .post_json(
                &["sandboxes", &args.sandbox, "exec"],
                &body,
                Target::Sandbox(&args.sandbox),
            )
            .await?;
        super::output::print_json(&result)?;
        return Ok(result["exit_code"].as_i64().unwrap_or(1) as i32);
    }
    let (mut out, mut err) = (io::stdout(), io::stderr());
    let outcome = async {
        if streams_stdin {
            exec_with_stdin(&ctx.client, &args.sandbox, &body, &mut out, &mut err).await
        } else {
            exec_to(&ctx.client, &args.sandbox, &body, &mut out, &mut err).await
        }
    };
    tokio::select! {
        r = outcome => {
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

/// Runs `body` over the exec WebSocket, streaming our stdin to it.
pub async fn exec_with_stdin(
    client: &ApiClient,
    sandbox: &str,
    body: &ExecBody<'_>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<Outcome> {
    let url = client.ws_url(&["sandboxes", sandbox, "exec", "ws"]);
    let mut ws = client.websocket(url, Target::Sandbox(sandbox)).await?;
    let start = ExecWsStart {
        cmd: body.cmd.to_vec(),
        env: body.env.clone(),
        cwd: body.cwd.clone(),
        timeout_sec: body.timeout_sec,
        max_idle_sec: None,
    };
    let lost = |e| anyhow!("lost the connection to the exec: {e}");
    ws.send(WsMessage::Text(serde_json::to_string(&start)?.into()))
        .await
        .map_err(lost)?;
    let mut stdin = Some(super::terminal::spawn_stdin_reader(STDIN_CHUNK)?);
    loop {
        tokio::select! {
            chunk = async {
                match stdin.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let msg = match chunk {
                    Some(b) => WsMessage::Binary(b.into()),
                    None => {
                        stdin = None;
                        WsMessage::Text(serde_json::to_string(&ExecWsControl::Eof)?.into())
                    }
                };
                // The command may have exited already; its exit event is still to come.
                let _ = ws.send(msg).await;
            }
            msg = ws.next() => match msg {
                Some(Ok(WsMessage::Text(t))) => {
                    if let Some(outcome) = handle_line(t.as_bytes(), out, err)? {
                        return Ok(outcome);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(lost(e)),
                None => bail!("the connection ended before the command finished (no exit code received)"),
            }
        }
    }
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
        ExecEvent::Exit {
            exit_code,
            timed_out,
        } => {
            if timed_out {
                let _ = writeln!(err, "bhatti: the command timed out and was killed");
            }
            return Ok(Some(Outcome::Exited(exit_code)));
        }
        ExecEvent::Error { data, message } => {
            bail!(
                "exec failed: {}",
                if data.is_empty() { message } else { data }
            )
        }
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
