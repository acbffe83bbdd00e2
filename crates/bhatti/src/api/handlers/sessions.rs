//! TTY sessions inside a sandbox: list and kill.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::router::AppState;
use crate::api::types::Session;

#[utoipa::path(get, path = "/sandboxes/{id}/sessions", tag = "sessions", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = [Session]), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Vec<Session>>, ApiError> {
    let agent = state.service.agent(&user, &id).await?;
    Ok(Json(
        agent
            .sessions()
            .await?
            .into_iter()
            .map(Into::into)
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/sandboxes/{id}/sessions/{session_id}", tag = "sessions",
    params(("id" = String, Path, description = "sandbox id or name"), ("session_id" = String, Path, description = "session id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn kill(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path((id, session_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let agent = state.service.agent(&user, &id).await?;
    if !agent
        .sessions()
        .await?
        .iter()
        .any(|s| s.session_id == session_id)
    {
        return Err(ApiError::not_found(format!(
            "no session {session_id} in sandbox {id}"
        )));
    }
    agent.kill_session(&session_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
