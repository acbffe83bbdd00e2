//! Persistent volumes: create, list, show, delete, grow.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json::ApiJson;
use crate::api::router::AppState;
use crate::model::volumes::{CreateVolumeRequest, ResizeVolumeRequest, Volume};

#[utoipa::path(post, path = "/volumes", tag = "volumes", request_body = CreateVolumeRequest,
    responses((status = 201, body = Volume, description = "an empty ext4 volume, root directory owned by the guest user (uid 1000)"),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody, description = "name in use"),
        (status = 429, body = ErrorBody, description = "over the caller's storage quota")))]
pub async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(req): ApiJson<CreateVolumeRequest>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    let v = state
        .service
        .create_volume(&user, &req.name, req.size_mb)
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(get, path = "/volumes", tag = "volumes", responses((status = 200, body = [Volume])))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<Volume>>, ApiError> {
    Ok(Json(state.service.list_volumes(&user).await?))
}

#[utoipa::path(get, path = "/volumes/{name}", tag = "volumes", params(("name" = String, Path, description = "volume name or id")),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(state.service.get_volume(&user, &name).await?))
}

#[utoipa::path(delete, path = "/volumes/{name}", tag = "volumes", params(("name" = String, Path, description = "volume name or id")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "attached to a sandbox")))]
pub async fn delete(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service.delete_volume(&user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/volumes/{name}/resize", tag = "volumes", params(("name" = String, Path, description = "volume name or id")),
    request_body = ResizeVolumeRequest,
    responses((status = 200, body = Volume, description = "disk and filesystem grown (in the guest when attached read-write)"),
        (status = 400, body = ErrorBody, description = "not larger"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "attached read-only, or to a sandbox that cannot run"),
        (status = 429, body = ErrorBody, description = "over the caller's storage quota")))]
pub async fn resize(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ResizeVolumeRequest>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(
        state
            .service
            .resize_volume(&user, &name, req.size_mb)
            .await?,
    ))
}
