//! The thermal manager: a loop over the sandboxes that pauses idle hot ones
//! (warm) and saves warm ones to disk (cold).
//!
//! Hot → warm when the host (last request, proxied request or shell) and
//! the guest agent (its own last activity) have both been idle for
//! `idle_warm`, nothing is in flight on the host (requests, agent
//! connections: a buffered exec of a quiet long command holds one) and no
//! client is attached in the guest. Background processes alone do not keep
//! a sandbox hot. Warm → cold once it has been idle for `idle_cold` more,
//! i.e. `idle_warm + idle_cold` after the last activity (with warm
//! disabled: hot → cold directly after `idle_cold`).
//! Both clocks come from `last_active_at` in the store, which the manager
//! keeps current, so a restarted daemon resumes them. `keep_hot` sandboxes are
//! left alone. A save that fails leaves the sandbox hot; after
//! [`MAX_SAVE_FAILURES`] in a row it stays hot until the daemon restarts.

use std::sync::Arc;
use std::time::Duration;

use super::thermal::since_ms;
use super::usage::now_ms;
use super::Service;
use crate::store::{SandboxRecord, SandboxStatus};

/// Failed saves in a row after which a sandbox is left hot.
pub const MAX_SAVE_FAILURES: u32 = 3;
/// How long the guest may take to say how idle it is.
const ACTIVITY_TIMEOUT: Duration = Duration::from_secs(2);
/// In-memory use newer than the store's by this much is written back.
const PERSIST_AFTER: Duration = Duration::from_secs(2);

fn unix_ms(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl Service {
    /// Runs the thermal manager until the daemon ends; returns at once when
    /// both steps are disabled.
    pub async fn thermal_manager(self: Arc<Self>) {
        let cfg = self.thermal.cfg;
        if cfg.idle_warm.is_none() && cfg.idle_cold.is_none() {
            tracing::info!("thermal manager off (idle_warm_secs and idle_cold_secs are 0)");
            return;
        }
        tracing::info!(warm = ?cfg.idle_warm, cold = ?cfg.idle_cold, tick = ?cfg.tick(), "thermal manager running");
        let mut tick = tokio::time::interval(cfg.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let all = match self.store.call(|s| s.list_all_sandboxes()).await {
                Ok(all) => all,
                Err(e) => {
                    tracing::warn!(error = %e, "thermal manager: cannot list sandboxes");
                    continue;
                }
            };
            for rec in all {
                match rec.status {
                    SandboxStatus::Running | SandboxStatus::Warm => {}
                    _ => continue,
                }
                // Each sandbox on its own: a slow save must not hold up the others.
                let this = self.clone();
                tokio::spawn(async move { this.consider(rec).await });
            }
        }
    }

    /// One look at one sandbox: persist its use, cool it one step if due.
    async fn consider(&self, rec: SandboxRecord) {
        let cfg = self.thermal.cfg;
        let usage = self.thermal.usage.get(&rec.id, unix_ms(rec.last_active_at));
        let stored_ms = unix_ms(rec.last_active_at);
        let last_ms = usage.last_use_ms().max(stored_ms);
        if last_ms - stored_ms > PERSIST_AFTER.as_millis() as i64 {
            let sid = rec.id.clone();
            let at =
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(last_ms) * 1_000_000)
                    .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
            let _ = self.store.call(move |s| s.set_last_active(&sid, at)).await;
        }
        if rec.keep_hot || self.save_failures(&rec.id) >= MAX_SAVE_FAILURES {
            return;
        }
        match rec.status {
            SandboxStatus::Running => {
                let (step, to) = match (cfg.idle_warm, cfg.idle_cold) {
                    (Some(w), _) => (w, SandboxStatus::Warm),
                    (None, Some(c)) => (c, SandboxStatus::Cold),
                    (None, None) => return,
                };
                if usage.in_flight() > 0 || since_ms(last_ms) < step {
                    return;
                }
                if !self.guest_idle(&rec, step).await {
                    return;
                }
                let Ok(lock) = self.thermal_lock(&rec.id).try_lock_owned() else {
                    return; // a transition or a request is entering
                };
                // Checked again under the lock: a request enters under it.
                if usage.in_flight() > 0 || since_ms(usage.last_use_ms().max(stored_ms)) < step {
                    return;
                }
                let Ok(rec) = self.reload(&rec.id).await else {
                    return;
                };
                if rec.status != SandboxStatus::Running || rec.keep_hot {
                    return;
                }
                let result = if to == SandboxStatus::Warm {
                    self.pause(lock, &rec).await
                } else {
                    self.save(lock, &rec, SandboxStatus::Cold).await
                };
                self.note_result(&rec, to, result);
            }
            SandboxStatus::Warm => {
                let Some(cold) = cfg.idle_cold else { return };
                // Counted from when it went warm (the status change stamps
                // `updated_at`), not from the last use: a sandbox that was
                // kept hot long after its last use still stays warm this long.
                let warm_at = unix_ms(rec.updated_at)
                    .max(last_ms + cfg.idle_warm.unwrap_or_default().as_millis() as i64);
                if since_ms(warm_at) < cold {
                    return;
                }
                let Ok(lock) = self.thermal_lock(&rec.id).try_lock_owned() else {
                    return;
                };
                let Ok(rec) = self.reload(&rec.id).await else {
                    return;
                };
                if rec.status != SandboxStatus::Warm || rec.keep_hot {
                    return;
                }
                let result = self.save(lock, &rec, SandboxStatus::Cold).await;
                self.note_result(&rec, SandboxStatus::Cold, result);
            }
            _ => {}
        }
    }

    /// Whether the guest has been idle for `step` with no client attached.
    /// A guest that does not answer is not paused (it may be busy).
    async fn guest_idle(&self, rec: &SandboxRecord, step: Duration) -> bool {
        let agent = self.agent_of(rec);
        match tokio::time::timeout(ACTIVITY_TIMEOUT, agent.activity()).await {
            Ok(Ok(a)) => {
                let idle_ms = now_ms().saturating_sub(a.last_activity_unix.saturating_mul(1000));
                a.attached_sessions == 0 && idle_ms >= step.as_millis() as i64
            }
            Ok(Err(e)) => {
                tracing::debug!(sandbox = %rec.id, error = %e, "thermal manager: activity query failed");
                false
            }
            Err(_) => false,
        }
    }

    fn save_failures(&self, id: &str) -> u32 {
        self.thermal
            .save_failures
            .lock()
            .map(|f| f.get(id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn note_result(&self, rec: &SandboxRecord, to: SandboxStatus, result: super::Result<()>) {
        let Ok(mut failures) = self.thermal.save_failures.lock() else {
            return;
        };
        match result {
            Ok(()) => {
                if to == SandboxStatus::Cold {
                    failures.remove(&rec.id);
                }
            }
            Err(e) if to == SandboxStatus::Cold => {
                let n = failures.entry(rec.id.clone()).or_insert(0);
                *n += 1;
                if *n >= MAX_SAVE_FAILURES {
                    tracing::error!(sandbox = %rec.id, name = %rec.name, failures = *n, error = %e,
                        "saving the idle sandbox to disk failed {MAX_SAVE_FAILURES} times; it stays hot until the daemon restarts (nothing is lost)");
                } else {
                    tracing::warn!(sandbox = %rec.id, name = %rec.name, failures = *n, error = %e,
                        "saving the idle sandbox to disk failed; it is hot again and will be retried");
                }
            }
            Err(e) => {
                tracing::warn!(sandbox = %rec.id, name = %rec.name, error = %e, "pausing the idle sandbox failed")
            }
        }
    }
}
