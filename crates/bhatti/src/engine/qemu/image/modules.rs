//! Kernel modules for the initramfs: find each wanted `.ko` in the unpacked
//! kernel package and order them so every module follows its dependencies.
//!
//! Debian's kernel package ships no `modules.dep`, so the order comes from the
//! `depends=` field of each module's `.modinfo` section, read here directly.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::elf::Elf;
use super::ImageError;

/// The drivers a bhatti guest needs, as the root set of the dependency walk.
pub const WANTED_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "qemu_fw_cfg",
    "virtio_balloon",
];

/// A module file to load, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Module name as the kernel knows it (underscores).
    pub name: String,
    pub path: PathBuf,
}

/// Kernel module names treat `-` and `_` alike; file names use either.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Every `.ko` under `dir`, by normalized module name.
pub fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>, ImageError> {
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| ImageError::io(&d, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io(&d, e))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| ImageError::io(&path, e))?;
            if ft.is_dir() {
                stack.push(path);
            } else if let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                index.insert(normalize(stem), path);
            }
        }
    }
    Ok(index)
}

/// The `depends=` list of a module file (empty when it has none).
pub fn module_depends(ko: &[u8]) -> Result<Vec<String>, String> {
    let elf = Elf::parse(ko).map_err(|e| e.to_string())?;
    let info = elf.section(".modinfo").ok_or("no .modinfo section")?;
    Ok(info
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(normalize)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

/// Orders `wanted` and all their dependencies so that each module comes after
/// everything it depends on. Ties keep the order of `wanted`.
pub fn resolve_order(
    wanted: &[&str],
    index: &BTreeMap<String, PathBuf>,
    depends_of: &dyn Fn(&Path) -> Result<Vec<String>, String>,
) -> Result<Vec<Module>, ImageError> {
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        depends_of: &dyn Fn(&Path) -> Result<Vec<String>, String>,
        done: &mut HashSet<String>,
        in_progress: &mut Vec<String>,
        out: &mut Vec<Module>,
    ) -> Result<(), ImageError> {
        if done.contains(name) {
            return Ok(());
        }
        if in_progress.iter().any(|n| n == name) {
            in_progress.push(name.to_string());
            return Err(ImageError::Modules(format!(
                "dependency cycle: {}",
                in_progress.join(" -> ")
            )));
        }
        let path = index.get(name).ok_or_else(|| {
            let needed_by = in_progress
                .last()
                .map(|p| format!(" (needed by {p})"))
                .unwrap_or_default();
            ImageError::Modules(format!(
                "module {name}{needed_by} not found in the kernel package"
            ))
        })?;
        in_progress.push(name.to_string());
        let deps = depends_of(path)
            .map_err(|e| ImageError::Modules(format!("reading {}: {e}", path.display())))?;
        for dep in deps {
            visit(&dep, index, depends_of, done, in_progress, out)?;
        }
        in_progress.pop();
        done.insert(name.to_string());
        out.push(Module {
            name: name.to_string(),
            path: path.clone(),
        });
        Ok(())
    }

    let mut done = HashSet::new();
    let mut out = Vec::new();
    for name in wanted {
        visit(
            &normalize(name),
            index,
            depends_of,
            &mut done,
            &mut Vec::new(),
            &mut out,
        )?;
    }
    Ok(out)
}

/// Reads `depends=` from a module file on disk.
pub fn depends_from_file(path: &Path) -> Result<Vec<String>, String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    module_depends(&data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_index(names: &[&str]) -> BTreeMap<String, PathBuf> {
        names
            .iter()
            .map(|n| (n.to_string(), PathBuf::from(format!("/k/{n}.ko"))))
            .collect()
    }

    fn fake_deps(p: &Path) -> Result<Vec<String>, String> {
        let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        Ok(match name {
            "virtio" => vec!["virtio_ring".into()],
            "virtio_mmio" | "virtio_blk" | "virtio_balloon" => {
                vec!["virtio".into(), "virtio_ring".into()]
            }
            "net_failover" => vec!["failover".into()],
            "virtio_net" => vec!["virtio_ring".into(), "virtio".into(), "net_failover".into()],
            _ => vec![],
        })
    }

    #[test]
    fn orders_dependencies_first() {
        let index = fake_index(WANTED_MODULES);
        let order =
            resolve_order(&["virtio_net", "virtio_blk"], &index, &fake_deps).expect("resolves");
        let names: Vec<_> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_blk"
            ]
        );
    }

    #[test]
    fn full_root_set_keeps_given_order_when_already_sorted() {
        let index = fake_index(WANTED_MODULES);
        let order = resolve_order(WANTED_MODULES, &index, &fake_deps).expect("resolves");
        let names: Vec<_> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, WANTED_MODULES);
    }

    #[test]
    fn missing_module_names_who_needs_it() {
        let index = fake_index(&["virtio_net"]);
        let err = resolve_order(&["virtio_net"], &index, &fake_deps).expect_err("must fail");
        assert!(
            err.to_string()
                .contains("virtio_ring (needed by virtio_net)"),
            "{err}"
        );
    }

    #[test]
    fn cycle_is_reported() {
        let index = fake_index(&["a", "b"]);
        let deps = |p: &Path| -> Result<Vec<String>, String> {
            Ok(vec![if p.ends_with("a.ko") { "b" } else { "a" }.to_string()])
        };
        let err = resolve_order(&["a"], &index, &deps).expect_err("must fail");
        assert!(err.to_string().contains("a -> b -> a"), "{err}");
    }

    #[test]
    fn normalizes_dashes() {
        assert_eq!(normalize("virtio-net"), "virtio_net");
    }
}
