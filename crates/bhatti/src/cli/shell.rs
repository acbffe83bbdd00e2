//! `bhatti shell` / `bhatti sh`: an interactive terminal inside a sandbox.
//!
//! The terminal is put in raw mode and bridged to the daemon's WebSocket:
//! binary messages carry terminal bytes both ways; the window size goes in
//! the query at start and as `{"type":"resize"}` on SIGWINCH. The server
//! first names the session (`{"type":"session"}`) and at the end sends
//! `{"type":"exit","exit_code"}`. Ctrl+\ detaches: the shell keeps running
//! with its scrollback, and `bhatti shell <name>` reattaches.
//!
//! When stdin is not a terminal the bytes are forwarded as they are (no raw
//! mode), so `printf 'echo hi; exit 3\n' | bhatti shell dev` works too.

use std::io::{self, IsTerminal, Write};

use anyhow::{anyhow, Context};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::client::{ApiClient, Target};
use super::terminal::RawModeGuard;
use super::Ctx;

/// Ctrl+\ (FS): detach.
pub const DETACH_BYTE: u8 = 0x1c;

#[derive(Debug, clap::Args)]
pub struct ShellArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Attach to this session (e.g. "init") instead of your login shell
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
}

/// How a shell connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The remote shell exited with this code.
    Exited(i32),
    /// The user pressed Ctrl+\; the session (named by the server) keeps running.
    Detached(Option<String>),
}

/// Text messages from the server.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerText {
    Session {
        session_id: String,
    },
    Exit {
        exit_code: i32,
    },
    /// The server ends the connection and says why (e.g. the key was revoked).
    Error {
        message: String,
    },
}

pub async fn run(ctx: Ctx, args: ShellArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let interactive = io::stdin().is_terminal();
    let ws = connect(&ctx.client, name, args.session.as_deref(), window_size()).await?;
    let end = {
        let _raw = if interactive {
            Some(RawModeGuard::enable()?)
        } else {
            None
        };
        relay(ws).await
        // The terminal is restored here, before anything is printed.
    }?;
    match end {
        End::Exited(code) => Ok(code),
        End::Detached(session) => {
            let again = match &args.session {
                Some(s) => format!("bhatti shell {name} --session {s}"),
                None => format!("bhatti shell {name}"),
            };
            match session {
                Some(id) => eprintln!("\ndetached from session {id}; run '{again}' to reattach"),
                None => eprintln!("\ndetached; run '{again}' to reattach"),
            }
            Ok(0)
        }
    }
}

/// `(rows, cols)` of the terminal on stdout, if it is one.
fn window_size() -> Option<(u16, u16)> {
    if !io::stdout().is_terminal() {
        return None;
    }
    crossterm::terminal::size()
        .ok()
        .filter(|(c, r)| *c > 0 && *r > 0)
        .map(|(c, r)| (r, c))
}

use super::client::WsStream;

/// Opens the shell WebSocket (`?session=&rows=&cols=`, bearer auth).
/// Public so that tests can drive a real shell without a terminal.
pub async fn connect(
    client: &ApiClient,
    sandbox: &str,
    session: Option<&str>,
    size: Option<(u16, u16)>,
) -> anyhow::Result<WsStream> {
    let mut url = client.ws_url(&["sandboxes", sandbox, "ws"]);
    if session.is_some() || size.is_some() {
        let mut q = url.query_pairs_mut();
        if let Some(s) = session {
            q.append_pair("session", s);
        }
        if let Some((rows, cols)) = size {
            q.append_pair("rows", &rows.to_string());
            q.append_pair("cols", &cols.to_string());
        }
    }
    client.websocket(url, Target::Sandbox(sandbox)).await
}

/// Bridges stdin/stdout and SIGWINCH to the socket until the shell exits or
/// the user detaches.
async fn relay(mut ws: WsStream) -> anyhow::Result<End> {
    let mut stdin_rx = super::terminal::spawn_stdin_reader(8192)?;
    let mut stdin_open = true;
    let mut winch =
        signal(SignalKind::window_change()).context("cannot watch window size changes")?;
    let mut session_id = None;
    let mut stdout = io::stdout();
    let lost = |e: WsError| anyhow!("lost the connection to the shell: {e}");
    loop {
        tokio::select! {
            chunk = stdin_rx.recv(), if stdin_open => match chunk {
                Some(bytes) => match split_detach(&bytes) {
                    (before, true) => {
                        if !before.is_empty() {
                            ws.send(Message::binary(before.to_vec())).await.map_err(lost)?;
                        }
                        // Closing the socket detaches; the session keeps running.
                        let _ = ws.close(None).await;
                        return Ok(End::Detached(session_id));
                    }
                    (all, false) => ws.send(Message::binary(all.to_vec())).await.map_err(lost)?,
                },
                None => stdin_open = false,
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    stdout.write_all(&b).and_then(|()| stdout.flush()).context("cannot write to stdout")?;
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerText>(&t) {
                    Ok(ServerText::Session { session_id: id }) => session_id = Some(id),
                    Ok(ServerText::Exit { exit_code }) => {
                        let _ = ws.close(None).await;
                        return Ok(End::Exited(exit_code));
                    }
                    Ok(ServerText::Error { message }) => {
                        return Err(anyhow!("the server ended the shell: {message}"));
                    }
                    // Unknown control messages are for newer clients.
                    Err(_) => {}
                },
                Some(Ok(Message::Close(_))) | None => {
                    return Err(anyhow!("the server closed the shell connection without an exit code"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(lost(e)),
            },
            _ = winch.recv() => {
                if let Some((rows, cols)) = window_size() {
                    let msg = serde_json::json!({"type": "resize", "rows": rows, "cols": cols});
                    ws.send(Message::text(msg.to_string())).await.map_err(lost)?;
                }
            }
        }
    }
}

/// The bytes before a Ctrl+\ and whether there was one.
pub fn split_detach(bytes: &[u8]) -> (&[u8], bool) {
    match bytes.iter().position(|b| *b == DETACH_BYTE) {
        Some(pos) => (&bytes[..pos], true),
        None => (bytes, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_byte_splits_input() {
        assert_eq!(split_detach(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_detach(b"ab\x1ccd"), (&b"ab"[..], true));
        assert_eq!(split_detach(b"\x1c"), (&b""[..], true));
    }

    #[test]
    fn server_text_messages() {
        assert_eq!(
            serde_json::from_str::<ServerText>(r#"{"type":"session","session_id":"s1"}"#)
                .expect("session"),
            ServerText::Session {
                session_id: "s1".into()
            }
        );
        assert_eq!(
            serde_json::from_str::<ServerText>(r#"{"type":"exit","exit_code":7}"#).expect("exit"),
            ServerText::Exit { exit_code: 7 }
        );
        assert!(serde_json::from_str::<ServerText>(r#"{"type":"other"}"#).is_err());
    }
}
