//! `ApiError`: every failure of a route, mapped to a status and a JSON body once.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// An error answer: `{"error": "<clear message>"}` with a fitting status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    /// 400: bad input; the message names the field and why.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), error = %self.message, "request failed");
        }
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<crate::engine::agent_client::AgentError> for ApiError {
    fn from(e: crate::engine::agent_client::AgentError) -> Self {
        use crate::engine::agent_client::AgentError;
        match e {
            // The agent's own refusals are about the request (bad path, bad cwd…).
            AgentError::Remote(msg) if is_not_found(&msg) => ApiError::not_found(msg),
            AgentError::Remote(msg) => ApiError::bad_request(msg),
            other => ApiError::unavailable(format!("sandbox agent unavailable: {other}")),
        }
    }
}

fn is_not_found(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("no such file") || m.contains("not found") || m.contains("does not exist")
}

impl From<crate::service::ServiceError> for ApiError {
    fn from(e: crate::service::ServiceError) -> Self {
        use crate::engine::EngineError;
        use crate::service::ServiceError as S;
        use crate::store::StoreError;
        match e {
            S::Invalid(m) => ApiError::bad_request(m),
            S::NotFound(m) => ApiError::not_found(m),
            S::Unauthorized => {
                ApiError::unauthorized("invalid API key: check the key, or run `bhatti setup`")
            }
            S::Unavailable(m) => ApiError::unavailable(m),
            S::Busy { message, .. } => ApiError::unavailable(message),
            S::Conflict(m) => ApiError::conflict(m),
            S::Agent(a) => a.into(),
            S::Secrets(s) => ApiError::internal(s.to_string()),
            S::Store(s) => match s {
                StoreError::NotFound(m) => ApiError::not_found(m),
                StoreError::Conflict(m) => ApiError::conflict(m),
                StoreError::LimitExceeded(m) => ApiError::unprocessable(m),
                StoreError::Invalid(m) => ApiError::bad_request(m),
                StoreError::SubnetFull(_) => ApiError::unavailable(s.to_string()),
                other => ApiError::internal(other.to_string()),
            },
            S::Engine(e) => match e {
                EngineError::NotFound(m) => ApiError::not_found(m),
                other => ApiError::unavailable(other.to_string()),
            },
        }
    }
}
