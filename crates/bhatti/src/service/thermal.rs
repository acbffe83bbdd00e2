//! Stop, start and the transparent wake-up of sandboxes saved to disk.
//!
//! Every transition of one sandbox holds that sandbox's own async lock, so
//! two requests that find it stopped restore it once and a stop never races
//! a start or a destroy. The engine work runs in a task of its own: a client
//! that goes away mid-way leaves no VM half saved or half restored.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use super::{view, Result, Service, ServiceError};
use crate::api::types::Sandbox;
use crate::engine::{VmRuntime, VmState};
use crate::store::{SandboxRecord, SandboxStatus, StoreError, User};

/// Statuses whose VM is saved to disk and comes back on use.
fn is_saved(status: SandboxStatus) -> bool {
    matches!(status, SandboxStatus::Stopped | SandboxStatus::Cold)
}

impl Service {
    /// Saves a running sandbox to disk and frees its RAM. Stopping a stopped
    /// sandbox succeeds.
    pub async fn stop_sandbox(&self, user: &User, id: &str) -> Result<Sandbox> {
        let rec = self.find(user, id).await?;
        let lock = self.thermal_lock(&rec.id).lock_owned().await;
        let rec = self.reload(&rec.id).await?;
        match rec.status {
            SandboxStatus::Running => {}
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
        self.proxy.forget_sandbox(&rec.id);
        let started = Instant::now();
        let (engine, store, sid) = (self.engine.clone(), self.store.clone(), rec.id.clone());
        detached(async move {
            let _lock = lock;
            engine.stop(&sid).await?;
            store
                .call(move |s| s.set_sandbox_status(&sid, SandboxStatus::Stopped))
                .await?;
            Ok(())
        })
        .await?;
        // Routes looked up while the VM was being saved go too.
        self.proxy.forget_sandbox(&rec.id);
        tracing::info!(sandbox = %rec.id, name = %rec.name, ms = started.elapsed().as_millis() as u64, "sandbox stopped");
        Ok(view(&SandboxRecord {
            status: SandboxStatus::Stopped,
            ..rec
        }))
    }

    /// Restores a stopped sandbox. Starting a running sandbox succeeds.
    pub async fn start_sandbox(&self, user: &User, id: &str) -> Result<Sandbox> {
        let rec = self.find(user, id).await?;
        match rec.status {
            SandboxStatus::Running => Ok(view(&rec)),
            s if is_saved(s) => Ok(view(&self.wake(rec).await?)),
            other => Err(ServiceError::Conflict(format!(
                "sandbox {} is {other}; only a stopped sandbox can be started",
                rec.name
            ))),
        }
    }

    /// Makes a sandbox saved to disk run again and returns its record as it
    /// is now; any other sandbox comes back unchanged.
    pub(super) async fn wake(&self, rec: SandboxRecord) -> Result<SandboxRecord> {
        if !is_saved(rec.status) {
            return Ok(rec);
        }
        let lock = self.thermal_lock(&rec.id).lock_owned().await;
        // Another request may have woken (or destroyed) it meanwhile.
        let rec = self.reload(&rec.id).await?;
        if !is_saved(rec.status) {
            return Ok(rec);
        }
        let started = Instant::now();
        let (engine, store, sid, from) = (
            self.engine.clone(),
            self.store.clone(),
            rec.id.clone(),
            rec.status,
        );
        let rt = VmRuntime {
            ip: rec.ip,
            token: rec.token.clone(),
        };
        detached(async move {
            let _lock = lock;
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
        tracing::info!(sandbox = %rec.id, name = %rec.name, ms = started.elapsed().as_millis() as u64, "sandbox started");
        Ok(SandboxRecord {
            status: SandboxStatus::Running,
            ..rec
        })
    }

    /// The lock that serializes stop, start, wake-up and destroy of one sandbox.
    pub(super) fn thermal_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .thermal_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    /// Forgets the lock of a destroyed sandbox.
    pub(super) fn drop_thermal_lock(&self, id: &str) {
        let mut locks = self
            .thermal_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.remove(id);
    }

    /// The sandbox's record as the store has it now.
    async fn reload(&self, id: &str) -> Result<SandboxRecord> {
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

/// Runs `work` to its end even if the caller's future is dropped.
async fn detached(work: impl Future<Output = Result<()>> + Send + 'static) -> Result<()> {
    tokio::spawn(work)
        .await
        .map_err(|e| ServiceError::Unavailable(format!("sandbox transition failed: {e}")))?
}
