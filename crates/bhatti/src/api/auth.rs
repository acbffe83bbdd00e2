//! Bearer-key authentication of API requests.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use super::router::AppState;
use crate::store::User;

/// The user a request acts for. Extracting it authenticates the request.
pub struct AuthUser(pub User);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer(parts)
            .or_else(|| query_token(parts))
            .ok_or_else(|| {
                ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`")
            })?;
        Ok(AuthUser(state.service.authenticate(&key).await?))
    }
}

/// The API key a request carried (after [`AuthUser`] accepted it): long-lived
/// connections use it to notice the key being rotated or its user deleted.
pub struct ApiKey(pub String);

impl FromRequestParts<AppState> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        bearer(parts)
            .or_else(|| query_token(parts))
            .map(ApiKey)
            .ok_or_else(|| ApiError::unauthorized("missing API key"))
    }
}

fn bearer(parts: &Parts) -> Option<String> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim().to_string())
}

// Browsers cannot set headers on a WebSocket, so the shell also takes `?token=`.
fn query_token(parts: &Parts) -> Option<String> {
    parts
        .uri
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(|t| t.to_string())
}
