//! JSON shapes of the custom image routes (`/images`).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `POST /images/save`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SaveImageRequest {
    /// Id or name of the sandbox whose disk becomes the image (it keeps running).
    pub sandbox: String,
    /// Image name, unique among the caller's images (sandbox name rules).
    pub name: String,
}

/// Query of `POST /images/import` (the body is the tarball).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
pub struct ImportImageQuery {
    /// Image name, unique among the caller's images.
    pub name: String,
}

/// A custom base image sandboxes can be created from (`image` of `POST /sandboxes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub id: String,
    pub name: String,
    /// `user` (the caller's own) or `operator` (visible to every user, read-only).
    pub owner: String,
    /// Where it came from: `save <sandbox>`, `import`, `pull <reference>`.
    pub source: String,
    /// Host bytes of its (sparse) file, counted against the owner's storage quota.
    pub size_bytes: u64,
    /// RFC 3339.
    pub created_at: String,
}

/// `POST /images/pull`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct PullImageRequest {
    /// `[registry/]repository[:tag|@sha256:…]`; no registry: Docker Hub.
    pub reference: String,
    /// Image name [default: the repository's last part, plus `-<tag>` unless `latest`].
    pub name: Option<String>,
}

/// A background task (`GET /tasks/{id}`): an image pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub id: String,
    /// `pull`.
    pub kind: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Layer bytes fetched so far.
    pub bytes_done: u64,
    /// Layer bytes in all (0 until the manifest is read).
    pub bytes_total: u64,
    /// The image, once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
