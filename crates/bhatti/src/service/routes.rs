//! `RouteCache`: published aliases resolved once and kept in memory, so the
//! public proxy does not read SQLite on every request.
//!
//! Every invalidation bumps a generation; a lookup that started before an
//! invalidation cannot put its (possibly stale) result into the cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use super::upstream::Target;

/// Entries kept at most; past it the cache starts over (lookups refill it).
const MAX_ROUTES: usize = 10_000;

/// A published alias, resolved.
pub struct Route {
    pub alias: String,
    pub target: Target,
    /// Unix seconds of the last activity recorded in the store for this route.
    last_touch: AtomicU64,
}

impl Route {
    pub fn new(alias: String, target: Target) -> Route {
        Route {
            alias,
            target,
            last_touch: AtomicU64::new(0),
        }
    }

    /// True at most once per `every_secs`: whether the caller should record
    /// activity now (the store is not written on every proxied request).
    pub fn should_touch(&self, every_secs: u64) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_touch.load(Ordering::Relaxed);
        now.saturating_sub(last) >= every_secs
            && self
                .last_touch
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[derive(Default)]
struct Inner {
    generation: u64,
    routes: HashMap<String, Arc<Route>>,
}

/// `alias` → [`Route`].
#[derive(Default)]
pub struct RouteCache {
    inner: Mutex<Inner>,
}

impl RouteCache {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, alias: &str) -> Option<Arc<Route>> {
        self.lock().routes.get(alias).cloned()
    }

    /// Read before looking a route up in the store; pass to [`insert`](Self::insert).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Caches a route unless something was invalidated since `generation`.
    pub fn insert(&self, generation: u64, route: Arc<Route>) -> bool {
        let mut g = self.lock();
        if g.generation != generation {
            return false;
        }
        if g.routes.len() >= MAX_ROUTES {
            g.routes.clear();
        }
        g.routes.insert(route.alias.clone(), route);
        true
    }

    /// Drops every route of a sandbox (destroy, stop).
    pub fn forget_sandbox(&self, sandbox_id: &str) {
        let mut g = self.lock();
        g.generation += 1;
        g.routes.retain(|_, r| r.target.sandbox_id != sandbox_id);
    }

    /// Drops the route of one published port (unpublish).
    pub fn forget_port(&self, sandbox_id: &str, port: u16) {
        let mut g = self.lock();
        g.generation += 1;
        g.routes
            .retain(|_, r| !(r.target.sandbox_id == sandbox_id && r.target.port == port));
    }

    pub fn len(&self) -> usize {
        self.lock().routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::agent_client::{AgentClient, UnixDialer};

    fn route(alias: &str, sandbox: &str, port: u16) -> Arc<Route> {
        let agent = AgentClient::new(
            Arc::new(UnixDialer {
                control: "/nonexistent/c".into(),
                forward: "/nonexistent/f".into(),
            }),
            b"t".to_vec(),
        );
        Arc::new(Route::new(
            alias.into(),
            Target::new(sandbox.into(), port, agent),
        ))
    }

    #[test]
    fn invalidation() {
        let c = RouteCache::default();
        let g = c.generation();
        assert!(c.insert(g, route("a", "sb1", 3000)));
        assert!(c.insert(g, route("b", "sb1", 8080)));
        assert!(c.insert(g, route("c", "sb2", 3000)));
        assert_eq!(c.len(), 3);
        c.forget_port("sb1", 8080);
        assert!(c.get("b").is_none());
        assert!(c.get("a").is_some());
        c.forget_sandbox("sb1");
        assert!(c.get("a").is_none());
        assert_eq!(c.get("c").map(|r| r.target.port), Some(3000));
    }

    #[test]
    fn stale_lookup_is_not_cached() {
        let c = RouteCache::default();
        let g = c.generation();
        // An unpublish lands while the lookup reads the store.
        c.forget_port("sb1", 3000);
        assert!(!c.insert(g, route("a", "sb1", 3000)));
        assert!(c.get("a").is_none());
    }

    #[test]
    fn touch_throttled() {
        let r = route("a", "sb1", 1);
        assert!(r.should_touch(5));
        assert!(!r.should_touch(5));
        assert!(r.should_touch(0));
    }
}
