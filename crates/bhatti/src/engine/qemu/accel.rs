//! Choosing QEMU's accelerator, and the host facts the guest kernel needs.
//!
//! `/dev/kvm` alone does not mean KVM works: on the development and CI
//! machines it is a paravirtual nested KVM (module `kvm_pvm`) on which QEMU
//! hangs while booting an ordinary kernel. `auto` therefore falls back to TCG
//! there and says so once in the log.

use std::io::Read;
use std::path::Path;
use std::sync::Once;

use serde::{Deserialize, Serialize};

/// The `accel` setting of the daemon config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// KVM when it can boot a guest, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator QEMU is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The `-accel` argument.
    pub fn qemu_arg(self) -> &'static str {
        match self {
            // Without a bounded translation cache a busy TCG guest grows QEMU to ~1.4 GiB RSS.
            Accel::Tcg => "tcg,tb-size=64",
            Accel::Kvm => "kvm",
        }
    }
}

/// Errors of choosing an accelerator.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// `accel: kvm` was asked for on a host without a usable `/dev/kvm`.
    #[error("accel is kvm but KVM is not usable here: {0}")]
    KvmUnavailable(String),
}

/// Why KVM cannot be used on this host, or `None` when it can.
pub fn kvm_unusable_reason() -> Option<String> {
    kvm_unusable_reason_at(Path::new("/"))
}

fn kvm_unusable_reason_at(root: &Path) -> Option<String> {
    let dev = root.join("dev/kvm");
    if !dev.exists() {
        return Some("/dev/kvm does not exist".into());
    }
    if root.join("sys/module/kvm_pvm").exists() {
        return Some("/dev/kvm is the paravirtual nested KVM (kvm_pvm), which cannot boot an ordinary guest kernel".into());
    }
    let modules = std::fs::read_to_string(root.join("proc/modules")).unwrap_or_default();
    if modules
        .lines()
        .any(|l| l.split_whitespace().next() == Some("kvm_pvm"))
    {
        return Some("/dev/kvm is the paravirtual nested KVM (kvm_pvm), which cannot boot an ordinary guest kernel".into());
    }
    if root == Path::new("/") {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
        {
            return Some(format!("cannot open /dev/kvm: {e}"));
        }
    }
    None
}

static FALLBACK_LOGGED: Once = Once::new();

/// Resolves the configured mode to the accelerator to use.
pub fn resolve(mode: AccelMode) -> Result<Accel, AccelError> {
    match mode {
        AccelMode::Tcg => Ok(Accel::Tcg),
        AccelMode::Kvm => match kvm_unusable_reason() {
            None => Ok(Accel::Kvm),
            Some(r) if !Path::new("/dev/kvm").exists() => Err(AccelError::KvmUnavailable(r)),
            Some(r) => {
                // Forced: honour it, but leave a trace for whoever sees VMs hang.
                tracing::warn!("accel: kvm forced although {r}; VMs may hang at boot");
                Ok(Accel::Kvm)
            }
        },
        AccelMode::Auto => match kvm_unusable_reason() {
            None => Ok(Accel::Kvm),
            Some(r) => {
                FALLBACK_LOGGED.call_once(|| {
                    tracing::info!("accel auto: using TCG (software emulation) because {r}")
                });
                Ok(Accel::Tcg)
            }
        },
    }
}

/// The host's TSC frequency in kHz, for the guest's `tsc_early_khz=`.
///
/// Without it the guest kernel sometimes hangs calibrating its clock under
/// TCG. Sources, best first: the kernel's refined calibration in the kernel
/// log, its first detection there, then `/proc/cpuinfo`.
pub fn host_tsc_khz() -> Option<u64> {
    let log = read_kernel_log();
    tsc_khz_from_kernel_log(&log).or_else(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        tsc_khz_from_cpuinfo(&cpuinfo)
    })
}

/// Reads what is left of the kernel ring buffer (root only), without blocking.
fn read_kernel_log() -> String {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return String::new();
    };
    let mut out = String::new();
    let mut buf = vec![0u8; 8192];
    // One record per read; stop at the end (EAGAIN) or after a sane number of records.
    for _ in 0..100_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.push_str(&String::from_utf8_lossy(&buf[..n]));
                out.push('\n');
            }
            // EPIPE means records were overwritten while reading; keep going.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    out
}

/// Parses "2596.148" (MHz) into 2596148 (kHz) without floating point.
fn mhz_to_khz(s: &str) -> Option<u64> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let int: u64 = int.parse().ok()?;
    let mut frac: String = frac.chars().take(3).collect();
    while frac.len() < 3 {
        frac.push('0');
    }
    let frac: u64 = frac.parse().ok()?;
    let khz = int.checked_mul(1000)?.checked_add(frac)?;
    (khz > 0).then_some(khz)
}

fn tsc_khz_from_kernel_log(log: &str) -> Option<u64> {
    let find = |marker: &str| {
        log.lines().rev().find_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            mhz_to_khz(rest.split_whitespace().next()?)
        })
    };
    find("tsc: Refined TSC clocksource calibration:").or_else(|| find("tsc: Detected"))
}

fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "cpu MHz").then(|| mhz_to_khz(v))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mhz_parsing() {
        assert_eq!(mhz_to_khz("2596.148"), Some(2_596_148));
        assert_eq!(mhz_to_khz(" 3000 "), Some(3_000_000));
        assert_eq!(mhz_to_khz("2400.5"), Some(2_400_500));
        assert_eq!(mhz_to_khz("1999.99999"), Some(1_999_999));
        assert_eq!(mhz_to_khz("abc"), None);
        assert_eq!(mhz_to_khz("0.000"), None);
    }

    #[test]
    fn tsc_from_kernel_log_prefers_refined() {
        let log = "6,1,0,-;tsc: Detected 2596.148 MHz processor\n6,9,0,-;tsc: Refined TSC clocksource calibration: 2596.101 MHz\n";
        assert_eq!(tsc_khz_from_kernel_log(log), Some(2_596_101));
        assert_eq!(
            tsc_khz_from_kernel_log("6,1,0,-;tsc: Detected 2596.148 MHz processor"),
            Some(2_596_148)
        );
        assert_eq!(tsc_khz_from_kernel_log("nothing here"), None);
    }

    #[test]
    fn tsc_from_cpuinfo() {
        let c = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.148\n";
        assert_eq!(tsc_khz_from_cpuinfo(c), Some(2_596_148));
        assert_eq!(tsc_khz_from_cpuinfo("processor : 0\n"), None);
    }

    #[test]
    fn pvm_is_not_usable_kvm() {
        let root = tempfile::tempdir().expect("tempdir");
        assert!(kvm_unusable_reason_at(root.path())
            .expect("no /dev/kvm")
            .contains("does not exist"));
        std::fs::create_dir_all(root.path().join("dev")).expect("mkdir");
        std::fs::write(root.path().join("dev/kvm"), "").expect("write");
        assert_eq!(kvm_unusable_reason_at(root.path()), None);
        std::fs::create_dir_all(root.path().join("proc")).expect("mkdir");
        std::fs::write(
            root.path().join("proc/modules"),
            "kvm_pvm 163840 0 - Live 0x0\nkvm 1 1 kvm_pvm, Live 0x0\n",
        )
        .expect("write");
        assert!(kvm_unusable_reason_at(root.path())
            .expect("pvm")
            .contains("kvm_pvm"));
        std::fs::remove_file(root.path().join("proc/modules")).expect("rm");
        std::fs::create_dir_all(root.path().join("sys/module/kvm_pvm")).expect("mkdir");
        assert!(kvm_unusable_reason_at(root.path())
            .expect("pvm")
            .contains("kvm_pvm"));
    }

    #[test]
    fn mode_names() {
        let m: AccelMode = serde_json::from_str("\"auto\"").expect("auto");
        assert_eq!(m, AccelMode::Auto);
        assert_eq!(Accel::Tcg.qemu_arg(), "tcg,tb-size=64");
    }
}
