//! Sandbox lifecycle routes.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json::ApiJson;
use crate::api::router::AppState;
use crate::model::{CreateSandboxRequest, PatchSandboxRequest, Sandbox, SandboxDetail};

#[utoipa::path(post, path = "/sandboxes", tag = "sandboxes", request_body = CreateSandboxRequest,
    responses((status = 201, body = Sandbox, description = "created"),
        (status = 200, body = Sandbox, description = "the caller already has a sandbox of that name: returned as it is, with `X-Bhatti-Existed: true`"),
        (status = 400, body = ErrorBody, description = "bad field, or cpus/memory over the caller's per-sandbox cap"),
        (status = 429, body = ErrorBody, description = "over the caller's sandbox quota"), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(req): ApiJson<CreateSandboxRequest>,
) -> Result<Response, ApiError> {
    let c = state.service.create_sandbox(&user, req).await?;
    Ok(if c.created {
        (StatusCode::CREATED, Json(c.sandbox)).into_response()
    } else {
        (StatusCode::OK, [(EXISTED_HEADER, "true")], Json(c.sandbox)).into_response()
    })
}

/// Set on a create answered with a sandbox that already existed.
pub const EXISTED_HEADER: &str = "x-bhatti-existed";

#[utoipa::path(get, path = "/sandboxes", tag = "sandboxes",
    params(("label" = Option<Vec<String>>, Query, description = "`key=value`; repeat for AND: only sandboxes carrying every pair")),
    responses((status = 200, body = [Sandbox]), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Sandbox>>, ApiError> {
    let mut filter = Vec::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if k == "label" {
            let (key, value) = v.split_once('=').ok_or_else(|| {
                ApiError::bad_request(format!(
                    "invalid query parameter `label`: {v:?} is not key=value"
                ))
            })?;
            filter.push((key.to_string(), value.to_string()));
        }
    }
    Ok(Json(state.service.list_sandboxes(&user, &filter).await?))
}

#[utoipa::path(get, path = "/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(state.service.get_sandbox(&user, &id).await?))
}

#[utoipa::path(patch, path = "/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id or name")), request_body = PatchSandboxRequest,
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn patch(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PatchSandboxRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(state.service.patch_sandbox(&user, &id, req).await?))
}

#[utoipa::path(delete, path = "/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn destroy(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service.destroy_sandbox(&user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{id}/stop", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn stop(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(state.service.stop_sandbox(&user, &id).await?))
}

#[utoipa::path(post, path = "/sandboxes/{id}/start", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn start(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(state.service.start_sandbox(&user, &id).await?))
}

#[utoipa::path(get, path = "/sandboxes/{id}/inspect", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = SandboxDetail, description = "never wakes the sandbox; `sessions` only while it is hot"), (status = 404, body = ErrorBody)))]
pub async fn inspect(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetail>, ApiError> {
    Ok(Json(state.service.inspect_sandbox(&user, &id).await?))
}
