//! `GET /health`: no auth, never wakes a VM.

use axum::extract::State;
use axum::Json;

use crate::api::error::ApiError;
use crate::api::router::AppState;
use crate::model::Health;

#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, body = Health)))]
pub async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    Ok(Json(state.service.health().await?))
}
