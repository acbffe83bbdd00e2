//! The shareable web terminal.
//!
//! - `POST /sandboxes/{id}/share` mints a token (replacing and disconnecting
//!   any previous share), `GET` tells whether one exists, `DELETE` revokes it
//!   and closes the open web terminals.
//! - `GET /_shell/{id}` is the page (no API key; xterm.js served from
//!   `/_shell/assets/`, strict Content-Security-Policy), and
//!   `GET /_shell/{id}/ws` its WebSocket: the first text message must be
//!   `{"type":"auth","token":"bsh_…","rows"?,"cols"?,"session"?}` within
//!   [`AUTH_TIMEOUT`]; after that it speaks the shell WebSocket's protocol
//!   (binary = terminal bytes, `{"type":"resize",…}`), on the same TTY
//!   sessions as `bhatti shell`. A refusal or a revocation is a text message
//!   `{"type":"error","message":…}` followed by a close frame with code
//!   4001 (bad or revoked token), 4008 (no auth message in time), 4029 (too
//!   many terminals) or 1011 (the sandbox failed).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde::Deserialize;

use super::shell::{relay, shell_open};
use crate::api::auth::AuthUser;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::router::AppState;
use crate::model::ShellQuery;
use crate::service::share::{ShareError, ShareInfo, ShareStatus};

/// How long a web terminal may take to send its token.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Close codes of the web terminal's WebSocket (4000-4999: application).
pub mod close_code {
    /// The token is wrong, or the share was revoked or replaced.
    pub const INVALID_TOKEN: u16 = 4001;
    /// No auth message within [`super::AUTH_TIMEOUT`].
    pub const AUTH_TIMEOUT: u16 = 4008;
    /// Too many web terminals are open on the sandbox.
    pub const TOO_MANY: u16 = 4029;
    /// The sandbox could not open a terminal.
    pub const INTERNAL: u16 = 1011;
}

const PAGE: &str = include_str!("../../../assets/share/index.html");

/// Files under `/_shell/assets/`: (name, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "xterm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../assets/xterm/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../assets/xterm/xterm.css"),
    ),
    (
        "addon-fit.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../assets/xterm/addon-fit.js"),
    ),
    (
        "share.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../assets/share/share.js"),
    ),
    (
        "share.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../assets/share/share.css"),
    ),
    (
        "LICENSE.xterm.txt",
        "text/plain; charset=utf-8",
        include_bytes!("../../../assets/xterm/LICENSE"),
    ),
];

/// The page's Content-Security-Policy: scripts, styles and connections only
/// from this origin, plus the `<style>` elements xterm.js creates, which
/// carry `nonce` (fresh for every response).
pub fn content_security_policy(nonce: &str) -> String {
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self' 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'self' data:; font-src 'self'; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    )
}

#[utoipa::path(post, path = "/sandboxes/{id}/share", tag = "share", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 201, body = ShareInfo, description = "a new share; the previous one (if any) no longer works and its terminals are closed"), (status = 404, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<ShareInfo>), ApiError> {
    let info = state.service.share(&user, &id).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(get, path = "/sandboxes/{id}/share", tag = "share", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = ShareStatus), (status = 404, body = ErrorBody, description = "no such sandbox, or it is not shared")))]
pub async fn status(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<ShareStatus>, ApiError> {
    Ok(Json(state.service.share_status(&user, &id).await?))
}

#[utoipa::path(delete, path = "/sandboxes/{id}/share", tag = "share", params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 204, description = "the share (if any) is revoked and its open terminals closed"), (status = 404, body = ErrorBody)))]
pub async fn revoke(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service.revoke_share(&user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/_shell/{id}", tag = "share", security(()), params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, content_type = "text/html", description = "the web terminal page; the token goes in the URL fragment `#token=…`")))]
pub async fn page(Path(_id): Path<String>) -> Response {
    let nonce = hex::encode(rand::rngs::OsRng.gen::<[u8; 16]>());
    let body = PAGE.replace("{{STYLE_NONCE}}", &nonce);
    let mut resp = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_security_policy(&nonce)) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    security_headers(h);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[utoipa::path(get, path = "/_shell/assets/{file}", tag = "share", security(()), params(("file" = String, Path, description = "xterm.js, xterm.css, addon-fit.js, share.js, share.css, LICENSE.xterm.txt")),
    responses((status = 200, description = "a static file of the web terminal"), (status = 404, body = ErrorBody)))]
pub async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (_, content_type, bytes) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| ApiError::not_found(format!("no asset named {file}")))?;
    let mut resp = ([(header::CONTENT_TYPE, *content_type)], *bytes).into_response();
    let h = resp.headers_mut();
    security_headers(h);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

fn security_headers(h: &mut axum::http::HeaderMap) {
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// The first message of a web terminal.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Hello {
    Auth {
        token: String,
        rows: Option<u16>,
        cols: Option<u16>,
        /// Attach to this session instead of the newest detached shell.
        session: Option<String>,
    },
}

#[utoipa::path(get, path = "/_shell/{id}/ws", tag = "share", security(()), params(("id" = String, Path, description = "sandbox id")),
    responses((status = 101, description = "WebSocket: first message `{\"type\":\"auth\",\"token\":…}` within 5 s, then the shell protocol"),
        (status = 429, body = ErrorBody, description = "too many connection attempts from this address")))]
pub async fn terminal(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    if !state.service.allow_share_attempt(peer.ip()) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many web terminal connection attempts from this address; wait a second",
        ));
    }
    let ws = ws
        .map_err(|e| ApiError::bad_request(format!("this route needs a WebSocket upgrade: {e}")))?;
    Ok(ws.on_upgrade(move |socket| serve(state, id, socket)))
}

async fn refuse(mut socket: WebSocket, code: u16, message: String) {
    let msg = serde_json::json!({"type": "error", "message": message});
    let _ = socket.send(WsMessage::Text(msg.to_string().into())).await;
    let _ = socket
        .send(WsMessage::Close(Some(CloseFrame {
            code,
            reason: close_reason(&message).into(),
        })))
        .await;
}

/// A close reason must fit in 123 bytes.
fn close_reason(message: &str) -> String {
    let mut end = message.len().min(123);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

async fn serve(state: AppState, id: String, mut socket: WebSocket) {
    let hello = match tokio::time::timeout(AUTH_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(WsMessage::Text(t)))) => serde_json::from_str::<Hello>(&t).ok(),
        Ok(_) => None,
        Err(_) => {
            let msg = format!("no auth message within {} s", AUTH_TIMEOUT.as_secs());
            return refuse(socket, close_code::AUTH_TIMEOUT, msg).await;
        }
    };
    let Some(Hello::Auth {
        token,
        rows,
        cols,
        session,
    }) = hello
    else {
        let msg = r#"the first message must be {"type":"auth","token":"…"}"#.to_string();
        return refuse(socket, close_code::INVALID_TOKEN, msg).await;
    };
    let q = ShellQuery {
        session,
        token: None,
        rows,
        cols,
    };
    let opened = state
        .service
        .open_shared_terminal(&id, &token, &shell_open(&q))
        .await;
    let (stream, mut slot) = match opened {
        Ok(v) => v,
        Err(e) => {
            let code = match e {
                ShareError::Invalid => close_code::INVALID_TOKEN,
                ShareError::TooMany => close_code::TOO_MANY,
                ShareError::Service(_) => close_code::INTERNAL,
            };
            return refuse(socket, code, e.to_string()).await;
        }
    };
    tracing::info!(sandbox = %id, "web terminal opened");
    let revoked = async move {
        slot.revoked().await;
        let message = "this share was revoked".to_string();
        let frame = CloseFrame {
            code: close_code::INVALID_TOKEN,
            reason: message.clone().into(),
        };
        (message, frame)
    };
    relay(socket, stream, revoked).await;
    tracing::info!(sandbox = %id, "web terminal closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csp_allows_nothing_from_elsewhere() {
        let csp = content_security_policy("abc");
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(!csp.contains("http"), "{csp}");
        assert!(csp.contains("'nonce-abc'"), "{csp}");
    }

    #[test]
    fn page_loads_only_local_assets() {
        for src in PAGE.split(['"', '\'']).filter(|s| s.starts_with('/')) {
            let file = src.strip_prefix("/_shell/assets/").expect(src);
            assert!(ASSETS.iter().any(|(n, _, _)| *n == file), "{src}");
        }
        assert!(!PAGE.contains("http"), "no absolute URL in the page");
    }

    #[test]
    fn close_reason_fits() {
        let long = "é".repeat(100);
        assert!(close_reason(&long).len() <= 123);
        assert_eq!(close_reason("short"), "short");
    }
}
