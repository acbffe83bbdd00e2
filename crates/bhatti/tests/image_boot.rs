//! The guest images boot: builds (or reuses) kernel, initramfs and rootfs
//! through the library, boots them under QEMU microvm with TCG and no network
//! device, and checks on the serial console that lohar went through stage 1,
//! PID 1 setup and up to listening, ran the init script as `lohar` with sudo,
//! and powered the VM off on SIGTERM.
//!
//! Needs root (mmdebstrap, finit_module in the guest is fine, QEMU is not) and
//! the packages of scripts/setup.sh. Images go to `$BHATTI_IMAGES_DIR`, else
//! the shared default `/var/lib/bhatti/images`; a first run builds them (about
//! a minute), later runs reuse them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bhatti::engine::qemu::image::{self, BuildOptions, Progress, Step};

/// Under TCG on a busy 2-core machine a boot takes seconds; leave room.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

struct StderrProgress;

impl Progress for StderrProgress {
    fn start(&self, step: Step) {
        eprintln!("image: {} ...", step.name());
    }
    fn detail(&self, _: Step, _: &str) {}
    fn finish(&self, step: Step, summary: &str) {
        eprintln!("image: {} done: {summary}", step.name());
    }
    fn cached(&self, step: Step, path: &Path) {
        eprintln!("image: {} cached: {}", step.name(), path.display());
    }
    fn note(&self, msg: &str) {
        eprintln!("image: {msg}");
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the static lohar (a no-op when it is current) and returns its path.
fn build_static_lohar() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "lohar",
            "--target",
            image::initramfs::LOHAR_TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace_root())
        .status()
        .expect("run cargo to build the static lohar");
    assert!(status.success(), "building the static lohar failed");
    workspace_root()
        .join("target")
        .join(image::initramfs::LOHAR_TARGET)
        .join("release/lohar")
}

/// The host's TSC frequency in kHz, which the guest must be told under TCG.
fn host_tsc_khz() -> u64 {
    let info = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    let mhz: f64 = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .expect("cpu MHz in /proc/cpuinfo");
    (mhz * 1000.0) as u64
}

#[test]
fn images_boot_to_a_serving_lohar_and_power_off() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it builds the guest images (mmdebstrap) and boots them"
    );
    let lohar = build_static_lohar();
    let images_dir = std::env::var_os("BHATTI_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(image::DEFAULT_IMAGES_DIR));
    let started = Instant::now();
    let paths = image::build_images(
        &BuildOptions {
            images_dir,
            lohar: Some(lohar),
            force: false,
        },
        &StderrProgress,
    )
    .unwrap_or_else(|e| panic!("image build failed: {e}"));
    eprintln!("images ready in {:.1?}: {paths:?}", started.elapsed());

    let work = tempfile::tempdir().expect("tempdir");
    let overlay = work.path().join("overlay.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&paths.rootfs)
        .arg(&overlay)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img create failed");

    let init = r#"{ echo "check: user=$(id -un) host=$(hostname) cwd=$(pwd)"
  ls /dev/fd/ >/dev/null && echo "check: /dev/fd ok"
  sudo -n true && echo "check: sudo ok"
  grep -q '^nameserver 192.0.2.53$' /etc/resolv.conf && echo "check: resolv.conf ok"
  [ "$(date +%Y)" -ge 2024 ] && echo "check: clock ok"
  findmnt -n /tmp >/dev/null && findmnt -n /dev/pts >/dev/null && echo "check: mounts ok"
} 2>&1 | sudo tee /dev/console >/dev/null
sudo kill -TERM 1"#;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis();
    let cfg = serde_json::json!({
        "hostname": "imgtest", "token": "t", "ip": "", "gateway": "",
        "dns": ["192.0.2.53"], "init": init, "time_unix_ms": now_ms as i64,
    });
    let cfg_path = work.path().join("cfg.json");
    std::fs::write(&cfg_path, cfg.to_string()).expect("write cfg");
    let console = work.path().join("console.log");

    // No network device at all: nothing in the guest can reach anything.
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm",
            "-accel",
            "tcg,tb-size=64",
            "-cpu",
            "max",
            "-m",
            "512",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&paths.kernel)
        .arg("-initrd")
        .arg(&paths.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet tsc_early_khz={} tsc=reliable panic=-1 cryptomgr.notests",
            host_tsc_khz()
        ))
        .arg("-fw_cfg")
        .arg(format!(
            "name=opt/bhatti/config,file={}",
            cfg_path.display()
        ))
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=qcow2,if=none",
            overlay.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64 (see scripts/setup.sh)");

    let t0 = Instant::now();
    let mut ready_at = None;
    let status = loop {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        if ready_at.is_none() && log.contains("lohar: ready") {
            ready_at = Some(t0.elapsed());
        }
        if let Some(st) = qemu.try_wait().expect("poll qemu") {
            break Some(st);
        }
        if t0.elapsed() > BOOT_TIMEOUT {
            // Our own child: kill it by handle.
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut qemu_err = String::new();
    if let Some(mut e) = qemu.stderr.take() {
        let _ = e.read_to_string(&mut qemu_err);
    }
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!("--- console ---\n{log}--- qemu stderr ---\n{qemu_err}");
    eprintln!(
        "ready after {ready_at:?}, exited after {:.1?}",
        t0.elapsed()
    );

    let status = status.unwrap_or_else(|| panic!("VM did not power off within {BOOT_TIMEOUT:?}"));
    assert!(status.success(), "QEMU exited with {status}");
    for want in [
        "lohar: stage 1",
        "lohar: ready",
        "check: user=lohar host=imgtest cwd=/workspace",
        "check: /dev/fd ok",
        "check: sudo ok",
        "check: resolv.conf ok",
        "check: clock ok",
        "check: mounts ok",
        "lohar: SIGTERM: powering off",
    ] {
        assert!(log.contains(want), "console lacks {want:?}");
    }
    assert!(
        !log.contains("lohar: fatal"),
        "lohar reported a fatal error"
    );
}
