//! Token buckets for the public proxy: one per alias and one global.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Buckets kept at most; past it, the full (idle) ones are dropped.
const MAX_BUCKETS: usize = 10_000;

/// `rate` tokens per second, holding at most one second's worth.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, now: Instant) -> TokenBucket {
        let capacity = f64::from(rate.max(1));
        TokenBucket {
            rate: f64::from(rate),
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + dt * self.rate >= self.capacity
    }
}

/// The public proxy's limits (requests per second; 0 = unlimited).
pub struct RateLimiter {
    per_alias: u32,
    global: Option<Mutex<TokenBucket>>,
    aliases: Mutex<HashMap<String, TokenBucket>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Buckets are plain numbers: a poisoned lock still holds usable state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RateLimiter {
    pub fn new(per_alias: u32, global: u32) -> RateLimiter {
        RateLimiter {
            per_alias,
            global: (global > 0).then(|| Mutex::new(TokenBucket::new(global, Instant::now()))),
            aliases: Mutex::new(HashMap::new()),
        }
    }

    /// One request against the global limit.
    pub fn allow_global(&self) -> bool {
        match &self.global {
            Some(b) => lock(b).try_take(Instant::now()),
            None => true,
        }
    }

    /// One request against `alias`'s limit.
    pub fn allow_alias(&self, alias: &str) -> bool {
        if self.per_alias == 0 {
            return true;
        }
        let now = Instant::now();
        let mut map = lock(&self.aliases);
        if let Some(b) = map.get_mut(alias) {
            return b.try_take(now);
        }
        if map.len() >= MAX_BUCKETS {
            map.retain(|_, b| !b.is_full(now));
        }
        let mut b = TokenBucket::new(self.per_alias, now);
        let ok = b.try_take(now);
        map.insert(alias.to_string(), b);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, t0);
        assert!((0..5).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        // 200 ms at 5/s is one more token.
        assert!(b.try_take(t0 + Duration::from_millis(200)));
        assert!(!b.try_take(t0 + Duration::from_millis(200)));
        // Never more than one second's worth.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| b.try_take(later)).count(), 5);
    }

    #[test]
    fn limits_are_per_alias_and_global() {
        let l = RateLimiter::new(3, 0);
        assert_eq!((0..10).filter(|_| l.allow_alias("a")).count(), 3);
        assert!(l.allow_alias("b"), "other aliases are unaffected");
        assert!((0..1000).all(|_| l.allow_global()), "0 = unlimited");
        let g = RateLimiter::new(0, 4);
        assert_eq!((0..10).filter(|_| g.allow_global()).count(), 4);
        assert!((0..1000).all(|_| g.allow_alias("a")));
    }
}
