//! `GET /sandboxes/{id}/ports`: TCP ports listening inside a sandbox.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::Json;

use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::router::AppState;
use crate::model::ListeningPort;

#[utoipa::path(get, path = "/sandboxes/{id}/ports", tag = "ports", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = [ListeningPort], description = "listening TCP ports, without the agent's own"), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vec<ListeningPort>>, ApiError> {
    let mut ports = state.service.listening_ports(&user, &id).await?;
    // By id: a name can change (`bhatti edit --name`), the id cannot.
    let sid = state.service.get_sandbox(&user, &id).await?.id;
    // The URL the caller reached us by: right behind a reverse proxy too.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    for p in &mut ports {
        p.proxy_url = Some(format!(
            "{scheme}://{host}/sandboxes/{sid}/proxy/{}/",
            p.port
        ));
    }
    Ok(Json(ports))
}
