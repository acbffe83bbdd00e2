//! A real daemon for tests: `bhatti serve` on a loopback port, its own data
//! dir and network namespace, `egress: false`, real VMs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

pub const BIN: &str = env!("CARGO_BIN_EXE_bhatti");

/// The CLI against daemon `d` as the user of API key `key`, with none of
/// the caller's `BHATTI_URL` / `BHATTI_TOKEN` and no stdin.
pub fn cli_run(d: &TestDaemon, key: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["--url", &d.url, "--token", key])
        .args(args)
        .env_remove("BHATTI_URL")
        .env_remove("BHATTI_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run bhatti")
}

/// [`cli_run`] that must succeed; its stdout.
pub fn cli_ok(d: &TestDaemon, key: &str, args: &[&str]) -> String {
    let o = cli_run(d, key, args);
    assert!(
        o.status.success(),
        "bhatti {args:?} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Where the guest images are; `scripts/test.sh` builds them before the suite.
pub fn images_dir() -> PathBuf {
    std::env::var_os("BHATTI_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/bhatti/images"))
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests boot VMs and need root (CI runs as root)"
    );
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

pub struct TestDaemon {
    pub url: String,
    pub public_addr: String,
    pub data_dir: tempfile::TempDir,
    pub config: PathBuf,
    pub netns: String,
    /// Whether the API listens on TCP (`url`); it is always on [`Self::socket`].
    pub tcp: bool,
    /// Extra environment of the daemon process (e.g. `BHATTI_LOHAR`).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl TestDaemon {
    /// Starts a daemon whose namespace and data dir are unique to this process.
    pub fn start(tag: &str) -> TestDaemon {
        Self::start_with(tag, "")
    }

    /// Like [`start`](Self::start), with more config lines (YAML) appended.
    pub fn start_with(tag: &str, extra_yaml: &str) -> TestDaemon {
        Self::start_full(tag, extra_yaml, &[])
    }

    /// Like [`start_with`](Self::start_with), with more environment for the daemon.
    pub fn start_full(tag: &str, extra_yaml: &str, env: &[(&str, &str)]) -> TestDaemon {
        require_root();
        let data_dir = tempfile::Builder::new()
            .prefix(&format!("bhatti-{tag}-"))
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let public_port = free_port();
        let netns = format!("bt-{tag}-{}", std::process::id());
        let config = data_dir.path().join("config.yaml");
        // `listen: off` in the extra lines: the API is only on the socket.
        let tcp = !extra_yaml.lines().any(|l| l.trim() == "listen: off");
        let listen = if tcp {
            format!("listen: 127.0.0.1:{port}\n")
        } else {
            String::new()
        };
        // Templates as `$BHATTI_TEMPLATES` says (scripts/test.sh runs the VM
        // tests with them on, then off), unless the test sets the key itself.
        let templates = if extra_yaml.contains("templates:") {
            String::new()
        } else {
            match std::env::var("BHATTI_TEMPLATES").ok().as_deref() {
                Some("0" | "false" | "off" | "no") => "templates: false\n".to_string(),
                _ => "templates: true\n".to_string(),
            }
        };
        // A test may bring images of its own.
        let images = if extra_yaml.contains("images_dir:") {
            String::new()
        } else {
            format!("images_dir: {}\n", images_dir().display())
        };
        let yaml = listen
            + &format!(
            "public_listen: 127.0.0.1:{public_port}\ndomain: bhatti.test\ndata_dir: {}\n{images}netns: {netns}\nbridge: brbt0\nsubnet: 192.168.150.0/24\negress: false\naccel: auto\nboot_timeout_secs: 90\n{templates}",
            data_dir.path().display(),
        ) + extra_yaml;
        // A test that sets its own subnet overrides the default.
        let yaml = if extra_yaml.contains("subnet:") {
            yaml.replacen("subnet: 192.168.150.0/24\n", "", 1)
        } else {
            yaml
        };
        // A test that sets egress itself (inside namespaces of its own) overrides the default.
        let yaml = if extra_yaml.contains("\negress:") || extra_yaml.starts_with("egress:") {
            yaml.replacen("egress: false\n", "", 1)
        } else {
            yaml
        };
        std::fs::write(&config, yaml).expect("write config");
        let mut d = TestDaemon {
            url: format!("http://127.0.0.1:{port}"),
            public_addr: format!("127.0.0.1:{public_port}"),
            data_dir,
            config,
            netns,
            tcp,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        d.spawn();
        d
    }

    /// Whether the daemon process is still running (it has not crashed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("daemon.log")
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open daemon log");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn bhatti serve");
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(600));
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> PathBuf {
        self.data_dir.path().join("api.sock")
    }

    fn wait_healthy(&mut self, within: Duration) {
        use std::io::{Read, Write};
        fn healthy(mut s: impl Read + Write) -> bool {
            let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
        }
        let deadline = Instant::now() + within;
        let addr = self.url.trim_start_matches("http://").to_string();
        loop {
            if self.tcp {
                if let Ok(s) = std::net::TcpStream::connect(&addr) {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    if healthy(s) {
                        return;
                    }
                }
            } else if let Ok(s) = std::os::unix::net::UnixStream::connect(self.socket()) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                if healthy(s) {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "bhatti serve exited ({st}) before it was healthy; log:\n{}",
                        self.log()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon not healthy in time; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs an operator command (`bhatti user …`) against this data dir.
    pub fn operator(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .output()
            .expect("run bhatti")
    }

    /// Creates a user and returns its API key.
    pub fn create_user(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["user", "create", "--name", name];
        args.extend_from_slice(extra);
        let out = self.operator(&args);
        assert!(
            out.status.success(),
            "user create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .find(|w| w.starts_with("bht_"))
            .expect("API key in output")
            .to_string()
    }

    /// PIDs of this daemon's sandbox QEMUs (not a template build's VM,
    /// which the daemon boots on its own for a few seconds).
    pub fn qemu_pids(&self) -> Vec<u32> {
        let templates = self.data_dir.path().join("sandboxes").join("tpl-");
        let templates = templates.to_string_lossy().into_owned();
        pids_matching(self.data_dir.path())
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| !String::from_utf8_lossy(&c).contains(&templates))
                    .unwrap_or(true)
            })
            .collect()
    }

    /// Every QEMU of this daemon, template builds included (for cleanup).
    pub fn all_qemu_pids(&self) -> Vec<u32> {
        pids_matching(self.data_dir.path())
    }
}

/// PIDs of processes whose command line mentions `needle` (QEMU of this daemon).
pub fn pids_matching(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                out.push(pid);
            }
        }
    }
    out
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.stop();
        // VMs outlive the daemon by design: a test's leftovers go with it.
        for pid in self.all_qemu_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        // The engine's ramfs of checkpoint RAM, so the data dir can go.
        bhatti::engine::qemu::ramfile::release_ramfs(&self.data_dir.path().join("cow"));
    }
}

/// A small typed HTTP client for one user.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, key: &str) -> Api {
        Api {
            base: base.to_string(),
            key: key.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .expect("client"),
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.key)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.req(reqwest::Method::GET, path)
            .send()
            .await
            .expect("GET")
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.req(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .expect("POST")
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.req(reqwest::Method::DELETE, path)
            .send()
            .await
            .expect("DELETE")
    }

    /// Buffered exec; returns (exit_code, stdout, stderr).
    pub async fn exec(&self, sandbox: &str, cmd: &[&str]) -> (i64, String, String) {
        let r = self
            .post(
                &format!("/sandboxes/{sandbox}/exec"),
                serde_json::json!({ "cmd": cmd }),
            )
            .await;
        let status = r.status();
        let v: serde_json::Value = r.json().await.expect("exec json");
        assert_eq!(status, 200, "exec {cmd:?} failed: {v}");
        (
            v["exit_code"].as_i64().unwrap_or(-1),
            v["stdout"].as_str().unwrap_or("").to_string(),
            v["stderr"].as_str().unwrap_or("").to_string(),
        )
    }
}

/// What to type into a shell: a line, an optional resize (rows, cols), another line.
pub type Typing<'a> = (&'a str, Option<(u16, u16)>, &'a str);

/// Opens the shell WebSocket, optionally types, resizes and types again, and
/// collects output until `until` shows up (or 30 s pass); then closes (detach).
pub async fn ws_collect(
    base: &str,
    key: &str,
    sandbox: &str,
    query: &str,
    script: Option<Typing<'_>>,
    until: &str,
) -> String {
    let url = format!(
        "{}/sandboxes/{sandbox}/ws?{query}",
        base.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    if let Some((first, resize, second)) = script {
        ws.send(Ws::Binary(first.as_bytes().to_vec().into()))
            .await
            .unwrap();
        if let Some((rows, cols)) = resize {
            ws.send(Ws::Text(
                serde_json::json!({"type": "resize", "rows": rows, "cols": cols})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        }
        if !second.is_empty() {
            ws.send(Ws::Binary(second.as_bytes().to_vec().into()))
                .await
                .unwrap();
        }
    }
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !text.contains(until) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
            Ok(Some(Ok(Ws::Binary(b)))) => text.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(None) | Ok(Some(Err(_))) => break,
        }
    }
    let _ = ws.close(None).await;
    text
}

/// A WebSocket to the test daemon.
#[allow(dead_code)]
pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The workspace root (`crates/bhatti/../..`).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python of the SDK's test venv (`scripts/sdk-venv.sh` makes it; `scripts/test.sh`
/// runs that), or `$BHATTI_SDK_PYTHON`. It has the SDK's dependencies, pytest and
/// `websockets` (the browser test drives Chromium with it).
pub fn venv_python() -> PathBuf {
    let py = std::env::var_os("BHATTI_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/sdk-venv/bin/python"));
    assert!(
        py.exists(),
        "{} is missing: run `bash scripts/sdk-venv.sh` (scripts/test.sh does)",
        py.display()
    );
    py
}
