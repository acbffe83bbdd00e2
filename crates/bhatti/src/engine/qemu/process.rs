//! The QEMU process of one VM: its argv, starting it inside the network
//! namespace in a session of its own, finding it again by pidfile, waiting
//! for its agent, and ending it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bhatti_proto::codec_async::{read_frame, write_frame};
use bhatti_proto::{ActivityInfo, FrameType, Message};

use super::accel::Accel;
use crate::engine::agent_client::{Channel, Dialer};

/// How long `qemu-system-x86_64 -daemonize` may take to report startup.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one readiness probe may take once connected.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connect timeout of a readiness probe. Short: until the guest configures
/// eth0 its SYNs vanish, and a short timeout notices the agent sooner.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// The files of one VM, all in its sandbox dir.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub dir: PathBuf,
    /// qcow2 overlay on the base rootfs.
    pub overlay: PathBuf,
    /// fw_cfg boot config (scrubbed once QEMU runs).
    pub config: PathBuf,
    /// The guest's serial console.
    pub console: PathBuf,
    pub qmp: PathBuf,
    pub pidfile: PathBuf,
    /// What the engine needs to find and restart the VM (argv, TAP, MAC).
    pub meta: PathBuf,
    /// The VM's saved state while it is stopped (QEMU's migration stream).
    pub state: PathBuf,
    /// Guest RAM of a VM whose memory is its own file (`share=on`); while
    /// the VM is stopped, this file is its saved memory.
    pub ram: PathBuf,
}

impl VmFiles {
    pub fn new(dir: PathBuf) -> VmFiles {
        VmFiles {
            overlay: dir.join("disk.qcow2"),
            config: dir.join("config.json"),
            console: dir.join("console.log"),
            qmp: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            meta: dir.join("vm.json"),
            state: dir.join("vm.state"),
            ram: dir.join("mem.ram"),
            dir,
        }
    }
}

/// Errors of the QEMU process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {prog}: {source}")]
    Spawn {
        prog: String,
        source: std::io::Error,
    },
    /// QEMU refused to start; carries its own message.
    #[error("QEMU exited at startup ({status}): {stderr}")]
    Startup { status: String, stderr: String },
    #[error("QEMU did not finish starting within {0:?}")]
    StartupTimeout(Duration),
    #[error("QEMU started but left no usable pidfile at {0}")]
    NoPid(String),
}

/// Everything the argv depends on.
#[derive(Debug, Clone)]
pub struct LaunchSpec<'a> {
    pub accel: Accel,
    pub tsc_khz: Option<u64>,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub cpus: u32,
    pub memory_mb: u32,
    pub tap: &'a str,
    pub mac: &'a str,
    /// Extra kernel command line words (from the image).
    pub extra_cmdline: &'a str,
    pub files: &'a VmFiles,
    /// Volume disks, in device order.
    pub volumes: &'a [VolumeDisk],
    /// Where guest RAM lives.
    pub mem: MemBacking<'a>,
    /// virtio-balloon free page reporting: the guest hands pages it freed
    /// back to the host, and QEMU punches them out of the RAM file. Off for
    /// a template VM, whose RAM file its copies map from disk: QEMU 7.2
    /// punches the file even through a copy's private mapping, which would
    /// zero the page under every other copy (docs/templates.md).
    pub report_free_pages: bool,
}

/// The file guest RAM is mapped from (`memory-backend-file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemBacking<'a> {
    pub path: &'a Path,
    /// `true`: the VM's own file, written through (`share=on`); a migration
    /// with `x-ignore-shared` then carries device state only. `false`: a
    /// checkpoint's file mapped copy-on-write (`share=off`), never written.
    pub shared: bool,
}

/// The `-object` argument of guest RAM.
fn mem_object(memory_mb: u32, mem: MemBacking<'_>) -> String {
    format!(
        "memory-backend-file,id={MEM_ID},size={memory_mb}M,mem-path={},share={}",
        mem.path.display(),
        if mem.shared { "on" } else { "off" }
    )
}

/// The balloon device of a VM that reports free pages.
const BALLOON_REPORTING: &str = "virtio-balloon-device,free-page-reporting=on";

/// Whether a VM started with `argv` reports free pages (see
/// [`LaunchSpec::report_free_pages`]). A copy must get the same device as
/// its source: QEMU restores device state only onto the same devices.
pub fn reports_free_pages(argv: &[String]) -> bool {
    argv.iter().any(|a| a == BALLOON_REPORTING)
}

/// The id of the guest RAM object in the argv.
const MEM_ID: &str = "mem";

/// Where an argv maps guest RAM from: `None` for anonymous RAM (a VM
/// started by an older bhatti without a memory backend, or one loaded from
/// a stream: see [`with_anonymous_ram`]), which migrates in full.
pub fn mem_backing(argv: &[String]) -> Option<(PathBuf, bool)> {
    let obj = argv
        .iter()
        .find(|a| a.starts_with("memory-backend-file,"))?;
    let mut path = None;
    let mut shared = false;
    for kv in obj.split(',') {
        if let Some(p) = kv.strip_prefix("mem-path=") {
            path = Some(PathBuf::from(p));
        } else if let Some(v) = kv.strip_prefix("share=") {
            shared = v == "on";
        }
    }
    path.map(|p| (p, shared))
}

/// The position and size (MiB) of the guest RAM object in `argv`, a file
/// backend or an anonymous one.
fn mem_object_at(argv: &[String]) -> Option<(usize, u32)> {
    let i = argv.iter().position(|a| {
        a.starts_with("memory-backend-file,") || a.starts_with("memory-backend-ram,")
    })?;
    let size: u32 = argv[i]
        .split(',')
        .find_map(|kv| kv.strip_prefix("size="))?
        .strip_suffix('M')?
        .parse()
        .ok()?;
    Some((i, size))
}

/// `argv` with guest RAM mapped from `mem` instead (the same size); `None`
/// when the argv has no memory backend.
pub fn with_mem_backing(argv: &[String], mem: MemBacking<'_>) -> Option<Vec<String>> {
    let (i, size) = mem_object_at(argv)?;
    let mut out = argv.to_vec();
    out[i] = mem_object(size, mem);
    Some(out)
}

/// `argv` with guest RAM anonymous (`memory-backend-ram`, the same size)
/// instead of a file; `None` when the argv has no memory backend.
///
/// For a VM that loads its RAM from a migration stream: QEMU reads every
/// page the stream says is zero before it decides not to write it, and
/// that read faults in the shared zero page of anonymous memory, where a
/// fresh file on disk allocates a page cache page and every data page
/// written goes through the filesystem (a template-born source's fork
/// loaded in 80-88 ms instead of 377 ms; docs/forks.md). Such a VM
/// migrates all of its RAM when stopped or checkpointed, like a VM mapping
/// a checkpoint's file privately; its stop gives it a RAM file of its own
/// (see [`with_mem_backing`]).
pub fn with_anonymous_ram(argv: &[String]) -> Option<Vec<String>> {
    let (i, size) = mem_object_at(argv)?;
    let mut out = argv.to_vec();
    out[i] = format!("memory-backend-ram,id={MEM_ID},size={size}M");
    Some(out)
}

/// A volume's disk as QEMU opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDisk {
    /// The volume id: the drive's id and the disk's virtio serial (at most 20 bytes).
    pub id: String,
    /// Raw image, absolute, without commas.
    pub path: PathBuf,
    pub read_only: bool,
}

/// The user QEMU drops to once its devices are open.
pub const QEMU_USER: &str = "nobody";

/// The guest kernel's command line.
pub fn kernel_cmdline(tsc_khz: Option<u64>, extra: &str) -> String {
    // `tsc_early_khz` + `tsc=reliable`: without them the guest sometimes hangs
    // calibrating its clock under TCG. `panic=-1` with `-no-reboot` turns a
    // guest panic into a QEMU exit the engine notices at once.
    // `cryptomgr.notests`: the crypto self-tests cost ~0.5 s of boot under TCG.
    let mut c = String::from("console=ttyS0 quiet panic=-1 cryptomgr.notests");
    if let Some(khz) = tsc_khz {
        c.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    if !extra.trim().is_empty() {
        c.push(' ');
        c.push_str(extra.trim());
    }
    c
}

/// QEMU's argv (without the program name). Devices keep a fixed order, so a
/// snapshot taken from this VM restores into a QEMU started with the same argv.
pub fn qemu_argv(s: &LaunchSpec<'_>) -> Vec<String> {
    let f = s.files;
    let p = |p: &Path| p.display().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    // Guest RAM is a file: a checkpoint copies it instead of streaming it,
    // and copies map a checkpoint's file copy-on-write (docs/forks.md).
    push(&[
        "-M",
        &format!("microvm,memory-backend={MEM_ID}"),
        "-accel",
        s.accel.qemu_arg(),
    ]);
    if s.accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &s.memory_mb.to_string(), "-smp", &s.cpus.to_string()]);
    push(&["-object", &mem_object(s.memory_mb, s.mem)]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    // A guest that breaks out of QEMU lands in a process without root and
    // under a seccomp filter: QEMU opens its disk, TAP and sockets as root,
    // then drops to `nobody`. (`elevateprivileges=deny` would forbid that very
    // drop, and `spawn=deny` the fork of -daemonize: QEMU 7.2 exits on both.)
    push(&["-runas", QEMU_USER]);
    push(&["-sandbox", "on,obsolete=deny,resourcecontrol=deny"]);
    push(&["-kernel", &p(s.kernel), "-initrd", &p(s.initramfs)]);
    push(&["-append", &kernel_cmdline(s.tsc_khz, s.extra_cmdline)]);
    // `auto-read-only=off`: keep the overlay's read-write descriptor for the
    // whole run. With the default (on), saving to disk drops write access,
    // and QEMU reopens the file by name, which `nobody` cannot.
    // `file.locking=off`: once the overlay is frozen as a layer (a fork,
    // a snapshot) this still-writable node must not lock the copies out;
    // the daemon keeps each image to one writer itself.
    push(&[
        "-drive",
        &format!(
            "id=root,file={},file.locking=off,format=qcow2,if=none,discard=unmap,detect-zeroes=unmap,auto-read-only=off",
            p(&f.overlay)
        ),
    ]);
    push(&["-device", "virtio-blk-device,drive=root"]);
    push(&[
        "-netdev",
        &format!("tap,id=n0,ifname={},script=no,downscript=no", s.tap),
    ]);
    push(&[
        "-device",
        &format!("virtio-net-device,netdev=n0,mac={}", s.mac),
    ]);
    push(&[
        "-device",
        if s.report_free_pages {
            BALLOON_REPORTING
        } else {
            "virtio-balloon-device,free-page-reporting=off"
        },
    ]);
    // Volumes come after every other virtio device, so the root disk stays
    // /dev/vda; the guest finds each volume by its serial, not its name.
    for v in s.volumes {
        let mode = if v.read_only {
            "readonly=on"
        } else {
            "discard=unmap,auto-read-only=off"
        };
        push(&[
            "-drive",
            &format!(
                "id={},file={},file.locking=off,format=raw,if=none,{mode}",
                v.id,
                p(&v.path)
            ),
        ]);
        push(&[
            "-device",
            &format!("virtio-blk-device,drive={0},serial={0}", v.id),
        ]);
    }
    push(&["-fw_cfg", &super::config_drive::qemu_arg(&f.config)]);
    push(&["-serial", &format!("file:{}", p(&f.console))]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", p(&f.qmp))]);
    push(&["-pidfile", &p(&f.pidfile)]);
    a
}

/// Starts QEMU inside `netns`, daemonized into its own session, and returns
/// its pid. `-daemonize` returns only once QEMU has initialised (devices,
/// TAP, QMP socket), and with its error message if it could not.
pub async fn launch(
    qemu: &str,
    netns: &str,
    argv: &[String],
    pidfile: &Path,
) -> Result<u32, ProcessError> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", netns, qemu])
        .args(argv)
        .arg("-daemonize");
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(LAUNCH_TIMEOUT, cmd.output())
        .await
        .map_err(|_| ProcessError::StartupTimeout(LAUNCH_TIMEOUT))?
        .map_err(|source| ProcessError::Spawn {
            prog: qemu.to_string(),
            source,
        })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        return Err(ProcessError::Startup {
            status: out.status.to_string(),
            stderr,
        });
    }
    read_pidfile(pidfile).ok_or_else(|| ProcessError::NoPid(pidfile.display().to_string()))
}

/// The pid in a pidfile, if it holds one.
pub fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
}

/// Whether `pid` is a live process (zombies count as dead: nobody may reap
/// a daemonized QEMU when PID 1 does not).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ") ".
        Ok(stat) => match stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
        {
            Some(state) => !matches!(state, "Z" | "X" | "x"),
            None => false,
        },
        Err(_) => false,
    }
}

/// Whether `pid` is a live QEMU of the VM in `dir` (guards against pid reuse).
pub fn is_our_qemu(pid: u32, dir: &Path) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = format!("{}/", dir.display());
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_qemu = args
        .first()
        .is_some_and(|a0| String::from_utf8_lossy(a0).contains("qemu-system"));
    is_qemu
        && args
            .iter()
            .any(|a| path_after(&String::from_utf8_lossy(a), &needle).is_some())
}

/// What follows `prefix` in a QEMU argument that holds a path starting with
/// it: the whole argument, or the part after `=` or `:` (`file=/p`,
/// `file:/p`, `unix:/p`). `/data/` thus does not match `/srv/data/x`.
fn path_after<'a>(arg: &'a str, prefix: &str) -> Option<&'a str> {
    arg.match_indices(prefix)
        .find(|(i, _)| *i == 0 || matches!(arg.as_bytes()[*i - 1], b'=' | b':'))
        .map(|(i, _)| &arg[i + prefix.len()..])
}

/// Live QEMU processes whose argv mentions a path under `sandboxes_dir`: (pid, sandbox id).
pub fn find_qemus_under(sandboxes_dir: &Path) -> Vec<(u32, String)> {
    let prefix = format!("{}/", sandboxes_dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline);
        let mut args = text.split('\0');
        if !args.next().is_some_and(|a0| a0.contains("qemu-system")) {
            continue;
        }
        let id = args.find_map(|a| {
            let rest = path_after(a, &prefix)?;
            rest.split('/')
                .next()
                .filter(|id| !id.is_empty())
                .map(str::to_string)
        });
        if let Some(id) = id {
            if pid_alive(pid) {
                found.push((pid, id));
            }
        }
    }
    found
}

/// SIGKILLs `pid` (errors ignored: it may be gone already).
pub fn kill(pid: u32) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
        // Reap it if it happens to be our child (it is not when daemonized).
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(p),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
}

/// Waits until `pid` is gone; false on timeout.
pub async fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while pid_alive(pid) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// The last `lines` lines of the console log (or a note that there is none).
pub fn console_tail(path: &Path, lines: usize) -> String {
    let Ok(data) = std::fs::read(path) else {
        return "(no console output)".into();
    };
    let start = data.len().saturating_sub(16 * 1024);
    let text = String::from_utf8_lossy(&data[start..]);
    let all: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    if all.is_empty() {
        return "(no console output)".into();
    }
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One readiness probe: AUTH + ACTIVITY_REQ on the control port.
pub async fn probe_agent(dialer: &dyn Dialer, token: &[u8]) -> Result<ActivityInfo, String> {
    probe_agent_within(dialer, token, PROBE_CONNECT_TIMEOUT).await
}

/// [`probe_agent`] with a connect timeout of `connect`.
async fn probe_agent_within(
    dialer: &dyn Dialer,
    token: &[u8],
    connect: Duration,
) -> Result<ActivityInfo, String> {
    let mut s = tokio::time::timeout(connect, dialer.dial(Channel::Control))
        .await
        .map_err(|_| "connect timed out (the guest's network is not up)".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let exchange = async {
        write_frame(&mut s, FrameType::Auth, token)
            .await
            .map_err(|e| format!("send AUTH: {e}"))?;
        write_frame(&mut s, FrameType::ActivityReq, &[])
            .await
            .map_err(|e| format!("send ACTIVITY_REQ: {e}"))?;
        let mut frame = read_frame(&mut s)
            .await
            .map_err(|e| format!("read reply: {e}"))?;
        if frame.kind == FrameType::ErrorCode {
            // The ERROR it qualifies follows; its message says enough here.
            frame = read_frame(&mut s)
                .await
                .map_err(|e| format!("read reply: {e}"))?;
        }
        match Message::decode(&frame).map_err(|e| e.to_string())? {
            Message::ActivityResp(a) => Ok(a),
            Message::Error(m) => Err(format!("agent answered ERROR: {m}")),
            other => Err(format!(
                "agent answered {:?} instead of ACTIVITY_RESP",
                other.kind()
            )),
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .map_err(|_| "no answer to ACTIVITY_REQ".to_string())?
}

/// Why waiting for the agent ended without an answer.
#[derive(Debug)]
pub enum NotReady {
    /// The QEMU process is gone.
    Died,
    /// The deadline passed; carries the last probe error.
    Timeout(String),
}

/// Probes the agent until it answers, QEMU dies or `timeout` passes.
pub async fn wait_ready(
    dialer: &dyn Dialer,
    token: &[u8],
    pid: u32,
    timeout: Duration,
) -> Result<(), NotReady> {
    wait_ready_with(
        dialer,
        token,
        pid,
        timeout,
        PROBE_CONNECT_TIMEOUT,
        PROBE_PAUSE,
    )
    .await
}

/// [`wait_ready`] for a guest that is known to run and is about to answer
/// (a restored copy): a lost SYN is not retransmitted for a second, so
/// probes give up on a connect after a few ms and start again at once.
pub async fn wait_ready_quick(
    dialer: &dyn Dialer,
    token: &[u8],
    pid: u32,
    timeout: Duration,
) -> Result<(), NotReady> {
    let connect = Duration::from_millis(25);
    wait_ready_with(
        dialer,
        token,
        pid,
        timeout,
        connect,
        Duration::from_millis(2),
    )
    .await
}

/// Pause between readiness probes of a booting guest.
const PROBE_PAUSE: Duration = Duration::from_millis(50);

async fn wait_ready_with(
    dialer: &dyn Dialer,
    token: &[u8],
    pid: u32,
    timeout: Duration,
    connect: Duration,
    pause: Duration,
) -> Result<(), NotReady> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if !pid_alive(pid) {
            return Err(NotReady::Died);
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(NotReady::Timeout(if last.is_empty() {
                "no probe finished".into()
            } else {
                last
            }));
        }
        match tokio::time::timeout(remaining, probe_agent_within(dialer, token, connect)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) if last.is_empty() => last = "probe still running at the deadline".into(),
            Err(_) => {}
        }
        tokio::time::sleep(pause).await;
    }
}

/// Makes the child `cmd` spawns get `signal` when the calling thread dies
/// (`PR_SET_PDEATHSIG`, prctl(2)): a daemon killed mid-way leaves no helper
/// (an image build, a rebase) running unsupervised.
pub fn die_with_caller(cmd: &mut std::process::Command, signal: libc::c_int) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> VmFiles {
        VmFiles::new(PathBuf::from("/var/lib/bhatti/sandboxes/sb1"))
    }

    #[test]
    fn argv_under_tcg() {
        let f = files();
        let spec = LaunchSpec {
            accel: Accel::Tcg,
            tsc_khz: Some(2_596_148),
            kernel: Path::new("/img/vmlinux"),
            initramfs: Path::new("/img/initrd"),
            cpus: 1,
            memory_mb: 512,
            tap: "bt-0123456789ab",
            mac: "02:b4:c0:a8:89:05",
            extra_cmdline: "",
            files: &f,
            volumes: &[],
            mem: MemBacking {
                path: &f.ram,
                shared: true,
            },
            report_free_pages: true,
        };
        let a = qemu_argv(&spec);
        let joined = a.join(" ");
        assert!(
            joined.starts_with("-M microvm,memory-backend=mem -accel tcg,tb-size=64 -m 512 -smp 1 -object memory-backend-file,id=mem,size=512M,mem-path=/var/lib/bhatti/sandboxes/sb1/mem.ram,share=on"),
            "{joined}"
        );
        assert_eq!(
            mem_backing(&a),
            Some((PathBuf::from("/var/lib/bhatti/sandboxes/sb1/mem.ram"), true))
        );
        let cow = with_mem_backing(
            &a,
            MemBacking {
                path: Path::new("/cp/mem.ram"),
                shared: false,
            },
        )
        .expect("has a backend");
        assert_eq!(
            mem_backing(&cow),
            Some((PathBuf::from("/cp/mem.ram"), false))
        );
        assert!(cow
            .join(" ")
            .contains("size=512M,mem-path=/cp/mem.ram,share=off"));
        assert_eq!(cow.len(), a.len());
        // Anonymous RAM: no file to map, and back to a file of its own.
        let anon = with_anonymous_ram(&cow).expect("has a backend");
        assert_eq!(mem_backing(&anon), None);
        assert!(anon
            .join(" ")
            .contains("-object memory-backend-ram,id=mem,size=512M -"));
        assert!(anon.join(" ").contains("microvm,memory-backend=mem"));
        let own = with_mem_backing(
            &anon,
            MemBacking {
                path: &f.ram,
                shared: true,
            },
        )
        .expect("has a backend");
        assert_eq!(own, a);
        assert!(!a.iter().any(|x| x == "-cpu"));
        let append = &a[a.iter().position(|x| x == "-append").expect("append") + 1];
        assert_eq!(
            append,
            "console=ttyS0 quiet panic=-1 cryptomgr.notests tsc_early_khz=2596148 tsc=reliable"
        );
        assert!(joined.contains("-netdev tap,id=n0,ifname=bt-0123456789ab,script=no,downscript=no"));
        assert!(joined.contains("virtio-net-device,netdev=n0,mac=02:b4:c0:a8:89:05"));
        assert!(joined.contains("virtio-balloon-device,free-page-reporting=on"));
        assert!(reports_free_pages(&a));
        let template = qemu_argv(&LaunchSpec {
            report_free_pages: false,
            ..spec.clone()
        });
        assert!(template
            .join(" ")
            .contains("virtio-balloon-device,free-page-reporting=off"));
        assert!(!reports_free_pages(&template));
        // Saving to disk needs the overlay's read-write descriptor kept open.
        assert!(joined.contains("detect-zeroes=unmap,auto-read-only=off"));
        assert!(joined.contains(
            "-fw_cfg name=opt/bhatti/config,file=/var/lib/bhatti/sandboxes/sb1/config.json"
        ));
        assert!(joined.contains("-serial file:/var/lib/bhatti/sandboxes/sb1/console.log"));
        assert!(
            joined.contains("-qmp unix:/var/lib/bhatti/sandboxes/sb1/qmp.sock,server=on,wait=off")
        );
        assert!(joined.contains("-pidfile /var/lib/bhatti/sandboxes/sb1/qemu.pid"));
        let kvm = qemu_argv(&LaunchSpec {
            accel: Accel::Kvm,
            extra_cmdline: "foo=1",
            ..spec
        });
        assert!(kvm.join(" ").contains("-accel kvm -cpu host"));
        assert!(kvm.iter().any(|x| x.ends_with("tsc=reliable foo=1")));
        assert!(!joined.contains("serial="));
    }

    #[test]
    fn volumes_follow_every_other_device() {
        let f = files();
        let vols = [
            VolumeDisk {
                id: "vol-000000000001".into(),
                path: PathBuf::from("/d/volumes/vol-000000000001.img"),
                read_only: false,
            },
            VolumeDisk {
                id: "vol-000000000002".into(),
                path: PathBuf::from("/d/volumes/vol-000000000002.img"),
                read_only: true,
            },
        ];
        let a = qemu_argv(&LaunchSpec {
            accel: Accel::Tcg,
            tsc_khz: None,
            kernel: Path::new("/k"),
            initramfs: Path::new("/i"),
            cpus: 1,
            memory_mb: 256,
            tap: "t",
            mac: "m",
            extra_cmdline: "",
            files: &f,
            volumes: &vols,
            mem: MemBacking {
                path: &f.ram,
                shared: true,
            },
            report_free_pages: true,
        });
        let devices: Vec<&str> = a
            .iter()
            .enumerate()
            .filter(|(i, _)| *i > 0 && a[i - 1] == "-device")
            .map(|(_, d)| d.as_str())
            .collect();
        assert!(devices[0].starts_with("virtio-blk-device,drive=root"));
        assert_eq!(
            &devices[3..],
            [
                "virtio-blk-device,drive=vol-000000000001,serial=vol-000000000001",
                "virtio-blk-device,drive=vol-000000000002,serial=vol-000000000002"
            ]
        );
        let joined = a.join(" ");
        assert!(joined.contains("id=vol-000000000001,file=/d/volumes/vol-000000000001.img,file.locking=off,format=raw,if=none,discard=unmap,auto-read-only=off"));
        assert!(joined.contains("id=vol-000000000002,file=/d/volumes/vol-000000000002.img,file.locking=off,format=raw,if=none,readonly=on"));
    }

    #[test]
    fn paths_in_arguments() {
        assert_eq!(
            path_after("/d/sandboxes/a/qemu.pid", "/d/sandboxes/"),
            Some("a/qemu.pid")
        );
        assert_eq!(
            path_after(
                "id=root,file=/d/sandboxes/a/disk.qcow2,format=qcow2",
                "/d/sandboxes/"
            ),
            Some("a/disk.qcow2,format=qcow2")
        );
        assert_eq!(
            path_after("file:/d/sandboxes/b/console.log", "/d/sandboxes/"),
            Some("b/console.log")
        );
        assert_eq!(
            path_after("file=/srv/d/sandboxes/a/disk.qcow2", "/d/sandboxes/"),
            None
        );
        assert_eq!(path_after("-m", "/d/sandboxes/"), None);
    }

    #[test]
    fn cmdline_without_tsc() {
        assert_eq!(
            kernel_cmdline(None, " "),
            "console=ttyS0 quiet panic=-1 cryptomgr.notests"
        );
    }

    #[test]
    fn liveness_of_self_and_nonsense() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
        assert!(!is_our_qemu(
            std::process::id(),
            Path::new("/nonexistent-dir")
        ));
    }

    #[test]
    fn console_tail_keeps_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("console.log");
        assert_eq!(console_tail(&p, 3), "(no console output)");
        std::fs::write(&p, "a\r\nb\n\nc\nd\n").expect("write");
        assert_eq!(console_tail(&p, 3), "b\nc\nd");
    }
}
