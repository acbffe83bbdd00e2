//! File routes: read (with truncation), ls, stat via HEAD, atomic write.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::TryStreamExt;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::router::AppState;
use crate::model::{FileEntry, FilesQuery};
use crate::service::files::{self, ReadRange};

fn path_of(q: &FilesQuery) -> Result<String, ApiError> {
    match q.path.as_deref() {
        Some(p) if !p.is_empty() => Ok(p.to_string()),
        _ => Err(ApiError::bad_request("missing query parameter `path`")),
    }
}

#[utoipa::path(get, path = "/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "sandbox id or name"), FilesQuery),
    responses((status = 200, description = "raw bytes with X-File-Size, or [FileEntry] with ls=true", body = [FileEntry]), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn read(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    Query(q): Query<FilesQuery>,
) -> Result<Response, ApiError> {
    let path = path_of(&q)?;
    if q.ls.unwrap_or(false) {
        let list = state.service.list_dir(&user, &id, &path).await?;
        return Ok(Json(list).into_response());
    }
    let range = ReadRange {
        offset: q.offset,
        limit: q.limit,
        max_bytes: q.max_bytes,
    };
    let file = state.service.read_file(&user, &id, &path, range).await?;
    let mut rx = file.chunks;
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    size_and_mode(h, file.size, &file.mode);
    Ok(resp)
}

/// `X-File-Size` (the total size, whatever part was sent) and `X-File-Mode`.
fn size_and_mode(h: &mut axum::http::HeaderMap, size: u64, mode: &str) {
    h.insert("x-file-size", HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(mode) {
        h.insert("x-file-mode", v);
    }
}

#[utoipa::path(head, path = "/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "sandbox id or name"), FilesQuery),
    responses((status = 200, description = "X-File-Size, X-File-Mode, X-File-IsDir headers"), (status = 404)))]
pub async fn stat(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    Query(q): Query<FilesQuery>,
) -> Result<Response, ApiError> {
    let path = path_of(&q)?;
    let info = state.service.stat_file(&user, &id, &path).await?;
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    size_and_mode(h, info.size, &info.mode);
    h.insert(
        "x-file-isdir",
        HeaderValue::from_static(if info.is_dir { "true" } else { "false" }),
    );
    Ok(resp)
}

#[utoipa::path(put, path = "/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "sandbox id or name"), FilesQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 411, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn write(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    Query(q): Query<FilesQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let path = path_of(&q)?;
    let len = headers
        .get(header::CONTENT_LENGTH)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "Content-Length is required for file writes",
            )
        })?
        .to_str()
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ApiError::bad_request("invalid Content-Length"))?;
    // Refused before any of the body is read (nothing to drain).
    files::check_write_size(len)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let mut reader = tokio_util::io::StreamReader::new(stream);
    let written = state
        .service
        .write_file(&user, &id, &path, q.mode.as_deref(), len, &mut reader)
        .await;
    if let Err(e) = written {
        drain_upload(&mut reader).await;
        return Err(e.into());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Longest a refused upload's rest is read (and dropped) before answering.
const DRAIN_TOTAL: std::time::Duration = std::time::Duration::from_secs(30);
/// A client that sends nothing for this long is not waited for.
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// [`drain_upload`] for a request body not yet read: what a handler that
/// refuses a request before reading its upload calls before answering.
pub(super) async fn drain_body(body: Body) {
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    drain_upload(&mut tokio_util::io::StreamReader::new(stream)).await;
}

/// Reads and drops what is left of a refused upload (at most 100 MiB, as
/// the length was checked), so that the client, still sending, reads our
/// answer instead of a reset connection (seen under load: a 20 MB write
/// refused early reached the client as "connection reset" instead of 400).
async fn drain_upload<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(DRAIN_TOTAL, async {
        while let Ok(Ok(n)) = tokio::time::timeout(DRAIN_IDLE, reader.read(&mut buf)).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
}
