//! Host-side use of each sandbox, for the thermal manager: when it was last
//! used and how many requests and agent connections are open right now.
//!
//! A request enters under the sandbox's thermal lock (see
//! [`Service::enter`](super::Service::enter)), so the manager, which checks
//! "nothing in flight" under the same lock, can never pause a VM between a
//! request's status check and its first byte to the guest.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::engine::agent_client::{BoxStream, Channel, DialFuture, Dialer};

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Settings of the idle transitions (from the daemon config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThermalConfig {
    /// Idle time after which a hot sandbox is paused; `None`: never.
    pub idle_warm: Option<Duration>,
    /// Idle time after which a warm (or, with warm disabled, hot) sandbox is
    /// saved to disk, counted from the last activity; `None`: never.
    pub idle_cold: Option<Duration>,
    /// Cold restores that may run at once on this host.
    pub max_concurrent_restores: usize,
}

impl ThermalConfig {
    /// No idle transitions (explicit stop/start still work).
    pub fn disabled() -> Self {
        ThermalConfig {
            idle_warm: None,
            idle_cold: None,
            max_concurrent_restores: 4,
        }
    }

    /// From the config's seconds, where 0 disables a step.
    pub fn from_secs(warm: u64, cold: u64, max_concurrent_restores: usize) -> Self {
        let d = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        ThermalConfig {
            idle_warm: d(warm),
            idle_cold: d(cold),
            max_concurrent_restores: max_concurrent_restores.max(1),
        }
    }

    /// How often the manager looks: a third of the shortest step, 1-5 s.
    pub fn tick(&self) -> Duration {
        let shortest = [self.idle_warm, self.idle_cold]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Duration::from_secs(15));
        (shortest / 3).clamp(Duration::from_secs(1), Duration::from_secs(5))
    }
}

/// One sandbox's host-side use.
#[derive(Debug)]
pub(crate) struct Usage {
    /// Unix ms of the last request start or end.
    last_use_ms: AtomicI64,
    /// Open requests and agent connections.
    in_flight: AtomicU32,
}

impl Usage {
    fn new(last_use_ms: i64) -> Self {
        Usage {
            last_use_ms: AtomicI64::new(last_use_ms),
            in_flight: AtomicU32::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        self.last_use_ms.fetch_max(now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn last_use_ms(&self) -> i64 {
        self.last_use_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts one request or connection as in flight for as long as it lives;
/// its end counts as use too.
#[derive(Debug)]
pub struct InFlight(Arc<Usage>);

impl InFlight {
    pub(crate) fn new(usage: Arc<Usage>) -> Self {
        usage.touch();
        usage.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(usage)
    }

    fn again(&self) -> InFlight {
        InFlight::new(self.0.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Every sandbox's [`Usage`], by id.
#[derive(Debug, Default)]
pub(crate) struct UsageTable {
    map: Mutex<HashMap<String, Arc<Usage>>>,
}

impl UsageTable {
    /// The sandbox's usage; a new entry starts at `last_active_ms` (the
    /// store's, so a restarted daemon resumes its clocks).
    pub(crate) fn get(&self, id: &str, last_active_ms: i64) -> Arc<Usage> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_string())
            .or_insert_with(|| Arc::new(Usage::new(last_active_ms)))
            .clone()
    }

    pub(crate) fn forget(&self, id: &str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(id);
    }
}

/// A dialer that counts each connection it opens as in flight, and holds
/// one more count itself while the client that owns it lives.
pub(crate) struct TrackedDialer {
    inner: Arc<dyn Dialer>,
    hold: InFlight,
}

impl TrackedDialer {
    pub(crate) fn new(inner: Arc<dyn Dialer>, hold: InFlight) -> Self {
        TrackedDialer { inner, hold }
    }
}

impl Dialer for TrackedDialer {
    fn dial(&self, channel: Channel) -> DialFuture {
        let guard = self.hold.again();
        let dial = self.inner.dial(channel);
        Box::pin(async move {
            let stream = dial.await?;
            Ok(Box::new(Tracked {
                inner: stream,
                _guard: guard,
            }) as BoxStream)
        })
    }
}

/// A connection to the agent that counts as in flight until it is dropped.
struct Tracked {
    inner: BoxStream,
    _guard: InFlight,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_and_touches() {
        let t = UsageTable::default();
        let u = t.get("a", 5);
        assert_eq!(u.last_use_ms(), 5);
        let g = InFlight::new(u.clone());
        let g2 = g.again();
        assert_eq!(u.in_flight(), 2);
        assert!(u.last_use_ms() > 5);
        drop(g);
        drop(g2);
        assert_eq!(u.in_flight(), 0);
        // The same entry, whatever the fallback.
        assert_eq!(t.get("a", 0).in_flight(), 0);
        assert!(Arc::ptr_eq(&t.get("a", 0), &u));
    }

    #[test]
    fn config_steps_and_tick() {
        let c = ThermalConfig::from_secs(3, 8, 0);
        assert_eq!(c.idle_warm, Some(Duration::from_secs(3)));
        assert_eq!(c.max_concurrent_restores, 1);
        assert_eq!(c.tick(), Duration::from_secs(1));
        let c = ThermalConfig::from_secs(0, 0, 4);
        assert_eq!((c.idle_warm, c.idle_cold), (None, None));
        assert_eq!(
            ThermalConfig::from_secs(300, 1800, 4).tick(),
            Duration::from_secs(5)
        );
    }
}
