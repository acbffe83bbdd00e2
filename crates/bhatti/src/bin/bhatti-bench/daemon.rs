//! A daemon of the bench's own (or a running one) and a small API client,
//! shared by the API and proxy benches.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub url: String,
    pub token: String,
}

impl Api {
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut r = self.req(method.clone(), path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::ensure!(status.is_success(), "{method} {path}: {status} {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn put_file(&self, sandbox: &str, path: &str, text: &str) -> anyhow::Result<()> {
        let r = self
            .req(
                reqwest::Method::PUT,
                &format!("/sandboxes/{sandbox}/files?path={path}"),
            )
            .body(text.to_string())
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "writing {path}: {}", r.status());
        Ok(())
    }

    /// Buffered exec; its stdout, or an error with stderr.
    pub async fn exec(&self, sandbox: &str, cmd: &[&str]) -> anyhow::Result<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/sandboxes/{sandbox}/exec"),
                Some(json!({ "cmd": cmd })),
            )
            .await?;
        anyhow::ensure!(
            v["exit_code"] == 0,
            "{cmd:?} failed: {}",
            v["stderr"].as_str().unwrap_or("")
        );
        Ok(v["stdout"].as_str().unwrap_or("").to_string())
    }
}

/// A daemon of our own on loopback ports, torn down on drop.
pub struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    netns: String,
    pub url: String,
    pub public: String,
    pub token: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Daemon {
    /// Starts `bhatti serve` (the binary next to this one unless `bhatti` is
    /// given) on loopback ports with its own data dir, namespace and subnet.
    pub fn start(tag: &str, bhatti: Option<&Path>, images_dir: &Path) -> anyhow::Result<Daemon> {
        Self::start_with(tag, bhatti, images_dir, "")
    }

    /// [`start`](Self::start) with more config lines (YAML).
    pub fn start_with(
        tag: &str,
        bhatti: Option<&Path>,
        images_dir: &Path,
        extra_yaml: &str,
    ) -> anyhow::Result<Daemon> {
        anyhow::ensure!(
            nix::unistd::geteuid().is_root(),
            "starting a daemon needs root (or pass --url/--token of a running one)"
        );
        let bin = match bhatti {
            Some(b) => b.to_path_buf(),
            None => std::env::current_exe()?.with_file_name("bhatti"),
        };
        // `BHATTI_BENCH_DIR` puts the data dir (disks, guest RAM files)
        // elsewhere, e.g. on a tmpfs to compare with disk.
        let parent = std::env::var("BHATTI_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
        let dir = tempfile::Builder::new()
            .prefix(&format!("bhbench-{tag}"))
            .tempdir_in(parent)?;
        let (port, public_port) = (free_port()?, free_port()?);
        let netns = format!("bhb{tag}-{}", std::process::id());
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\npublic_listen: 127.0.0.1:{public_port}\ndomain: bhatti.bench\n\
                 public_url_scheme: http\npublic_rate_per_alias: 0\npublic_rate_global: 0\n\
                 public_rate_per_client: 0\napi_create_per_min: 0\napi_write_per_min: 0\napi_read_per_min: 0\n\
                 data_dir: {}\nimages_dir: {}\nnetns: {netns}\nbridge: brbench0\n\
                 subnet: 192.168.171.0/24\negress: false\n{extra_yaml}",
                dir.path().display(),
                images_dir.display()
            ),
        )?;
        let out = Command::new(&bin)
            .args([
                "user",
                "create",
                "--name",
                "bench",
                "--max-sandboxes",
                "30",
                "--data-dir",
            ])
            .arg(dir.path())
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "user create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find(|w| w.starts_with("bht_"))
            .context("API key in `user create` output")?
            .to_string();
        let log = std::fs::File::create(dir.path().join("daemon.log"))?;
        let child = Command::new(&bin)
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let d = Daemon {
            child,
            dir,
            netns,
            url: format!("http://127.0.0.1:{port}"),
            public: format!("127.0.0.1:{public_port}"),
            token,
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "daemon did not listen; log:\n{}",
                std::fs::read_to_string(d.dir.path().join("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(d)
    }
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's data dir (sandbox dirs live in `sandboxes/`).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        bhatti::engine::qemu::ramfile::release_ramfs(&self.dir.path().join("cow"));
    }
}
