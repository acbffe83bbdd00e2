//! The caller's secrets: values go in, never come out.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json::ApiJson;
use crate::api::router::AppState;
use crate::model::{SecretBody, SecretInfo};

#[utoipa::path(post, path = "/secrets", tag = "secrets", request_body = SecretBody, responses((status = 201, body = SecretInfo), (status = 400, body = ErrorBody)))]
pub async fn set(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<SecretBody>,
) -> Result<(StatusCode, Json<SecretInfo>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(
            state
                .service
                .set_secret(&user, &body.name, &body.value)
                .await?,
        ),
    ))
}

#[utoipa::path(get, path = "/secrets", tag = "secrets", responses((status = 200, body = [SecretInfo])))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<SecretInfo>>, ApiError> {
    Ok(Json(state.service.list_secrets(&user).await?))
}

#[utoipa::path(delete, path = "/secrets/{name}", tag = "secrets", params(("name" = String, Path, description = "secret name")), responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service.delete_secret(&user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
