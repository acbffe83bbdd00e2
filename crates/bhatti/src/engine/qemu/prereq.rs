//! What the host must have before the daemon can run a VM: one check per
//! prerequisite, each with a fix a person can act on.
//!
//! `bhatti serve` refuses to start when a required check fails (one line
//! naming everything missing) instead of failing at the first create;
//! `bhatti doctor` prints every check. Package names are Debian 12's.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::accel::{self, AccelMode};

/// Below this much free space in the data dir a create may fail half-way
/// (a 512 MB guest's saved state alone is ~100 MiB, measured).
pub const MIN_FREE_DISK_BYTES: u64 = 1 << 30;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    /// Short name: `qemu-img`, `accelerator`, `free disk`, ...
    pub name: &'static str,
    /// Whether the prerequisite holds.
    pub ok: bool,
    /// What was found (a version, a path, a reason).
    pub detail: String,
    /// What to do when it does not hold; empty when `ok`.
    pub fix: String,
    /// `false` for checks that only warn (the daemon still starts).
    pub required: bool,
}

/// What the checks need to know of the daemon's config.
#[derive(Debug, Clone)]
pub struct Host<'a> {
    pub accel: AccelMode,
    pub data_dir: &'a Path,
    pub images_dir: &'a Path,
}

/// A command the daemon runs, the package it comes from, and the argument
/// that makes it print its version without side effects.
const TOOLS: &[(&str, &str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86", "--version"),
    ("qemu-img", "qemu-utils", "--version"),
    ("nft", "nftables", "--version"),
    ("ip", "iproute2", "-V"),
];

/// Runs every check, in the order `bhatti doctor` prints them.
pub fn check_all(host: &Host<'_>) -> Vec<Check> {
    let mut out = vec![root()];
    out.push(accelerator(host.accel));
    for (cmd, pkg, arg) in TOOLS {
        out.push(tool(cmd, pkg, arg));
    }
    out.push(netns());
    out.push(images(host.images_dir));
    out.push(free_disk(host.data_dir));
    out
}

/// The failed required checks as one line, or `None` when all hold.
pub fn missing_line(checks: &[Check]) -> Option<String> {
    let bad: Vec<String> = checks
        .iter()
        .filter(|c| c.required && !c.ok)
        .map(|c| format!("{} ({}; fix: {})", c.name, c.detail, c.fix))
        .collect();
    (!bad.is_empty()).then(|| bad.join("; "))
}

fn root() -> Check {
    let ok = nix::unistd::geteuid().is_root();
    Check {
        name: "root",
        ok,
        detail: if ok { "running as root" } else { "not root" }.into(),
        fix: if ok {
            String::new()
        } else {
            "run as root (VMs, TAP devices and network namespaces need it)".into()
        },
        required: true,
    }
}

fn accelerator(mode: AccelMode) -> Check {
    let reason = accel::kvm_unusable_reason();
    let (ok, detail, fix) = match (mode, reason) {
        (AccelMode::Tcg, _) => (true, "tcg (set in config)".to_string(), String::new()),
        (_, None) => (true, "kvm".to_string(), String::new()),
        (AccelMode::Auto, Some(r)) => (
            true,
            format!("tcg (software emulation): {r}"),
            String::new(),
        ),
        (AccelMode::Kvm, Some(r)) if !Path::new("/dev/kvm").exists() => (
            false,
            format!("accel is kvm but {r}"),
            "set `accel: auto` or `accel: tcg` in the daemon config".to_string(),
        ),
        (AccelMode::Kvm, Some(r)) => (true, format!("kvm forced although {r}"), String::new()),
    };
    Check {
        name: "accelerator",
        ok,
        detail,
        fix,
        required: true,
    }
}

/// Finds `cmd` on PATH (plus the sbin directories, which a non-root PATH lacks).
pub fn find_command(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn tool(cmd: &'static str, pkg: &str, version_arg: &str) -> Check {
    let fix = format!("apt-get install {pkg} (or run scripts/setup.sh)");
    let Some(path) = find_command(cmd) else {
        return Check {
            name: cmd,
            ok: false,
            detail: "not found on PATH".into(),
            fix,
            required: true,
        };
    };
    match Command::new(&path).arg(version_arg).output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let first = text.lines().next().unwrap_or("").trim().to_string();
            Check {
                name: cmd,
                ok: true,
                detail: first,
                fix: String::new(),
                required: true,
            }
        }
        Ok(o) => Check {
            name: cmd,
            ok: false,
            detail: format!(
                "{} {version_arg} failed: {}",
                path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            fix,
            required: true,
        },
        Err(e) => Check {
            name: cmd,
            ok: false,
            detail: format!("cannot run {}: {e}", path.display()),
            fix,
            required: true,
        },
    }
}

fn netns() -> Check {
    // `ip netns add` needs /run/netns on a filesystem that allows bind mounts
    // and a kernel with network namespaces.
    let ok = Path::new("/proc/self/ns/net").exists();
    Check {
        name: "network namespaces",
        ok,
        detail: if ok {
            "supported".into()
        } else {
            "/proc/self/ns/net missing: the kernel has no network namespaces".into()
        },
        fix: if ok {
            String::new()
        } else {
            "use a kernel built with CONFIG_NET_NS".into()
        },
        required: true,
    }
}

fn images(dir: &Path) -> Check {
    let current = dir.join("current.json");
    let ok = current.is_file();
    Check {
        name: "guest images",
        ok,
        detail: if ok {
            format!("{}", dir.display())
        } else {
            format!("{} has no current.json", dir.display())
        },
        fix: if ok {
            String::new()
        } else {
            "bhatti image build (bhatti serve also builds them at start-up)".into()
        },
        // serve builds them itself; doctor only reports.
        required: false,
    }
}

fn free_disk(data_dir: &Path) -> Check {
    // The data dir may not exist yet: measure the nearest existing ancestor.
    let probe = data_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match nix::sys::statvfs::statvfs(probe) {
        Ok(s) => {
            let free = s.blocks_available().saturating_mul(s.fragment_size());
            let ok = free >= MIN_FREE_DISK_BYTES;
            Check {
                name: "free disk",
                ok,
                detail: format!(
                    "{} free at {}",
                    super::image::human_size(free),
                    probe.display()
                ),
                fix: if ok {
                    String::new()
                } else {
                    format!(
                        "free at least {} in {}",
                        super::image::human_size(MIN_FREE_DISK_BYTES),
                        probe.display()
                    )
                },
                required: false,
            }
        }
        Err(e) => Check {
            name: "free disk",
            ok: false,
            detail: format!("statvfs {}: {e}", probe.display()),
            fix: "check that the data dir is on a mounted filesystem".into(),
            required: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_named_with_its_package() {
        let c = tool("bhatti-no-such-tool", "some-pkg", "--version");
        assert!(!c.ok);
        assert!(c.fix.contains("some-pkg"), "{c:?}");
        let line = missing_line(&[c]).expect("a failed required check");
        assert!(line.contains("bhatti-no-such-tool"), "{line}");
    }

    #[test]
    fn a_present_tool_reports_its_version() {
        let c = tool("true", "coreutils", "--version");
        assert!(c.ok, "{c:?}");
        assert!(c.detail.contains("true"), "{c:?}");
        // A tool that runs but fails its version call is not present.
        let c = tool("false", "coreutils", "--version");
        assert!(!c.ok, "{c:?}");
    }

    #[test]
    fn warnings_do_not_block() {
        let c = Check {
            name: "guest images",
            ok: false,
            detail: String::new(),
            fix: String::new(),
            required: false,
        };
        assert_eq!(missing_line(&[c]), None);
    }
}
