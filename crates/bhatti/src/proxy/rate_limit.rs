//! Request rate limits on `governor`'s GCRA: [`Limit`] for one shared
//! budget, [`KeyedLimit`] for one budget per key (an alias, a client
//! address, a user), and [`RateLimiter`], the public proxy's pair of them.
//!
//! Every limit here is "`rate` requests per second, bursting to one
//! second's worth": after an idle second `rate` requests pass at once, then
//! one every `1/rate` s. A rate of 0 means unlimited.
//!
//! Pinned to governor 0.6: every 0.10.x release pulls in hashbrown 0.16, a
//! third major version of it in our tree; 0.6 shares dashmap 5 / hashbrown
//! 0.14 with what we already build.

use std::hash::Hash;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::Quota;

/// Keys a [`KeyedLimit`] holds before it drops those whose budget is full
/// again (indistinguishable from a new key), so a stream of distinct keys
/// cannot grow it without bound.
const MAX_KEYS: usize = 10_000;

/// governor's limiter for one budget, timed by `C`.
type Direct<C> =
    governor::RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
/// governor's limiter for a budget per key, timed by `C`.
type Keyed<K, C> =
    governor::RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

fn quota(rate: u32) -> Option<Quota> {
    NonZeroU32::new(rate).map(Quota::per_second)
}

/// One budget of `rate` requests per second shared by every caller.
pub struct Limit<C: Clock = DefaultClock> {
    limiter: Option<Direct<C>>,
}

impl Limit {
    /// `rate` requests per second (0: unlimited).
    pub fn per_second(rate: u32) -> Self {
        Self::with_clock(rate, DefaultClock::default())
    }
}

impl<C: Clock> Limit<C> {
    /// As [`Limit::per_second`], timed by `clock`.
    pub fn with_clock(rate: u32, clock: C) -> Self {
        Limit {
            limiter: quota(rate).map(|q| governor::RateLimiter::direct_with_clock(q, &clock)),
        }
    }

    /// Counts one request; false when it is over the limit.
    pub fn allow(&self) -> bool {
        self.limiter.as_ref().is_none_or(|l| l.check().is_ok())
    }
}

/// A budget of `rate` requests per second for each key.
pub struct KeyedLimit<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    limiter: Option<Keyed<K, C>>,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `rate` requests per second for each key (0: unlimited).
    pub fn per_second(rate: u32) -> Self {
        Self::with_clock(rate, DefaultClock::default())
    }
}

impl<K: Hash + Eq + Clone, C: Clock> KeyedLimit<K, C> {
    /// As [`KeyedLimit::per_second`], timed by `clock`.
    pub fn with_clock(rate: u32, clock: C) -> Self {
        KeyedLimit {
            limiter: quota(rate).map(|q| governor::RateLimiter::dashmap_with_clock(q, &clock)),
        }
    }

    /// Counts one request for `key`; false when it is over the key's limit.
    pub fn allow(&self, key: &K) -> bool {
        let Some(l) = &self.limiter else {
            return true;
        };
        let ok = l.check_key(key).is_ok();
        if l.len() > MAX_KEYS {
            l.retain_recent();
        }
        ok
    }

    /// Drops the keys whose budget has been full again for `1/rate`; they
    /// start afresh if seen.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys currently tracked.
    pub fn keys(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

/// The public proxy's limits: per alias and in total (requests per second;
/// 0 = unlimited).
pub struct RateLimiter {
    global: Limit,
    aliases: KeyedLimit<String>,
}

impl RateLimiter {
    pub fn new(per_alias: u32, global: u32) -> RateLimiter {
        RateLimiter {
            global: Limit::per_second(global),
            aliases: KeyedLimit::per_second(per_alias),
        }
    }

    /// One request against the global limit.
    pub fn allow_global(&self) -> bool {
        self.global.allow()
    }

    /// One request against `alias`'s limit.
    pub fn allow_alias(&self, alias: &str) -> bool {
        // The key is owned: governor clones it into its map for new keys.
        self.aliases.allow(&alias.to_string())
    }

    /// Forgets aliases whose budget is full again.
    pub fn forget_idle(&self) {
        self.aliases.forget_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    #[test]
    fn budget_refills_at_rate() {
        let clock = FakeRelativeClock::default();
        let b = Limit::with_clock(5, clock.clone());
        assert!((0..5).all(|_| b.allow()));
        assert!(!b.allow());
        // 200 ms at 5/s is one more request.
        clock.advance(Duration::from_millis(200));
        assert!(b.allow());
        assert!(!b.allow());
        // Never more than one second's worth after a long quiet spell
        // (governor 0.6 also admits the request at the refill boundary).
        clock.advance(Duration::from_secs(60));
        let n = (0..20).filter(|_| b.allow()).count();
        assert!((5..=6).contains(&n), "{n}");
    }

    #[test]
    fn keyed_budgets_are_separate_and_bounded() {
        let clock = FakeRelativeClock::default();
        let k = KeyedLimit::with_clock(2, clock.clone());
        assert_eq!((0..10).filter(|_| k.allow(&"a")).count(), 2);
        assert!(k.allow(&"b"), "other keys are unaffected");
        assert_eq!(k.keys(), 2);
        // Quiet long enough: both budgets are full again and dropped
        // (governor waits one emission interval, 1/rate, past full).
        clock.advance(Duration::from_secs(2));
        k.forget_idle();
        assert_eq!(k.keys(), 0);
        assert_eq!((0..10).filter(|_| k.allow(&"a")).count(), 2);

        // A flood of distinct keys does not grow it past MAX_KEYS (+1 for
        // the one that triggers the cleanup) once their budgets refill.
        let ips = KeyedLimit::with_clock(1000, clock.clone());
        for i in 0..MAX_KEYS as u32 {
            assert!(ips.allow(&i));
        }
        clock.advance(Duration::from_secs(2));
        assert!(ips.allow(&u32::MAX));
        assert!(ips.allow(&(u32::MAX - 1)));
        assert!(ips.keys() <= 2, "{} keys kept", ips.keys());
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
        assert_eq!(g.aliases.keys(), 0, "unlimited keeps no state");
    }
}
