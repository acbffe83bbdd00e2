//! The app state, every route, and the OpenAPI document generated from them.

use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::handlers::{
    exec, files, health, images, ports, proxy, publish, sandboxes, secrets, sessions, share, shell,
    snapshots, volumes,
};
use crate::rate_limit::UserLimits;
use crate::service::Service;

/// Largest JSON request body (exec stdin travels base64-encoded in it).
pub const MAX_JSON_BODY: usize = 64 * 1024 * 1024;

pub use crate::model::VERSION_HEADER;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    /// Per-user request budgets, counted when a request authenticates.
    pub limits: Arc<UserLimits>,
}

#[derive(OpenApi)]
#[openapi(info(title = "bhatti", description = "Self-hosted microVM sandboxes"),
    modifiers(&BearerAuth), security(("bearer" = [])),
    // Messages of the WebSockets, which no request body names.
    components(schemas(crate::model::ExecWsStart, crate::model::ExecWsControl,
        crate::model::ExecEvent, crate::model::ShellControl,
        crate::egress::EgressPolicy, crate::egress::Posture)))]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// axum's catch-all `{*path}` is an ordinary `{path}` parameter in OpenAPI.
fn openapi_paths(mut api: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let paths = std::mem::take(&mut api.paths.paths);
    api.paths.paths = paths
        .into_iter()
        .map(|(p, item)| (p.replace("{*", "{"), item))
        .collect();
    api
}

/// Every route of the API, with `/openapi.json` describing them.
pub fn router(state: AppState) -> Router {
    let (router, api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(sandboxes::create, sandboxes::list))
        .routes(routes!(
            sandboxes::get,
            sandboxes::patch,
            sandboxes::destroy
        ))
        .routes(routes!(sandboxes::inspect))
        .routes(routes!(sandboxes::stop))
        .routes(routes!(sandboxes::start))
        .routes(routes!(exec::exec))
        .routes(routes!(exec::exec_ws))
        .routes(routes!(files::read, files::stat, files::write))
        .routes(routes!(sessions::list))
        .routes(routes!(sessions::kill))
        .routes(routes!(shell::shell))
        .routes(routes!(publish::publish, publish::list))
        .routes(routes!(publish::unpublish))
        .routes(routes!(ports::list))
        .routes(routes!(proxy::root))
        .routes(routes!(proxy::path))
        // `{*path}` does not match an empty rest: `/proxy/{port}/` is the same as no path.
        .route(
            "/sandboxes/{id}/proxy/{port}/",
            axum::routing::any(proxy::root),
        )
        .routes(routes!(secrets::set, secrets::list))
        .routes(routes!(secrets::delete))
        .routes(routes!(share::create, share::status, share::revoke))
        .routes(routes!(share::page))
        .routes(routes!(share::asset))
        .routes(routes!(share::terminal))
        .routes(routes!(snapshots::checkpoint))
        .routes(routes!(snapshots::create, snapshots::list))
        .routes(routes!(snapshots::get, snapshots::delete))
        .routes(routes!(snapshots::resume))
        .routes(routes!(volumes::create, volumes::list))
        .routes(routes!(volumes::get, volumes::delete))
        .routes(routes!(volumes::resize))
        .routes(routes!(images::list))
        .routes(routes!(images::get, images::delete))
        .routes(routes!(images::save))
        .routes(routes!(images::import))
        .routes(routes!(images::pull))
        .routes(routes!(images::task))
        .with_state(state)
        .split_for_parts();
    let api = Arc::new(openapi_paths(api));
    router
        .route(
            "/openapi.json",
            get(move || async move { Json(api.as_ref().clone()) }),
        )
        // JSON bodies carry exec stdin (base64); file uploads stream and are capped in their handler.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(axum::middleware::map_response(version_header))
}

/// Every answer names the server's version, so clients can adapt to it.
async fn version_header(mut resp: axum::response::Response) -> axum::response::Response {
    resp.headers_mut().insert(
        VERSION_HEADER,
        axum::http::HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    resp
}
