//! What the service needs to keep templates (docs/templates.md): the
//! identity of a booted guest of this engine, and the checkpoints and
//! layers on the host (to sweep a template build cut short).

use std::path::Path;
use std::sync::OnceLock;

use super::QemuEngine;

/// `<len>:<mtime ns>` of a file, or `missing`: a file replaced in place
/// under the same name changes the basis too.
fn file_id(p: &Path) -> String {
    match std::fs::metadata(p) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{}:{mtime}", m.len())
        }
        Err(_) => "missing".into(),
    }
}

/// The first line of `<qemu> --version` (once per process: the binary does
/// not change under a running daemon that would notice).
fn qemu_version(binary: &str) -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            std::process::Command::new(binary)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "unknown".into())
        })
        .clone()
}

/// Names in `dir` ending in `suffix` (the suffix cut off), or every
/// directory name when `suffix` is empty.
fn names_in(dir: &Path, suffix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if suffix.is_empty() {
                e.path().is_dir().then_some(name)
            } else {
                name.strip_suffix(suffix).map(str::to_string)
            }
        })
        .collect()
}

impl QemuEngine {
    /// See [`crate::engine::Engine::template_basis`]: the kernel, initramfs
    /// (lohar) and rootfs (paths, which carry their recipe hashes, and
    /// size and mtime), QEMU's version and binary, the accelerator, the
    /// kernel command line, and the network plan a guest boots with.
    pub(super) fn basis(&self) -> String {
        let img = &self.cfg.images;
        let dns = if self.resolver.is_some() {
            vec![self.net.subnet.gateway().to_string()]
        } else {
            self.cfg.dns.clone()
        };
        [
            format!("kernel={} {}", img.kernel.display(), file_id(&img.kernel)),
            format!(
                "initramfs={} {}",
                img.initramfs.display(),
                file_id(&img.initramfs)
            ),
            format!("rootfs={} {}", img.rootfs.display(), file_id(&img.rootfs)),
            format!(
                "qemu={} {}",
                self.cfg.qemu_binary,
                qemu_version(&self.cfg.qemu_binary)
            ),
            format!("accel={:?}", self.accel),
            format!("cmdline={}", self.cfg.extra_cmdline),
            format!("subnet={} dns={}", self.net.subnet, dns.join(",")),
        ]
        .join("\n")
    }

    /// Ids of the checkpoints on the host.
    pub(super) fn checkpoint_ids(&self) -> Vec<String> {
        names_in(&self.sandboxes_dir.with_file_name("checkpoints"), "")
    }

    /// Ids of the layers on the host.
    pub(super) fn layer_ids(&self) -> Vec<String> {
        names_in(&self.layers_dir(), ".qcow2")
    }
}
