//! Exec routes: `POST /sandboxes/{id}/exec` (buffered JSON, or NDJSON
//! streamed as it happens) and `GET /sandboxes/{id}/exec/ws` (stdin streamed
//! in, output streamed out). Each only translates between its framing and
//! [`Service::exec`](crate::service::Service::exec).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::api::auth::{ApiKey, AuthUser};
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json::ApiJson;
use crate::api::router::AppState;
use crate::model::{
    ExecBody, ExecDetached, ExecEvent, ExecResult, ExecWsControl, ExecWsQuery, ExecWsStart,
};
use crate::service::exec::{ExecSpec, ExecUpdate, Stdin};
use crate::service::exec_session::{Attachment, ExecSession, ExecUpdateText};
use crate::service::Service;
use crate::store::User;

const NDJSON: &str = "application/x-ndjson";
/// The exec WebSocket's first message (the command) must come this soon.
const WS_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Stdin chunks queued between the WebSocket and the command.
const WS_STDIN_BUFFER: usize = 8;

#[utoipa::path(post, path = "/sandboxes/{id}/exec", tag = "exec", params(("id" = String, Path, description = "sandbox id or name")), request_body = ExecBody,
    responses((status = 200, body = ExecResult, description = "buffered; with `Accept: application/x-ndjson` one ExecEvent per line"), (status = 202, body = ExecDetached, description = "`detach: true`: started, output going to `output_file`"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn exec(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<Response, ApiError> {
    let spec = ExecSpec::new(body.cmd, body.env, body.cwd, body.timeout_sec)?;
    if body.detach {
        let started = state
            .service
            .exec_detached(&user, &id, spec, body.output_file)
            .await?;
        return Ok((StatusCode::ACCEPTED, Json(started)).into_response());
    }
    let stdin = match &body.stdin_b64 {
        Some(s) => Stdin::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| ApiError::bad_request(format!("invalid field `stdin_b64`: {e}")))?,
        ),
        None => Stdin::Closed,
    };
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NDJSON));
    if wants_stream {
        let updates = state.service.exec(&user, &id, spec, stdin).await?;
        Ok(ndjson(updates))
    } else {
        let result = state.service.exec_buffered(&user, &id, spec, stdin).await?;
        Ok(Json(result).into_response())
    }
}

/// The API event for one update.
fn event_of(update: ExecUpdate) -> ExecEvent {
    let chunk = |b: Vec<u8>| match String::from_utf8(b) {
        Ok(s) => (Some(s), None),
        Err(e) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
        ),
    };
    match update {
        ExecUpdate::Stdout(b) => {
            let (data, data_b64) = chunk(b);
            ExecEvent::Stdout { data, data_b64 }
        }
        ExecUpdate::Stderr(b) => {
            let (data, data_b64) = chunk(b);
            ExecEvent::Stderr { data, data_b64 }
        }
        ExecUpdate::Exit { code, timed_out } => ExecEvent::Exit {
            exit_code: code,
            timed_out,
        },
        ExecUpdate::Failed(e) => ExecEvent::error(e.to_string()),
    }
}

/// Relays updates as NDJSON lines. When the client goes away the body
/// stream is dropped, and with it the receiver: the command is killed.
fn ndjson(updates: mpsc::Receiver<ExecUpdate>) -> Response {
    let lines = futures_util::stream::unfold(updates, |mut rx| async move {
        let update = rx.recv().await?;
        let mut line = serde_json::to_vec(&event_of(update)).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, NDJSON)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[utoipa::path(get, path = "/sandboxes/{id}/exec/ws", tag = "exec", params(("id" = String, Path, description = "sandbox id or name"), ExecWsQuery),
    responses((status = 101, description = "WebSocket. First message (unless `?session=` reattaches): an ExecWsStart (text JSON). The server answers {\"type\":\"session\",\"session_id\",\"dropped_events\"}, then ExecEvent text messages, the last an exit or error event. Binary messages are stdin; text {\"type\":\"eof\"} closes stdin, {\"type\":\"kill\"} kills. Closing the socket kills the command unless it was started with max_idle_sec (then it detaches)."),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn exec_ws(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiKey(key): ApiKey,
    Path(id): Path<String>,
    Query(q): Query<ExecWsQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Another user's sandbox is a 404 whatever the request (no wake here:
    // the command is not known yet).
    let sandbox = state.service.get_sandbox(&user, &id).await?;
    let reattach = match &q.session {
        Some(sid) => Some(state.service.attach_exec_session(&user, &id, sid).await?),
        None => None,
    };
    let ws = ws
        .map_err(|e| ApiError::bad_request(format!("this route needs a WebSocket upgrade: {e}")))?;
    let service = state.service.clone();
    Ok(ws.on_upgrade(move |mut socket| async move {
        let run = async {
            let att = match reattach {
                Some(att) => att,
                None => match start_session(&mut socket, &service, &user, &sandbox.id).await {
                    Ok(att) => att,
                    Err(e) => return ws_finish(&mut socket, ExecEvent::error(e)).await,
                },
            };
            let revoked = async {
                service.key_revoked(&key).await;
                super::shell::key_revoked_close()
            };
            relay(socket, att, revoked).await
        };
        run.await
    }))
}

/// Reads the start message and starts the command as a session the caller
/// is attached to. Errors are the text of the error event to send.
async fn start_session(
    socket: &mut WebSocket,
    service: &Arc<Service>,
    user: &User,
    sandbox_id: &str,
) -> Result<Attachment, String> {
    let start = match tokio::time::timeout(WS_START_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(WsMessage::Text(t)))) => serde_json::from_str::<ExecWsStart>(&t)
            .map_err(|e| format!("invalid start message: {e}"))?,
        Ok(_) => return Err("the first message must be the command as JSON text".into()),
        Err(_) => {
            return Err(format!(
                "no start message within {}s",
                WS_START_TIMEOUT.as_secs()
            ))
        }
    };
    let max_idle = start.max_idle_sec.unwrap_or(0);
    let spec = ExecSpec::new(start.cmd, start.env, start.cwd, start.timeout_sec)
        .map_err(|e| e.to_string())?;
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(WS_STDIN_BUFFER);
    let updates = service
        .exec(user, sandbox_id, spec, Stdin::Stream(stdin_rx))
        .await
        .map_err(|e| ApiError::from(e).message)?;
    service
        .start_exec_session(user, sandbox_id, max_idle, stdin_tx, updates, text_of)
        .map_err(|e| ApiError::from(e).message)
}

/// An update as the exec WebSocket sends it.
fn text_of(update: ExecUpdate) -> ExecUpdateText {
    let last = matches!(update, ExecUpdate::Exit { .. } | ExecUpdate::Failed(_));
    ExecUpdateText {
        json: serde_json::to_string(&event_of(update)).unwrap_or_default(),
        last,
    }
}

/// Bridges the socket and an attached session until the command ends or
/// the client leaves (which kills the command, or detaches it when it was
/// started with `max_idle_sec`).
async fn relay(
    mut socket: WebSocket,
    mut att: Attachment,
    stop: impl std::future::Future<Output = (String, CloseFrame)>,
) {
    tokio::pin!(stop);
    let session = att.session.clone();
    let hello = serde_json::json!({"type": "session", "session_id": session.id, "dropped_events": att.dropped});
    if socket
        .send(WsMessage::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return leave(&session);
    }
    for ev in std::mem::take(&mut att.replay) {
        if socket.send(WsMessage::Text(ev.json.into())).await.is_err() {
            return leave(&session);
        }
        if ev.last {
            let _ = socket.send(WsMessage::Close(None)).await;
            return session.detach();
        }
    }
    let mut stdin_tx = session.stdin_sender();
    // A stdin chunk waiting for room: the socket is not read meanwhile, so a
    // command that does not read its stdin slows its client, not the daemon.
    let mut pending: Option<Bytes> = None;
    loop {
        let reserve = stdin_tx.clone().filter(|_| pending.is_some());
        tokio::select! {
            (message, frame) = &mut stop => {
                let ev = ExecEvent::error(message);
                let text = serde_json::to_string(&ev).unwrap_or_default();
                let _ = socket.send(WsMessage::Text(text.into())).await;
                let _ = socket.send(WsMessage::Close(Some(frame))).await;
                return leave(&session);
            }
            ev = att.live.recv() => {
                // None: the command ended (its last event was sent) or
                // another client took the session over.
                let Some(ev) = ev else {
                    let _ = socket.send(WsMessage::Close(None)).await;
                    return;
                };
                if socket.send(WsMessage::Text(ev.json.into())).await.is_err() {
                    return leave(&session);
                }
                if ev.last {
                    let _ = socket.send(WsMessage::Close(None)).await;
                    return session.detach();
                }
            }
            permit = async move {
                match reserve {
                    Some(tx) => tx.reserve_owned().await.ok(),
                    None => std::future::pending().await,
                }
            } => {
                match (permit, pending.take()) {
                    (Some(p), Some(chunk)) => {
                        p.send(chunk);
                    }
                    // The command no longer takes stdin: drop what is left.
                    _ => stdin_tx = None,
                }
            }
            msg = socket.recv(), if pending.is_none() => match msg {
                Some(Ok(WsMessage::Binary(b))) if !b.is_empty() => {
                    if stdin_tx.is_some() {
                        pending = Some(b);
                    }
                }
                Some(Ok(WsMessage::Binary(_))) => {}
                Some(Ok(WsMessage::Text(t))) => match serde_json::from_str::<ExecWsControl>(&t) {
                    Ok(ExecWsControl::Eof) => {
                        stdin_tx = None;
                        session.close_stdin();
                    }
                    Ok(ExecWsControl::Kill) => session.kill(),
                    Err(_) => {}
                },
                Some(Ok(WsMessage::Ping(_))) | Some(Ok(WsMessage::Pong(_))) => {}
                _ => return leave(&session),
            }
        }
    }
}

/// The client is gone: a session without an idle limit dies with it.
fn leave(session: &ExecSession) {
    session.detach();
    if session.dies_with_client() {
        session.kill();
    }
}

async fn ws_finish(socket: &mut WebSocket, event: ExecEvent) {
    let text = serde_json::to_string(&event).unwrap_or_default();
    let _ = socket.send(WsMessage::Text(text.into())).await;
    let _ = socket.send(WsMessage::Close(None)).await;
}
