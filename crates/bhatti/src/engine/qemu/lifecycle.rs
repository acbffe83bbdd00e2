//! One VM's way through the engine: checking a spec, preparing its host
//! side, booting it and waiting for its agent, stopping it and removing
//! what it left.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bhatti_proto::BootConfig;

use super::netns_dialer::NetnsDialer;
use super::process::{self, NotReady, VmFiles};
use super::qmp::Qmp;
use super::{
    blocking, check_id, config_drive, disks, net_err, network, QemuEngine, Vm, VmMeta,
    CONSOLE_TAIL_LINES, QUIT_GRACE,
};
use crate::engine::{EngineError, SandboxSpec};

impl QemuEngine {
    pub(super) fn check_spec(&self, spec: &SandboxSpec) -> Result<(), EngineError> {
        check_id(&spec.id)?;
        if !self.net.subnet.is_guest_addr(spec.ip) {
            return Err(EngineError::InvalidSpec(format!(
                "guest address {} is not a host address of {} other than the gateway",
                spec.ip, self.net.subnet
            )));
        }
        if !(1..=64).contains(&spec.cpus) {
            return Err(EngineError::InvalidSpec(format!(
                "cpus must be 1-64, got {}",
                spec.cpus
            )));
        }
        if spec.memory_mb < 128 {
            return Err(EngineError::InvalidSpec(format!(
                "memory must be at least 128 MiB, got {}",
                spec.memory_mb
            )));
        }
        let images = &self.cfg.images;
        let base = self.base_of(spec);
        for (what, p) in [
            ("kernel", &images.kernel),
            ("initramfs", &images.initramfs),
            ("base rootfs", &base),
        ] {
            if !p.is_file() {
                return Err(EngineError::Image(format!(
                    "{what} {} does not exist (run the image build first)",
                    p.display()
                )));
            }
        }
        for v in &spec.volumes {
            check_id(&v.id)?;
            if v.id.len() > 20 {
                return Err(EngineError::InvalidSpec(format!(
                    "volume id {} is longer than a virtio serial (20 bytes)",
                    v.id
                )));
            }
            if !self.volume_path(&v.id).is_file() {
                return Err(EngineError::Storage(format!(
                    "the disk of volume {} is missing ({})",
                    v.id,
                    self.volume_path(&v.id).display()
                )));
            }
        }
        let qmp_path = self.sandbox_dir(&spec.id).join("qmp.sock");
        if qmp_path.as_os_str().len() >= 108 {
            return Err(EngineError::Config(format!(
                "QMP socket path {} is too long for a Unix socket; use a shorter data dir",
                qmp_path.display()
            )));
        }
        Ok(())
    }

    /// The raw image the sandbox's overlay backs onto: its custom image, or the built rootfs.
    pub(super) fn base_of(&self, spec: &SandboxSpec) -> std::path::PathBuf {
        match &spec.image {
            Some(id) => self.image_path(id),
            None => self.cfg.images.rootfs.clone(),
        }
    }

    pub(super) fn boot_config(&self, spec: &SandboxSpec) -> BootConfig {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        BootConfig {
            hostname: spec.name.clone(),
            token: spec.token.clone(),
            ip: format!("{}/{}", spec.ip, self.net.subnet.prefix()),
            gateway: self.net.subnet.gateway().to_string(),
            dns: if self.resolver.is_some() {
                vec![self.net.subnet.gateway().to_string()]
            } else {
                self.cfg.dns.clone()
            },
            env: spec.env.clone(),
            init: spec.init.clone(),
            time_unix_ms: i64::try_from(now.as_millis()).unwrap_or(i64::MAX),
            volumes: spec
                .volumes
                .iter()
                .map(|v| bhatti_proto::VolumeMount {
                    serial: v.id.clone(),
                    path: v.mount.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            entropy_hex: super::fork::random_hex(bhatti_proto::BOOT_ENTROPY_BYTES),
        }
    }

    /// Reserves `spec.id` for a new VM (boot or restore) and returns its
    /// files and the guard that undoes everything if the start fails.
    ///
    /// Errors: `Other` when a VM with that id exists or is being made.
    pub(super) fn begin_create(
        &self,
        spec: &SandboxSpec,
    ) -> Result<(VmFiles, CreateGuard<'_>), EngineError> {
        {
            let mut busy = self.busy_ids();
            if self.vm(&spec.id).is_some() || !busy.insert(spec.id.clone()) {
                return Err(EngineError::AlreadyExists(format!(
                    "a VM with id {} already exists",
                    spec.id
                )));
            }
        }
        let files = VmFiles::new(self.sandbox_dir(&spec.id));
        let guard = CreateGuard {
            engine: self,
            id: spec.id.clone(),
            files: files.clone(),
            ip: spec.ip,
            pid: Mutex::new(None),
            armed: false,
        };
        Ok((files, guard))
    }

    /// The QEMU command line and the record of a VM for `spec` with this
    /// machine size (a restored copy takes its source's) and guest RAM.
    pub(super) fn vm_meta(
        &self,
        spec: &SandboxSpec,
        cpus: u32,
        memory_mb: u32,
        files: &VmFiles,
        mem: process::MemBacking<'_>,
        report_free_pages: bool,
    ) -> VmMeta {
        let tap = network::tap_name(&spec.id);
        let mac = network::guest_mac(spec.ip);
        let volumes: Vec<process::VolumeDisk> = spec
            .volumes
            .iter()
            .map(|v| process::VolumeDisk {
                id: v.id.clone(),
                path: self.volume_path(&v.id),
                read_only: v.read_only,
            })
            .collect();
        let launch = process::LaunchSpec {
            accel: self.accel,
            tsc_khz: self.tsc_khz,
            kernel: &self.cfg.images.kernel,
            initramfs: &self.cfg.images.initramfs,
            cpus,
            memory_mb,
            tap: &tap,
            mac: &mac,
            extra_cmdline: &self.cfg.extra_cmdline,
            files,
            volumes: &volumes,
            mem,
            report_free_pages,
        };
        let argv = process::qemu_argv(&launch);
        VmMeta {
            id: spec.id.clone(),
            ip: spec.ip,
            mac,
            tap,
            netns: self.net.netns.clone(),
            accel: self.accel,
            qemu: self.cfg.qemu_binary.clone(),
            argv,
            egress: spec.egress.clone(),
            peer_group: spec.peer_group.clone(),
            saved_ram_in_file: false,
        }
    }

    /// Everything of `create` after the id was reserved; the caller cleans up on error.
    pub(super) async fn boot(
        &self,
        spec: &SandboxSpec,
        files: &VmFiles,
        pid_slot: &Mutex<Option<u32>>,
    ) -> Result<Arc<Vm>, EngineError> {
        let mem = process::MemBacking {
            path: &files.ram,
            shared: true,
        };
        let meta = self.vm_meta(spec, spec.cpus, spec.memory_mb, files, mem, !spec.template);
        let (tap, mac, argv) = (meta.tap.clone(), meta.mac.clone(), meta.argv.clone());
        let boot_cfg = self.boot_config(spec);
        let record = meta.clone();

        // Host-side preparation: plain blocking work (files, `ip`, `qemu-img`).
        let (net, f, rootfs, b, ip, t, m) = (
            self.net.clone(),
            files.clone(),
            self.base_of(spec),
            boot_cfg.clone(),
            spec.ip,
            tap.clone(),
            mac.clone(),
        );
        let read_only: Vec<std::path::PathBuf> = spec
            .volumes
            .iter()
            .filter(|v| v.read_only)
            .map(|v| self.volume_path(&v.id))
            .collect();
        let t0 = std::time::Instant::now();
        blocking(move || -> Result<(), EngineError> {
            if !network::base_present(&net) {
                network::ensure_base(&net).map_err(net_err)?;
            }
            for p in &read_only {
                super::volumes::make_clean(p)?;
            }
            disks::create_overlay(&rootfs, &f.overlay).map_err(|e| match e {
                disks::DiskError::MissingBase(_) => EngineError::Image(e.to_string()),
                e => EngineError::Disk(e),
            })?;
            config_drive::write(&f.config, &b)?;
            let meta_json = serde_json::to_vec_pretty(&meta)
                .map_err(|e| EngineError::Internal(format!("VM record: {e}")))?;
            std::fs::write(&f.meta, meta_json)?;
            network::add_tap(&net, &t, ip, &m).map_err(net_err)
        })
        .await??;
        self.install_firewall(&record).await?;

        let prepared = t0.elapsed();
        let pid = process::launch(
            &self.cfg.qemu_binary,
            &self.net.netns,
            &argv,
            &files.pidfile,
        )
        .await
        .map_err(|e| match e {
            process::ProcessError::Startup { .. } => EngineError::Boot {
                // QEMU's own words may only name the RAM file's ftruncate.
                reason: format!("{e} (guest memory {} MiB)", spec.memory_mb),
                console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
            },
            e => EngineError::Process(e),
        })?;
        if let Ok(mut p) = pid_slot.lock() {
            *p = Some(pid);
        }
        // QEMU holds the config in memory now: no secret stays on disk.
        config_drive::scrub(&files.config, &boot_cfg)?;
        let qmp = Qmp::connect_retry(&files.qmp, Duration::from_secs(5))
            .await
            .map_err(|e| EngineError::Boot {
                reason: e.to_string(),
                console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
            })?;

        let launched = t0.elapsed();
        let dialer = NetnsDialer::new(self.sockets.clone(), spec.ip);
        match process::wait_ready(&dialer, spec.token.as_bytes(), pid, self.boot_timeout).await {
            Ok(()) => {}
            Err(NotReady::Died) => {
                return Err(EngineError::Boot {
                    reason: format!("QEMU (pid {pid}) exited while the guest was booting"),
                    console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                })
            }
            Err(NotReady::Timeout(last)) => {
                return Err(EngineError::Timeout {
                    secs: self.boot_timeout.as_secs(),
                    reason: format!(
                        "the agent at {}:{} never answered (last attempt: {last})",
                        spec.ip,
                        bhatti_proto::CONTROL_PORT
                    ),
                    console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                })
            }
        }
        tracing::debug!(
            id = %spec.id,
            prepare_ms = prepared.as_millis() as u64,
            launch_ms = (launched - prepared).as_millis() as u64,
            agent_ms = (t0.elapsed() - launched).as_millis() as u64,
            "VM boot phases"
        );
        Ok(Arc::new(Vm {
            files: files.clone(),
            pid,
            ip: spec.ip,
            tap,
            qmp: tokio::sync::Mutex::new(Some(Arc::new(qmp))),
        }))
    }

    /// Stops a VM's QEMU: QMP `quit`, then SIGKILL if it lingers.
    pub(super) async fn stop_qemu(&self, vm: Option<&Vm>, files: &VmFiles) {
        let pid = vm
            .map(|v| v.pid)
            .or_else(|| process::read_pidfile(&files.pidfile));
        let Some(pid) = pid.filter(|p| process::is_our_qemu(*p, &files.dir)) else {
            return;
        };
        let existing = match vm {
            Some(v) => v.qmp.lock().await.take(),
            None => None,
        };
        let qmp = match existing.filter(|q| !q.is_closed()) {
            Some(q) => Some(q),
            None => tokio::time::timeout(Duration::from_secs(1), Qmp::connect(&files.qmp))
                .await
                .ok()
                .and_then(Result::ok)
                .map(Arc::new),
        };
        if let Some(q) = qmp {
            let _ = tokio::time::timeout(Duration::from_secs(1), q.quit()).await;
        }
        if !process::wait_exit(pid, QUIT_GRACE).await && process::is_our_qemu(pid, &files.dir) {
            tracing::warn!(pid, "QEMU did not quit; killing it");
            process::kill(pid);
            process::wait_exit(pid, QUIT_GRACE).await;
        }
    }

    /// Removes a VM's host leftovers (TAP, neighbour entry, dir); the process must be gone.
    pub(super) async fn remove_leftovers(
        &self,
        id: &str,
        files: &VmFiles,
        ip: Option<Ipv4Addr>,
        tap: Option<String>,
    ) -> Result<(), EngineError> {
        let meta = read_meta(&files.meta);
        let tap = tap
            .or_else(|| meta.as_ref().map(|m| m.tap.clone()))
            .unwrap_or_else(|| network::tap_name(id));
        let ip = ip.or(meta.map(|m| m.ip));
        let (net, dir) = (self.net.clone(), files.dir.clone());
        let (fw, fid) = (self.firewall.clone(), id.to_string());
        blocking(move || -> Result<(), EngineError> {
            fw.remove(&fid);
            network::remove_tap(&net, &tap, ip).map_err(net_err)?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(EngineError::State(format!(
                    "cannot remove {}: {e}",
                    dir.display()
                ))),
            }
        })
        .await?
    }
}

pub(super) fn read_meta(path: &Path) -> Option<VmMeta> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Tears a half-created VM down if `create` is abandoned (its future dropped).
pub(super) struct CreateGuard<'a> {
    pub(super) engine: &'a QemuEngine,
    pub(super) id: String,
    pub(super) files: VmFiles,
    pub(super) ip: Ipv4Addr,
    pub(super) pid: Mutex<Option<u32>>,
    pub(super) armed: bool,
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        self.engine.busy_ids().remove(&self.id);
        if !self.armed {
            return;
        }
        // Cancelled mid-create: clean up synchronously on a plain thread.
        let (net, files, ip, id) = (
            self.engine.net.clone(),
            self.files.clone(),
            self.ip,
            self.id.clone(),
        );
        let pid = self
            .pid
            .lock()
            .ok()
            .and_then(|p| *p)
            .or_else(|| process::read_pidfile(&files.pidfile));
        std::thread::spawn(move || {
            if let Some(pid) = pid.filter(|p| process::is_our_qemu(*p, &files.dir)) {
                process::kill(pid);
            }
            let _ = network::remove_tap(&net, &network::tap_name(&id), Some(ip));
            let _ = std::fs::remove_dir_all(&files.dir);
        });
    }
}
