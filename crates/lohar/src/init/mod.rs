//! PID 1 duties inside the VM: stage-1 (modules, root disk, switch_root),
//! then mounts, hostname, network, clock, and power-off.
//!
//! Phases, in order (each failure is fatal and reported by the caller with
//! [`fatal`]):
//! 1. shutdown signals: SIGTERM/SIGINT/SIGPWR power the VM off ([`power`]);
//! 2. stage 1, when running as `/init` of the bhatti initramfs: mount
//!    /dev /proc /sys, load the modules in manifest order, read the boot
//!    config from fw_cfg, mount the root disk and switch root ([`stage1`]);
//! 3. PID 1 mounts in the real root ([`mounts`]);
//! 4. the kernel RNG seeded with the host's entropy ([`rng`]); hostname,
//!    /etc/hostname, /etc/hosts; a fresh /etc/machine-id if the
//!    root has none; wall clock; lo and eth0 ([`network`]); /etc/resolv.conf;
//! 5. the sandbox's volumes, found by virtio serial ([`volumes`]).

use std::io::Write;

use bhatti_proto::boot::FW_CFG_PATH;
use bhatti_proto::BootConfig;

pub mod clock;
mod mounts;
pub mod network;
pub mod power;
pub mod rng;
mod stage1;
mod volumes;

pub use power::poweroff;

/// What the boot phase hands to the server.
pub struct Booted {
    pub config: BootConfig,
}

/// How long the fw_cfg entry may take to show up after qemu_fw_cfg loads.
const CONFIG_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Writes one `lohar: …` line on the console (stderr is /dev/console for PID 1).
pub fn say(msg: &str) {
    let mut err = std::io::stderr().lock();
    // Nothing sensible to do if the console itself fails.
    let _ = writeln!(err, "lohar: {msg}");
}

/// Prints `lohar: fatal: <msg>` and powers off (PID 1) or exits 1 (tests).
pub fn fatal(msg: &str) -> ! {
    poweroff(&format!("fatal: {msg}"))
}

/// Announces on the console that the agent is listening. Prints only as PID 1
/// (the console of a VM), so tests' stderr stays quiet.
pub fn ready() {
    if std::process::id() == 1 {
        let up = clock::uptime_secs()
            .map(|u| format!(" (uptime {u:.2} s)"))
            .unwrap_or_default();
        say(&format!("ready{up}"));
    }
}

/// Runs every boot step; on error the caller prints it on the console and powers off.
pub fn boot() -> Result<Booted, String> {
    if std::process::id() != 1 {
        return Err(
            "not PID 1: lohar boots a VM as its /init (set LOHAR_TEST=1 to run the server alone)"
                .into(),
        );
    }
    let started = clock::uptime_secs().unwrap_or_default();
    power::watch_shutdown_signals()?;
    let mut marks = Marks::default();

    let config = if stage1::in_initramfs() {
        stage1::prepare()?;
        let loaded = clock::uptime_secs().unwrap_or_default();
        say(&format!(
            "stage 1: /init at {started:.2} s, modules loaded at {loaded:.2} s"
        ));
        // qemu_fw_cfg is loaded now; /sys moves along into the new root anyway.
        let config = read_boot_config()?;
        marks.mark("config");
        stage1::switch_root()?;
        marks.mark("root");
        mounts::mount_all()?;
        marks.mark("mounts");
        config
    } else {
        mounts::mount_all()?;
        read_boot_config()?
    };

    // Before anything reads randomness (the machine-id below, the user's
    // programs): an unseeded kernel makes a /dev/urandom read collect
    // jitter entropy first, 1.3 s under TCG.
    seed_rng(&config.entropy_hex);
    marks.mark("rng");
    set_hostname(&config.hostname)?;
    marks.mark("hostname");
    // A cold-booted sandbox is its own machine; a copy gets a new id via IDENTITY.
    match ensure_machine_id(std::path::Path::new(MACHINE_ID)) {
        Ok(true) => say("wrote a fresh /etc/machine-id"),
        Ok(false) => {}
        Err(e) => say(&format!("warning: {e}")),
    }
    marks.mark("machine-id");
    // The host took its time before QEMU started: the kernel's uptime has
    // passed since (a floor of the real lag; the host sets the clock again
    // once the agent answers).
    let up_ms = clock::uptime_secs().map_or(0, |u| (u * 1000.0) as i64);
    let now_ms = if config.time_unix_ms > 0 {
        config.time_unix_ms.saturating_add(up_ms)
    } else {
        0
    };
    if let Err(e) = clock::set_wall_clock(now_ms) {
        say(&format!("warning: {e}"));
    }
    marks.mark("clock");
    network::configure(&config.ip, &config.gateway)?;
    marks.mark("network");
    write_resolv_conf(&config.dns)?;
    volumes::mount_all(&config.volumes)?;
    marks.mark("volumes");
    say(&format!("boot steps done at (uptime, s): {marks}"));
    Ok(Booted { config })
}

/// Credits the host's entropy from the boot config to the kernel RNG. A
/// config without it (an older host) or a failure only costs time later.
fn seed_rng(entropy_hex: &str) {
    if entropy_hex.is_empty() {
        say("warning: the boot config carries no entropy; the RNG seeds itself (slow under TCG)");
        return;
    }
    let result = rng::decode_hex(entropy_hex)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| "entropy_hex is not hex".to_string())
        .and_then(|e| rng::reseed(&e).map_err(|e| e.to_string()));
    if let Err(e) = result {
        say(&format!("warning: cannot seed the RNG: {e}"));
    }
}

/// Uptimes at which boot steps ended, for one console line: where a slow
/// boot spends its time shows without a debugger.
#[derive(Default)]
struct Marks(Vec<(&'static str, f64)>);

impl Marks {
    fn mark(&mut self, step: &'static str) {
        self.0
            .push((step, clock::uptime_secs().unwrap_or_default()));
    }
}

impl std::fmt::Display for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, at)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{step} {at:.2}")?;
        }
        Ok(())
    }
}

/// The [`BootConfig`] QEMU hands over through fw_cfg.
fn read_boot_config() -> Result<BootConfig, String> {
    let path = std::path::Path::new(FW_CFG_PATH);
    stage1::wait_for(path, CONFIG_WAIT).map_err(|w| {
        format!("boot config {FW_CFG_PATH} missing after {w:?} (QEMU needs -fw_cfg name=opt/bhatti/config,file=...)")
    })?;
    let raw = std::fs::read(path).map_err(|e| format!("read {FW_CFG_PATH}: {e}"))?;
    serde_json::from_slice(&raw).map_err(|e| format!("boot config is not valid JSON: {e}"))
}

pub fn set_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Ok(());
    }
    nix::unistd::sethostname(name).map_err(|e| format!("sethostname {name:?}: {e}"))?;
    write_etc("/etc/hostname", &format!("{name}\n"))?;
    write_etc(
        "/etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
        ),
    )
}

/// Where the machine's id lives (systemd's format: 32 lowercase hex digits and a newline).
const MACHINE_ID: &str = "/etc/machine-id";

/// Writes a random machine-id to `path` when it is missing, empty or
/// systemd's `uninitialized` placeholder (the base image ships none, so
/// that no two sandboxes share one); returns whether it wrote one. An id
/// already there (a restarted sandbox) stays.
pub fn ensure_machine_id(path: &std::path::Path) -> Result<bool, String> {
    let current = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("read {}: {e}", path.display())),
    };
    let current = current.trim();
    if current.len() == 32 && current.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(false);
    }
    let mut raw = [0u8; 16];
    // /dev/urandom never blocks, also this early in boot; an id needs no more.
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(|e| format!("open /dev/urandom: {e}"))?,
        &mut raw,
    )
    .map_err(|e| format!("read /dev/urandom: {e}"))?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let text = format!("{hex}\n");
    match path.to_str() {
        Some(p) => write_etc(p, &text)?,
        None => std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))?,
    }
    Ok(true)
}

fn write_resolv_conf(dns: &[String]) -> Result<(), String> {
    let mut text = String::from("# written by lohar at boot\n");
    for ns in dns {
        text.push_str(&format!("nameserver {ns}\n"));
    }
    write_etc("/etc/resolv.conf", &text)
}

/// Replaces a file in /etc (a symlink there is replaced, not followed).
pub fn write_etc(path: &str, text: &str) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(path).map_err(|e| format!("remove {path}: {e}"))?;
    }
    std::fs::write(path, text).map_err(|e| format!("write {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Missing, empty and placeholder ids are replaced by 32 random hex
    /// digits (two runs differ); a valid id stays.
    #[test]
    fn machine_id_is_written_when_missing() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("machine-id");
        assert!(ensure_machine_id(&p).expect("missing"));
        let first = std::fs::read_to_string(&p).expect("read");
        let id = first.trim_end_matches('\n');
        assert!(first.ends_with('\n') && id.len() == 32, "{first:?}");
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(!ensure_machine_id(&p).expect("valid"), "a valid id stays");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), first);
        for placeholder in ["", "\n", "uninitialized\n"] {
            std::fs::write(&p, placeholder).expect("write");
            assert!(ensure_machine_id(&p).expect("placeholder"));
            let again = std::fs::read_to_string(&p).expect("read");
            assert_eq!(again.trim().len(), 32);
            assert_ne!(again, first, "random");
        }
    }
}
