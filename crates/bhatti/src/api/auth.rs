//! Bearer-key authentication of API requests, and the per-user rate limits
//! counted once a request has authenticated.

use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::router::AppState;
use crate::rate_limit::{Limited, RequestClass};
use crate::store::User;

/// The user a request acts for. Extracting it authenticates the request and
/// counts it against the user's budget for its [`RequestClass`]: over it,
/// the request is refused with 429 (see [`RateLimitBody`]).
pub struct AuthUser(pub User);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer(parts)
            .or_else(|| query_token(parts))
            .ok_or_else(|| {
                ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`")
                    .into_response()
            })?;
        let user = state
            .service
            .authenticate(&key)
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
        state
            .limits
            .check(user.id, class_of(parts))
            .map_err(too_many)?;
        Ok(AuthUser(user))
    }
}

/// The body of a 429 from the API's per-user limits.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RateLimitBody {
    /// What happened and when to retry, for people.
    pub error: String,
    /// The budget that ran out: `create`, `write` or `read`.
    pub limit: &'static str,
    /// That budget, in requests per minute per user.
    pub limit_per_minute: u32,
    /// Seconds until a request of this kind would pass (as `Retry-After`).
    pub retry_after_secs: u64,
}

fn too_many(l: Limited) -> Response {
    let secs = l.retry_after_secs();
    let what = match l.class {
        RequestClass::Create => "creations (sandboxes, snapshots, images)",
        RequestClass::Write => "changing requests (exec, writes)",
        RequestClass::Read => "reads",
    };
    let body = RateLimitBody {
        error: format!(
            "rate limit `{}`: at most {} {what} per minute per user; retry in {secs} s",
            l.class.as_str(),
            l.per_minute
        ),
        limit: l.class.as_str(),
        limit_per_minute: l.per_minute,
        retry_after_secs: secs,
    };
    let mut resp = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// Which budget a request counts against: making a sandbox, snapshot or
/// image (the heavy requests), reading
/// (safe methods, except WebSocket upgrades, which run commands), or
/// anything else.
fn class_of(parts: &Parts) -> RequestClass {
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    if parts.method == axum::http::Method::POST
        && matches!(
            route,
            Some(
                "/sandboxes"
                    | "/snapshots/{name}/resume"
                    // Heavy: each copies a VM's memory or a whole disk.
                    | "/snapshots"
                    | "/sandboxes/{id}/checkpoint"
                    | "/images/save"
                    | "/images/import"
                    | "/images/pull"
            )
        )
    {
        return RequestClass::Create;
    }
    let upgrade = parts.headers.contains_key(header::UPGRADE);
    if parts.method.is_safe() && !upgrade {
        RequestClass::Read
    } else {
        RequestClass::Write
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
