//! `GET /sandboxes/{id}/ports`: TCP ports listening inside a sandbox.

use axum::extract::{Path, State};
use axum::Json;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::router::AppState;
use crate::api::types::ListeningPort;

#[utoipa::path(get, path = "/sandboxes/{id}/ports", tag = "ports", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = [ListeningPort], description = "listening TCP ports, without the agent's own"), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Vec<ListeningPort>>, ApiError> {
    Ok(Json(state.service.listening_ports(&user, &id).await?))
}
