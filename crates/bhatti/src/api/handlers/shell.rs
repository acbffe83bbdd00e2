//! `GET /sandboxes/{id}/ws`: an interactive shell over a WebSocket.
//!
//! Binary messages carry terminal bytes both ways; a text message
//! `{"type":"resize","rows":R,"cols":C}` resizes. Closing the socket detaches
//! the session (it keeps running with its scrollback), it never kills it.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;

use crate::api::auth::{ApiKey, AuthUser};
use crate::api::error::{ApiError, ErrorBody};
use crate::api::router::AppState;
use crate::model::{ShellControl, ShellQuery};
use crate::service::sessions::{Shell, ShellEvent, ShellOpen};

#[utoipa::path(get, path = "/sandboxes/{id}/ws", tag = "sessions", params(("id" = String, Path, description = "sandbox id or name"), ShellQuery),
    responses((status = 101, description = "WebSocket shell"), (status = 404, body = ErrorBody)))]
pub async fn shell(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiKey(key): ApiKey,
    Path(id): Path<String>,
    Query(q): Query<ShellQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Look the sandbox up first: another user's sandbox is a 404 whatever the request.
    state.service.get_sandbox(&user, &id).await?;
    let ws = ws
        .map_err(|e| ApiError::bad_request(format!("this route needs a WebSocket upgrade: {e}")))?;
    let stream = state
        .service
        .open_shell(&user, &id, &shell_open(&q))
        .await?;
    let service = state.service.clone();
    Ok(ws.on_upgrade(move |socket| async move {
        let revoked = async move {
            service.key_revoked(&key).await;
            key_revoked_close()
        };
        relay(socket, stream, revoked).await
    }))
}

/// The message and close frame of a WebSocket whose API key stopped working.
pub(crate) fn key_revoked_close() -> (String, CloseFrame) {
    (
        "the API key was rotated or revoked".into(),
        CloseFrame {
            // 1008: policy violation (RFC 6455 section 7.4.1).
            code: 1008,
            reason: "API key revoked".into(),
        },
    )
}

/// What the shell query asks the service for.
pub(crate) fn shell_open(q: &ShellQuery) -> ShellOpen {
    ShellOpen {
        session: q.session.clone(),
        rows: q.rows,
        cols: q.cols,
    }
}

/// Relays terminal bytes and resizes until either side ends or `stop`
/// completes; `stop`'s `(message, close frame)` is sent to the client then.
pub(crate) async fn relay(
    mut socket: WebSocket,
    stream: Shell,
    stop: impl std::future::Future<Output = (String, CloseFrame)>,
) {
    tokio::pin!(stop);
    let Shell {
        session_id,
        output: mut reader,
        input: mut writer,
    } = stream;
    if let Some(session_id) = session_id {
        let hello = serde_json::json!({"type": "session", "session_id": session_id});
        if socket
            .send(WsMessage::Text(hello.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    loop {
        tokio::select! {
            (message, frame) = &mut stop => {
                let msg = serde_json::json!({"type": "error", "message": message});
                let _ = socket.send(WsMessage::Text(msg.to_string().into())).await;
                let _ = socket.send(WsMessage::Close(Some(frame))).await;
                return;
            }
            ev = reader.next() => match ev {
                Ok(ShellEvent::Output(b)) => {
                    if socket.send(WsMessage::Binary(b.into())).await.is_err() {
                        return;
                    }
                }
                Ok(ShellEvent::Exit(code)) => {
                    let msg = serde_json::json!({"type": "exit", "exit_code": code});
                    let _ = socket.send(WsMessage::Text(msg.to_string().into())).await;
                    let _ = socket.send(WsMessage::Close(None)).await;
                    return;
                }
                Err(_) => {
                    let _ = socket.send(WsMessage::Close(None)).await;
                    return;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(WsMessage::Binary(b))) => {
                    if writer.write(&b).await.is_err() {
                        return;
                    }
                }
                Some(Ok(WsMessage::Text(t))) => {
                    if let Ok(ShellControl::Resize { rows, cols }) = serde_json::from_str::<ShellControl>(&t) {
                        if writer.resize(rows, cols).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(WsMessage::Ping(_))) | Some(Ok(WsMessage::Pong(_))) => {}
                // Close or error: dropping the agent connection detaches.
                _ => return,
            }
        }
    }
}
