//! Publish routes: a public URL for a sandbox port.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json::ApiJson;
use crate::api::router::AppState;
use crate::model::{PublishRequest, PublishedPort};

#[utoipa::path(post, path = "/sandboxes/{id}/publish", tag = "publish", params(("id" = String, Path, description = "sandbox id or name")), request_body = PublishRequest,
    responses((status = 201, body = PublishedPort), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "alias taken or port already published")))]
pub async fn publish(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PublishRequest>,
) -> Result<(StatusCode, Json<PublishedPort>), ApiError> {
    let rule = state.service.publish(&user, &id, req).await?;
    Ok((StatusCode::CREATED, Json(rule)))
}

#[utoipa::path(get, path = "/sandboxes/{id}/publish", tag = "publish", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = [PublishedPort]), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Vec<PublishedPort>>, ApiError> {
    Ok(Json(state.service.list_published(&user, &id).await?))
}

#[utoipa::path(delete, path = "/sandboxes/{id}/publish/{port}", tag = "publish",
    params(("id" = String, Path, description = "sandbox id or name"), ("port" = u16, Path, description = "published port")),
    responses((status = 204, description = "unpublished; the URL stops working at once"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn unpublish(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path((id, port)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let port = parse_port(&port)?;
    state.service.unpublish(&user, &id, port).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A port in a URL path: 1-65535, else a 400 that says so.
pub fn parse_port(s: &str) -> Result<u16, ApiError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ApiError::bad_request(format!(
            "invalid port {s:?}: must be a number from 1 to 65535"
        ))),
    }
}
