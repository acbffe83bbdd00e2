//! Pulling an image from an OCI distribution registry over HTTPS into an
//! OCI image layout on disk (`oci::layout_to_tree` takes it from there).
//!
//! Authentication: anonymous, or the registry's bearer-token challenge
//! (`WWW-Authenticate: Bearer realm=…,service=…,scope=…`) answered
//! anonymously (public images). Blobs are checked against their sha256 digest.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Client, Response, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Errors of a pull; each message names the registry, repository or blob.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{0}")]
    Registry(String),
    #[error("{0}")]
    Io(String),
}

/// `registry/repository:tag` or `…@sha256:…`, resolved against Docker Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    pub repository: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl Reference {
    /// Parses `[registry/]name[:tag|@digest]`; no registry means Docker Hub
    /// (`library/` for one-part names); no tag means `latest`.
    pub fn parse(s: &str) -> Result<Reference, PullError> {
        let bad = |why: &str| PullError::Reference(s.to_string(), why.to_string());
        if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("empty, too long or with spaces"));
        }
        let (name, reference) = match s.split_once('@') {
            Some((n, d)) => (n, d.to_string()),
            None => {
                let last_slash = s.rfind('/').map_or(0, |i| i + 1);
                match s[last_slash..].rfind(':') {
                    Some(i) => (&s[..last_slash + i], s[last_slash + i + 1..].to_string()),
                    None => (s, "latest".to_string()),
                }
            }
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ if !name.contains('/') => (
                "registry-1.docker.io".to_string(),
                format!("library/{name}"),
            ),
            _ => ("registry-1.docker.io".to_string(), name.to_string()),
        };
        // `host[:port]`: a port is 1-65535.
        if let Some((host, port)) = registry.rsplit_once(':') {
            if host.is_empty() || !port.parse::<u16>().is_ok_and(|p| p > 0) {
                return Err(bad("registry port must be 1-65535"));
            }
        }
        // Each part starts and ends with [a-z0-9], so `.` and `..` are no parts.
        let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
        let ok_repo = !repository.is_empty()
            && repository.split('/').all(|c| {
                c.starts_with(alnum)
                    && c.ends_with(alnum)
                    && c.chars().all(|ch| alnum(ch) || "._-".contains(ch))
            });
        if !ok_repo {
            return Err(bad(
                "repository must be lowercase [a-z0-9._-] parts separated by /, \
                 each starting and ending with a letter or digit",
            ));
        }
        let ok_ref = if let Some(hex) = reference.strip_prefix("sha256:") {
            hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())
        } else {
            !reference.is_empty()
                && reference.len() <= 128
                && reference
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        if !ok_ref {
            return Err(bad("bad tag or digest"));
        }
        Ok(Reference {
            registry,
            repository,
            reference,
        })
    }
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

#[derive(Deserialize)]
struct Desc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Plat>,
}

#[derive(Deserialize)]
struct Plat {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<Desc>,
    #[serde(default)]
    layers: Vec<Desc>,
    #[serde(default)]
    config: Option<Desc>,
}

/// Progress of a pull: bytes of layers fetched so far, and in all.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// One registry session: the HTTP client and the bearer token once got.
pub struct Puller {
    http: Client,
    base: String,
    token: Option<String>,
}

fn reg_err(what: &str, e: impl std::fmt::Display) -> PullError {
    PullError::Registry(format!("{what}: {e}"))
}

/// `key="value"` pairs of a `WWW-Authenticate: Bearer …` challenge.
fn challenge_params(h: &str) -> Option<Vec<(String, String)>> {
    let rest = h.trim().strip_prefix("Bearer ")?;
    let mut out = Vec::new();
    let mut s = rest;
    while !s.is_empty() {
        let (k, v) = s.split_once('=')?;
        let v = v.trim_start();
        let (val, tail) = if let Some(q) = v.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            match v.find(',') {
                Some(i) => (&v[..i], &v[i..]),
                None => (v, ""),
            }
        };
        out.push((k.trim().to_string(), val.to_string()));
        s = tail.trim_start_matches([',', ' ']);
    }
    Some(out)
}

impl Puller {
    /// A session with registry `registry` (`host[:port]`, HTTPS) using `http`.
    pub fn new(http: Client, registry: &str) -> Puller {
        Puller {
            http,
            base: format!("https://{registry}"),
            token: None,
        }
    }

    /// GET with the token; on a 401 answers the bearer challenge once and retries.
    async fn get(&mut self, url: &str, accept: Option<&str>) -> Result<Response, PullError> {
        for attempt in 0..2 {
            let mut rb = self.http.get(url);
            if let Some(a) = accept {
                rb = rb.header(ACCEPT, a);
            }
            if let Some(t) = &self.token {
                rb = rb.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let resp = rb.send().await.map_err(|e| reg_err(url, e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                if !resp.status().is_success() {
                    let status = resp.status();
                    let body = resp.text().await.unwrap_or_default();
                    return Err(PullError::Registry(format!(
                        "{url}: {status}: {}",
                        body.chars().take(300).collect::<String>()
                    )));
                }
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|h| h.to_str().ok())
                .and_then(challenge_params)
                .ok_or_else(|| {
                    PullError::Registry(format!(
                        "{url}: 401 without a bearer challenge (only token auth is supported)"
                    ))
                })?;
            self.token = Some(self.fetch_token(&challenge).await?);
        }
        Err(PullError::Registry(format!("{url}: still unauthorized")))
    }

    async fn fetch_token(&self, params: &[(String, String)]) -> Result<String, PullError> {
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| PullError::Registry("bearer challenge without realm".into()))?;
        let mut url = reqwest::Url::parse(&realm).map_err(|e| reg_err("token realm", e))?;
        let loopback = url.host_str().is_some_and(|h| {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err(PullError::Registry(format!(
                "token realm {realm} is not https"
            )));
        }
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in params
                .iter()
                .filter(|(k, _)| k == "service" || k == "scope")
            {
                q.append_pair(k, v);
            }
        }
        #[derive(Deserialize)]
        struct Tok {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| reg_err("token request", e))?;
        if !resp.status().is_success() {
            return Err(PullError::Registry(format!(
                "token server {realm} answered {}",
                resp.status()
            )));
        }
        let t: Tok = resp.json().await.map_err(|e| reg_err("token answer", e))?;
        t.token
            .or(t.access_token)
            .ok_or_else(|| PullError::Registry("token answer without a token".into()))
    }

    /// Fetches manifest `reference` of `repo` and stores it as a blob in `dir`; returns its bytes and digest.
    async fn manifest(
        &mut self,
        repo: &str,
        reference: &str,
        dir: &Path,
    ) -> Result<(Manifest, String, Vec<u8>), PullError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let resp = self.get(&url, Some(MANIFEST_TYPES)).await?;
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = resp.bytes().await.map_err(|e| reg_err(&url, e))?.to_vec();
        if bytes.len() > 4 << 20 {
            return Err(PullError::Registry(format!("{url}: manifest too large")));
        }
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if reference.starts_with("sha256:") && reference != digest {
            return Err(PullError::Registry(format!(
                "{url}: manifest digest {digest} does not match"
            )));
        }
        let mut m: Manifest = serde_json::from_slice(&bytes).map_err(|e| reg_err("manifest", e))?;
        if m.media_type.is_empty() {
            m.media_type = ctype;
        }
        write_blob(dir, &digest, &bytes).await?;
        Ok((m, digest, bytes))
    }

    /// Downloads blob `digest` into the layout at `dir`, checking its digest.
    async fn blob(
        &mut self,
        repo: &str,
        digest: &str,
        dir: &Path,
        progress: &Progress,
    ) -> Result<(), PullError> {
        let path =
            crate::oci::blob_path(dir, digest).map_err(|e| PullError::Registry(e.to_string()))?;
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let resp = self.get(&url, None).await?;
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| PullError::Io(format!("{}: {e}", parent.display())))?;
        }
        let mut f = tokio::fs::File::create(&path)
            .await
            .map_err(|e| PullError::Io(format!("{}: {e}", path.display())))?;
        let mut hash = Sha256::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| reg_err(&url, e))?;
            hash.update(&chunk);
            progress
                .done
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            f.write_all(&chunk)
                .await
                .map_err(|e| PullError::Io(format!("{}: {e}", path.display())))?;
        }
        f.flush()
            .await
            .map_err(|e| PullError::Io(format!("{}: {e}", path.display())))?;
        let got = format!("sha256:{}", hex::encode(hash.finalize()));
        if got != digest {
            return Err(PullError::Registry(format!(
                "blob {digest} arrived with digest {got}"
            )));
        }
        Ok(())
    }
}

async fn write_blob(dir: &Path, digest: &str, bytes: &[u8]) -> Result<(), PullError> {
    let path =
        crate::oci::blob_path(dir, digest).map_err(|e| PullError::Registry(e.to_string()))?;
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| PullError::Io(format!("{}: {e}", parent.display())))?;
    }
    tokio::fs::write(&path, bytes)
        .await
        .map_err(|e| PullError::Io(format!("{}: {e}", path.display())))
}

/// Pulls `r` into an OCI image layout at `dir` (linux/amd64 from a list),
/// counting layer bytes in `progress`.
pub async fn pull(
    http: Client,
    r: &Reference,
    dir: &Path,
    progress: Arc<Progress>,
) -> Result<(), PullError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| PullError::Io(format!("{}: {e}", dir.display())))?;
    let mut p = Puller::new(http, &r.registry);
    let (mut m, mut digest, mut bytes) = p.manifest(&r.repository, &r.reference, dir).await?;
    for _ in 0..3 {
        if m.manifests.is_empty() {
            break;
        }
        let pick = m
            .manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_none_or(|pl| pl.os == "linux" && pl.architecture == "amd64")
            })
            .ok_or_else(|| PullError::Registry("no linux/amd64 image in the manifest list".into()))?
            .digest
            .clone();
        (m, digest, bytes) = p.manifest(&r.repository, &pick, dir).await?;
    }
    if m.layers.is_empty() {
        return Err(PullError::Registry(format!(
            "manifest {digest} ({}) lists no layers",
            m.media_type
        )));
    }
    progress
        .total
        .store(m.layers.iter().map(|l| l.size).sum(), Ordering::Relaxed);
    if let Some(c) = &m.config {
        let _ = &c.media_type;
        p.blob(&r.repository, &c.digest, dir, &Progress::default())
            .await?;
    }
    for l in &m.layers {
        p.blob(&r.repository, &l.digest, dir, &progress).await?;
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": if m.media_type.is_empty() { "application/vnd.oci.image.manifest.v1+json" } else { m.media_type.as_str() },
            "digest": digest,
            "size": bytes.len(),
        }],
    });
    tokio::fs::write(dir.join("index.json"), index.to_string())
        .await
        .map_err(|e| PullError::Io(format!("index.json: {e}")))?;
    tokio::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .await
        .map_err(|e| PullError::Io(format!("oci-layout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("debian").expect("hub");
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("registry-1.docker.io", "library/debian", "latest")
        );
        let r = Reference::parse("127.0.0.1:5000/team/app:v1.2").expect("local");
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "team/app", "v1.2")
        );
        let d = format!("ghcr.io/x/y@sha256:{}", "a".repeat(64));
        assert_eq!(
            Reference::parse(&d).expect("digest").reference,
            format!("sha256:{}", "a".repeat(64))
        );
        for bad in [
            "",
            "UPPER/x",
            "x:",
            "a b",
            "x@sha256:12",
            "localhost:5000/",
            "localhost:5000/../x",
            "localhost:5000/a/../b",
            "registry.example:99999/x",
            "registry.example:0/x",
            "registry.example:http/x",
            "team/./app",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_challenges() {
        let p = challenge_params(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        )
        .expect("params");
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull".into()));
        assert!(challenge_params("Basic realm=x").is_none());
    }
}
