//! Container images as root filesystems: a `docker save` tarball or an OCI
//! image layout, unpacked layer by layer (whiteouts applied) into a
//! directory, then made bootable as a bhatti guest.
//!
//! Blocking code (big files, many syscalls): call it from `spawn_blocking`.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// Errors of reading or unpacking an image.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The archive is neither a `docker save` tarball nor an OCI layout, or
    /// is inconsistent; the message says what is wrong.
    #[error("not a usable image: {0}")]
    Format(String),
    /// The layers unpack to more than the bytes the caller may still use.
    #[error("the image unpacks to more than the {limit_mb} MB left of your storage quota")]
    TooBig { limit_mb: u64 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `msg` without the host directory `dir` (the tar crate names the paths
/// it writes to): errors about an archive go to its uploader.
fn scrub(msg: &str, dir: &Path) -> String {
    match dir.to_str() {
        Some(d) if !d.is_empty() => msg.replace(d, "<image>"),
        _ => msg.to_string(),
    }
}

/// Unpacks the outer archive (`docker save` or an OCI layout as a tar) into
/// `dir`, its files taking at most `limit` bytes (a sparse entry counts in
/// full: an upload must not unpack to more than its owner may store).
///
/// Errors: `Format` for what is not a tar; `TooBig` past the limit.
pub fn unpack_archive(archive: &Path, dir: &Path, limit: u64) -> Result<(), OciError> {
    let f = File::open(archive).map_err(io(archive))?;
    let mut a = tar::Archive::new(BufReader::new(f));
    a.set_preserve_permissions(false);
    let bad = |e: std::io::Error| {
        OciError::Format(format!(
            "the archive cannot be unpacked as a tar: {}",
            scrub(&e.to_string(), dir)
        ))
    };
    let mut budget = Budget::new(limit);
    for entry in a.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        budget.charge(entry.size())?;
        // `false`: a path leaving `dir`, skipped (the layers are looked up by name).
        entry.unpack_in(dir).map_err(bad)?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

/// An OCI image index or manifest (the fields we read).
#[derive(Deserialize)]
struct OciDoc {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The file of blob `digest` (`sha256:<hex>`) in an OCI layout at `dir`.
pub fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| OciError::Format(format!("bad digest {digest:?}")))?;
    if alg != "sha256" || hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(OciError::Format(format!("unsupported digest {digest:?}")));
    }
    Ok(dir.join("blobs").join(alg).join(hex))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, OciError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    // The file's name only: the message goes to the client, the work dir is the host's.
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    serde_json::from_slice(&bytes).map_err(|e| OciError::Format(format!("{name}: {e}")))
}

/// Whether a manifest-list entry is for this host's platform (or names none).
fn for_us(d: &Descriptor) -> bool {
    d.platform
        .as_ref()
        .is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
}

/// The layer files of the image in `dir`, lowest first: a `docker save`
/// tarball's `manifest.json`, or an OCI layout's `index.json` (through a
/// manifest list, picking linux/amd64).
pub fn layer_files(dir: &Path) -> Result<Vec<PathBuf>, OciError> {
    let index = dir.join("index.json");
    if index.is_file() {
        let mut doc: OciDoc = read_json(&index)?;
        // Index → (index →)* manifest, at most a few levels deep.
        for _ in 0..4 {
            if !doc.layers.is_empty() {
                return doc
                    .layers
                    .iter()
                    .map(|l| blob_path(dir, &l.digest))
                    .collect();
            }
            let next =
                doc.manifests.iter().find(|m| for_us(m)).ok_or_else(|| {
                    OciError::Format("no linux/amd64 manifest in the index".into())
                })?;
            let _ = &next.media_type;
            doc = read_json(&blob_path(dir, &next.digest)?)?;
        }
        return Err(OciError::Format("manifest nesting too deep".into()));
    }
    let manifest = dir.join("manifest.json");
    if manifest.is_file() {
        let m: Vec<DockerManifest> = read_json(&manifest)?;
        let first = m
            .first()
            .ok_or_else(|| OciError::Format("manifest.json lists no image".into()))?;
        return first
            .layers
            .iter()
            .map(|l| {
                let rel = safe_relative(Path::new(l))
                    .ok_or_else(|| OciError::Format(format!("bad layer path {l:?}")))?;
                Ok(dir.join(rel))
            })
            .collect();
    }
    Err(OciError::Format(
        "neither manifest.json (docker save) nor index.json (OCI layout) found".into(),
    ))
}

/// `p` without `.`/root prefixes; `None` if it climbs out (`..`).
fn safe_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Opens a layer, gunzipping it if it is compressed.
fn open_layer(path: &Path) -> Result<Box<dyn Read>, OciError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(io(path))?;
    f.rewind().map_err(io(path))?;
    let r = BufReader::new(f);
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::GzDecoder::new(r)))
    } else {
        Ok(Box::new(r))
    }
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Removes `path` whatever it is, without following a symlink.
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether no component of `rel` below `root` is a symlink (a whiteout must
/// not reach through one out of the tree).
fn no_symlink_on_the_way(root: &Path, rel: &Path) -> bool {
    let mut p = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        p.push(c);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return false;
        }
    }
    true
}

/// Applies one layer onto `root`: its whiteouts first (they hide what lower
/// layers put there), then its files. `budget` is the bytes the files may
/// still take (sum of entry sizes over all layers); each file is charged
/// before it is written.
///
/// Errors: `Format` for a layer that is not a usable tar (the message names
/// no host path); `TooBig` as soon as the budget is passed.
pub fn apply_layer(layer: &Path, root: &Path, budget: &mut Budget) -> Result<(), OciError> {
    let bad = |e: std::io::Error| {
        OciError::Format(format!(
            "a layer is not a usable tar: {}",
            scrub(&e.to_string(), root)
        ))
    };
    // Pass 1: whiteouts.
    let mut a = tar::Archive::new(open_layer(layer)?);
    for entry in a.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with(WHITEOUT) {
            continue;
        }
        let rel = safe_relative(&path)
            .ok_or_else(|| OciError::Format(format!("whiteout {path:?} climbs out")))?;
        if !no_symlink_on_the_way(root, &rel) {
            continue;
        }
        let dir = root.join(rel.parent().unwrap_or(Path::new("")));
        if name == OPAQUE {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    remove_any(&e.path()).map_err(io(&e.path()))?;
                }
            }
        } else {
            let target = dir.join(&name[WHITEOUT.len()..]);
            remove_any(&target).map_err(io(&target))?;
        }
    }
    // Pass 2: everything else. `unpack_in` refuses paths that leave `root`.
    let mut a = tar::Archive::new(open_layer(layer)?);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_overwrite(true);
    a.set_unpack_xattrs(false);
    for entry in a.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(WHITEOUT))
        {
            continue;
        }
        let climbs_out = || {
            OciError::Format(format!(
                "the archive's entry {path:?} leaves the image's root (..); refused"
            ))
        };
        let rel = safe_relative(&path).ok_or_else(climbs_out)?;
        // A directory replacing a file (or the reverse) replaces it.
        let dst = root.join(&rel);
        if let Ok(m) = std::fs::symlink_metadata(&dst) {
            let is_dir = entry.header().entry_type().is_dir();
            if m.is_dir() != is_dir && no_symlink_on_the_way(root, &rel) {
                remove_any(&dst).map_err(io(&dst))?;
            }
        }
        // The size the file will have (a sparse entry counts in full).
        budget.charge(entry.size())?;
        // `false`: the tar crate skipped a path that leaves `root`.
        if !entry.unpack_in(root).map_err(bad)? {
            return Err(climbs_out());
        }
    }
    Ok(())
}

/// Bytes an unpacked tree may still take.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    left: u64,
    limit: u64,
}

impl Budget {
    /// At most `limit` bytes in all.
    pub fn new(limit: u64) -> Self {
        Budget { left: limit, limit }
    }

    /// Takes `bytes` from what is left.
    ///
    /// Errors: `TooBig` when that passes the limit.
    fn charge(&mut self, bytes: u64) -> Result<(), OciError> {
        self.left = self.left.checked_sub(bytes).ok_or(OciError::TooBig {
            limit_mb: self.limit >> 20,
        })?;
        Ok(())
    }
}

/// What [`make_bootable`] added, for the log and the docs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Added(pub Vec<String>);

fn append(path: &Path, line: &str, added: &mut Added) -> Result<(), OciError> {
    use std::io::Write;
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    added.0.push(format!("{}: {line}", path.display()));
    Ok(())
}

fn has_entry(path: &Path, pred: impl Fn(&[&str]) -> bool) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| pred(&l.split(':').collect::<Vec<_>>()))
}

/// Adds what the guest needs and the image lacks, changing nothing that is
/// there: the `lohar` user and group (uid/gid 1000, home /home/lohar) unless
/// uid 1000 exists, /workspace (owned by 1000), a sudo rule for `lohar` when
/// sudo is installed, and an empty /etc/resolv.conf (lohar writes it at
/// boot). The guest agent itself travels in the initramfs.
pub fn make_bootable(root: &Path) -> Result<Added, OciError> {
    let mut added = Added::default();
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).map_err(io(&etc))?;
    let passwd = etc.join("passwd");
    let uid_taken = has_entry(&passwd, |f| f.get(2) == Some(&"1000"));
    let named = has_entry(&passwd, |f| f.first() == Some(&"lohar"));
    if !uid_taken && !named {
        let shell = if root.join("bin/bash").exists() || root.join("usr/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        append(
            &passwd,
            &format!("lohar:x:1000:1000:bhatti:/home/lohar:{shell}"),
            &mut added,
        )?;
        let group = etc.join("group");
        if !has_entry(&group, |f| f.get(2) == Some(&"1000")) {
            append(&group, "lohar:x:1000:", &mut added)?;
        }
        let shadow = etc.join("shadow");
        if shadow.is_file() {
            append(&shadow, "lohar:*:19000:0:99999:7:::", &mut added)?;
        }
        let home = root.join("home/lohar");
        if !home.exists() {
            std::fs::create_dir_all(&home).map_err(io(&home))?;
            std::os::unix::fs::chown(&home, Some(1000), Some(1000)).map_err(io(&home))?;
            added.0.push("/home/lohar (owned by 1000)".into());
        }
    }
    let ws = root.join("workspace");
    if std::fs::symlink_metadata(&ws).is_err() {
        std::fs::create_dir_all(&ws).map_err(io(&ws))?;
        std::fs::set_permissions(&ws, std::fs::Permissions::from_mode(0o755)).map_err(io(&ws))?;
        std::os::unix::fs::chown(&ws, Some(1000), Some(1000)).map_err(io(&ws))?;
        added.0.push("/workspace (owned by 1000)".into());
    }
    let sudo = ["usr/bin/sudo", "bin/sudo"]
        .iter()
        .any(|p| root.join(p).exists());
    let rule = etc.join("sudoers.d/lohar");
    if sudo && std::fs::symlink_metadata(&rule).is_err() {
        std::fs::create_dir_all(etc.join("sudoers.d")).map_err(io(&etc))?;
        std::fs::write(&rule, "lohar ALL=(ALL:ALL) NOPASSWD:ALL\n").map_err(io(&rule))?;
        std::fs::set_permissions(&rule, std::fs::Permissions::from_mode(0o440))
            .map_err(io(&rule))?;
        added.0.push("/etc/sudoers.d/lohar".into());
    }
    let resolv = etc.join("resolv.conf");
    if std::fs::symlink_metadata(&resolv).is_err() {
        std::fs::write(&resolv, "").map_err(io(&resolv))?;
        added.0.push("/etc/resolv.conf (empty)".into());
    }
    Ok(added)
}

/// Bytes the files under `root` take (apparent sizes; for sizing the image).
pub fn tree_bytes(root: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            }
            total += m.size().max(4096);
        }
    }
    total
}

/// Unpacks `archive` (docker save or OCI layout) into `root`, its files
/// taking at most `limit` bytes, and makes it bootable.
pub fn archive_to_tree(
    archive: &Path,
    work: &Path,
    root: &Path,
    limit: u64,
) -> Result<Added, OciError> {
    let outer = work.join("archive");
    std::fs::create_dir_all(&outer).map_err(io(&outer))?;
    unpack_archive(archive, &outer, limit)?;
    layout_to_tree(&outer, root, limit)
}

/// Applies the layers of the unpacked image at `dir` onto `root` (their
/// files taking at most `limit` bytes) and makes it bootable.
///
/// Errors: `Format`, `TooBig` (see [`apply_layer`]).
pub fn layout_to_tree(dir: &Path, root: &Path, limit: u64) -> Result<Added, OciError> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let mut budget = Budget::new(limit);
    for layer in layer_files(dir)? {
        if !layer.is_file() {
            let name = layer.strip_prefix(dir).unwrap_or(&layer);
            return Err(OciError::Format(format!(
                "layer {} is missing from the archive",
                name.display()
            )));
        }
        apply_layer(&layer, root, &mut budget)?;
    }
    make_bootable(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_leaving_the_root_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = tar::Header::new_old();
        // `set_path` refuses `..`; write the name field as a hostile tar would.
        h.as_old_mut().name[..11].copy_from_slice(b"../escaped\0");
        h.set_size(2);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"hi"[..]).expect("append");
        let tar = dir.path().join("layer.tar");
        std::fs::write(&tar, b.into_inner().expect("tar")).expect("write");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("root");
        let e = apply_layer(&tar, &root, &mut Budget::new(1 << 20)).expect_err("climbs out");
        assert!(e.to_string().contains("leaves the image's root"), "{e}");
        assert!(!dir.path().join("escaped").exists());
    }

    /// A tar of (path, contents) files; a `None` contents is a directory.
    fn layer(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, path, d.as_bytes()).expect("append");
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    h.set_cksum();
                    b.append_data(&mut h, path, &[][..]).expect("append");
                }
            }
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn docker_save_layers_with_whiteouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("img");
        std::fs::create_dir_all(img.join("l1")).expect("mkdir");
        std::fs::create_dir_all(img.join("l2")).expect("mkdir");
        std::fs::write(
            img.join("l1/layer.tar"),
            layer(&[
                ("etc/", None),
                ("etc/passwd", Some("root:x:0:0:root:/root:/bin/sh\n")),
                ("app/", None),
                ("app/keep", Some("k")),
                ("app/gone", Some("g")),
                ("opaque/", None),
                ("opaque/old", Some("o")),
            ]),
        )
        .expect("l1");
        // Layer 2 gzipped: a whiteout, an opaque dir, a new file.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(
            &mut gz,
            &layer(&[
                ("app/.wh.gone", Some("")),
                ("opaque/.wh..wh..opq", Some("")),
                ("opaque/new", Some("n")),
                ("app/added", Some("a")),
            ]),
        )
        .expect("gz");
        std::fs::write(img.join("l2/layer.tar"), gz.finish().expect("gz")).expect("l2");
        std::fs::write(
            img.join("manifest.json"),
            r#"[{"Config":"c.json","RepoTags":["t:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#,
        )
        .expect("manifest");
        let root = dir.path().join("root");
        let added = layout_to_tree(&img, &root, 1 << 20).expect("unpack");
        assert_eq!(
            std::fs::read_to_string(root.join("app/keep")).expect("keep"),
            "k"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("app/added")).expect("added"),
            "a"
        );
        assert!(!root.join("app/gone").exists());
        assert!(!root.join("app/.wh.gone").exists());
        assert!(!root.join("opaque/old").exists());
        assert!(root.join("opaque/new").exists());
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
        assert!(passwd.starts_with("root:x:0:0"), "{passwd}");
        assert!(
            passwd.contains("lohar:x:1000:1000:bhatti:/home/lohar:/bin/sh"),
            "{passwd}"
        );
        assert_eq!(
            std::fs::metadata(root.join("workspace")).expect("ws").uid(),
            1000
        );
        assert!(root.join("etc/resolv.conf").is_file());
        assert!(!root.join("etc/sudoers.d").exists(), "no sudo, no rule");
        assert!(
            added.0.iter().any(|a| a.contains("/workspace")),
            "{added:?}"
        );
        // A second pass adds nothing.
        assert!(make_bootable(&root).expect("again").0.is_empty());
    }

    /// A small gzipped layer that unpacks big is stopped at the cap, before
    /// the file is written; the error names no host path.
    #[test]
    fn the_unpacked_tree_is_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("img");
        std::fs::create_dir_all(img.join("l1")).expect("mkdir");
        let zeros = "\0".repeat(8 << 20);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(
            &mut gz,
            &layer(&[("small", Some("s")), ("big", Some(&zeros))]),
        )
        .expect("gz");
        let gz = gz.finish().expect("gz");
        assert!(gz.len() < 1 << 20, "{} bytes compressed", gz.len());
        std::fs::write(img.join("l1/layer.tar"), gz).expect("l1");
        std::fs::write(
            img.join("manifest.json"),
            r#"[{"Config":"c.json","Layers":["l1/layer.tar"]}]"#,
        )
        .expect("manifest");
        let root = dir.path().join("root");
        let e = layout_to_tree(&img, &root, 4 << 20).expect_err("over the cap");
        assert!(matches!(e, OciError::TooBig { limit_mb: 4 }), "{e}");
        assert!(
            !e.to_string().contains(dir.path().to_str().expect("utf-8")),
            "{e}"
        );
        assert!(root.join("small").is_file());
        assert!(!root.join("big").exists(), "refused before it was written");
        // Under a cap that fits, the same image unpacks.
        let root2 = dir.path().join("root2");
        layout_to_tree(&img, &root2, 9 << 20).expect("fits");
        assert_eq!(
            std::fs::metadata(root2.join("big")).expect("big").len(),
            8 << 20
        );
    }

    /// The outer archive is capped too.
    #[test]
    fn the_outer_archive_is_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = "x".repeat(2 << 20);
        let tar = dir.path().join("archive.tar");
        std::fs::write(
            &tar,
            layer(&[("manifest.json", Some("[]")), ("l1.tar", Some(&big))]),
        )
        .expect("tar");
        let work = dir.path().join("work");
        let e = archive_to_tree(&tar, &work, &dir.path().join("root"), 1 << 20)
            .expect_err("over the cap");
        assert!(matches!(e, OciError::TooBig { limit_mb: 1 }), "{e}");
        assert!(!work.join("archive/l1.tar").exists());
    }

    /// A broken layer is described without the host's paths.
    #[test]
    fn layer_errors_name_no_host_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("img");
        std::fs::create_dir_all(img.join("l1")).expect("mkdir");
        std::fs::write(img.join("l1/layer.tar"), vec![7u8; 1000]).expect("l1");
        std::fs::write(
            img.join("manifest.json"),
            r#"[{"Config":"c.json","Layers":["l1/layer.tar","l2/layer.tar"]}]"#,
        )
        .expect("manifest");
        let host = dir.path().to_str().expect("utf-8");
        let e = layout_to_tree(&img, &dir.path().join("root"), 1 << 20).expect_err("bad");
        assert!(matches!(e, OciError::Format(_)), "{e}");
        assert!(!e.to_string().contains(host), "{e}");
        std::fs::write(
            img.join("manifest.json"),
            r#"[{"Config":"c.json","Layers":["l2/layer.tar"]}]"#,
        )
        .expect("manifest");
        let e = layout_to_tree(&img, &dir.path().join("root"), 1 << 20).expect_err("missing");
        assert!(e.to_string().contains("l2/layer.tar"), "{e}");
        assert!(!e.to_string().contains(host), "{e}");
    }

    #[test]
    fn refuses_what_is_not_an_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(layer_files(dir.path()), Err(OciError::Format(_))));
        std::fs::write(
            dir.path().join("manifest.json"),
            r#"[{"Layers":["../../etc/shadow"]}]"#,
        )
        .expect("manifest");
        assert!(layer_files(dir.path()).is_err());
        assert!(blob_path(dir.path(), "sha256:../../x").is_err());
    }
}
