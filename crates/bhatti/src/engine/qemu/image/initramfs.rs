//! The initramfs: an uncompressed newc cpio archive (fastest to unpack, and
//! every kernel reads it) holding `/init` = the static lohar binary, the
//! kernel modules and their load order.
//!
//! The archive is written here directly rather than with `cpio(1)`: it needs
//! a `/dev/console` node (without one the kernel starts `/init` with no
//! stdio) and byte-identical output for identical input.

use std::io::Write;
use std::path::{Path, PathBuf};

use bhatti_proto::boot::{INITRAMFS_MODULES_DIR, INITRAMFS_MODULES_ORDER};

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

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// A newc ("070701") cpio archive writer.
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> std::io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        let name = name.trim_start_matches('/');
        let size =
            u32::try_from(data.len()).map_err(|_| std::io::Error::other("file over 4 GiB"))?;
        let namesize =
            u32::try_from(name.len() + 1).map_err(|_| std::io::Error::other("name too long"))?;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.ino += 1;
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    fn chardev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> std::io::Result<()> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    fn finish(mut self) -> std::io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
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
