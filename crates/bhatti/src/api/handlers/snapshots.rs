//! Named snapshots: take, list, show, delete, resume into a new sandbox.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json::ApiJson;
use crate::api::router::AppState;
use crate::model::{
    CheckpointRequest, CreateSandboxRequest, CreateSnapshotRequest, Sandbox, Snapshot,
};

#[utoipa::path(post, path = "/sandboxes/{id}/checkpoint", tag = "snapshots",
    params(("id" = String, Path, description = "sandbox id or name")), request_body = CheckpointRequest,
    responses((status = 201, body = Snapshot, description = "taken; a running sandbox runs on"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "name in use, or the sandbox cannot be copied now"),
        (status = 429, body = ErrorBody, description = "over the caller's snapshot quota")))]
pub async fn checkpoint(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CheckpointRequest>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let s = state.service.create_snapshot(&user, &id, &req.name).await?;
    Ok((StatusCode::CREATED, Json(s)))
}

#[utoipa::path(post, path = "/snapshots", tag = "snapshots", request_body = CreateSnapshotRequest,
    responses((status = 201, body = Snapshot), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(req): ApiJson<CreateSnapshotRequest>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let s = state
        .service
        .create_snapshot(&user, &req.sandbox, &req.name)
        .await?;
    Ok((StatusCode::CREATED, Json(s)))
}

#[utoipa::path(get, path = "/snapshots", tag = "snapshots", responses((status = 200, body = [Snapshot])))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<Snapshot>>, ApiError> {
    Ok(Json(state.service.list_snapshots(&user).await?))
}

#[utoipa::path(get, path = "/snapshots/{name}", tag = "snapshots", params(("name" = String, Path, description = "snapshot name or id")),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(state.service.get_snapshot(&user, &name).await?))
}

#[utoipa::path(delete, path = "/snapshots/{name}", tag = "snapshots", params(("name" = String, Path, description = "snapshot name or id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service.delete_snapshot(&user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/snapshots/{name}/resume", tag = "snapshots", params(("name" = String, Path, description = "snapshot name or id")),
    request_body = CreateSandboxRequest,
    responses((status = 201, body = Sandbox, description = "a new sandbox with the snapshot's memory and disk"),
        (status = 200, body = Sandbox, description = "the caller already has a sandbox of that name: returned as it is"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<CreateSandboxRequest>,
) -> Result<Response, ApiError> {
    let c = state.service.resume_snapshot(&user, &name, req).await?;
    Ok(if c.created {
        (StatusCode::CREATED, Json(c.sandbox)).into_response()
    } else {
        (
            StatusCode::OK,
            [(super::sandboxes::EXISTED_HEADER, "true")],
            Json(c.sandbox),
        )
            .into_response()
    })
}
