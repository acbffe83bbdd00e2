//! What the proxies ask of the service: where a request goes. Both proxies
//! wake a warm or cold sandbox, and hold the sandbox hot (in flight) until
//! the response body has been sent; idle pooled connections do not count.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Response;
use http_body_util::BodyExt;

use super::routes::Route;
use super::thermal::WakeMode;
use super::upstream::{ProxyError, Target, UpstreamPool};
use super::usage::InFlight;
use super::{Result, Service, ServiceError};
use crate::store::{StoreError, User};

/// The store's activity time is written at most this often per route.
const TOUCH_EVERY_SECS: u64 = 5;

/// A public route for one request, holding its sandbox hot while it lives.
pub struct Routed {
    route: Arc<Route>,
    hold: InFlight,
}

impl std::ops::Deref for Routed {
    type Target = Route;
    fn deref(&self) -> &Route {
        &self.route
    }
}

impl Routed {
    /// `resp` with the hold moved into its body: the sandbox stays hot until
    /// the body is sent (or dropped).
    pub fn hold_until_sent(self, resp: Response<Body>) -> Response<Body> {
        hold_until_sent(resp, self.hold)
    }
}

/// `resp` with `hold` alive until its body has been sent or dropped.
pub fn hold_until_sent(resp: Response<Body>, hold: InFlight) -> Response<Body> {
    resp.map(|body| {
        Body::new(body.map_frame(move |f| {
            let _ = &hold;
            f
        }))
    })
}

impl Service {
    /// The keep-alive connections to guest ports both proxies send through.
    pub fn upstream(&self) -> Arc<UpstreamPool> {
        self.proxy.pool.clone()
    }

    /// A port of one of the user's sandboxes, for the authenticated proxy;
    /// a warm or cold sandbox is woken. The request is in flight while the
    /// returned hold lives.
    pub async fn proxy_target(
        &self,
        user: &User,
        id: &str,
        port: u16,
    ) -> Result<(Target, InFlight)> {
        let rec = self.find(user, id).await?;
        let hold = self.enter(&rec).await;
        let rec = self.reload(&rec.id).await?;
        let rec = self.wake(rec, WakeMode::Wait).await?;
        self.require_running(&rec)?;
        let sid = rec.id.clone();
        // Best effort: activity bookkeeping must never fail a request.
        let _ = self.store.call(move |s| s.touch_sandbox(&sid)).await;
        Ok((Target::new(rec.id.clone(), port, self.agent_of(&rec)), hold))
    }

    /// What a forward to `id` that failed with `e` means for the caller. A
    /// sandbox destroyed while the request was under way breaks the forward
    /// the same way a dead guest or app does; the caller gets the 404 the
    /// request would get now, not an outage. Otherwise `e` stands.
    pub async fn proxy_failure(&self, user: &User, id: &str, e: ProxyError) -> ServiceError {
        if matches!(e, ProxyError::TooLarge) {
            return ServiceError::Proxy(e);
        }
        match self.find(user, id).await {
            Err(gone @ ServiceError::NotFound(_)) => gone,
            _ => ServiceError::Proxy(e),
        }
    }

    /// The published port behind `alias`, for the public proxy. Served from
    /// the route cache while the sandbox is hot; a warm or cold one is woken
    /// ([`ServiceError::Busy`] when too many cold restores run already).
    pub async fn public_route(&self, alias: &str) -> Result<Routed> {
        let alias = alias.to_ascii_lowercase();
        // A cached route belongs to a hot sandbox: every status change away
        // from running (pause, stop, destroy) forgets it, under the lock
        // `enter` takes, so a route still cached after entering is usable.
        if let Some(route) = self.proxy.routes.get(&alias) {
            let hold = self.enter_id(&route.target.sandbox_id).await;
            if let Some(route) = self.proxy.routes.get(&alias) {
                self.note_activity(&route);
                return Ok(Routed { route, hold });
            }
        }
        let generation = self.proxy.routes.generation();
        let key = alias.clone();
        let not_found = |e: StoreError| match e {
            StoreError::NotFound(_) => {
                ServiceError::NotFound(format!("no app is published as {alias}"))
            }
            other => other.into(),
        };
        let rule = self
            .store
            .call(move |s| s.find_publish_rule(&key))
            .await
            .map_err(not_found)?;
        let hold = self.enter_id(&rule.sandbox_id).await;
        let rec = self.reload(&rule.sandbox_id).await.map_err(|e| match e {
            ServiceError::NotFound(_) => {
                ServiceError::NotFound(format!("no app is published as {alias}"))
            }
            other => other,
        })?;
        let rec = self.wake(rec, WakeMode::NoWait).await?;
        self.require_running(&rec)?;
        let route = Arc::new(Route::new(
            rule.alias,
            Target::new(rec.id.clone(), rule.port, self.agent_of(&rec)),
        ));
        self.proxy.routes.insert(generation, route.clone());
        self.note_activity(&route);
        Ok(Routed { route, hold })
    }

    /// Records activity for a proxied request, at most every few seconds
    /// and without delaying the request.
    fn note_activity(&self, route: &Route) {
        if !route.should_touch(TOUCH_EVERY_SECS) {
            return;
        }
        let store = self.store.clone();
        let sid = route.target.sandbox_id.clone();
        tokio::spawn(async move {
            let _ = store.call(move |s| s.touch_sandbox(&sid)).await;
        });
    }
}
