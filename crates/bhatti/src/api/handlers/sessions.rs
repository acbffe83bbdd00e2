//! TTY sessions inside a sandbox: list and kill.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::router::AppState;
use crate::model::Session;

#[utoipa::path(get, path = "/sandboxes/{id}/sessions", tag = "sessions", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = [Session]), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Vec<Session>>, ApiError> {
    Ok(Json(state.service.list_sessions(&user, &id).await?))
}

#[utoipa::path(delete, path = "/sandboxes/{id}/sessions/{session_id}", tag = "sessions",
    params(("id" = String, Path, description = "sandbox id or name"), ("session_id" = String, Path, description = "session id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn kill(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path((id, session_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.service.kill_session(&user, &id, &session_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
