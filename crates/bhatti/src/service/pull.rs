//! `image pull`: a background task that fetches an image from a registry
//! (see [`crate::registry`]) and imports it; clients poll its progress.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::{Result, Service, ServiceError};
use crate::model::images::{Image, Task};
use crate::registry::{Progress, Reference};
use crate::store::User;

/// How many finished tasks are kept for their clients to read.
const KEEP_FINISHED: usize = 64;

/// One pull.
pub(crate) struct PullTask {
    id: String,
    user_id: i64,
    progress: Arc<Progress>,
    outcome: Mutex<Option<std::result::Result<Image, String>>>,
}

/// The tasks of this daemon (memory only: a restart forgets them).
#[derive(Default)]
pub(crate) struct Tasks(Mutex<HashMap<String, Arc<PullTask>>>);

impl PullTask {
    fn view(&self) -> Task {
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (state, image, error) = match outcome {
            None => ("running", None, None),
            Some(Ok(img)) => ("done", Some(img), None),
            Some(Err(e)) => ("failed", None, Some(e)),
        };
        Task {
            id: self.id.clone(),
            kind: "pull".into(),
            state: state.into(),
            bytes_done: self.progress.done.load(Ordering::Relaxed),
            bytes_total: self.progress.total.load(Ordering::Relaxed),
            image,
            error,
        }
    }
}

/// The default image name of a reference: the repository's last part, and `-<tag>` unless `latest`.
fn default_name(r: &Reference) -> String {
    let base = r.repository.rsplit('/').next().unwrap_or("image");
    if r.reference == "latest" || r.reference.starts_with("sha256:") {
        base.to_string()
    } else {
        format!("{base}-{}", r.reference)
    }
}

fn registry_client() -> std::result::Result<reqwest::Client, String> {
    let tls = crate::cli::tls::client_config().map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .connect_timeout(std::time::Duration::from_secs(15))
        .user_agent(concat!("bhatti/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

impl Service {
    /// Starts pulling `reference` into the image `name` and returns the task at once.
    ///
    /// Errors (before anything starts): `Invalid` for the reference or name, `Conflict` for a taken name.
    pub async fn pull_image(
        self: &Arc<Self>,
        user: &User,
        reference: &str,
        name: Option<&str>,
    ) -> Result<Task> {
        let r = Reference::parse(reference).map_err(|e| ServiceError::Invalid(e.to_string()))?;
        let name = name.map(str::to_string).unwrap_or_else(|| default_name(&r));
        self.check_image_name(user, &name).await?;
        self.storage_room(user).await?;
        let http = registry_client().map_err(ServiceError::Unavailable)?;
        let work = self.import_dir()?;
        let task = Arc::new(PullTask {
            id: format!("task-{}", &crate::store::generate_volume_id()[4..]),
            user_id: user.id,
            progress: Arc::new(Progress::default()),
            outcome: Mutex::new(None),
        });
        {
            let mut all = self.tasks.0.lock().unwrap_or_else(|p| p.into_inner());
            if all.len() >= KEEP_FINISHED {
                let done: Vec<String> = all
                    .iter()
                    .filter(|(_, t)| t.outcome.lock().map(|o| o.is_some()).unwrap_or(true))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in done {
                    all.remove(&k);
                }
            }
            all.insert(task.id.clone(), task.clone());
        }
        let (svc, t, user) = (self.clone(), task.clone(), user.clone());
        tokio::spawn(async move {
            let layout = work.0.join("layout");
            let source = format!("pull {reference_text}", reference_text = format_ref(&r));
            let result = async {
                crate::registry::pull(http, &r, &layout, t.progress.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                svc.import_image(&user, &name, &work, &source)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            match &result {
                Ok(img) => tracing::info!(task = %t.id, image = %img.name, "pull done"),
                Err(e) => tracing::warn!(task = %t.id, error = %e, "pull failed"),
            }
            *t.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            drop(work);
        });
        Ok(task.view())
    }

    /// One of the caller's tasks.
    pub fn get_task(&self, user: &User, id: &str) -> Result<Task> {
        let all = self.tasks.0.lock().unwrap_or_else(|p| p.into_inner());
        all.get(id)
            .filter(|t| t.user_id == user.id)
            .map(|t| t.view())
            .ok_or_else(|| ServiceError::NotFound(format!("no task {id}")))
    }
}

fn format_ref(r: &Reference) -> String {
    let sep = if r.reference.starts_with("sha256:") {
        '@'
    } else {
        ':'
    };
    format!("{}/{}{sep}{}", r.registry, r.repository, r.reference)
}
