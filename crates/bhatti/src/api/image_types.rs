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
