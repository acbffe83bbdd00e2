//! `inspect`: one sandbox and what it uses, without waking it.

use super::{view, Result, Service};
use crate::model::volumes::SandboxVolume;
use crate::model::SandboxDetail;
use crate::store::{SandboxStatus, User};

impl Service {
    /// The sandbox, its host disk use, its published ports, custom image and
    /// volumes and, while it is hot, its sessions. Never wakes a warm or cold sandbox.
    ///
    /// Errors: `NotFound` for an unknown (or another user's) sandbox.
    pub async fn inspect_sandbox(&self, user: &User, id: &str) -> Result<SandboxDetail> {
        let rec = self.find(user, id).await?;
        let disk_bytes = match self.engine.disk_usage(&rec.id) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::debug!(sandbox = %rec.id, error = %e, "disk usage");
                None
            }
        };
        let published = self.list_published(user, &rec.id).await?;
        let sid = rec.id.clone();
        let (image, volumes) = self
            .store
            .call(move |s| Ok((s.sandbox_image_name(&sid)?, s.sandbox_volumes(&sid)?)))
            .await?;
        let volumes = volumes
            .into_iter()
            .map(|a| SandboxVolume {
                volume: a.volume_name,
                mount: a.mount_path,
                read_only: a.read_only,
            })
            .collect();
        let sessions = if rec.status == SandboxStatus::Running {
            // Hot already: asking costs no wake. A failure only leaves it out.
            match self.agent(user, &rec.id).await {
                Ok(agent) => agent
                    .sessions()
                    .await
                    .ok()
                    .map(|l| l.into_iter().map(super::sessions::session).collect()),
                Err(_) => None,
            }
        } else {
            None
        };
        Ok(SandboxDetail {
            sandbox: view(&rec),
            disk_bytes,
            published,
            sessions,
            egress_off: !self.uplink,
            image,
            volumes,
        })
    }
}
