//! Guest images: kernel, initramfs with lohar, base rootfs.
//!
//! [`ensure_images`] (the daemon at start) and `bhatti image build` (the CLI)
//! make sure that a complete, current set exists under `images_dir`:
//!
//! ```text
//! images_dir/
//!   .lock                       flock: one builder at a time
//!   kernel-<key>/vmlinux        (or vmlinuz) + modules/*.ko + modules.order
//!   initramfs-<key>.cpio        lohar as /init + the modules; key includes lohar's hash
//!   rootfs-<key>/rootfs.ext4    sparse ext4, the read-only backing file of every overlay
//!   current.json                the set the last successful ensure returned
//! ```
//!
//! Each artifact is named by the hash of its recipe (kernel package version and
//! module list; rootfs suite, packages and setup; lohar's content hash), so
//! changing a recipe builds a new artifact beside the old one and a change of
//! lohar rebuilds only the initramfs. Old artifacts are never deleted here:
//! existing sandbox overlays keep pointing at the rootfs they were made from.
//! Every artifact is built in a `.tmp-*` path and renamed into place, so an
//! interrupted build leaves nothing that looks finished.
//!
//! This is blocking code (it runs apt, mmdebstrap, mke2fs): call it from
//! `tokio::task::spawn_blocking`. It needs root (mmdebstrap's root mode).

use std::path::{Path, PathBuf};

use cache::{clean_stale_tmp, lock, read_current, remove_any, write_current, WorkDir};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod cache;
mod elf;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod rootfs;
mod run;

pub use initramfs::{LOHAR_BUILD_HINT, LOHAR_ENV};

/// Default location of the images, shared by every data dir on the host.
pub const DEFAULT_IMAGES_DIR: &str = "/var/lib/bhatti/images";

/// Bump one of these when the builder changes what it produces for the same
/// recipe, so that only that artifact is rebuilt.
const KERNEL_BUILDER_VERSION: u32 = 1;
const INITRAMFS_BUILDER_VERSION: u32 = 2;
const ROOTFS_BUILDER_VERSION: u32 = 1;

/// The files a VM boots from, all inside `images_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePaths {
    /// `vmlinux` (ELF with PVH entry: boot with `-kernel`) or a bzImage.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Raw ext4 image, the read-only backing file of every sandbox overlay.
    pub rootfs: PathBuf,
}

/// Why the images could not be built or found.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Fetching or unpacking the kernel package failed.
    #[error("kernel: {0}")]
    Kernel(String),
    /// A wanted module or one of its dependencies is missing or unreadable.
    #[error("modules: {0}")]
    Modules(String),
    /// The static lohar binary is missing or unusable.
    #[error("lohar: {0}")]
    Lohar(String),
    /// mmdebstrap or mke2fs failed.
    #[error("rootfs: {0}")]
    Rootfs(String),
    /// The build needs root.
    #[error("building images needs root (mmdebstrap, apt); run as root or use an images dir that is already built")]
    NotRoot,
}

impl ImageError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The named steps of a build, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Kernel,
    Modules,
    Debootstrap,
    Ext4,
    Initramfs,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Kernel => "kernel",
            Step::Modules => "modules",
            Step::Debootstrap => "rootfs (mmdebstrap)",
            Step::Ext4 => "ext4",
            Step::Initramfs => "initramfs",
        }
    }
}

/// Receives what the build is doing; a terminal shows bars, a daemon logs.
pub trait Progress {
    /// A step starts doing real work.
    fn start(&self, step: Step);
    /// Latest detail of the running step (a tool's output line, a sub-stage).
    fn detail(&self, step: Step, line: &str);
    /// The step finished; `summary` says what it produced.
    fn finish(&self, step: Step, summary: &str);
    /// The step's output is already in the cache.
    fn cached(&self, step: Step, path: &Path);
    /// A one-off message (waiting for the lock, a fallback taken).
    fn note(&self, msg: &str);
}

/// Progress as `tracing` log lines (the daemon's choice).
pub struct LogProgress;

impl Progress for LogProgress {
    fn start(&self, step: Step) {
        tracing::info!("image build: {} …", step.name());
    }
    fn detail(&self, step: Step, line: &str) {
        tracing::debug!("image build: {}: {line}", step.name());
    }
    fn finish(&self, step: Step, summary: &str) {
        tracing::info!("image build: {} done: {summary}", step.name());
    }
    fn cached(&self, step: Step, path: &Path) {
        tracing::debug!("image build: {} cached at {}", step.name(), path.display());
    }
    fn note(&self, msg: &str) {
        tracing::info!("image build: {msg}");
    }
}

/// What to build, and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub images_dir: PathBuf,
    /// The static lohar for the initramfs; `None` = `$BHATTI_LOHAR`, then the
    /// usual places (see [`initramfs::lohar_candidates`]).
    pub lohar: Option<PathBuf>,
    /// Rebuild every artifact even when its cached copy is current.
    pub force: bool,
}

/// The daemon's entry: returns the current images, building what is missing.
pub fn ensure_images(images_dir: &Path, progress: &dyn Progress) -> Result<ImagePaths, ImageError> {
    build_images(
        &BuildOptions {
            images_dir: images_dir.to_path_buf(),
            lohar: None,
            force: false,
        },
        progress,
    )
}

fn hash_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..8])
}

/// Builds (or finds in the cache) kernel, initramfs and rootfs.
pub fn build_images(
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<ImagePaths, ImageError> {
    let dir = &opts.images_dir;
    std::fs::create_dir_all(dir).map_err(|e| ImageError::io(dir, e))?;
    let _lock = lock(dir, progress)?;
    clean_stale_tmp(dir);

    // Without a lohar binary (an install that ships only the images), the last
    // built initramfs still serves, unless a rebuild was asked for.
    let lohar = match initramfs::locate_lohar(opts.lohar.as_deref()) {
        Ok(found) => Some(found),
        Err(e) => match read_current(dir) {
            Some(cur) if !opts.force && opts.lohar.is_none() && cur.initramfs.is_file() => {
                progress.note(&format!("{e}; keeping the last built initramfs"));
                None
            }
            _ => return Err(e),
        },
    };

    // Kernel + modules, keyed by package version and module list.
    let kernel_dir = match kernel::resolve_package() {
        Ok(pkg) => {
            let key = hash_hex(&[
                &KERNEL_BUILDER_VERSION.to_le_bytes(),
                pkg.name.as_bytes(),
                pkg.version.as_bytes(),
                modules::WANTED_MODULES.join(",").as_bytes(),
            ]);
            let kdir = dir.join(format!("kernel-{key}"));
            if kdir.is_dir() && !opts.force {
                progress.cached(Step::Kernel, &kdir);
            } else {
                build_kernel(dir, &kdir, &pkg, progress)?;
            }
            kdir
        }
        // Offline or apt lists gone: keep using the kernel we last booted.
        Err(e) => match read_current(dir) {
            Some(cur) if !opts.force && cur.kernel.is_file() => {
                progress.note(&format!("{e}; keeping the last built kernel"));
                cur.kernel.parent().map(Path::to_path_buf).ok_or(e)?
            }
            _ => return Err(e),
        },
    };
    let kernel = ["vmlinux", "vmlinuz"]
        .iter()
        .map(|n| kernel_dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::Kernel(format!("{} holds no kernel", kernel_dir.display())))?;

    // Initramfs, keyed by kernel artifact and lohar's content.
    let initramfs_path = match lohar {
        Some((lohar_path, lohar)) => {
            let kernel_key = kernel_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ikey = hash_hex(&[
                &INITRAMFS_BUILDER_VERSION.to_le_bytes(),
                kernel_key.as_bytes(),
                &lohar,
            ]);
            let path = dir.join(format!("initramfs-{ikey}.cpio"));
            if path.is_file() && !opts.force {
                progress.cached(Step::Initramfs, &path);
            } else {
                progress.start(Step::Initramfs);
                let mods = read_module_order(&kernel_dir)?;
                let work = WorkDir::new(dir, ".tmp-initramfs-work-")?;
                let (lohar, warning) = initramfs::strip_debug(&lohar, work.path());
                if let Some(w) = warning {
                    progress.note(&w);
                }
                let tmp = dir.join(format!(".tmp-initramfs-{ikey}"));
                initramfs::write(&tmp, &lohar, &mods)?;
                std::fs::rename(&tmp, &path).map_err(|e| ImageError::io(&path, e))?;
                progress.finish(
                    Step::Initramfs,
                    &format!(
                        "{} ({}, lohar from {})",
                        path.display(),
                        human_size(file_size(&path)),
                        lohar_path.display()
                    ),
                );
            }
            path
        }
        // Its modules must match the kernel: only valid for the same kernel artifact.
        None => read_current(dir)
            .filter(|c| c.kernel.parent() == Some(kernel_dir.as_path()))
            .map(|c| c.initramfs)
            .ok_or_else(|| {
                ImageError::Lohar(format!(
                    "the kernel changed and no static lohar was found to rebuild the initramfs; \
                     build it with: {LOHAR_BUILD_HINT}"
                ))
            })?,
    };

    // Rootfs, keyed by its recipe.
    let rkey = hash_hex(&[
        &ROOTFS_BUILDER_VERSION.to_le_bytes(),
        rootfs::recipe().as_bytes(),
    ]);
    let rootfs_dir = dir.join(format!("rootfs-{rkey}"));
    let rootfs_img = rootfs_dir.join("rootfs.ext4");
    if rootfs_img.is_file() && !opts.force {
        progress.cached(Step::Ext4, &rootfs_img);
    } else {
        build_rootfs(dir, &rootfs_dir, &rkey, progress)?;
    }

    let paths = ImagePaths {
        kernel,
        initramfs: initramfs_path,
        rootfs: rootfs_img,
    };
    write_current(dir, &paths)?;
    Ok(paths)
}

fn require_root() -> Result<(), ImageError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(ImageError::NotRoot)
    }
}

fn build_kernel(
    dir: &Path,
    kdir: &Path,
    pkg: &kernel::KernelPackage,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    require_root()?;
    progress.start(Step::Kernel);
    let work = WorkDir::new(dir, ".tmp-kernel-work-")?;
    let staging = dir.join(format!(
        ".tmp-{}",
        kdir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    remove_any(&staging);
    let files = kernel::build(pkg, modules::WANTED_MODULES, work.path(), &staging, |l| {
        progress.detail(Step::Kernel, l)
    })?;
    progress.finish(
        Step::Kernel,
        &format!(
            "{} {} ({})",
            pkg.name,
            pkg.version,
            human_size(file_size(&files.kernel))
        ),
    );
    progress.start(Step::Modules);
    let order: Vec<_> = files
        .modules
        .iter()
        .map(|m| format!("{}.ko", m.name))
        .collect();
    let order_file = staging.join("modules.order");
    std::fs::write(&order_file, order.join("\n") + "\n")
        .map_err(|e| ImageError::io(&order_file, e))?;
    if kdir.exists() {
        remove_any(kdir);
    }
    std::fs::rename(&staging, kdir).map_err(|e| ImageError::io(kdir, e))?;
    let names: Vec<_> = files.modules.iter().map(|m| m.name.as_str()).collect();
    progress.finish(Step::Modules, &names.join(" "));
    Ok(())
}

/// Modules of a kernel artifact in load order.
fn read_module_order(kdir: &Path) -> Result<Vec<modules::Module>, ImageError> {
    let order_file = kdir.join("modules.order");
    let text = std::fs::read_to_string(&order_file).map_err(|e| ImageError::io(&order_file, e))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|f| modules::Module {
            name: f.trim_end_matches(".ko").to_string(),
            path: kdir.join("modules").join(f),
        })
        .collect())
}

fn build_rootfs(
    dir: &Path,
    rootfs_dir: &Path,
    rkey: &str,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    require_root()?;
    progress.start(Step::Debootstrap);
    let work = WorkDir::new(dir, ".tmp-rootfs-work-")?;
    let sources = rootfs::host_sources(Path::new("/etc/apt"), rootfs::SUITE);
    let sources_file = match &sources {
        Some(text) => {
            let p = work.path().join("bhatti.sources");
            std::fs::write(&p, text).map_err(|e| ImageError::io(&p, e))?;
            Some(p)
        }
        None => {
            progress
                .note("no Debian bookworm entries in /etc/apt; mmdebstrap uses its default mirror");
            None
        }
    };
    let tree = work.path().join("tree");
    let started = std::time::Instant::now();
    rootfs::debootstrap(&tree, sources_file.as_deref(), &mut |l| {
        progress.detail(Step::Debootstrap, l)
    })?;
    let used = rootfs::tree_size(&tree)?;
    progress.finish(
        Step::Debootstrap,
        &format!("{} of files in {:.0?}", human_size(used), started.elapsed()),
    );

    progress.start(Step::Ext4);
    let staging = dir.join(format!(".tmp-rootfs-{rkey}"));
    remove_any(&staging);
    std::fs::create_dir(&staging).map_err(|e| ImageError::io(&staging, e))?;
    let img = staging.join("rootfs.ext4");
    let size = rootfs::make_ext4(&tree, &img)?;
    let pkgs = staging.join("packages.txt");
    std::fs::write(&pkgs, rootfs::PACKAGES.join("\n") + "\n")
        .map_err(|e| ImageError::io(&pkgs, e))?;
    if rootfs_dir.exists() {
        remove_any(rootfs_dir);
    }
    std::fs::rename(&staging, rootfs_dir).map_err(|e| ImageError::io(rootfs_dir, e))?;
    progress.finish(
        Step::Ext4,
        &format!(
            "{} ({} sparse, {} allocated)",
            rootfs_dir.join("rootfs.ext4").display(),
            human_size(size),
            human_size(allocated(&rootfs_dir.join("rootfs.ext4")))
        ),
    );
    Ok(())
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// 1536 → "1.5 KiB".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(12), "12 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(4 << 30), "4.0 GiB");
    }

    #[test]
    fn hash_separates_parts() {
        assert_ne!(hash_hex(&[b"ab", b"c"]), hash_hex(&[b"a", b"bc"]));
        assert_eq!(hash_hex(&[b"x"]).len(), 16);
    }
}
