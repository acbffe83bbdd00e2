//! `bhatti serve`: start-up in named phases, then the HTTP listener until
//! SIGTERM/SIGINT. VMs keep running across daemon restarts.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;

use crate::api::router::{router, AppState};
use crate::config::DaemonConfig;
use crate::engine::qemu::image::{ensure_images, LogProgress};
use crate::engine::qemu::{QemuConfig, QemuEngine};
use crate::proxy::public::PublicConfig;
use crate::rate_limit::UserLimits;
use crate::secrets::SecretCipher;
use crate::service::{Service, ThermalConfig};
use crate::store::Store;

/// How often running sandboxes are checked for a VM that died.
const VM_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the daemon until it is told to stop.
pub async fn serve(config_flag: Option<&Path>) -> anyhow::Result<()> {
    let loaded = DaemonConfig::load(config_flag)?;
    tracing::info!("{}", loaded.notice());
    let cfg = loaded.config;
    require_root()?;
    require_prerequisites(&cfg)?;

    // Everything that can clash with another daemon is claimed before the
    // store is touched: a second daemon on this data dir (or these ports)
    // must refuse without marking the first one's sandboxes as gone.
    let _data_dir_lock = lock_data_dir(&cfg.data_dir)?;
    let public = tokio::net::TcpListener::bind(cfg.public_listen)
        .await
        .with_context(|| format!("listening on {} (public_listen)", cfg.public_listen))?;
    let listener = match cfg.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?,
        ),
        None => None,
    };
    let socket_path = cfg.socket_path();
    let control = bind_control_socket(&socket_path)?;

    let store = Store::open(&cfg.data_dir)?;
    let cipher = Arc::new(SecretCipher::load_or_create(&cfg.data_dir)?);

    let images_dir = cfg.images_dir.clone();
    let images =
        tokio::task::spawn_blocking(move || ensure_images(&images_dir, &LogProgress)).await??;
    let engine = Arc::new(QemuEngine::new(qemu_config(&cfg, images)?).await?);
    tracing::info!(accel = ?engine.accel(), netns = %cfg.netns, "engine ready");

    let service = Arc::new(
        Service::new(store, engine, cipher, cfg.subnet)
            .with_public_urls(cfg.public_scheme(), &cfg.public_url_host_suffix())
            .with_egress(cfg.default_egress()?, cfg.same_user_peers)
            .with_uplink(cfg.egress)
            .with_templates(crate::service::templates_enabled(cfg.templates))
            .with_thermal(ThermalConfig::from_secs(
                cfg.idle_warm_secs,
                cfg.idle_cold_secs,
                cfg.max_concurrent_restores as usize,
            )),
    );
    service
        .recover()
        .await
        .context("recovering sandboxes from the store")?;
    // Builds the default template in the background; creates boot until it is ready.
    service.clone().start_templates().await;
    tokio::spawn(service.clone().watch_vms(VM_WATCH_INTERVAL));
    tokio::spawn(service.clone().thermal_manager());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let public_cfg = PublicConfig {
        domain: cfg.domain.clone(),
        scheme: cfg.public_scheme(),
        rate_per_alias: cfg.public_rate_per_alias,
        rate_global: cfg.public_rate_global,
        rate_per_client: cfg.public_rate_per_client,
    };
    let public_task = tokio::spawn(crate::proxy::public::serve(
        public,
        service.clone(),
        public_cfg,
        stopped(stop_rx.clone()),
    ));
    tracing::info!(public_listen = %cfg.public_listen, domain = %cfg.domain, "public proxy listening");

    let app = router(AppState {
        service,
        limits: Arc::new(UserLimits::new(cfg.api_rates())),
    });
    let mut servers = Vec::new();
    if let (Some(listener), Some(addr)) = (listener, cfg.listen) {
        tracing::info!(listen = %addr, "bhatti API listening");
        // Streamed answers (exec, files, the proxy) write headers and body
        // separately: without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
        });
        let serve = axum::serve(
            listener,
            app.clone()
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(stopped(stop_rx.clone()));
        servers.push(tokio::spawn(async move { serve.await }));
    } else {
        tracing::info!("no TCP listener (listen: off)");
    }
    tracing::info!(socket = %socket_path.display(), "bhatti API on the control socket");
    // Handlers that limit per client address see the socket's clients as
    // one local address.
    let local = axum::extract::ConnectInfo(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let serve = axum::serve(control, app.layer(axum::Extension(local)))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    servers.push(tokio::spawn(async move { serve.await }));

    shutdown_signal().await;
    let _ = stop_tx.send(true);
    for s in servers {
        if let Err(e) = s.await? {
            tracing::warn!(error = %e, "API listener");
        }
    }
    let _ = std::fs::remove_file(&socket_path);
    let _ = public_task.await;
    tracing::info!("stopped; sandboxes keep running and are adopted at the next start");
    Ok(())
}

/// Takes `<data_dir>/daemon.lock` exclusively for the daemon's life (the
/// lock goes with the returned file, also when the process dies).
///
/// Errors: another daemon holds it, or the data dir cannot be created.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
    let path = data_dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another daemon is running on the data dir {}: one data dir, one daemon",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Binds the control socket at `path`, mode 0600 (root only). A socket
/// left by a daemon that is gone is replaced; one that answers belongs to a
/// running daemon, which is an error.
fn bind_control_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket; move it away (the control socket goes there)",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another daemon answers on {}: one data dir, one daemon",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    // connect(2) needs write permission on the socket: with 0600 only root
    // (the daemon's user) gets in. Before this chmod the umask's mode
    // (0755 with the usual 022) gives no one else write access either.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

fn qemu_config(
    cfg: &DaemonConfig,
    images: crate::engine::qemu::image::ImagePaths,
) -> anyhow::Result<QemuConfig> {
    let mut q = QemuConfig::new(&cfg.data_dir, images);
    q.accel = cfg.accel;
    q.netns = cfg.netns.clone();
    q.bridge = cfg.bridge.clone();
    q.subnet = cfg.subnet;
    q.egress = cfg.egress;
    q.uplink_netns = cfg.uplink_netns.clone();
    q.dns_upstream = cfg
        .dns_upstream_addrs()
        .map_err(|m| anyhow::anyhow!("dns_upstream: {m}"))?;
    q.boot_timeout = Some(std::time::Duration::from_secs(cfg.boot_timeout_secs));
    Ok(q)
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("bhatti serve needs root: it starts VMs, creates TAP devices and a network namespace (run it with sudo)");
    }
    Ok(())
}

/// Refuses to start, in one line, when a tool the engine runs is missing:
/// better than a daemon that fails at its first create.
fn require_prerequisites(cfg: &DaemonConfig) -> anyhow::Result<()> {
    use crate::engine::qemu::prereq;
    let checks = prereq::check_all(&prereq::Host {
        accel: cfg.accel,
        data_dir: &cfg.data_dir,
        images_dir: &cfg.images_dir,
    });
    for c in checks.iter().filter(|c| !c.ok && !c.required) {
        tracing::warn!("{}: {} (fix: {})", c.name, c.detail, c.fix);
    }
    match prereq::missing_line(&checks) {
        Some(line) => {
            anyhow::bail!("missing prerequisites: {line}; `bhatti doctor` lists them all")
        }
        None => Ok(()),
    }
}

/// Completes once `rx` turns true (or its sender is gone).
async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon still serves; it just cannot stop gracefully.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
