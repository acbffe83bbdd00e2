//! Request rate limits on `governor`'s GCRA: [`Limit`] for one shared
//! budget, [`KeyedLimit`] for one budget per key (an alias, a client
//! address, a user), and [`UserLimits`], the API's per-user budgets by
//! kind of request. The public proxy and the share page use them too.
//!
//! A limit of "`n` per second" (or per minute) bursts to `n`: after a quiet
//! second (minute) `n` requests pass at once, then one every `1/n` of it.
//! A rate of 0 means unlimited.
//!
//! Pinned to governor 0.6: every 0.10.x release pulls in hashbrown 0.16, a
//! third major version of it in our tree; 0.6 shares dashmap 5 / hashbrown
//! 0.14 with what we already build.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

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

fn quota_per_minute(rate: u32) -> Option<Quota> {
    NonZeroU32::new(rate).map(Quota::per_minute)
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

/// A budget of requests for each key.
pub struct KeyedLimit<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    limiter: Option<Keyed<K, C>>,
    clock: C,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `rate` requests per second for each key (0: unlimited).
    pub fn per_second(rate: u32) -> Self {
        Self::with_clock(rate, DefaultClock::default())
    }

    /// `rate` requests per minute for each key (0: unlimited).
    pub fn per_minute(rate: u32) -> Self {
        Self::per_minute_with_clock(rate, DefaultClock::default())
    }
}

impl<K: Hash + Eq + Clone, C: Clock> KeyedLimit<K, C> {
    /// As [`KeyedLimit::per_second`], timed by `clock`.
    pub fn with_clock(rate: u32, clock: C) -> Self {
        Self::from_quota(quota(rate), clock)
    }

    /// As [`KeyedLimit::per_minute`], timed by `clock`.
    pub fn per_minute_with_clock(rate: u32, clock: C) -> Self {
        Self::from_quota(quota_per_minute(rate), clock)
    }

    fn from_quota(quota: Option<Quota>, clock: C) -> Self {
        KeyedLimit {
            limiter: quota.map(|q| governor::RateLimiter::dashmap_with_clock(q, &clock)),
            clock,
        }
    }

    /// Counts one request for `key`; false when it is over the key's limit.
    pub fn allow(&self, key: &K) -> bool {
        self.check(key).is_ok()
    }

    /// Counts one request for `key`. Over the limit: `Err` with how long
    /// until the key's next request would pass (the request is not counted).
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        let res = l
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()));
        if l.len() > MAX_KEYS {
            l.retain_recent();
        }
        res
    }

    /// Drops the keys whose budget has been full again for one emission
    /// interval; they start afresh if seen.
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

/// The kinds of API request, each with its own per-user budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestClass {
    /// Requests that make a sandbox (create, fork, resume a snapshot).
    Create,
    /// Every other request that changes or runs something: exec (also
    /// over a WebSocket), shells, file writes, edits, deletes.
    Write,
    /// Requests that only read (GET, HEAD).
    Read,
}

impl RequestClass {
    /// The name clients see in a 429 body: `create`, `write` or `read`.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestClass::Create => "create",
            RequestClass::Write => "write",
            RequestClass::Read => "read",
        }
    }
}

/// Requests per minute each user may make, by [`RequestClass`]; 0 = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRates {
    pub create_per_min: u32,
    pub write_per_min: u32,
    pub read_per_min: u32,
}

impl UserRates {
    fn of(&self, class: RequestClass) -> u32 {
        match class {
            RequestClass::Create => self.create_per_min,
            RequestClass::Write => self.write_per_min,
            RequestClass::Read => self.read_per_min,
        }
    }
}

/// A request refused by [`UserLimits::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// Which budget ran out.
    pub class: RequestClass,
    /// That budget, in requests per minute.
    pub per_minute: u32,
    /// How long until the user's next request of this class would pass.
    pub retry_after: Duration,
}

impl Limited {
    /// [`Limited::retry_after`] in whole seconds, rounded up, at least 1
    /// (the `Retry-After` header's unit).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// The API's per-user budgets, keyed by user id: one for each
/// [`RequestClass`], so reads never use up creates and one user never
/// uses up another's.
pub struct UserLimits<C: Clock = DefaultClock> {
    rates: UserRates,
    create: KeyedLimit<i64, C>,
    write: KeyedLimit<i64, C>,
    read: KeyedLimit<i64, C>,
}

impl UserLimits {
    /// Budgets of `rates` for every user.
    pub fn new(rates: UserRates) -> Self {
        Self::with_clock(rates, DefaultClock::default())
    }
}

impl<C: Clock> UserLimits<C> {
    /// As [`UserLimits::new`], timed by `clock`.
    pub fn with_clock(rates: UserRates, clock: C) -> Self {
        let keyed = |rate| KeyedLimit::per_minute_with_clock(rate, clock.clone());
        UserLimits {
            rates,
            create: keyed(rates.create_per_min),
            write: keyed(rates.write_per_min),
            read: keyed(rates.read_per_min),
        }
    }

    /// Counts one request of `class` by user `user_id`.
    pub fn check(&self, user_id: i64, class: RequestClass) -> Result<(), Limited> {
        let limit = match class {
            RequestClass::Create => &self.create,
            RequestClass::Write => &self.write,
            RequestClass::Read => &self.read,
        };
        limit.check(&user_id).map_err(|retry_after| Limited {
            class,
            per_minute: self.rates.of(class),
            retry_after,
        })
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
    fn user_budgets_are_per_user_and_class() {
        let clock = FakeRelativeClock::default();
        let rates = UserRates {
            create_per_min: 3,
            write_per_min: 0,
            read_per_min: 5,
        };
        let l = UserLimits::with_clock(rates, clock.clone());
        for _ in 0..3 {
            l.check(1, RequestClass::Create).expect("within budget");
        }
        let e = l.check(1, RequestClass::Create).expect_err("4th create");
        assert_eq!(e.class, RequestClass::Create);
        assert_eq!(e.per_minute, 3);
        // 3 per minute: one more every 20 s.
        assert_eq!(e.retry_after, Duration::from_secs(20));
        assert_eq!(e.retry_after_secs(), 20);
        assert!(l.check(2, RequestClass::Create).is_ok(), "another user");
        assert!(l.check(1, RequestClass::Read).is_ok(), "reads are separate");
        assert!(
            (0..1000).all(|_| l.check(1, RequestClass::Write).is_ok()),
            "0 = unlimited"
        );
        clock.advance(Duration::from_secs(20));
        assert!(l.check(1, RequestClass::Create).is_ok());
        assert!(l.check(1, RequestClass::Create).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_a_second() {
        let l = Limited {
            class: RequestClass::Read,
            per_minute: 1200,
            retry_after: Duration::from_millis(50),
        };
        assert_eq!(l.retry_after_secs(), 1);
        let l = Limited {
            retry_after: Duration::from_millis(2001),
            ..l
        };
        assert_eq!(l.retry_after_secs(), 3);
    }
}
