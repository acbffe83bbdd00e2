//! Forks and snapshots through the API on real VMs (issue 13): a running
//! sandbox with a file and an in-memory counter behind a published port is
//! forked; the copy has both, an identity of its own, and runs apart from
//! its source, also after the source is destroyed; snapshot → change →
//! resume gives the snapshot's state, also after a daemon restart; quota
//! and name errors are clear; layers go when their last user goes.

mod common;

use std::time::{Duration, Instant};

use common::{Api, TestDaemon};
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

fn err_text(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

/// An HTTP server in the guest keeping a counter in memory: every request
/// gets the counter, incremented.
const COUNTER: &str = r#"
cat > /tmp/counter.py <<'PY'
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7070)); s.listen(8)
n = 0
while True:
    c, _ = s.accept(); c.recv(4096); n += 1
    body = b"%d" % n
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    c.close()
PY
setsid -f python3 /tmp/counter.py >/dev/null 2>&1 </dev/null
for i in $(seq 1 200); do python3 -c 'import socket; socket.create_connection(("127.0.0.1", 7070)).close()' 2>/dev/null && exit 0; sleep 0.05; done; exit 1
"#;

async fn sh(api: &Api, sb: &str, script: &str) -> String {
    let (code, out, err) = api.exec(sb, &["bash", "-c", script]).await;
    assert_eq!(code, 0, "{sb}: {script}: {out} {err}");
    out.trim().to_string()
}

/// The counter through the public proxy (the published port).
async fn bump(http: &reqwest::Client, d: &TestDaemon, alias: &str) -> String {
    let r = http
        .get(format!("http://{}/", d.public_addr))
        .header("Host", format!("{alias}.bhatti.test"))
        .send()
        .await
        .expect("public GET");
    assert_eq!(r.status(), 200, "{alias}");
    r.text().await.unwrap_or_default()
}

async fn publish(api: &Api, sb: &str, alias: &str) {
    let (s, v) = status_of(
        api.post(
            &format!("/sandboxes/{sb}/publish"),
            json!({"port": 7070, "alias": alias}),
        )
        .await,
    )
    .await;
    assert!(s.is_success(), "publish {sb}: {v}");
}

const IDENTITY: &str = "hostname; cat /etc/machine-id 2>/dev/null || echo none; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";

/// Entries of a data dir's subdir, a template's (`tpl-*`) not counted.
fn entries(d: &TestDaemon, sub: &str) -> usize {
    std::fs::read_dir(d.data_dir.path().join(sub))
        .map(|r| {
            r.flatten()
                .filter(|e| {
                    !e.file_name()
                        .to_string_lossy()
                        .starts_with(bhatti::service::TEMPLATE_PREFIX)
                })
                .count()
        })
        .unwrap_or(0)
}

fn layer_files(d: &TestDaemon) -> usize {
    entries(d, "layers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fork_snapshot_resume_through_the_api() {
    let mut d = TestDaemon::start("fork");
    let key = d.create_user("alice", &["--max-sandboxes", "6"]);
    let api = Api::new(&d.url, &key);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");

    // --- A: a file and a counter process behind a published port.
    let (s, a) = status_of(api.post("/sandboxes", json!({"name": "a"})).await).await;
    assert_eq!(s, 201, "{a}");
    sh(&api, "a", "echo from-a > /workspace/file.txt && sync").await;
    sh(&api, "a", COUNTER).await;
    publish(&api, "a", "ctr-a").await;
    assert_eq!(bump(&http, &d, "ctr-a").await, "2");

    // --- errors first (cheap): unknown source, machine size, names.
    let (s, v) = status_of(
        api.post("/sandboxes", json!({"name": "x", "from": "nope"}))
            .await,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        err_text(&v).contains("from") && err_text(&v).contains("nope"),
        "{v}"
    );
    let (s, v) = status_of(
        api.post(
            "/sandboxes",
            json!({"name": "x", "from": "a", "memory_mb": 1024}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(err_text(&v).contains("memory_mb"), "{v}");
    let (s, v) = status_of(
        api.post("/sandboxes/a/checkpoint", json!({"name": "bad name"}))
            .await,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(err_text(&v).contains("name"), "{v}");
    let (s, v) = status_of(
        api.post("/snapshots/nope/resume", json!({"name": "x"}))
            .await,
    )
    .await;
    assert_eq!(s, 404, "{v}");
    assert!(err_text(&v).contains("no snapshot named nope"), "{v}");

    // --- fork B from running A.
    let t = Instant::now();
    let (s, b) = status_of(
        api.post("/sandboxes", json!({"name": "b", "from": "a"}))
            .await,
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let fork_ms = t.elapsed().as_millis();
    assert_eq!(b["memory_mb"], a["memory_mb"]);
    assert_ne!(b["ip"], a["ip"]);
    assert_eq!(b["status"], "running");
    assert_eq!(sh(&api, "b", "cat /workspace/file.txt").await, "from-a");
    eprintln!(
        "fork → created {fork_ms} ms (first exec answered {:?})",
        t.elapsed()
    );
    publish(&api, "b", "ctr-b").await;
    // The counter came along at its fork-time value; from here on each counts alone.
    assert_eq!(bump(&http, &d, "ctr-b").await, "3");
    assert_eq!(bump(&http, &d, "ctr-b").await, "4");
    assert_eq!(bump(&http, &d, "ctr-a").await, "3");
    // Files apart, both ways.
    sh(
        &api,
        "b",
        "echo from-b > /workspace/file.txt; touch /workspace/only-b; sync",
    )
    .await;
    sh(&api, "a", "touch /workspace/only-a; sync").await;
    assert_eq!(
        sh(
            &api,
            "a",
            "cat /workspace/file.txt; ls /workspace | tr '\\n' ' '"
        )
        .await,
        "from-a\nfile.txt only-a"
    );
    assert_eq!(
        sh(
            &api,
            "b",
            "cat /workspace/file.txt; ls /workspace | tr '\\n' ' '"
        )
        .await,
        "from-b\nfile.txt only-b"
    );
    // Identity.
    let ia: Vec<String> = sh(&api, "a", IDENTITY)
        .await
        .lines()
        .map(str::to_string)
        .collect();
    let ib: Vec<String> = sh(&api, "b", IDENTITY)
        .await
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!((ia[0].as_str(), ib[0].as_str()), ("a", "b"));
    assert_ne!(ia[1], ib[1], "machine-id");
    assert_ne!(ia[2], ib[2], "urandom");
    let ip_b = b["ip"].as_str().unwrap_or_default().to_string();
    assert!(sh(&api, "b", "cat /proc/net/fib_trie")
        .await
        .contains(&ip_b));

    // --- A goes; B works on.
    let (s, _) = status_of(api.delete("/sandboxes/a").await).await;
    assert_eq!(s, 204);
    assert_eq!(sh(&api, "b", "cat /workspace/file.txt").await, "from-b");
    assert_eq!(bump(&http, &d, "ctr-b").await, "5");

    // --- snapshot → change → resume gives the snapshot's state.
    let (s, snap) = status_of(
        api.post("/sandboxes/b/checkpoint", json!({"name": "s1"}))
            .await,
    )
    .await;
    assert_eq!(s, 201, "{snap}");
    assert!(snap["size_bytes"].as_u64().unwrap_or(0) > 1 << 20, "{snap}");
    assert_eq!(snap["sandbox"], "b");
    sh(&api, "b", "echo after > /workspace/file.txt; sync").await;
    assert_eq!(bump(&http, &d, "ctr-b").await, "6");
    let (s, v) = status_of(
        api.post("/sandboxes/b/checkpoint", json!({"name": "s1"}))
            .await,
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(err_text(&v).contains("s1"), "{v}");
    let (s, c) = status_of(api.post("/snapshots/s1/resume", json!({"name": "c"})).await).await;
    assert_eq!(s, 201, "{c}");
    assert_eq!(
        sh(&api, "c", "cat /workspace/file.txt; hostname").await,
        "from-b\nc"
    );
    publish(&api, "c", "ctr-c").await;
    assert_eq!(bump(&http, &d, "ctr-c").await, "6");
    assert_eq!(bump(&http, &d, "ctr-b").await, "7");

    // --- a copy's stop reads all its RAM through the snapshot's file; the
    // pages of zeros that leaves must not stay in host memory for good.
    // c restarts with a RAM file of its own, so its snapshot has one too.
    let (s, _) = status_of(api.post("/sandboxes/c/stop", json!({})).await).await;
    assert!(s.is_success());
    let (s, _) = status_of(api.post("/sandboxes/c/start", json!({})).await).await;
    assert!(s.is_success());
    assert_eq!(bump(&http, &d, "ctr-c").await, "7", "c kept its process");
    let (s, v) = status_of(
        api.post("/snapshots", json!({"sandbox": "c", "name": "sc"}))
            .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = status_of(api.post("/snapshots/sc/resume", json!({"name": "r"})).await).await;
    assert_eq!(s, 201, "{v}");
    let snap = bhatti::store::Store::open(d.data_dir.path())
        .expect("store")
        .list_all_snapshots()
        .expect("snapshots")
        .into_iter()
        .find(|r| r.name == "sc")
        .expect("sc");
    let durable = d
        .data_dir
        .path()
        .join("checkpoints")
        .join(&snap.id)
        .join("mem.ram");
    let on_ramfs = d
        .data_dir
        .path()
        .join("cow")
        .join(format!("{}.ram", snap.id));
    let data = bhatti::engine::qemu::ramfile::allocated(&durable);
    assert!(data > 0, "sc keeps its RAM on disk");
    let (s, _) = status_of(api.post("/sandboxes/r/stop", json!({})).await).await;
    assert!(s.is_success());
    let held = if on_ramfs.exists() {
        bhatti::engine::qemu::ramfile::allocated(&on_ramfs)
    } else {
        // No free page reporting (c came from a template): on disk only.
        bhatti::engine::qemu::ramfile::resident(&durable).expect("resident")
    };
    assert!(
        held <= data + (16 << 20),
        "after a copy's stop sc's RAM holds {} MiB of host memory, its data is {} MiB",
        held >> 20,
        data >> 20
    );
    let (s, _) = status_of(api.post("/sandboxes/r/start", json!({})).await).await;
    assert!(s.is_success());
    assert_eq!(sh(&api, "r", "hostname").await, "r");
    let (s, _) = status_of(api.delete("/sandboxes/r").await).await;
    assert_eq!(s, 204);
    let (s, _) = status_of(api.delete("/snapshots/sc").await).await;
    assert_eq!(s, 204);

    // --- quota: 5 by default.
    for n in 2..=5 {
        let (s, v) = status_of(
            api.post(
                "/snapshots",
                json!({"sandbox": "c", "name": format!("s{n}")}),
            )
            .await,
        )
        .await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, v) = status_of(
        api.post("/sandboxes/c/checkpoint", json!({"name": "s6"}))
            .await,
    )
    .await;
    assert_eq!(s, 429, "{v}");
    assert!(err_text(&v).contains("quota"), "{v}");
    let (s, list) = status_of(api.get("/snapshots").await).await;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(5), "{list}");
    for n in 3..=5 {
        let (s, _) = status_of(api.delete(&format!("/snapshots/s{n}")).await).await;
        assert_eq!(s, 204);
    }

    // --- snapshots survive a daemon restart.
    d.restart();
    let (s, v) = status_of(api.get("/snapshots/s1").await).await;
    assert_eq!(s, 200, "{v}");
    let (s, e) = status_of(api.post("/snapshots/s1/resume", json!({"name": "e"})).await).await;
    assert_eq!(s, 201, "{e}");
    assert_eq!(sh(&api, "e", "cat /workspace/file.txt").await, "from-b");
    assert_eq!(sh(&api, "c", "cat /workspace/file.txt").await, "from-b");

    // --- the last user of a layer takes it along.
    for sb in ["b", "c", "e"] {
        let (s, _) = status_of(api.delete(&format!("/sandboxes/{sb}")).await).await;
        assert_eq!(s, 204);
    }
    assert!(layer_files(&d) > 0, "snapshots s1, s2 keep their layers");
    for n in ["s1", "s2"] {
        let (s, _) = status_of(api.delete(&format!("/snapshots/{n}")).await).await;
        assert_eq!(s, 204);
    }
    assert_eq!(layer_files(&d), 0, "layers left behind");
    assert_eq!(entries(&d, "checkpoints"), 0, "checkpoints left behind");
}

/// The disk chain (overlay, layers, base) of sandbox `id`'s disk, as
/// `qemu-img info --backing-chain` reads it.
fn chain(d: &TestDaemon, id: &str) -> Vec<String> {
    let disk = d
        .data_dir
        .path()
        .join("sandboxes")
        .join(id)
        .join("disk.qcow2");
    bhatti::engine::qemu::disks::backing_chain(&disk).expect("backing chain")
}

/// The layer files on the host, by id; a template's layer (the daemon's
/// own, kept while the template is) is not counted.
fn layer_ids(d: &TestDaemon) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(d.data_dir.path().join("layers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".qcow2"))
                .filter(|n| !n.starts_with(bhatti::service::TEMPLATE_PREFIX))
                .map(str::to_string)
        })
        .collect()
}

/// The layer ids in a chain.
fn layers_in(chain: &[String]) -> std::collections::BTreeSet<String> {
    chain
        .iter()
        .filter(|f| f.contains("/layers/"))
        .filter_map(|f| {
            std::path::Path::new(f)
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
        })
        .collect()
}

/// A fork of a fork of a fork …, 9 generations, each writing a file of its
/// own: no disk chain passes the bound (4 images) in any generation, every
/// generation has every file of its ancestors, and after the middle
/// generations are destroyed the last works on, and the layers only they
/// used are gone; the last sandboxes take the rest along.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fork_of_fork_chains_stay_bounded() {
    const GENERATIONS: usize = 9;
    let d = TestDaemon::start("gens");
    let key = d.create_user("alice", &["--max-sandboxes", "12"]);
    let api = Api::new(&d.url, &key);
    let mut ids = Vec::new();
    let (s, g0) = status_of(api.post("/sandboxes", json!({"name": "g0"})).await).await;
    assert_eq!(s, 201, "{g0}");
    ids.push(g0["id"].as_str().unwrap_or_default().to_string());
    sh(&api, "g0", "echo 0 > /workspace/g0 && sync").await;
    let mut depths = Vec::new();
    let mut fork_ms = Vec::new();
    for n in 1..GENERATIONS {
        let t = Instant::now();
        let (s, g) = status_of(
            api.post(
                "/sandboxes",
                json!({"name": format!("g{n}"), "from": format!("g{}", n - 1)}),
            )
            .await,
        )
        .await;
        assert_eq!(s, 201, "generation {n}: {g}");
        fork_ms.push(t.elapsed().as_millis());
        ids.push(g["id"].as_str().unwrap_or_default().to_string());
        sh(
            &api,
            &format!("g{n}"),
            &format!("echo {n} > /workspace/g{n} && sync"),
        )
        .await;
        let row: Vec<usize> = ids.iter().map(|id| chain(&d, id).len()).collect();
        assert!(
            row.iter().all(|d| *d <= 4),
            "generation {n}: chain depths {row:?}: {:?}",
            chain(&d, &ids[n])
        );
        depths.push(row);
    }
    eprintln!("chain depths after each generation: {depths:?}; fork ms: {fork_ms:?}");
    // Every generation has its ancestors' files and its own.
    for n in 0..GENERATIONS {
        let want: Vec<String> = (0..=n).map(|i| i.to_string()).collect();
        let got = sh(
            &api,
            &format!("g{n}"),
            &format!(
                "cat {} | tr '\\n' ' '",
                (0..=n)
                    .map(|i| format!("/workspace/g{i}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
        .await;
        assert_eq!(got, want.join(" "), "generation {n}");
    }
    // The middle generations go: the last works on, on the layers it needs.
    for n in 1..GENERATIONS - 1 {
        let (s, _) = status_of(api.delete(&format!("/sandboxes/g{n}")).await).await;
        assert_eq!(s, 204, "destroy g{n}");
    }
    let last = format!("g{}", GENERATIONS - 1);
    let all: Vec<String> = (0..GENERATIONS)
        .map(|i| format!("/workspace/g{i}"))
        .collect();
    let want: Vec<String> = (0..GENERATIONS).map(|i| i.to_string()).collect();
    assert_eq!(
        sh(
            &api,
            &last,
            &format!("cat {} | tr '\\n' ' '", all.join(" "))
        )
        .await,
        want.join(" ")
    );
    sh(
        &api,
        &last,
        "echo more > /workspace/more && sync && cat /workspace/more",
    )
    .await;
    let needed: std::collections::BTreeSet<String> = layers_in(&chain(&d, &ids[0]))
        .union(&layers_in(&chain(&d, &ids[GENERATIONS - 1])))
        .cloned()
        .collect();
    assert_eq!(
        layer_ids(&d),
        needed,
        "layers only the destroyed used are left"
    );
    for sb in ["g0", last.as_str()] {
        let (s, _) = status_of(api.delete(&format!("/sandboxes/{sb}")).await).await;
        assert_eq!(s, 204);
    }
    assert!(layer_ids(&d).is_empty(), "layers left: {:?}", layer_ids(&d));
}

/// A daemon killed at the wrong moments leaves: a running sandbox's disk
/// frozen into a layer no row records (its freeze rolled forward), a
/// snapshot's checkpoint without its row, a snapshot row whose checkpoint
/// is gone, and a layer file nothing uses. The next start records the
/// first (so it is collected with its last user), removes the orphan
/// checkpoint, the broken snapshot (with a log line) and the stray layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_reconciles_layers_and_snapshots() {
    use bhatti::engine::qemu::disks;
    use bhatti::engine::qemu::qmp::Qmp;
    use std::os::fd::AsFd;

    let mut d = TestDaemon::start("recon");
    let key = d.create_user("alice", &[]);
    let api = Api::new(&d.url, &key);
    let (s, a) = status_of(api.post("/sandboxes", json!({"name": "a"})).await).await;
    assert_eq!(s, 201, "{a}");
    let id = a["id"].as_str().unwrap_or_default().to_string();
    sh(&api, "a", "echo one > /workspace/f && sync").await;
    for (snap, file) in [("s1", "g"), ("s2", "h")] {
        let (s, v) = status_of(
            api.post("/sandboxes/a/checkpoint", json!({"name": snap}))
                .await,
        )
        .await;
        assert_eq!(s, 201, "{v}");
        sh(
            &api,
            "a",
            &format!("echo {snap} > /workspace/{file} && sync"),
        )
        .await;
    }
    let (_, s2) = status_of(api.get("/snapshots/s2").await).await;
    let s2_id = s2["id"].as_str().unwrap_or_default().to_string();
    d.kill9();

    let data = d.data_dir.path();
    let cps = data.join("checkpoints");
    let layers = data.join("layers");
    // A snapshot's checkpoint whose row never came.
    let orphan = cps.join("snap-00000000deadbeef");
    std::fs::create_dir_all(&orphan).expect("orphan dir");
    std::fs::write(orphan.join("vm.state"), b"x").expect("orphan state");
    // A snapshot whose checkpoint is gone.
    std::fs::remove_dir_all(cps.join(&s2_id)).expect("remove s2's checkpoint");
    // A layer file nothing uses.
    let stray = layers.join("lstray.qcow2");
    disks::create_overlay_on_layer(&layers.join("lnothing.qcow2"), &stray, 1 << 20)
        .expect("stray layer");
    // A's disk frozen into a layer, its QEMU switched onto the new overlay,
    // and the daemon gone before it renamed that into place.
    let dir = data.join("sandboxes").join(&id);
    let (disk, next) = (dir.join("disk.qcow2"), dir.join("disk.next.qcow2"));
    let crash = layers.join("lcrash.qcow2");
    let size = disks::info(&disk).expect("info").virtual_size;
    let qmp = Qmp::connect_retry(&dir.join("qmp.sock"), Duration::from_secs(10))
        .await
        .expect("qmp");
    qmp.stop().await.expect("stop");
    std::fs::rename(&disk, &crash).expect("rename to layer");
    disks::create_overlay_on_layer(&crash, &next, size).expect("next");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&next)
        .expect("open next");
    let set = qmp.add_fd(f.as_fd()).await.expect("add-fd");
    qmp.snapshot_onto("root", &format!("/dev/fdset/{set}"), "ov-crash")
        .await
        .expect("switch");
    qmp.cont().await.expect("cont");
    drop((qmp, f));

    d.restart();
    assert!(!orphan.exists(), "orphan snapshot checkpoint left");
    assert!(!stray.exists(), "stray layer left");
    assert!(crash.is_file(), "a's disk backs onto it");
    let (s, list) = status_of(api.get("/snapshots").await).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = list
        .as_array()
        .map(|l| l.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["s1"], "{list}");
    assert!(
        d.log().contains("removing a snapshot whose files are gone"),
        "no log line for the broken snapshot"
    );
    assert_eq!(
        sh(&api, "a", "echo two > /workspace/k && sync; cat /workspace/f /workspace/g /workspace/h /workspace/k").await,
        "one\ns1\ns2\ntwo"
    );
    // The resumed snapshot still works, and every layer goes with its last user.
    let (s, b) = status_of(api.post("/snapshots/s1/resume", json!({"name": "b"})).await).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(
        sh(
            &api,
            "b",
            "cat /workspace/f; test -e /workspace/g || echo no-g"
        )
        .await,
        "one\nno-g"
    );
    for sb in ["a", "b"] {
        let (s, _) = status_of(api.delete(&format!("/sandboxes/{sb}")).await).await;
        assert_eq!(s, 204);
    }
    let (s, _) = status_of(api.delete("/snapshots/s1").await).await;
    assert_eq!(s, 204);
    assert!(layer_ids(&d).is_empty(), "layers left: {:?}", layer_ids(&d));
}
