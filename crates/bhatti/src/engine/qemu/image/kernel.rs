//! The guest kernel: Debian's cloud kernel package, fetched with
//! `apt-get download`, unpacked with `dpkg-deb -x`, plus the modules the
//! initramfs loads.
//!
//! The bzImage of this kernel holds an LZ4 payload; when it decompresses to an
//! ELF `vmlinux` with a PVH entry note, that is what we boot (QEMU loads it
//! directly and skips the in-guest decompression, ~0.2 s under TCG).
//! Otherwise the bzImage itself is used.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::elf::Elf;
use super::modules::{self, Module};
use super::run::run_checked;
use super::ImageError;

/// The meta package that always depends on the current cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// A concrete kernel package, as apt knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    pub name: String,
    pub version: String,
}

/// Asks the local apt cache (no network) which versioned kernel package the
/// meta package currently points at.
pub fn resolve_package() -> Result<KernelPackage, ImageError> {
    let out = run_checked(
        Command::new("apt-cache").args(["show", "--no-all-versions", KERNEL_META_PACKAGE]),
        "apt-cache show",
    )
    .map_err(|e| {
        ImageError::Kernel(format!(
            "{e} (is {KERNEL_META_PACKAGE} known to apt? run `apt-get update`)"
        ))
    })?;
    parse_meta_depends(&out).ok_or_else(|| {
        ImageError::Kernel(format!(
            "{KERNEL_META_PACKAGE} has no linux-image-* dependency with a version in `apt-cache show`"
        ))
    })
}

/// From `Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)` to the package.
fn parse_meta_depends(show: &str) -> Option<KernelPackage> {
    let deps = show.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    deps.split(',').find_map(|dep| {
        let dep = dep.split('|').next()?.trim();
        let (name, rest) = dep.split_once(' ')?;
        if !name.starts_with("linux-image-") {
            return None;
        }
        let version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
        Some(KernelPackage {
            name: name.to_string(),
            version: version.to_string(),
        })
    })
}

/// What the kernel step leaves in its output directory.
pub struct KernelFiles {
    /// `vmlinux` (PVH ELF) or `vmlinuz` (bzImage).
    pub kernel: PathBuf,
    /// Modules in load order, copied into the output directory.
    pub modules: Vec<Module>,
}

/// Downloads and unpacks `pkg` in `work`, then copies the kernel and the
/// wanted modules (with their dependencies) into `out`.
pub fn build(
    pkg: &KernelPackage,
    wanted: &[&str],
    work: &Path,
    out: &Path,
    mut note: impl FnMut(&str),
) -> Result<KernelFiles, ImageError> {
    note(&format!("apt-get download {}={}", pkg.name, pkg.version));
    run_checked(
        Command::new("apt-get")
            .arg("download")
            // Download as root into our private temp dir: the _apt sandbox user cannot write there.
            .args(["-o", "APT::Sandbox::User=root", "-q"])
            .arg(format!("{}={}", pkg.name, pkg.version))
            .current_dir(work),
        "apt-get download",
    )
    .map_err(|e| ImageError::Kernel(e.to_string()))?;
    let deb = find_one(work, |n| n.starts_with(&pkg.name) && n.ends_with(".deb"))?
        .ok_or_else(|| ImageError::Kernel(format!("apt-get download left no {}*.deb", pkg.name)))?;

    note("dpkg-deb -x");
    let unpacked = work.join("pkg");
    run_checked(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        "dpkg-deb -x",
    )
    .map_err(|e| ImageError::Kernel(e.to_string()))?;

    let boot = unpacked.join("boot");
    let vmlinuz = find_one(&boot, |n| n.starts_with("vmlinuz-"))?
        .ok_or_else(|| ImageError::Kernel(format!("no vmlinuz-* in {}", boot.display())))?;
    let bzimage = std::fs::read(&vmlinuz).map_err(|e| ImageError::io(&vmlinuz, e))?;

    std::fs::create_dir_all(out).map_err(|e| ImageError::io(out, e))?;
    let kernel = match extract_vmlinux(&bzimage) {
        Ok(elf) => {
            note("using uncompressed vmlinux (PVH entry)");
            let p = out.join("vmlinux");
            std::fs::write(&p, elf).map_err(|e| ImageError::io(&p, e))?;
            p
        }
        Err(why) => {
            note(&format!("using bzImage: {why}"));
            let p = out.join("vmlinuz");
            std::fs::write(&p, &bzimage).map_err(|e| ImageError::io(&p, e))?;
            p
        }
    };

    let modules_root = unpacked.join("lib/modules");
    let kver_dir = find_one(&modules_root, |_| true)?.ok_or_else(|| {
        ImageError::Kernel(format!(
            "no kernel version dir in {}",
            modules_root.display()
        ))
    })?;
    let index = modules::index_modules(&kver_dir)?;
    let order = modules::resolve_order(wanted, &index, &modules::depends_from_file)?;
    let mod_out = out.join("modules");
    std::fs::create_dir_all(&mod_out).map_err(|e| ImageError::io(&mod_out, e))?;
    let mut copied = Vec::with_capacity(order.len());
    for m in order {
        let dest = mod_out.join(format!("{}.ko", m.name));
        std::fs::copy(&m.path, &dest).map_err(|e| ImageError::io(&m.path, e))?;
        copied.push(Module {
            name: m.name,
            path: dest,
        });
    }
    Ok(KernelFiles {
        kernel,
        modules: copied,
    })
}

/// The single directory entry in `dir` whose name satisfies `pred`, if any.
fn find_one(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<Option<PathBuf>, ImageError> {
    let mut found = None;
    for entry in std::fs::read_dir(dir).map_err(|e| ImageError::io(dir, e))? {
        let entry = entry.map_err(|e| ImageError::io(dir, e))?;
        if entry.file_name().to_str().is_some_and(&pred) {
            if found.is_some() {
                return Err(ImageError::Kernel(format!(
                    "more than one candidate in {}",
                    dir.display()
                )));
            }
            found = Some(entry.path());
        }
    }
    Ok(found)
}

const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Legacy LZ4 frames always use 8 MiB blocks.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Xen's PVH entry point note, which QEMU needs to boot an ELF kernel.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Decompresses the payload of an x86 bzImage into the ELF `vmlinux`, when
/// the payload is LZ4 (legacy frame, as the kernel build writes it) and the
/// result is bootable by QEMU's PVH loader. The error says why not.
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, String> {
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bz.get(off..off + 4)?.try_into().ok()?))
    };
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        return Err("no bzImage header".into());
    }
    let setup_sects = match bz.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => return Err("truncated header".into()),
    };
    let pm_start = (setup_sects + 1) * 512;
    let (Some(off), Some(len)) = (u32_at(0x248), u32_at(0x24c)) else {
        return Err("truncated header".into());
    };
    let start = pm_start + off as usize;
    let payload = bz
        .get(start..start + len as usize)
        .ok_or("payload outside the file")?;
    if payload.get(..4) != Some(&LZ4_LEGACY_MAGIC.to_le_bytes()[..]) {
        return Err("payload is not LZ4-compressed".into());
    }
    let elf = lz4_legacy_decompress(payload)?;
    let parsed = Elf::parse(&elf).map_err(|e| e.to_string())?;
    if !parsed.has_note("Xen", XEN_ELFNOTE_PHYS32_ENTRY) {
        return Err("vmlinux has no PVH entry note".into());
    }
    Ok(elf)
}

/// Legacy LZ4 frame: magic, then (u32 LE compressed size, block) repeated;
/// the kernel build appends the uncompressed size as a final u32, and may
/// concatenate frames (each starting with the magic again).
fn lz4_legacy_decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut pos = 0;
    while let Some(word) = data.get(pos..pos + 4) {
        let n = u32::from_le_bytes(word.try_into().map_err(|_| "short read")?);
        pos += 4;
        if n == LZ4_LEGACY_MAGIC {
            continue;
        }
        let Some(chunk) = data.get(pos..pos + n as usize) else {
            // The trailing size word of the kernel build, or the end.
            break;
        };
        let got = lz4_flex::block::decompress_into(chunk, &mut block)
            .map_err(|e| format!("LZ4 block at {pos}: {e}"))?;
        out.extend_from_slice(&block[..got]);
        pos += n as usize;
    }
    if out.is_empty() {
        return Err("empty LZ4 payload".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meta_depends() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n";
        assert_eq!(
            parse_meta_depends(show),
            Some(KernelPackage {
                name: "linux-image-6.1.0-56-cloud-amd64".into(),
                version: "6.1.192-2".into()
            })
        );
        assert_eq!(parse_meta_depends("Depends: libc6 (>= 2)\n"), None);
    }

    #[test]
    fn lz4_legacy_roundtrip() {
        let plain: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let block = lz4_flex::block::compress(&plain);
        let mut frame = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        frame.extend_from_slice(&u32::try_from(block.len()).expect("small").to_le_bytes());
        frame.extend_from_slice(&block);
        frame.extend_from_slice(&u32::try_from(plain.len()).expect("small").to_le_bytes());
        assert_eq!(lz4_legacy_decompress(&frame).expect("decompress"), plain);
    }

    #[test]
    fn not_a_bzimage() {
        assert!(extract_vmlinux(&[0u8; 1024]).is_err());
    }
}
