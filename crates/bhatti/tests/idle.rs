//! Idle thermal states on real VMs through a real daemon (idle_warm_secs 3,
//! idle_cold_secs 8): idle sandboxes go hot → warm → cold by themselves, as
//! `bhatti list` shows; every kind of use wakes them with processes and
//! clock intact; attached shells, keep_hot and running requests keep them
//! hot; many requests on a cold sandbox restore it once; a daemon killed
//! with warm and cold sandboxes finds them all again.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{pids_matching, Api, TestDaemon, BIN};
use serde_json::{json, Value};

const CONFIG: &str = "idle_warm_secs: 3\nidle_cold_secs: 8\n";
/// Longest a transition may take to show up (TCG, a busy 2-core machine).
const WITHIN: Duration = Duration::from_secs(40);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// The CLI as a user runs it, against this daemon.
struct Cli {
    home: tempfile::TempDir,
    url: String,
    key: String,
}

impl Cli {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("HOME", self.home.path())
            .env("BHATTI_URL", &self.url)
            .env("BHATTI_TOKEN", &self.key);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let o: Output = self.cmd(args).output().expect("run bhatti");
        assert!(
            o.status.success(),
            "bhatti {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `bhatti list --json`: name → thermal.
    fn thermal(&self, name: &str) -> String {
        let v: Value = serde_json::from_str(&self.ok(&["list", "--json"])).expect("list json");
        v.as_array()
            .expect("array")
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["thermal"].as_str().unwrap_or("-").to_string())
            .unwrap_or_default()
    }

    /// The THERMAL cell of `name`'s row in the `bhatti list` table.
    fn list_row(&self, name: &str) -> String {
        let out = self.ok(&["list"]);
        let header = out.lines().next().unwrap_or_default().to_string();
        assert!(header.contains("THERMAL"), "{out}");
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_default()
            .to_string()
    }

    /// Polls until `name` is `want`; returns how long it took.
    fn wait_thermal(&self, name: &str, want: &str) -> Duration {
        let t = Instant::now();
        loop {
            let now = self.thermal(name);
            if now == want {
                assert!(
                    self.list_row(name).split_whitespace().any(|c| c == want),
                    "bhatti list shows {want} for {name}"
                );
                return t.elapsed();
            }
            assert!(
                t.elapsed() < WITHIN,
                "{name} did not become {want} (is {now})"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// `date` in the guest, in ms, against the host's time of the answer.
async fn clock_skew_ms(api: &Api, name: &str) -> i64 {
    let (code, out, err) = api.exec(name, &["date", "+%s%3N"]).await;
    let host = now_ms();
    assert_eq!(code, 0, "{err}");
    let guest: i64 = out.trim().parse().expect("date +%s%3N");
    guest - host
}

async fn counter(api: &Api, name: &str) -> u64 {
    let (code, out, err) = api.exec(name, &["cat", "/tmp/count"]).await;
    assert_eq!(code, 0, "{err}");
    out.trim().parse().expect("counter value")
}

/// The counter loop runs: it moves on within a few seconds.
async fn counter_runs(api: &Api, name: &str) {
    let a = counter(api, name).await;
    let t = Instant::now();
    while counter(api, name).await <= a {
        assert!(t.elapsed() < Duration::from_secs(5), "counter stuck at {a}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn restores_of(d: &TestDaemon, id: &str) -> usize {
    d.log()
        .lines()
        .filter(|l| l.contains("sandbox restored from disk") && l.contains(id))
        .count()
}

/// The tmux server of one attached `bhatti shell`.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.0])
            .args(args)
            .output()
            .expect("tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    }

    fn wait_screen(&self, what: &str) {
        let t = Instant::now();
        while !self.screen().contains(what) {
            assert!(t.elapsed() < Duration::from_secs(30), "{}", self.screen());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sandboxes_cool_and_wake() {
    let mut d = TestDaemon::start_with("idle", CONFIG);
    let key = d.create_user("dana", &["--max-sandboxes", "5"]);
    let api = Api::new(&d.url, &key);
    let cli = Cli {
        home: tempfile::tempdir().expect("home"),
        url: d.url.clone(),
        key: key.clone(),
    };
    let http = reqwest::Client::new();

    // idle: a counter loop and a published web server, nothing attached.
    cli.ok(&["create", "--name", "idle"]);
    // hot: keep_hot from the start. shell: a `bhatti shell` stays attached.
    cli.ok(&["create", "--name", "hot", "--keep-hot"]);
    cli.ok(&["create", "--name", "shell"]);
    let id = |name: &str| {
        let v: Value = serde_json::from_str(&cli.ok(&["list", "--json"])).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["id"].as_str())
            .expect("id")
            .to_string()
    };
    let idle_id = id("idle");
    let idle_dir = d.data_dir.path().join("sandboxes").join(&idle_id);
    let (code, _, err) = api
        .exec(
            "idle",
            &[
                "bash",
                "-c",
                "setsid -f sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done'; \
                 cd /tmp && setsid -f python3 -m http.server 8000 >/dev/null 2>&1; \
                 for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.1; done",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let (s, v) = {
        let r = api
            .post("/sandboxes/idle/publish", json!({"port": 8000}))
            .await;
        (r.status(), r.json::<Value>().await.expect("json"))
    };
    assert_eq!(s, 201, "{v}");
    let alias = v["alias"].as_str().expect("alias").to_string();
    let public_get = || {
        http.get(format!("http://{}/", d.public_addr))
            .header("Host", format!("{alias}.bhatti.test"))
            .send()
    };

    let tmux = Tmux(format!("bhatti-idle-{}", std::process::id()));
    let home = cli.home.path().display().to_string();
    let shell_cmd = format!(
        "env HOME={home} BHATTI_URL={} BHATTI_TOKEN={key} {BIN} shell shell; sleep 600",
        d.url
    );
    let o = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        &shell_cmd,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    tmux.run(&["send-keys", "-t", "t", "echo attached-$((20+22))", "Enter"]);
    tmux.wait_screen("attached-42");

    // --- a buffered exec of a quiet command longer than idle_warm_secs is
    // never paused under its caller
    let long = tokio::spawn({
        let api = api.clone();
        async move { api.exec("idle", &["sh", "-c", "sleep 6; echo done"]).await }
    });
    let t = Instant::now();
    while !long.is_finished() {
        assert_eq!(cli.thermal("idle"), "hot", "paused under a running exec");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, out, _) = long.await.expect("join");
    assert_eq!((code, out.trim()), (0, "done"));
    assert!(t.elapsed() >= Duration::from_secs(5));

    // --- a proxied response whose body takes longer than idle_warm_secs
    // (the guest sees no activity meanwhile) is not paused under its client
    let slow = r#"import time
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.flush()
        time.sleep(6)
        self.wfile.write(b"slow")
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", 8001), H).serve_forever()
"#;
    let r = api
        .req(
            reqwest::Method::PUT,
            "/sandboxes/idle/files?path=/tmp/slow.py",
        )
        .body(slow)
        .send()
        .await
        .expect("PUT");
    assert!(r.status().is_success());
    let (code, _, err) = api
        .exec(
            "idle",
            &[
                "bash",
                "-c",
                "setsid -f python3 /tmp/slow.py >/dev/null 2>&1; \
                 for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8001) 2>/dev/null && break; sleep 0.1; done",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let body = tokio::spawn({
        let api = api.clone();
        async move {
            let r = api.get("/sandboxes/idle/proxy/8001/").await;
            assert_eq!(r.status(), 200);
            r.text().await.expect("body")
        }
    });
    while !body.is_finished() {
        assert_eq!(
            cli.thermal("idle"),
            "hot",
            "paused under a proxied response"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(body.await.expect("join"), "slow");

    // --- hot → warm by itself; exec on warm: right output, processes ran on,
    // clock right
    let to_warm = cli.wait_thermal("idle", "warm");
    assert_eq!(pids_matching(&idle_dir).len(), 1, "warm keeps its QEMU");
    let t = Instant::now();
    let (code, out, _) = api.exec("idle", &["echo", "woken"]).await;
    let warm_exec = t.elapsed();
    assert_eq!((code, out.as_str()), (0, "woken\n"));
    assert_eq!(cli.thermal("idle"), "hot");
    let skew = clock_skew_ms(&api, "idle").await;
    assert!(
        skew.abs() <= 1000,
        "guest clock off by {skew} ms after warm"
    );
    counter_runs(&api, "idle").await;

    // --- the public proxy wakes a warm sandbox
    cli.wait_thermal("idle", "warm");
    let r = public_get().await.expect("public GET");
    assert_eq!(r.status(), 200);
    assert_eq!(cli.thermal("idle"), "hot");

    // --- warm → cold by itself: no QEMU; exec on cold: output, processes, clock
    cli.wait_thermal("idle", "warm");
    let to_cold = cli.wait_thermal("idle", "cold");
    assert!(pids_matching(&idle_dir).is_empty(), "cold keeps no QEMU");
    let (code, out, _) = api.exec("idle", &["echo", "restored"]).await;
    assert_eq!((code, out.as_str()), (0, "restored\n"));
    let skew = clock_skew_ms(&api, "idle").await;
    assert!(
        skew.abs() <= 1000,
        "guest clock off by {skew} ms after cold"
    );
    counter_runs(&api, "idle").await;

    // --- keep_hot and an attached shell kept theirs hot past both timeouts;
    // detaching lets the shell's cool down
    assert_eq!(cli.thermal("hot"), "hot");
    assert_eq!(cli.thermal("shell"), "hot");
    tmux.run(&["send-keys", "-t", "t", "C-\\"]);
    cli.wait_thermal("shell", "warm");

    // --- 20 concurrent execs on a cold sandbox: one restore, 20 right answers
    cli.wait_thermal("idle", "cold");
    let before = restores_of(&d, &idle_id);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let (code, out, _) = api
                .exec("idle", &["sh", "-c", &format!("echo $((({i}) * 3))")])
                .await;
            (i, code, out)
        }));
    }
    for t in tasks {
        let (i, code, out) = t.await.expect("join");
        assert_eq!((code, out.trim().to_string()), (0, (i * 3).to_string()));
    }
    assert_eq!(
        restores_of(&d, &idle_id),
        before + 1,
        "restored more than once"
    );
    assert_eq!(pids_matching(&idle_dir).len(), 1);

    // --- daemon killed with a warm and a cold sandbox; all answer afterwards
    // (fresh use first, so "idle" is killed early in its warm time)
    cli.wait_thermal("shell", "cold");
    api.exec("idle", &["true"]).await;
    cli.wait_thermal("idle", "warm");
    d.kill9();
    d.restart();
    assert_eq!(cli.thermal("idle"), "warm", "warm VM re-adopted as warm");
    assert_eq!(cli.thermal("shell"), "cold");
    for name in ["idle", "shell", "hot"] {
        let (code, out, _) = api.exec(name, &["echo", name]).await;
        assert_eq!((code, out.trim()), (0, name));
    }
    counter_runs(&api, "idle").await;
    let skew = clock_skew_ms(&api, "shell").await;
    assert!(
        skew.abs() <= 1000,
        "guest clock off by {skew} ms after restart"
    );

    // --- `bhatti edit --keep-hot` wakes at once; `--allow-cold` lets it cool
    cli.wait_thermal("shell", "warm");
    let out = cli.ok(&["edit", "shell", "--keep-hot"]);
    assert!(out.contains("now hot"), "{out}");
    assert_eq!(cli.thermal("shell"), "hot");
    // "hot" was kept hot long past both timeouts: once allowed, it still
    // takes idle_warm_secs to go warm (the edit is use) and idle_cold_secs
    // more, counted from going warm, to go cold.
    let edited = Instant::now();
    cli.ok(&["edit", "hot", "--allow-cold"]);
    cli.wait_thermal("hot", "warm");
    let warm_after = edited.elapsed();
    assert!(
        warm_after >= Duration::from_secs(2),
        "warm {warm_after:?} after the edit: the edit must count as use"
    );
    cli.wait_thermal("hot", "cold");
    let cold_after = edited.elapsed() - warm_after;
    assert!(
        cold_after >= Duration::from_secs(6),
        "cold {cold_after:?} after going warm; idle_cold_secs is 8"
    );

    eprintln!(
        "idle → warm seen after {to_warm:?}; warm → cold after {to_cold:?}; exec on warm {warm_exec:?}"
    );
    for name in ["idle", "hot", "shell"] {
        assert_eq!(
            api.delete(&format!("/sandboxes/{name}")).await.status(),
            204
        );
    }
    assert!(d.qemu_pids().is_empty());
}

/// With `max_concurrent_restores: 1`, two public requests to two cold
/// sandboxes at once: one restores, the other gets 503 with Retry-After
/// (and succeeds when retried); API requests wait their turn instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restores_beyond_the_limit_get_503_on_the_public_proxy() {
    let d = TestDaemon::start_with(
        "restlim",
        "idle_warm_secs: 0\nidle_cold_secs: 0\nmax_concurrent_restores: 1\n",
    );
    let key = d.create_user("erin", &[]);
    let api = Api::new(&d.url, &key);
    let http = reqwest::Client::new();
    let mut hosts = Vec::new();
    for name in ["one", "two"] {
        let r = api.post("/sandboxes", json!({"name": name})).await;
        assert_eq!(r.status(), 201);
        let (code, _, err) = api
            .exec(
                name,
                &[
                    "bash",
                    "-c",
                    "cd /tmp && setsid -f python3 -m http.server 8000 >/dev/null 2>&1; \
                     for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.1; done",
                ],
            )
            .await;
        assert_eq!(code, 0, "{err}");
        let r = api
            .post(&format!("/sandboxes/{name}/publish"), json!({"port": 8000}))
            .await;
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.expect("json");
        hosts.push(format!(
            "{}.bhatti.test",
            v["alias"].as_str().expect("alias")
        ));
    }
    let stop_all = || async {
        for name in ["one", "two"] {
            let r = api
                .post(&format!("/sandboxes/{name}/stop"), json!({}))
                .await;
            assert_eq!(r.status(), 200);
        }
    };
    stop_all().await;
    let get = |host: String| {
        let (http, addr) = (http.clone(), d.public_addr.clone());
        async move {
            http.get(format!("http://{addr}/"))
                .header("Host", host)
                .send()
                .await
                .expect("public GET")
        }
    };
    let (a, b) = tokio::join!(get(hosts[0].clone()), get(hosts[1].clone()));
    let mut statuses = vec![a.status().as_u16(), b.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 503], "one restore at a time");
    let busy = if a.status() == 503 { &a } else { &b };
    assert_eq!(
        busy.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    for h in &hosts {
        assert_eq!(get(h.clone()).await.status(), 200, "retry succeeds");
    }
    // The API queues instead.
    stop_all().await;
    let (x, y) = tokio::join!(
        api.exec("one", &["echo", "1"]),
        api.exec("two", &["echo", "2"])
    );
    assert_eq!((x.0, x.1.as_str(), y.0, y.1.as_str()), (0, "1\n", 0, "2\n"));
}

/// Makes a directory immutable (root cannot create files in it) until dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn new(dir: &std::path::Path) -> Immutable {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .expect("chattr");
        assert!(ok.success(), "chattr +i {}", dir.display());
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A save to disk that keeps failing (the sandbox dir is immutable): the
/// sandbox comes back hot each time, is retried, and after 3 failures stays
/// hot with a log line saying why; it serves all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_saves_leave_the_sandbox_hot() {
    let d = TestDaemon::start_with("savefail", "idle_warm_secs: 1\nidle_cold_secs: 2\n");
    let key = d.create_user("fay", &[]);
    let api = Api::new(&d.url, &key);
    let r = api.post("/sandboxes", json!({"name": "stuck"})).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.expect("json");
    let id = v["id"].as_str().expect("id").to_string();
    let dir = d.data_dir.path().join("sandboxes").join(&id);
    let (code, _, _) = api
        .exec("stuck", &["sh", "-c", "echo kept > /dev/shm/x"])
        .await;
    assert_eq!(code, 0);
    let guard = Immutable::new(&dir);

    let t = Instant::now();
    while !d.log().contains("failed 3 times") {
        assert!(
            t.elapsed() < WITHIN,
            "no final save failure; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let retries = d
        .log()
        .lines()
        .filter(|l| l.contains("will be retried") && l.contains(&id))
        .count();
    assert_eq!(retries, 2, "two retried failures before the last");
    // It stays hot past both timeouts, with its memory intact.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = api.get("/sandboxes/stuck").await;
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["thermal"], "hot", "{v}");
    let (code, out, _) = api.exec("stuck", &["cat", "/dev/shm/x"]).await;
    assert_eq!((code, out.as_str()), (0, "kept\n"));
    assert!(!dir.join("vm.state").exists());
    drop(guard);
    assert_eq!(api.delete("/sandboxes/stuck").await.status(), 204);
}
