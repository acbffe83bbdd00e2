//! The engine harness the VM tests share (`vm_engine.rs`, `vm_fork.rs`):
//! a QEMU engine in a network namespace and data dir of its own, removed on
//! drop, plus small helpers. Needs root and the guest images.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use bhatti::engine::agent_client::{AgentClient, ExecOutput};
use bhatti::engine::qemu::accel::AccelMode;
use bhatti::engine::qemu::image::{self, ImagePaths};
use bhatti::engine::qemu::network::{self, Subnet};
use bhatti::engine::qemu::{process, QemuConfig, QemuEngine};
use bhatti::engine::SandboxSpec;
use bhatti_proto::ExecRequest;

pub fn require_root() {
    // Engine logs (`RUST_LOG=bhatti=debug` shows the boot phases).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    assert!(
        nix::unistd::geteuid().is_root(),
        "VM tests need root (network namespaces, TAPs, nftables); CI runs them as root"
    );
}

pub async fn images() -> ImagePaths {
    let dir = PathBuf::from(
        std::env::var("BHATTI_IMAGES_DIR")
            .unwrap_or_else(|_| image::DEFAULT_IMAGES_DIR.to_string()),
    );
    tokio::task::spawn_blocking(move || image::ensure_images(&dir, &image::LogProgress))
        .await
        .expect("image task")
        .unwrap_or_else(|e| panic!("guest images unavailable: {e}"))
}

/// An engine with its own namespace and data dir, both removed on drop.
pub struct TestEngine {
    pub engine: QemuEngine,
    pub cfg: QemuConfig,
    _data: tempfile::TempDir,
}

impl TestEngine {
    pub async fn new(
        tag: &str,
        subnet: &str,
        images: ImagePaths,
        tweak: impl FnOnce(&mut QemuConfig),
    ) -> TestEngine {
        require_root();
        // Short paths: the QMP socket path must fit a Unix socket address.
        let data = tempfile::Builder::new()
            .prefix("bhvm")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut cfg = QemuConfig::new(data.path(), images);
        cfg.netns = format!("bhvm-{tag}-{}", std::process::id());
        cfg.bridge = format!("brvm{tag}");
        cfg.subnet = subnet.parse::<Subnet>().expect("subnet");
        cfg.egress = false;
        cfg.accel = AccelMode::Auto;
        tweak(&mut cfg);
        let engine = QemuEngine::new(cfg.clone()).await.expect("engine");
        TestEngine {
            engine,
            cfg,
            _data: data,
        }
    }

    /// The namespace's nftables rules without their counters (`-s`): the
    /// bridge's drop rule counts whatever a guest sent that it may not.
    pub fn ruleset(&self) -> String {
        network::exec_in(&self.cfg.netns, &["nft", "-s", "list", "ruleset"]).expect("nft")
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        // Whatever a failed assertion left running.
        for (pid, _) in process::find_qemus_under(&self.cfg.data_dir.join("sandboxes")) {
            process::kill(pid);
        }
        let _ = network::delete_all(&self.cfg.netns);
        bhatti::engine::qemu::ramfile::release_ramfs(&self.cfg.data_dir.join("cow"));
    }
}

pub fn spec(id: &str, ip: Ipv4Addr) -> SandboxSpec {
    SandboxSpec {
        id: id.into(),
        name: id.into(),
        cpus: 1,
        memory_mb: 384,
        ip,
        token: format!("token-{id}-{}", std::process::id()),
        env: BTreeMap::new(),
        init: None,
        egress: Default::default(),
        peer_group: None,
        volumes: Vec::new(),
        image: None,
        template: false,
    }
}

pub async fn sh(agent: &AgentClient, script: &str) -> ExecOutput {
    let req = ExecRequest::command(["bash", "-c", script]);
    tokio::time::timeout(Duration::from_secs(30), agent.exec_buffered(req))
        .await
        .unwrap_or_else(|_| panic!("exec timed out: {script}"))
        .unwrap_or_else(|e| panic!("exec failed: {script}: {e}"))
}
