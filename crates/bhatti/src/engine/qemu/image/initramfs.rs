//! The initramfs: an uncompressed newc cpio archive (fastest to unpack, and
//! every kernel reads it) holding `/init` = the static lohar binary, the
//! kernel modules and their load order.
//!
//! Written with the `cpio` crate rather than `cpio(1)`: the archive needs a
//! `/dev/console` node (without one the kernel starts `/init` with no stdio),
//! which `cpio -o` only copies from a real node on disk, and byte-identical
//! output for identical input (no mtimes, owners or inode numbers of the host).

use std::io::Write;
use std::path::{Path, PathBuf};

use bhatti_proto::boot::{INITRAMFS_MODULES_DIR, INITRAMFS_MODULES_ORDER};
use cpio::newc::{Builder, ModeFileType};

use super::elf::Elf;
use super::modules::Module;
use super::ImageError;

/// Environment variable naming the static lohar binary to put in the initramfs.
pub const LOHAR_ENV: &str = "BHATTI_LOHAR";
/// The target triple lohar is built for, static (`-C target-feature=+crt-static`).
pub const LOHAR_TARGET: &str = "x86_64-unknown-linux-gnu";
/// How to build the lohar binary the image builder looks for.
pub const LOHAR_BUILD_HINT: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" \
     cargo build --release -p lohar --target x86_64-unknown-linux-gnu";

/// Name of the entry that ends a newc archive.
const TRAILER: &str = "TRAILER!!!";

/// A newc archive being written: every entry owned by root with mtime 0 and
/// inode numbers counted from 1 in the order written, so the same input
/// always gives the same bytes.
struct Cpio<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio { out, ino: 1 }
    }

    fn entry(&mut self, entry: Builder, data: &[u8]) -> std::io::Result<()> {
        let size =
            u32::try_from(data.len()).map_err(|_| std::io::Error::other("file over 4 GiB"))?;
        let mut w = entry.ino(self.ino).write(&mut self.out, size);
        w.write_all(data)?;
        w.finish()?;
        self.ino += 1;
        Ok(())
    }

    fn builder(name: &str, kind: ModeFileType, perm: u32) -> Builder {
        Builder::new(name.trim_start_matches('/'))
            .mode(perm)
            .set_mode_file_type(kind)
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        // A directory's own entry and its `..` in the parent.
        let b = Self::builder(name, ModeFileType::Directory, 0o755).nlink(2);
        self.entry(b, &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(Self::builder(name, ModeFileType::Regular, perm), data)
    }

    fn chardev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> std::io::Result<()> {
        let b = Self::builder(name, ModeFileType::Char, perm)
            .rdev_major(major)
            .rdev_minor(minor);
        self.entry(b, &[])
    }

    fn finish(mut self) -> std::io::Result<W> {
        // Not `cpio::newc::trailer`, which numbers it 0: this keeps the bytes
        // of archives written before the switch to the crate.
        self.entry(Builder::new(TRAILER), &[])?;
        Ok(self.out)
    }
}

/// Writes the initramfs archive for `lohar` (the binary's bytes) and `modules`
/// (in load order) to `out`.
pub fn write(out: &Path, lohar: &[u8], modules: &[Module]) -> Result<(), ImageError> {
    let io = |e| ImageError::io(out, e);
    let file = std::fs::File::create(out).map_err(io)?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    let mut order = String::new();
    (|| -> std::io::Result<()> {
        for d in ["dev", "proc", "sys", "newroot", "bhatti"] {
            cpio.dir(d)?;
        }
        cpio.dir(INITRAMFS_MODULES_DIR)?;
        cpio.chardev("dev/console", 0o600, 5, 1)?;
        cpio.file("init", 0o755, lohar)?;
        for m in modules {
            let data = std::fs::read(&m.path)?;
            let fname = format!("{}.ko", m.name);
            cpio.file(&format!("{INITRAMFS_MODULES_DIR}/{fname}"), 0o644, &data)?;
            order.push_str(&fname);
            order.push('\n');
        }
        cpio.file(INITRAMFS_MODULES_ORDER, 0o644, order.as_bytes())?;
        let mut w = cpio.finish()?;
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    })()
    .map_err(io)
}

/// lohar without its debug info (a release build with `debug = 1` is ~4x
/// larger, and every byte is copied into each VM at boot). Uses `strip` from
/// binutils when present; otherwise the binary goes in as it is.
pub fn strip_debug(bytes: &[u8], work: &Path) -> (Vec<u8>, Option<String>) {
    let input = work.join("lohar.full");
    let output = work.join("lohar.stripped");
    let result = std::fs::write(&input, bytes)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            super::run::run_checked(
                std::process::Command::new("strip")
                    .arg("--strip-debug")
                    .arg("-o")
                    .arg(&output)
                    .arg(&input),
                "strip",
            )
            .map_err(|e| e.to_string())
        })
        .and_then(|_| std::fs::read(&output).map_err(|e| e.to_string()));
    match result {
        Ok(stripped) if Elf::parse(&stripped).is_ok() => (stripped, None),
        Ok(_) => (
            bytes.to_vec(),
            Some("strip produced no ELF; using lohar unstripped".into()),
        ),
        Err(e) => (bytes.to_vec(), Some(format!("{e}; using lohar unstripped"))),
    }
}

/// Checks that `bytes` is a static ELF executable that can run as `/init`.
pub fn check_static(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let elf =
        Elf::parse(bytes).map_err(|e| ImageError::Lohar(format!("{}: {e}", path.display())))?;
    if elf.has_interpreter() {
        return Err(ImageError::Lohar(format!(
            "{} is dynamically linked and cannot run as /init; build it with: {LOHAR_BUILD_HINT}",
            path.display()
        )));
    }
    Ok(())
}

/// Where to look for lohar when neither `--lohar` nor `BHATTI_LOHAR` is given:
/// `lohar-static` or `lohar` next to the running executable, then the workspace's static release build
/// (relative to the executable inside `target/`, and to this crate's source).
pub fn lohar_candidates() -> Vec<PathBuf> {
    let rel = Path::new(LOHAR_TARGET).join("release/lohar");
    let mut c = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            // scripts/build.sh installs it as target/<profile>/lohar-static.
            c.push(dir.join("lohar-static"));
            c.push(dir.join("lohar"));
            // target/<profile>/bhatti and target/<profile>/deps/<test>.
            for up in dir.ancestors().skip(1).take(2) {
                c.push(up.join(&rel));
            }
        }
    }
    c.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target")
            .join(&rel),
    );
    c
}

/// Finds the static lohar: `explicit` (a flag), else `$BHATTI_LOHAR`, else the
/// first static binary among [`lohar_candidates`]. Returns its path and bytes.
pub fn locate_lohar(explicit: Option<&Path>) -> Result<(PathBuf, Vec<u8>), ImageError> {
    let given = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(LOHAR_ENV).map(PathBuf::from));
    if let Some(p) = given {
        let bytes =
            std::fs::read(&p).map_err(|e| ImageError::Lohar(format!("{}: {e}", p.display())))?;
        check_static(&p, &bytes)?;
        return Ok((p, bytes));
    }
    let mut rejected = Vec::new();
    for p in lohar_candidates() {
        let Ok(bytes) = std::fs::read(&p) else {
            continue;
        };
        match check_static(&p, &bytes) {
            Ok(()) => return Ok((p, bytes)),
            Err(e) => rejected.push(e.to_string()),
        }
    }
    let tried: Vec<_> = lohar_candidates()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    Err(ImageError::Lohar(format!(
        "no static lohar binary found (tried {}{}); build it with: {LOHAR_BUILD_HINT}, \
         or point {LOHAR_ENV} / --lohar at one",
        tried.join(", "),
        if rejected.is_empty() {
            String::new()
        } else {
            format!("; rejected: {}", rejected.join("; "))
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut c = Cpio::new(Vec::new());
        c.file("/init", 0o755, b"abc").expect("write");
        let out = c.finish().expect("finish");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("070701"));
        // Header is 110 bytes, then "init\0" padded to 116, then data.
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..119], b"abc");
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(out.len() % 4, 0);
    }

    /// The bytes of a small archive, fixed: the initramfs cache is keyed by
    /// its inputs, so identical input must give identical output. The hash is
    /// that of the hand-written writer this one replaced.
    #[test]
    fn output_is_stable() {
        use sha2::Digest;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut mods = Vec::new();
        for (name, body) in [
            ("virtio_ring", &b"ring"[..]),
            ("virtio", b"virtio-module"),
            ("net_failover", b"x"),
        ] {
            let path = dir.path().join(format!("{name}.ko"));
            std::fs::write(&path, body).expect("write");
            mods.push(Module {
                name: name.into(),
                path,
            });
        }
        let img = dir.path().join("i.cpio");
        write(&img, b"\x7fELF static lohar, 31 bytes long", &mods).expect("write");
        let bytes = std::fs::read(&img).expect("read");
        assert_eq!(bytes.len(), 1732);
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            "8861792737026f51d197dc123d3dc56a4d199a40c6425f855ea5908bb3df6da0"
        );
    }

    /// The initramfs of the shared image cache, when one was built: written
    /// again from its own `/init` and modules, it comes out byte for byte.
    #[test]
    fn rewrites_the_cached_initramfs_identically() {
        let images = Path::new(super::super::DEFAULT_IMAGES_DIR);
        let Some(cached) = std::fs::read_dir(images).ok().and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "cpio"))
        }) else {
            eprintln!("no initramfs in {}; skipping", images.display());
            return;
        };
        let original = std::fs::read(&cached).expect("read cached initramfs");
        let mut files = std::collections::HashMap::new();
        let mut rest = &original[..];
        loop {
            let mut r = cpio::NewcReader::new(rest).expect("newc entry");
            if r.entry().is_trailer() {
                break;
            }
            let name = r.entry().name().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut data).expect("entry data");
            files.insert(name, data);
            rest = r.finish().expect("next entry");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // Archive names have no leading `/`.
        let order = &files[INITRAMFS_MODULES_ORDER.trim_start_matches('/')];
        let mods_dir = INITRAMFS_MODULES_DIR.trim_start_matches('/');
        let order = String::from_utf8(order.clone()).expect("utf-8");
        let mods: Vec<Module> = order
            .lines()
            .map(|f| {
                let path = dir.path().join(f);
                std::fs::write(&path, &files[&format!("{mods_dir}/{f}")]).expect("write module");
                Module {
                    name: f.trim_end_matches(".ko").into(),
                    path,
                }
            })
            .collect();
        let again = dir.path().join("again.cpio");
        write(&again, &files["init"], &mods).expect("write initramfs");
        let again = std::fs::read(&again).expect("read");
        assert!(again == original, "{} differs", cached.display());
    }

    #[test]
    fn cpio_tool_reads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ko = dir.path().join("virtio.ko");
        std::fs::write(&ko, b"module").expect("write");
        let img = dir.path().join("initramfs.cpio");
        let m = Module {
            name: "virtio".into(),
            path: ko,
        };
        write(&img, b"\x7fELF-ish", &[m]).expect("write initramfs");
        let Ok(out) = std::process::Command::new("cpio")
            .args(["-t", "-v", "-F"])
            .arg(&img)
            .output()
        else {
            eprintln!("cpio(1) not installed; skipping the cross-check");
            return;
        };
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("bhatti/modules/virtio.ko"), "{list}");
        assert!(list.contains("bhatti/modules.order"), "{list}");
        assert!(list.contains("dev/console"), "{list}");
        assert!(
            list.lines()
                .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" init")),
            "{list}"
        );
    }

    #[test]
    fn dynamic_binary_is_rejected() {
        let exe = std::env::current_exe().expect("test exe");
        let bytes = std::fs::read(&exe).expect("read");
        let err = check_static(&exe, &bytes).expect_err("test binary is dynamic");
        assert!(err.to_string().contains("dynamically linked"));
    }
}
