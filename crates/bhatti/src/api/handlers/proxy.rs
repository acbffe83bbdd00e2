//! `ANY /sandboxes/{id}/proxy/{port}/{*path}`: the authenticated reverse
//! proxy into a sandbox port, HTTP and WebSocket, streaming.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::response::Response;

use super::publish::parse_port;
use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::router::AppState;
use crate::proxy::authed;

#[utoipa::path(method(get, post, put, delete, patch, head, options), path = "/sandboxes/{id}/proxy/{port}", tag = "proxy",
    params(("id" = String, Path, description = "sandbox id or name"), ("port" = u16, Path, description = "port inside the sandbox")),
    responses((status = 200, description = "the app's response, streamed"), (status = 101, description = "WebSocket relayed"), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 502, body = ErrorBody, description = "nothing listens on the port"), (status = 503, body = ErrorBody)))]
pub async fn root(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path((id, port)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    proxy(state, user, id, port, req).await
}

#[utoipa::path(method(get, post, put, delete, patch, head, options), path = "/sandboxes/{id}/proxy/{port}/{*path}", tag = "proxy",
    params(("id" = String, Path, description = "sandbox id or name"), ("port" = u16, Path, description = "port inside the sandbox"), ("path" = String, Path, description = "path the app sees, after a leading /")),
    responses((status = 200, description = "the app's response, streamed"), (status = 101, description = "WebSocket relayed"), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 502, body = ErrorBody, description = "nothing listens on the port"), (status = 503, body = ErrorBody)))]
pub async fn path(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path((id, port, _path)): Path<(String, String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    proxy(state, user, id, port, req).await
}

async fn proxy(
    state: AppState,
    user: crate::store::User,
    id: String,
    port: String,
    req: Request,
) -> Result<Response, ApiError> {
    let port = parse_port(&port)?;
    let (target, hold) = state.service.proxy_target(&user, &id, port).await?;
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    // The raw (still percent-encoded) path after `/sandboxes/<id>/proxy/<port>`.
    let rest = req
        .uri()
        .path()
        .splitn(6, '/')
        .nth(5)
        .unwrap_or("")
        .to_string();
    match authed::forward(&state.service.upstream(), &target, req, &rest, client).await {
        Ok(resp) => Ok(crate::service::hold_until_sent(resp, hold)),
        Err(e) => {
            drop(hold);
            Err(state.service.proxy_failure(&user, &id, e).await.into())
        }
    }
}
