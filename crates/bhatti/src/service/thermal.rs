//! Thermal states: hot (running), warm (vCPUs paused, RAM kept), cold or
//! stopped (saved to disk, no process). Stop, start, the idle transitions of
//! the manager (see [`idle`](super::idle)) and the transparent wake-up on use.
//!
//! Every transition of one sandbox holds that sandbox's own async lock, so
//! many requests that find it warm or cold wake it once (single-flight) and
//! a stop never races a start, a pause or a destroy. The engine work runs in
//! a task of its own: a client that goes away mid-way leaves no VM half
//! saved or half restored. At most `max_concurrent_restores` cold restores
//! run at once on the host.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::usage::{InFlight, ThermalConfig, TrackedDialer, UsageTable};
use super::{view, Result, Service, ServiceError};
use crate::engine::agent_client::AgentClient;
use crate::engine::{VmRuntime, VmState};
use crate::model::Sandbox;
use crate::store::{SandboxRecord, SandboxStatus, StoreError, User};

/// What the public proxy tells a client to wait when restores are saturated.
pub const RESTORE_RETRY_AFTER_SECS: u64 = 2;

/// Thermal bookkeeping of the service.
pub(crate) struct Thermal {
    pub(crate) cfg: ThermalConfig,
    pub(crate) usage: UsageTable,
    /// Permits for cold restores, host-wide.
    restores: Arc<Semaphore>,
    /// Failed saves to disk in a row, by sandbox id.
    pub(crate) save_failures: Mutex<std::collections::HashMap<String, u32>>,
}

impl Thermal {
    pub(crate) fn new(cfg: ThermalConfig) -> Self {
        Thermal {
            cfg,
            usage: UsageTable::default(),
            restores: Arc::new(Semaphore::new(cfg.max_concurrent_restores.max(1))),
            save_failures: Mutex::new(Default::default()),
        }
    }
}

/// Statuses whose VM is saved to disk and comes back on use.
fn is_saved(status: SandboxStatus) -> bool {
    matches!(status, SandboxStatus::Stopped | SandboxStatus::Cold)
}

/// Statuses a request wakes from.
fn needs_wake(status: SandboxStatus) -> bool {
    status == SandboxStatus::Warm || is_saved(status)
}

/// Whether a wake may wait for a restore permit or must give up at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WakeMode {
    Wait,
    /// The public proxy: answer 503 with Retry-After instead of queueing.
    NoWait,
}

/// The thermal state the API shows: hot, warm or cold; none while the
/// sandbox is being created or destroyed, or after an error.
pub fn thermal_of(status: SandboxStatus) -> Option<&'static str> {
    match status {
        SandboxStatus::Running => Some("hot"),
        SandboxStatus::Warm => Some("warm"),
        SandboxStatus::Cold | SandboxStatus::Stopped => Some("cold"),
        _ => None,
    }
}

fn unix_ms(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl Service {
    /// Sets the idle transitions (default: none).
    pub fn with_thermal(mut self, cfg: ThermalConfig) -> Self {
        self.thermal = Thermal::new(cfg);
        self
    }

    /// Counts a request on `rec` as in flight from now on. Taken under the
    /// sandbox's thermal lock, so the manager either sees it or has already
    /// finished its transition (which the caller then sees in the store).
    pub(super) async fn enter(&self, rec: &SandboxRecord) -> InFlight {
        let usage = self.thermal.usage.get(&rec.id, unix_ms(rec.last_active_at));
        let _lock = self.thermal_lock(&rec.id).lock_owned().await;
        InFlight::new(usage)
    }

    /// [`enter`](Self::enter) by id alone (before the record is read). A
    /// sandbox the table does not know yet starts with "used now", which
    /// the request is anyway.
    pub(super) async fn enter_id(&self, id: &str) -> InFlight {
        let usage = self.thermal.usage.get(id, super::usage::now_ms());
        let _lock = self.thermal_lock(id).lock_owned().await;
        InFlight::new(usage)
    }

    /// A client of the sandbox's agent whose connections count as in
    /// flight (and the client itself while it lives).
    pub(super) fn tracked_agent(&self, rec: &SandboxRecord, hold: InFlight) -> AgentClient {
        self.agent_of(rec)
            .wrap_dialer(|inner| Arc::new(TrackedDialer::new(inner, hold)))
    }

    /// Saves a running or warm sandbox to disk and frees its RAM. Stopping
    /// a stopped sandbox succeeds.
    pub async fn stop_sandbox(&self, user: &User, id: &str) -> Result<Sandbox> {
        let rec = self.find(user, id).await?;
        let lock = self.thermal_lock(&rec.id).lock_owned().await;
        let rec = self.reload(&rec.id).await?;
        match rec.status {
            SandboxStatus::Running | SandboxStatus::Warm => {}
            SandboxStatus::Stopped => return Ok(view(&rec)),
            SandboxStatus::Cold => {
                // Already on disk; an explicit stop only changes the label.
                let sid = rec.id.clone();
                self.store
                    .call(move |s| s.set_sandbox_status(&sid, SandboxStatus::Stopped))
                    .await?;
                return Ok(view(&SandboxRecord {
                    status: SandboxStatus::Stopped,
                    ..rec
                }));
            }
            other => {
                return Err(ServiceError::Conflict(format!(
                    "sandbox {} is {other}; only a running sandbox can be stopped",
                    rec.name
                )))
            }
        }
        self.save(lock, &rec, SandboxStatus::Stopped).await?;
        Ok(view(&SandboxRecord {
            status: SandboxStatus::Stopped,
            ..rec
        }))
    }

    /// Saves `rec`'s VM to disk and records `to` (stopped or cold). On
    /// failure the engine has resumed the VM: it is hot again, clock set.
    pub(super) async fn save(
        &self,
        lock: tokio::sync::OwnedMutexGuard<()>,
        rec: &SandboxRecord,
        to: SandboxStatus,
    ) -> Result<()> {
        self.proxy.forget_sandbox(&rec.id);
        let started = Instant::now();
        self.sync_volumes(rec).await;
        let (engine, store, sid) = (self.engine.clone(), self.store.clone(), rec.id.clone());
        let rt = runtime(rec);
        let was_warm = rec.status == SandboxStatus::Warm;
        detached(async move {
            let _lock = lock;
            if let Err(e) = engine.stop(&sid).await {
                if matches!(engine.state(&sid), VmState::Running) {
                    // Never leave a VM paused under a "running" label.
                    if let Err(re) = engine.resume(&sid, &rt).await {
                        tracing::warn!(sandbox = %sid, error = %re, "cannot resume the VM after a failed save");
                    }
                    let id = sid.clone();
                    store
                        .call(move |s| s.set_sandbox_status(&id, SandboxStatus::Running))
                        .await?;
                } else if was_warm {
                    tracing::warn!(sandbox = %sid, "VM gone after a failed save");
                }
                return Err(e.into());
            }
            store
                .call(move |s| s.set_sandbox_status(&sid, to))
                .await?;
            Ok(())
        })
        .await?;
        // Routes looked up while the VM was being saved go too.
        self.proxy.forget_sandbox(&rec.id);
        tracing::info!(sandbox = %rec.id, name = %rec.name, %to, ms = started.elapsed().as_millis() as u64, "sandbox saved to disk");
        Ok(())
    }

    /// Pauses a hot sandbox (warm). The caller holds its lock and checked
    /// that nothing is in flight.
    pub(super) async fn pause(
        &self,
        lock: tokio::sync::OwnedMutexGuard<()>,
        rec: &SandboxRecord,
    ) -> Result<()> {
        // A paused VM may be destroyed without running again.
        self.sync_volumes(rec).await;
        let (engine, store, sid) = (self.engine.clone(), self.store.clone(), rec.id.clone());
        let rt = runtime(rec);
        let started = Instant::now();
        detached(async move {
            let _lock = lock;
            engine.pause(&sid).await?;
            let id = sid.clone();
            let changed = store
                .call(move |s| {
                    s.set_sandbox_status_if(&id, SandboxStatus::Running, SandboxStatus::Warm)
                })
                .await;
            if !matches!(changed, Ok(true)) {
                // Destroyed or changed meanwhile: do not leave it paused.
                let _ = engine.resume(&sid, &rt).await;
            }
            changed?;
            Ok(())
        })
        .await?;
        // The public proxy's cached route must not reach a paused guest
        // (its next request wakes it). Pooled upstream connections stay:
        // TCP to a paused guest survives, and a new one costs the app an
        // accept (a thread spawn for Python's server under TCG: ~30 ms).
        self.proxy.routes.forget_sandbox(&rec.id);
        tracing::info!(sandbox = %rec.id, name = %rec.name, us = started.elapsed().as_micros() as u64, "sandbox warm (paused)");
        Ok(())
    }

    /// Restores a stopped, cold or warm sandbox. Starting a running sandbox
    /// succeeds.
    pub async fn start_sandbox(&self, user: &User, id: &str) -> Result<Sandbox> {
        let rec = self.find(user, id).await?;
        match rec.status {
            SandboxStatus::Running => Ok(view(&rec)),
            s if needs_wake(s) => Ok(view(&self.wake(rec, WakeMode::Wait).await?)),
            SandboxStatus::Error => Err(ServiceError::Conflict(format!(
                "sandbox {} is in status error: its VM died (crashed, or killed on the host) and cannot be started; destroy it and create a new one",
                rec.name
            ))),
            other => Err(ServiceError::Conflict(format!(
                "sandbox {} is in status {other}; only a stopped, warm or cold sandbox can be started",
                rec.name
            ))),
        }
    }

    /// Makes a warm, cold or stopped sandbox run again and returns its
    /// record as it is now; any other sandbox comes back unchanged.
    pub(super) async fn wake(&self, rec: SandboxRecord, mode: WakeMode) -> Result<SandboxRecord> {
        if !needs_wake(rec.status) {
            return Ok(rec);
        }
        let lock = self.thermal_lock(&rec.id).lock_owned().await;
        // Another request may have woken (or destroyed) it meanwhile.
        let rec = self.reload(&rec.id).await?;
        if !needs_wake(rec.status) {
            return Ok(rec);
        }
        let started = Instant::now();
        let (engine, store, sid, from) = (
            self.engine.clone(),
            self.store.clone(),
            rec.id.clone(),
            rec.status,
        );
        let rt = runtime(&rec);
        if from == SandboxStatus::Warm {
            detached(async move {
                let _lock = lock;
                let result = engine.resume(&sid, &rt).await;
                let status = match (&result, engine.state(&sid)) {
                    (_, VmState::Dead(_)) => SandboxStatus::Error,
                    // Running, even if only the clock could not be set.
                    _ => SandboxStatus::Running,
                };
                let id = sid.clone();
                store
                    .call(move |s| s.set_sandbox_status(&id, status))
                    .await?;
                if let Err(e) = result {
                    tracing::warn!(sandbox = %sid, error = %e, %status, "resume incomplete");
                    if status == SandboxStatus::Error {
                        return Err(e.into());
                    }
                }
                Ok(())
            })
            .await?;
            tracing::debug!(sandbox = %rec.id, us = started.elapsed().as_micros() as u64, "sandbox woken from warm");
            return Ok(SandboxRecord {
                status: SandboxStatus::Running,
                ..rec
            });
        }
        let permit = match mode {
            WakeMode::Wait => self
                .thermal
                .restores
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ServiceError::Unavailable("restores are shut down".into()))?,
            WakeMode::NoWait => match self.thermal.restores.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    return Err(ServiceError::Busy {
                        retry_after_secs: RESTORE_RETRY_AFTER_SECS,
                        message: format!(
                            "sandbox {} is being restored after other sandboxes; retry shortly",
                            rec.name
                        ),
                    })
                }
            },
        };
        detached(async move {
            let _lock = lock;
            let _permit = permit;
            let result = engine.start(&sid, &rt).await;
            // A failed restore that kept the state on disk leaves the sandbox
            // as it was; one that got further says what the VM is now.
            let status = match (&result, engine.state(&sid)) {
                (Ok(()), _) | (Err(_), VmState::Running) => SandboxStatus::Running,
                (Err(_), VmState::Stopped) => from,
                (Err(_), VmState::Dead(_)) => SandboxStatus::Error,
            };
            let id = sid.clone();
            store
                .call(move |s| s.set_sandbox_status(&id, status))
                .await?;
            if let Err(e) = &result {
                tracing::warn!(sandbox = %sid, error = %e, %status, "start failed");
            }
            Ok(result?)
        })
        .await?;
        tracing::info!(sandbox = %rec.id, name = %rec.name, ms = started.elapsed().as_millis() as u64, "sandbox restored from disk");
        Ok(SandboxRecord {
            status: SandboxStatus::Running,
            ..rec
        })
    }

    /// The lock that serializes stop, start, pause, wake-up and destroy of one sandbox.
    pub(super) fn thermal_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .thermal_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    /// Forgets the lock and usage of a destroyed sandbox.
    pub(super) fn drop_thermal_lock(&self, id: &str) {
        let mut locks = self
            .thermal_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.remove(id);
        self.thermal.usage.forget(id);
        if let Ok(mut f) = self.thermal.save_failures.lock() {
            f.remove(id);
        }
    }

    /// The sandbox's record as the store has it now.
    pub(super) async fn reload(&self, id: &str) -> Result<SandboxRecord> {
        let sid = id.to_string();
        self.store
            .call(move |s| s.get_sandbox(&sid))
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => ServiceError::NotFound(format!("no sandbox named {id}")),
                other => other.into(),
            })
    }
}

pub(super) fn runtime(rec: &SandboxRecord) -> VmRuntime {
    VmRuntime {
        ip: rec.ip,
        token: rec.token.clone(),
    }
}

/// Runs `work` to its end even if the caller's future is dropped.
pub(super) async fn detached(
    work: impl Future<Output = Result<()>> + Send + 'static,
) -> Result<()> {
    tokio::spawn(work)
        .await
        .map_err(|e| ServiceError::Unavailable(format!("sandbox transition failed: {e}")))?
}

/// How long since `ms` (unix ms), never negative.
pub(super) fn since_ms(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(super::usage::now_ms().saturating_sub(ms)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thermal_labels() {
        assert_eq!(thermal_of(SandboxStatus::Running), Some("hot"));
        assert_eq!(thermal_of(SandboxStatus::Warm), Some("warm"));
        assert_eq!(thermal_of(SandboxStatus::Cold), Some("cold"));
        assert_eq!(thermal_of(SandboxStatus::Stopped), Some("cold"));
        for s in [
            SandboxStatus::Creating,
            SandboxStatus::Error,
            SandboxStatus::Destroying,
        ] {
            assert_eq!(thermal_of(s), None);
        }
        assert!(needs_wake(SandboxStatus::Warm) && needs_wake(SandboxStatus::Cold));
        assert!(!needs_wake(SandboxStatus::Running));
    }
}
