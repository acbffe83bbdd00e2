//! What the proxies ask of the service: where a request goes.

use std::sync::Arc;

use super::{Result, Service, ServiceError};
use crate::proxy::{Route, Target};
use crate::store::{StoreError, User};

/// The store's activity time is written at most this often per route.
const TOUCH_EVERY_SECS: u64 = 5;

impl Service {
    /// A port of one of the user's running sandboxes, for the authenticated proxy.
    pub async fn proxy_target(&self, user: &User, id: &str, port: u16) -> Result<Target> {
        let rec = self.find(user, id).await?;
        let rec = self.wake(rec).await?;
        self.require_running(&rec)?;
        let sid = rec.id.clone();
        // Best effort: activity bookkeeping must never fail a request.
        let _ = self.store.call(move |s| s.touch_sandbox(&sid)).await;
        Ok(Target {
            sandbox_id: rec.id.clone(),
            port,
            agent: self.agent_of(&rec),
        })
    }

    /// The published port behind `alias`, for the public proxy. Served from
    /// the route cache; unpublish and destroy invalidate it.
    pub async fn public_route(&self, alias: &str) -> Result<Arc<Route>> {
        let alias = alias.to_ascii_lowercase();
        // A cached route belongs to a running sandbox: every status change
        // away from running (destroy, stop) forgets it.
        if let Some(route) = self.proxy.routes.get(&alias) {
            self.note_activity(&route);
            return Ok(route);
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
        let sid = rule.sandbox_id.clone();
        let rec = self
            .store
            .call(move |s| s.get_sandbox(&sid))
            .await
            .map_err(not_found)?;
        let rec = self.wake(rec).await?;
        self.require_running(&rec)?;
        let route = Arc::new(Route::new(
            rule.alias,
            Target {
                sandbox_id: rec.id.clone(),
                port: rule.port,
                agent: self.agent_of(&rec),
            },
        ));
        self.proxy.routes.insert(generation, route.clone());
        self.note_activity(&route);
        Ok(route)
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
