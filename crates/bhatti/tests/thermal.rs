//! Stop and start through the HTTP API against a real daemon with a real VM:
//! a stopped sandbox has no QEMU, list and health leave it stopped, any call
//! that touches the VM (exec, the public proxy) restores it transparently
//! with its files, processes, TTY sessions and clock, a daemon crash keeps it
//! stopped, and destroying it leaves nothing behind.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{pids_matching, Api, TestDaemon};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn status_of(r: reqwest::Response) -> (StatusCode, Value) {
    let s = r.status();
    let text = r.text().await.unwrap_or_default();
    (
        s,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn sh(api: &Api, id: &str, script: &str) -> String {
    let (code, out, err) = api.exec(id, &["bash", "-c", script]).await;
    assert_eq!(code, 0, "{script}: {out} {err}");
    out.trim().to_string()
}

async fn status(api: &Api, id: &str) -> String {
    let (s, v) = status_of(api.get(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(s, 200, "{v}");
    v["status"].as_str().unwrap_or_default().to_string()
}

/// Stops the sandbox and checks the answer and that its QEMU is gone.
async fn stop(api: &Api, id: &str, dir: &Path) -> Duration {
    let t = Instant::now();
    let (s, v) = status_of(api.post(&format!("/sandboxes/{id}/stop"), json!({})).await).await;
    let took = t.elapsed();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "stopped", "{v}");
    assert!(pids_matching(dir).is_empty(), "QEMU still runs after stop");
    took
}

fn guest_clock_ok(guest: &str) {
    let guest: i64 = guest.parse().expect("date +%s");
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (guest - host).abs() <= 3,
        "guest clock {guest} vs host {host}"
    );
}

/// Opens the shell WebSocket (reattaching the caller's detached shell),
/// optionally types a line, and collects output until `until` shows up.
async fn shell(d: &TestDaemon, key: &str, id: &str, typing: Option<&str>, until: &str) -> String {
    common::ws_collect(&d.url, key, id, "", typing.map(|l| (l, None, "")), until).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_start_and_transparent_wake() {
    let mut d = TestDaemon::start("thermal");
    let key = d.create_user("carol", &[]);
    let api = Api::new(&d.url, &key);
    let http = reqwest::Client::new();

    let (s, v) = status_of(api.post("/sandboxes", json!({"name": "cold-box"})).await).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let dir = d.data_dir.path().join("sandboxes").join(&id);

    // What must survive: a file, memory, a background process, a listener
    // (published), a TTY session.
    sh(
        &api,
        &id,
        "echo on-disk > /workspace/keep.txt; echo in-ram > /dev/shm/keep; \
         setsid -f sh -c 'sleep 1000'; \
         cd /tmp && setsid -f python3 -m http.server 8000 >/dev/null 2>&1; \
         for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.1; done",
    )
    .await;
    let sleeper = sh(&api, &id, "pgrep -x sleep").await;
    let text = shell(&d, &key, &id, Some("echo before-$((2+3))\n"), "before-5").await;
    assert!(text.contains("before-5"), "{text:?}");
    let (s, v) = status_of(
        api.post(&format!("/sandboxes/{id}/publish"), json!({"port": 8000}))
            .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let alias = v["alias"].as_str().expect("alias").to_string();
    let public_url = format!("http://{}/", d.public_addr);
    let public_get = || {
        http.get(&public_url)
            .header("Host", format!("{alias}.bhatti.test"))
            .send()
    };

    // --- stop: saved to disk, no process; again: nothing to do
    let stop_took = stop(&api, &id, &dir).await;
    let state_mib = std::fs::metadata(dir.join("vm.state"))
        .expect("state file")
        .len()
        / (1024 * 1024);
    stop(&api, &id, &dir).await;

    // --- list, get and health do not wake it
    let (s, v) = status_of(api.get("/sandboxes").await).await;
    assert_eq!(s, 200);
    assert_eq!(v[0]["status"], "stopped", "{v}");
    assert_eq!(status(&api, &id).await, "stopped");
    let (s, _) = status_of(
        http.get(format!("{}/health", d.url))
            .send()
            .await
            .expect("health"),
    )
    .await;
    assert_eq!(s, 200);
    assert!(pids_matching(&dir).is_empty(), "list or health woke the VM");

    // --- exec wakes it: everything is where it was, the clock is right
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = Instant::now();
    let kept = sh(&api, &id, "cat /workspace/keep.txt /dev/shm/keep").await;
    let wake_took = t.elapsed();
    assert_eq!(kept, "on-disk\nin-ram");
    assert_eq!(status(&api, &id).await, "running");
    assert_eq!(pids_matching(&dir).len(), 1);
    assert!(
        !dir.join("vm.state").exists(),
        "state file kept after start"
    );
    assert_eq!(sh(&api, &id, "pgrep -x sleep").await, sleeper);
    guest_clock_ok(&sh(&api, &id, "date +%s").await);
    let text = shell(&d, &key, &id, Some("echo after-$((3+4))\n"), "after-7").await;
    assert!(
        text.contains("before-5") && text.contains("after-7"),
        "TTY session and its scrollback survive: {text:?}"
    );

    // --- the public proxy wakes it too
    stop(&api, &id, &dir).await;
    let t = Instant::now();
    let r = public_get().await.expect("public GET");
    let proxy_wake_took = t.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(status(&api, &id).await, "running");

    // --- a daemon crash while stopped: still stopped, then two requests at
    // once restore it once, and start of a running sandbox is a no-op
    stop(&api, &id, &dir).await;
    d.kill9();
    d.restart();
    assert_eq!(status(&api, &id).await, "stopped");
    assert!(pids_matching(&dir).is_empty());
    let (a, b) = tokio::join!(
        sh(&api, &id, "cat /workspace/keep.txt"),
        sh(&api, &id, "cat /dev/shm/keep")
    );
    assert_eq!((a.as_str(), b.as_str()), ("on-disk", "in-ram"));
    assert_eq!(pids_matching(&dir).len(), 1, "restored more than once");
    assert_eq!(sh(&api, &id, "pgrep -x sleep").await, sleeper);
    let (s, v) = status_of(api.post(&format!("/sandboxes/{id}/start"), json!({})).await).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "running");

    // --- explicit start after stop
    stop(&api, &id, &dir).await;
    let t = Instant::now();
    let (s, v) = status_of(api.post(&format!("/sandboxes/{id}/start"), json!({})).await).await;
    let start_took = t.elapsed();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "running");
    guest_clock_ok(&sh(&api, &id, "date +%s").await);

    // --- destroy a stopped sandbox: nothing stays
    stop(&api, &id, &dir).await;
    let (s, _) = status_of(api.delete(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(s, 204);
    assert!(!dir.exists(), "sandbox dir left behind");
    assert!(d.qemu_pids().is_empty());
    let links = std::process::Command::new("ip")
        .args(["netns", "exec", &d.netns, "ip", "-o", "link", "show"])
        .output()
        .expect("ip link");
    let tap = bhatti::engine::qemu::network::tap_name(&id);
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&tap),
        "TAP {tap} left behind"
    );
    let r = public_get().await.expect("public GET");
    assert_eq!(r.status(), 404);

    eprintln!(
        "stop (API) {stop_took:?}; state file {state_mib} MiB; wake on exec {wake_took:?}; \
         wake on public proxy {proxy_wake_took:?}; start (API) {start_took:?}"
    );
}
