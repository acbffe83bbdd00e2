//! `POST /sandboxes/{id}/exec`: buffered JSON, or NDJSON streamed as it happens.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use bhatti_proto::ExecRequest;
use bytes::Bytes;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json::ApiJson;
use crate::api::router::AppState;
use crate::api::types::{ExecBody, ExecEvent, ExecResult};
use crate::engine::agent_client::{ExecEvent as AgentEvent, ExecStream};

const NDJSON: &str = "application/x-ndjson";
/// Streamed lines buffered between the agent and a slow client.
const STREAM_BUFFER: usize = 64;

#[utoipa::path(post, path = "/sandboxes/{id}/exec", tag = "exec", params(("id" = String, Path, description = "sandbox id or name")), request_body = ExecBody,
    responses((status = 200, body = ExecResult, description = "buffered; with `Accept: application/x-ndjson` one ExecEvent per line"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn exec(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<Response, ApiError> {
    if body.cmd.is_empty() || body.cmd[0].is_empty() {
        return Err(ApiError::bad_request(
            "invalid field `cmd`: must name a command",
        ));
    }
    let stdin = match &body.stdin_b64 {
        Some(s) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| ApiError::bad_request(format!("invalid field `stdin_b64`: {e}")))?,
        ),
        None => None,
    };
    let agent = state.service.agent(&user, &id).await?;
    let req = ExecRequest {
        argv: body.cmd,
        env: body.env,
        cwd: body.cwd.filter(|c| !c.is_empty()),
        ..Default::default()
    };
    let stream = agent
        .exec_with_input(req, stdin.as_deref().unwrap_or_default())
        .await?;
    let timeout = body.timeout.filter(|t| *t > 0).map(Duration::from_secs);

    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NDJSON));
    if wants_stream {
        Ok(streamed(stream, timeout))
    } else {
        Ok(Json(buffered(stream, timeout).await?).into_response())
    }
}

async fn buffered(
    mut stream: ExecStream,
    timeout: Option<Duration>,
) -> Result<ExecResult, ApiError> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut timed_out = false;
    let code = loop {
        let next = match deadline {
            Some(d) if !timed_out => match tokio::time::timeout_at(d, stream.reader.next()).await {
                Ok(ev) => ev,
                Err(_) => {
                    timed_out = true;
                    stream.writer.kill().await?;
                    continue;
                }
            },
            _ => stream.reader.next().await,
        };
        match next? {
            AgentEvent::Stdout(b) => out.extend_from_slice(&b),
            AgentEvent::Stderr(b) => err.extend_from_slice(&b),
            AgentEvent::Exit(c) => break c,
        }
    };
    let (stdout, stdout_b64) = text_or_b64(out);
    let (stderr, stderr_b64) = text_or_b64(err);
    Ok(ExecResult {
        exit_code: code,
        stdout,
        stderr,
        stdout_b64,
        stderr_b64,
        timed_out,
    })
}

fn text_or_b64(bytes: Vec<u8>) -> (String, Option<String>) {
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

fn chunk_fields(b: Vec<u8>) -> (Option<String>, Option<String>) {
    match String::from_utf8(b) {
        Ok(s) => (Some(s), None),
        Err(e) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
        ),
    }
}

/// Relays agent events as NDJSON lines. When the client goes away the
/// channel closes, the agent connection is dropped and lohar kills the
/// command's process group.
fn streamed(mut stream: ExecStream, timeout: Option<Duration>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(STREAM_BUFFER);
    tokio::spawn(async move {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut killed = false;
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = sleep_until_opt(deadline), if !killed => {
                    killed = true;
                    let _ = stream.writer.kill().await;
                    continue;
                }
                ev = stream.reader.next() => ev,
            };
            let (event, last) = match next {
                Ok(AgentEvent::Stdout(b)) => {
                    let (data, data_b64) = chunk_fields(b);
                    (ExecEvent::Stdout { data, data_b64 }, false)
                }
                Ok(AgentEvent::Stderr(b)) => {
                    let (data, data_b64) = chunk_fields(b);
                    (ExecEvent::Stderr { data, data_b64 }, false)
                }
                Ok(AgentEvent::Exit(exit_code)) => (ExecEvent::Exit { exit_code }, true),
                Err(e) => (
                    ExecEvent::Error {
                        message: e.to_string(),
                    },
                    true,
                ),
            };
            let mut line = serde_json::to_vec(&event).unwrap_or_default();
            line.push(b'\n');
            if tx.send(Ok(Bytes::from(line))).await.is_err() || last {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream_from(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, NDJSON)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
