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
            AgentError::Remote { code, message } => ApiError::new(status_of(code), message),
            other => ApiError::unavailable(format!("sandbox agent unavailable: {other}")),
        }
    }
}

/// The HTTP status of each agent error code: the one place they are mapped.
pub fn status_of(code: crate::engine::agent_client::ErrorCode) -> StatusCode {
    use crate::engine::agent_client::ErrorCode as C;
    match code {
        C::NotFound => StatusCode::NOT_FOUND,
        C::Invalid | C::NotADirectory | C::IsADirectory => StatusCode::BAD_REQUEST,
        C::PermissionDenied => StatusCode::FORBIDDEN,
        C::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        C::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        C::Busy | C::Exists => StatusCode::CONFLICT,
        C::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
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
                StoreError::LimitExceeded(m) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, m),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::agent_client::AgentError;
    use crate::engine::agent_client::ErrorCode as C;

    #[test]
    fn agent_codes_map_to_statuses_not_message_text() {
        for (code, status) in [
            (C::NotFound, 404),
            (C::Invalid, 400),
            (C::NotADirectory, 400),
            (C::IsADirectory, 400),
            (C::PermissionDenied, 403),
            (C::TooLarge, 413),
            (C::NoSpace, 507),
            (C::Busy, 409),
            (C::Exists, 409),
            (C::Internal, 500),
        ] {
            // The text says "not found", the code decides.
            let e: ApiError = AgentError::remote(code, "/srv/not found/x").into();
            assert_eq!(e.status.as_u16(), status, "{code}");
            assert_eq!(e.message, "/srv/not found/x");
        }
    }
}
