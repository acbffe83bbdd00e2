//! Custom base images: list, show, save from a sandbox, import a tarball, delete.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json::ApiJson;
use crate::api::router::AppState;
use crate::model::images::{Image, ImportImageQuery, PullImageRequest, SaveImageRequest, Task};
use crate::service::MAX_IMPORT_BYTES;

#[utoipa::path(get, path = "/images", tag = "images",
    responses((status = 200, body = [Image], description = "the caller's images and the operator's")))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<Image>>, ApiError> {
    Ok(Json(state.service.list_images(&user).await?))
}

#[utoipa::path(get, path = "/images/{name}", tag = "images", params(("name" = String, Path, description = "image name or id")),
    responses((status = 200, body = Image), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
) -> Result<Json<Image>, ApiError> {
    Ok(Json(state.service.get_image(&user, &name).await?))
}

#[utoipa::path(delete, path = "/images/{name}", tag = "images", params(("name" = String, Path, description = "image name or id")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "in use by a sandbox, fork or snapshot, or an operator image")))]
pub async fn delete(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service.delete_image(&user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/images/save", tag = "images", request_body = SaveImageRequest,
    responses((status = 201, body = Image, description = "the sandbox's disk, flattened; the sandbox runs on"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "name in use, or the sandbox cannot be saved now"),
        (status = 429, body = ErrorBody, description = "over the caller's storage quota")))]
pub async fn save(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(req): ApiJson<SaveImageRequest>,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    let img = state
        .service
        .save_image(&user, &req.sandbox, &req.name)
        .await?;
    Ok((StatusCode::CREATED, Json(img)))
}

#[utoipa::path(post, path = "/images/import", tag = "images", params(ImportImageQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar",
        description = "a `docker save` tarball or an OCI image layout as a tar"),
    responses((status = 201, body = Image), (status = 400, body = ErrorBody, description = "not an image, or a bad name"),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn import(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Query(q): Query<ImportImageQuery>,
    body: Body,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    // A bad name, or no room left: refused before the upload is stored,
    // but read to its end first, so the client still sending it gets this
    // answer and not a broken pipe (seen in CI: EPIPE instead of a 400).
    let refused = match crate::store::validate_image_name(&q.name) {
        Err(e) => Some(ApiError::bad_request(e.to_string())),
        Ok(()) => state
            .service
            .storage_room(&user)
            .await
            .err()
            .map(ApiError::from),
    };
    if let Some(e) = refused {
        super::files::drain_body(body).await;
        return Err(e);
    }
    let work = state.service.import_dir()?;
    let path = work.0.join("archive.tar");
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("upload broke off: {e}")))?;
        total += chunk.len() as u64;
        if total > MAX_IMPORT_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("archives are capped at {MAX_IMPORT_BYTES} bytes"),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))?;
    drop(file);
    let img = state
        .service
        .import_image(&user, &q.name, &work, "import")
        .await?;
    Ok((StatusCode::CREATED, Json(img)))
}

#[utoipa::path(post, path = "/images/pull", tag = "images", request_body = PullImageRequest,
    responses((status = 202, body = Task, description = "pulling in the background: poll GET /tasks/{id}"),
        (status = 400, body = ErrorBody, description = "bad reference or name"), (status = 409, body = ErrorBody)))]
pub async fn pull(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(req): ApiJson<PullImageRequest>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let t = state
        .service
        .pull_image(&user, &req.reference, req.name.as_deref())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(t)))
}

#[utoipa::path(get, path = "/tasks/{id}", tag = "images", params(("id" = String, Path, description = "task id")),
    responses((status = 200, body = Task), (status = 404, body = ErrorBody)))]
pub async fn task(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(state.service.get_task(&user, &id)?))
}
