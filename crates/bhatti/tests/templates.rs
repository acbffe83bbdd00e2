//! Templates on real VMs (issue 14, docs/templates.md): the daemon builds
//! the default shape's template at start; sandboxes restored from it are
//! machines of their own (hostname, IP, token, machine-id, random state)
//! with their request's env, secrets and init script; `cold_boot` boots; a
//! damaged template falls back to a boot and the create succeeds, and is
//! rebuilt only after that boot; a change of lohar (the initramfs) rebuilds
//! the template and removes the old one once no sandbox uses its layer; at
//! most 4 templates are kept, the least recently used dropped first; a
//! daemon started with templates off drops those of an earlier run.

mod common;

use std::path::{Path, PathBuf};
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

async fn sh(api: &Api, sb: &str, script: &str) -> String {
    let (code, out, err) = api.exec(sb, &["bash", "-c", script]).await;
    assert_eq!(code, 0, "{sb}: {script}: {out} {err}");
    out.trim().to_string()
}

/// Templates forced on, whatever `$BHATTI_TEMPLATES` says.
const ON: &[(&str, &str)] = &[("BHATTI_TEMPLATES", "1")];

fn templates(d: &TestDaemon) -> Vec<bhatti::store::TemplateRecord> {
    bhatti::store::Store::open(d.data_dir.path())
        .expect("store")
        .list_templates()
        .expect("templates")
}

/// Waits until the daemon has `n` templates ready (up to 3 minutes) and returns them.
fn wait_templates(d: &TestDaemon, n: usize) -> Vec<bhatti::store::TemplateRecord> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let t = templates(d);
        if t.len() >= n {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "no template ready in time; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The daemon log's lines without terminal colours.
fn log_lines(d: &TestDaemon) -> Vec<String> {
    let mut out = Vec::new();
    for line in d.log().lines() {
        let mut clean = String::with_capacity(line.len());
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                // CSI: ESC [ parameters final-byte.
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                clean.push(c);
            }
        }
        out.push(clean);
    }
    out
}

/// Index of the first log line at or after `from` that holds every one of `needles`.
fn find_line(lines: &[String], from: usize, needles: &[&str]) -> Option<usize> {
    lines
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, l)| needles.iter().all(|n| l.contains(n)))
        .map(|(i, _)| i)
}

/// A build the create of `name` (of `memory_mb`) asked for starts only
/// after that create's boot is over: the log says "sandbox created" for
/// it before "building a template" of its shape (from log line `from` on).
fn assert_build_after_create(d: &TestDaemon, from: usize, name: &str, memory_mb: u32) {
    let lines = log_lines(d);
    let created = find_line(&lines, from, &["sandbox created", &format!("name={name} ")])
        .unwrap_or_else(|| panic!("no create of {name} logged:\n{}", lines.join("\n")));
    let build = find_line(
        &lines,
        from,
        &["building a template", &format!("memory_mb={memory_mb}")],
    )
    .unwrap_or_else(|| panic!("no build logged:\n{}", lines.join("\n")));
    assert!(
        build > created,
        "the build started during the boot of {name}:\n{}",
        lines[from..].join("\n")
    );
}

fn count_entries(dir: &Path, prefix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn template_born_sandboxes_are_machines_of_their_own() {
    let d = TestDaemon::start_full("tpl", "", ON);
    let key = d.create_user("alice", &["--max-sandboxes", "6"]);
    let api = Api::new(&d.url, &key);
    let (s, _) = status_of(
        api.post(
            "/secrets",
            json!({"name": "API_KEY", "value": "from-secret"}),
        )
        .await,
    )
    .await;
    assert!(s.is_success());
    let t = wait_templates(&d, 1);
    assert_eq!((t[0].cpus, t[0].memory_mb), (1, 512));

    let mut seen = Vec::new();
    for name in ["a", "b"] {
        let (s, v) = status_of(
            api.post(
                "/sandboxes",
                json!({"name": name, "env": {"WHO": name}, "secrets": ["API_KEY"],
                       "init": "echo \"init $WHO $API_KEY\" > /tmp/init.txt"}),
            )
            .await,
        )
        .await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["born"], "template", "{v}");
        let who = sh(
            &api,
            name,
            "hostname; awk -v h=$(hostname) '$1==\"127.0.1.1\" && $2==h' /etc/hosts | wc -l; cat /etc/machine-id; \
             head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
             ip -4 -o addr show eth0 | awk '{print $4}'; echo $WHO $API_KEY; \
             for i in $(seq 100); do [ -s /tmp/init.txt ] && break; sleep 0.1; done; cat /tmp/init.txt",
        )
        .await;
        let lines: Vec<&str> = who.lines().collect();
        assert_eq!(lines.len(), 7, "{who}");
        assert_eq!(lines[0], name, "hostname");
        assert_eq!(lines[1], "1", "/etc/hosts names the host: {who}");
        assert_eq!(lines[2].len(), 32, "machine-id: {who}");
        assert_eq!(lines[3].len(), 64, "urandom: {who}");
        assert_eq!(lines[4], format!("{}/24", v["ip"].as_str().unwrap_or("")));
        assert_eq!(lines[5], format!("{name} from-secret"), "env and secrets");
        assert_eq!(lines[6], format!("init {name} from-secret"), "init script");
        seen.push((
            lines[2].to_string(),
            lines[3].to_string(),
            lines[4].to_string(),
        ));
        // The guest's clock is the host's.
        let guest: i64 = sh(&api, name, "date +%s").await.parse().expect("date");
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        assert!(
            (guest - host).abs() <= 5,
            "guest clock {guest}, host {host}"
        );
    }
    assert_ne!(seen[0].0, seen[1].0, "machine-id");
    assert_ne!(seen[0].1, seen[1].1, "random state");
    assert_ne!(seen[0].2, seen[1].2, "address");
    let all = bhatti::store::Store::open(d.data_dir.path())
        .expect("store")
        .list_all_sandboxes()
        .expect("sandboxes");
    let by_name = |n: &str| all.iter().find(|r| r.name == n).expect("row").clone();
    let (ra, rb) = (by_name("a"), by_name("b"));
    assert_ne!(ra.token, rb.token);
    assert_ne!(ra.token, t[0].token, "a copy has a token of its own");
    // The two reach each other only as the rules say: not at all here.
    // (Each answers at its own address through the daemon: exec above.)

    // --- cold_boot boots, and says so.
    let (s, v) = status_of(
        api.post("/sandboxes", json!({"name": "c", "cold_boot": true}))
            .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["born"], "boot", "{v}");
    let (s, v) = status_of(api.get("/sandboxes/a").await).await;
    assert_eq!(s, 200);
    assert_eq!(v["born"], "template");

    // --- a template-born sandbox stops, starts and forks like any other.
    // Its stop reads every page of its RAM through the template's file:
    // the pages of the file's holes must not stay in host memory.
    let data = d.data_dir.path();
    let tpl_ram = data
        .join("checkpoints")
        .join(&t[0].checkpoint)
        .join("mem.ram");
    assert_eq!(
        count_entries(&data.join("cow"), "tpl-"),
        0,
        "a template's RAM is on disk only"
    );
    let held = bhatti::engine::qemu::ramfile::allocated(&tpl_ram);
    assert!(held > 0, "the template has its RAM on disk");
    let resident_mib =
        || bhatti::engine::qemu::ramfile::resident(&tpl_ram).expect("resident") >> 20;
    // A fork of a running template-born sandbox streams its RAM, which
    // reads every page of the template's file too.
    let (s, v) = status_of(
        api.post("/sandboxes", json!({"name": "fb", "from": "b"}))
            .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(sh(&api, "fb", "hostname").await, "fb");
    // (Paged out a second after the checkpoint, off the copy's path.)
    let deadline = Instant::now() + Duration::from_secs(15);
    while resident_mib() > (held >> 20) + 16 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        resident_mib() <= (held >> 20) + 16,
        "after a fork of b the template's RAM holds {} MiB of host memory, its data is {} MiB",
        resident_mib(),
        held >> 20
    );
    let (s, _) = status_of(api.delete("/sandboxes/fb").await).await;
    assert_eq!(s, 204);
    let (s, _) = status_of(api.post("/sandboxes/a/stop", json!({})).await).await;
    assert!(s.is_success());
    assert!(
        resident_mib() <= (held >> 20) + 16,
        "after a copy's stop the template's RAM holds {} MiB of host memory, its data is {} MiB",
        resident_mib(),
        held >> 20
    );
    let (s, _) = status_of(api.post("/sandboxes/a/start", json!({})).await).await;
    assert!(s.is_success());
    // It restarted from a RAM file of its own, filled from the stream:
    // the pages the stream left zero must not stay in its memory.
    let a_id = bhatti::store::Store::open(data)
        .expect("store")
        .list_all_sandboxes()
        .expect("sandboxes")
        .into_iter()
        .find(|r| r.name == "a")
        .expect("a")
        .id;
    let rss_mib = || -> u64 {
        let pid = std::fs::read_to_string(data.join("sandboxes").join(&a_id).join("qemu.pid"))
            .unwrap_or_default();
        std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb >> 10)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while rss_mib() > 300 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        (1..=300).contains(&rss_mib()),
        "a restarted holds {} MiB (a 512 MB guest)",
        rss_mib()
    );
    assert_eq!(
        sh(&api, "a", "cat /tmp/init.txt").await,
        "init a from-secret"
    );
    let (s, v) = status_of(
        api.post("/sandboxes", json!({"name": "f", "from": "a"}))
            .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["born"], "fork");
    assert_eq!(sh(&api, "f", "hostname").await, "f");

    // --- a damaged template: the create boots instead, and succeeds.
    let cp = d.data_dir.path().join("checkpoints").join(&t[0].checkpoint);
    std::fs::write(cp.join("vm.state"), b"not a migration stream").expect("damage");
    let log_from = log_lines(&d).len();
    let (s, v) = status_of(api.post("/sandboxes", json!({"name": "g"})).await).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["born"], "boot", "{v}");
    assert_eq!(sh(&api, "g", "hostname").await, "g");
    assert!(
        d.log()
            .contains("restore from the template failed; booting instead"),
        "the fallback is logged"
    );
    // It is replaced by a fresh one, built after g's boot (not alongside it).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let now = templates(&d);
        if now.len() == 1 && now[0].checkpoint != t[0].checkpoint {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "template not rebuilt; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_build_after_create(&d, log_from, "g", 512);
    let (s, v) = status_of(api.post("/sandboxes", json!({"name": "h"})).await).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["born"], "template", "{v}");

    // --- destroy leaves only the template behind.
    for sb in ["a", "b", "c", "f", "g", "h"] {
        let (s, _) = status_of(api.delete(&format!("/sandboxes/{sb}")).await).await;
        assert_eq!(s, 204);
    }
    assert_eq!(count_entries(&data.join("sandboxes"), ""), 0);
    assert_eq!(count_entries(&data.join("checkpoints"), ""), 1);
    assert_eq!(
        count_entries(&data.join("layers"), ""),
        1,
        "the template's layer only"
    );
}

/// A hard-linked copy of the test images (kernel, rootfs, initramfs) in a
/// dir of its own, on the same filesystem: a daemon may build another
/// initramfs there without touching the shared images.
fn private_images() -> tempfile::TempDir {
    let src = common::images_dir();
    let dir = tempfile::Builder::new()
        .prefix(".tpl-images-")
        .tempdir_in(src.parent().unwrap_or(Path::new("/var/lib/bhatti")))
        .expect("images tempdir");
    let current: Value =
        serde_json::from_slice(&std::fs::read(src.join("current.json")).expect("current.json"))
            .expect("current.json");
    let mut paths = serde_json::Map::new();
    for k in ["kernel", "initramfs", "rootfs"] {
        let p = PathBuf::from(current[k].as_str().expect("path"));
        let rel = p.strip_prefix(&src).expect("inside the images dir");
        // The artifact: a file at the top, or the dir it sits in.
        let top = rel.components().next().expect("component");
        let (from, to) = (src.join(top), dir.path().join(top));
        if !to.exists() {
            let st = std::process::Command::new("cp")
                .arg("-al")
                .arg(&from)
                .arg(&to)
                .status()
                .expect("cp");
            assert!(st.success());
        }
        paths.insert(k.into(), json!(dir.path().join(rel)));
    }
    std::fs::write(
        dir.path().join("current.json"),
        serde_json::to_vec_pretty(&paths).expect("json"),
    )
    .expect("write current.json");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_lohar_rebuilds_the_template() {
    let lohar = std::env::var("BHATTI_LOHAR").expect("BHATTI_LOHAR (scripts/test.sh sets it)");
    let images = private_images();
    let yaml = format!("images_dir: {}\n", images.path().display());
    let mut env: Vec<(&str, &str)> = ON.to_vec();
    env.push(("BHATTI_LOHAR", &lohar));
    let mut d = TestDaemon::start_full("tplk", &yaml, &env);
    let key = d.create_user("alice", &[]);
    let api = Api::new(&d.url, &key);
    let old = wait_templates(&d, 1).remove(0);
    let (s, v) = status_of(api.post("/sandboxes", json!({"name": "x"})).await).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["born"], "template");

    // Another lohar (one byte more): another initramfs, another template.
    let changed = images.path().join("lohar-changed");
    let mut bytes = std::fs::read(&lohar).expect("lohar");
    bytes.push(0);
    std::fs::write(&changed, bytes).expect("write lohar");
    d.env.retain(|(k, _)| k != "BHATTI_LOHAR");
    d.env
        .push(("BHATTI_LOHAR".into(), changed.display().to_string()));
    d.restart();
    let deadline = Instant::now() + Duration::from_secs(180);
    let new = loop {
        let t = templates(&d);
        if let Some(n) = t.iter().find(|t| t.key != old.key) {
            break n.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no new template; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        templates(&d).iter().all(|t| t.key != old.key),
        "the old template is dropped"
    );
    let data = d.data_dir.path();
    assert!(!data.join("checkpoints").join(&old.checkpoint).exists());
    // Its layer stays while x's disk backs onto it.
    let old_layer = data.join("layers").join(format!("{}.qcow2", old.layer_id));
    assert!(old_layer.exists());
    assert_eq!(sh(&api, "x", "hostname").await, "x");
    let (s, v) = status_of(api.post("/sandboxes", json!({"name": "y"})).await).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["born"], "template");
    assert_ne!(new.key, old.key);
    for sb in ["x", "y"] {
        let (s, _) = status_of(api.delete(&format!("/sandboxes/{sb}")).await).await;
        assert_eq!(s, 204);
    }
    assert!(
        !old_layer.exists(),
        "the old template's layer goes with its last user"
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A booted guest's clock is the host's, as a template-born one's is: the
/// boot config's time was taken before QEMU started, so a booted guest used
/// to lag by its whole boot (3-4 s under TCG), its init script included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_booted_guest_has_the_hosts_clock() {
    let d = TestDaemon::start_full("clk", "", &[("BHATTI_TEMPLATES", "0")]);
    let key = d.create_user("alice", &[]);
    let api = Api::new(&d.url, &key);
    let t0 = now_ms();
    let (s, v) = status_of(
        api.post(
            "/sandboxes",
            json!({"name": "c", "init": "echo $(date +%s%3N) $(cut -d' ' -f1 /proc/uptime) > /tmp/t.tmp && mv /tmp/t.tmp /tmp/t"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["born"], "boot", "{v}");
    let before = now_ms();
    let guest: i64 = sh(&api, "c", "date +%s%3N").await.parse().expect("date");
    let after = now_ms();
    assert!(
        guest >= before - 1000 && guest <= after + 1000,
        "guest clock {guest}, host {before}..{after}"
    );
    // The init script ran before the host set the clock: its time is at
    // least the create's start plus the guest's uptime then.
    let init = sh(
        &api,
        "c",
        "for i in $(seq 100); do [ -s /tmp/t ] && break; sleep 0.1; done; cat /tmp/t",
    )
    .await;
    let mut it = init.split_whitespace();
    let at: i64 = it.next().and_then(|x| x.parse().ok()).expect("init date");
    let up: f64 = it.next().and_then(|x| x.parse().ok()).expect("init uptime");
    assert!(
        at + 300 >= t0 + (up * 1000.0) as i64,
        "init script's clock {at} ms, create started {t0} ms, uptime {up} s"
    );
}

fn shapes(d: &TestDaemon) -> Vec<u32> {
    let mut m: Vec<u32> = templates(d).iter().map(|t| t.memory_mb).collect();
    m.sort_unstable();
    m
}

/// Waits until the daemon's templates are of exactly these memory sizes.
fn wait_shapes(d: &TestDaemon, want: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while shapes(d) != want {
        assert!(
            Instant::now() < deadline,
            "templates {:?}, want {want:?}; log:\n{}",
            shapes(d),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn templates_are_kept_by_use_and_dropped_when_switched_off() {
    let mut d = TestDaemon::start_full("tplu", "", ON);
    let key = d.create_user("alice", &["--max-sandboxes", "8"]);
    let api = Api::new(&d.url, &key);
    wait_shapes(&d, &[512]);
    let create = |name: &'static str, memory_mb: u32| {
        let api = &api;
        async move {
            let (s, v) = status_of(
                api.post("/sandboxes", json!({"name": name, "memory_mb": memory_mb}))
                    .await,
            )
            .await;
            assert_eq!(s, 201, "{v}");
            v["born"].as_str().unwrap_or("").to_string()
        }
    };
    let destroy = |name: &'static str| {
        let api = &api;
        async move {
            let (s, _) = status_of(api.delete(&format!("/sandboxes/{name}")).await).await;
            assert_eq!(s, 204);
        }
    };

    // A create of a shape without a template boots; the shape's build
    // starts once that boot is over. Three more shapes: 4 templates.
    let mut have = vec![512];
    for (name, mb) in [("m256", 256), ("m320", 320), ("m384", 384)] {
        let from = log_lines(&d).len();
        assert_eq!(create(name, mb).await, "boot");
        have.push(mb);
        have.sort_unstable();
        wait_shapes(&d, &have);
        assert_build_after_create(&d, from, name, mb);
        destroy(name).await;
    }
    // The oldest of the three is used; the second oldest now is the least
    // recently used.
    assert_eq!(create("u256", 256).await, "template");
    destroy("u256").await;
    // A fifth shape: its template evicts the least recently used (320),
    // not the oldest (256) nor the default shape's (512, the oldest of all).
    assert_eq!(create("m448", 448).await, "boot");
    wait_shapes(&d, &[256, 384, 448, 512]);
    assert!(log_lines(&d)
        .iter()
        .any(|l| l.contains("dropping the least recently used template")
            && l.contains("memory_mb=320")));
    destroy("m448").await;
    let data = d.data_dir.path().to_path_buf();
    assert_eq!(count_entries(&data.join("checkpoints"), "tpl-"), 4);

    // A sandbox born of the 256 template keeps its layer past the drop.
    assert_eq!(create("keep", 256).await, "template");
    let kept_layer = templates(&d)
        .into_iter()
        .find(|t| t.memory_mb == 256)
        .expect("256 template")
        .layer_id;

    // --- switched off: the templates of the earlier run go at start.
    d.env.retain(|(k, _)| k != "BHATTI_TEMPLATES");
    d.env.push(("BHATTI_TEMPLATES".into(), "0".into()));
    d.restart();
    assert!(templates(&d).is_empty(), "template rows dropped at start");
    assert_eq!(
        count_entries(&data.join("checkpoints"), "tpl-"),
        0,
        "template checkpoints (RAM and state) deleted at start"
    );
    let layers: Vec<String> = std::fs::read_dir(data.join("layers"))
        .expect("layers")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tpl-"))
        .collect();
    assert_eq!(
        layers,
        vec![format!("{kept_layer}.qcow2")],
        "only the layer a sandbox backs onto stays"
    );
    assert_eq!(sh(&api, "keep", "hostname").await, "keep");
    assert_eq!(create("off", 256).await, "boot");
    destroy("keep").await;
    destroy("off").await;
    assert_eq!(count_entries(&data.join("layers"), "tpl-"), 0);
}

/// A template build never takes the last free address of the subnet: a
/// create must not fail with 503 because a build holds it. A build that
/// finds no spare address is not a failed shape (no 5-minute pause): the
/// next create of the shape asks again. Subnet /30: one guest address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_leaves_the_last_address_to_creates() {
    let mut d = TestDaemon::start_full("tplip", "subnet: 192.168.152.0/30\n", ON);
    let key = d.create_user("alice", &[]);
    let api = Api::new(&d.url, &key);
    // Right after start, while the default shape's build would run.
    let (s, v) = status_of(api.post("/sandboxes", json!({"name": "only"})).await).await;
    assert_eq!(s, 201, "{v}; log:\n{}", d.log());
    assert_eq!(v["born"], "boot");
    assert_eq!(v["ip"], "192.168.152.2");
    let (s, _) = status_of(api.delete("/sandboxes/only").await).await;
    assert_eq!(s, 204);
    // The create asked for the shape again once it was over, and again the
    // build found no spare address (a failed shape would not be asked).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = log_lines(&d);
        let spare = lines
            .iter()
            .filter(|l| l.contains("no spare address for a template build"))
            .count();
        if spare >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the build was not asked again after the create:\n{}",
            lines.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let lines = log_lines(&d);
    assert!(
        find_line(&lines, 0, &["template build failed"]).is_none(),
        "{}",
        lines.join("\n")
    );
    assert!(templates(&d).is_empty());
    d.stop();
}

/// Creates that find no free address but the one a template build's VM
/// holds wait for the build instead of failing with 503. Subnet /29: five
/// guest addresses; two copies, one boot of another shape (its build then
/// holds the highest free address), then two creates at once for the last
/// two.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_wait_for_the_address_a_build_holds() {
    let mut d = TestDaemon::start_full("tplhold", "subnet: 192.168.153.0/29\n", ON);
    let key = d.create_user("alice", &[]);
    let api = Api::new(&d.url, &key);
    wait_shapes(&d, &[512]);
    let create = |name: &'static str, memory_mb: u32| {
        let api = &api;
        async move {
            status_of(
                api.post("/sandboxes", json!({"name": name, "memory_mb": memory_mb}))
                    .await,
            )
            .await
        }
    };
    for name in ["t1", "t2"] {
        let (s, v) = create(name, 512).await;
        assert_eq!(s, 201, "{v}");
    }
    let from = log_lines(&d).len();
    let (s, v) = create("b256", 256).await;
    assert_eq!((s.as_u16(), v["born"].as_str()), (201, Some("boot")), "{v}");
    // The 256 MB build starts once that boot is over and holds .6.
    let deadline = Instant::now() + Duration::from_secs(60);
    while find_line(
        &log_lines(&d),
        from,
        &["building a template", "memory_mb=256"],
    )
    .is_none()
    {
        assert!(Instant::now() < deadline, "no build:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let ((s3, v3), (s4, v4)) = tokio::join!(create("t3", 512), create("t4", 512));
    assert_eq!(s3, 201, "{v3}; log:\n{}", d.log());
    assert_eq!(s4, 201, "{v4}; log:\n{}", d.log());
    let mut ips = vec![
        v3["ip"].as_str().unwrap_or("").to_string(),
        v4["ip"].as_str().unwrap_or("").to_string(),
    ];
    ips.sort();
    assert_eq!(ips, ["192.168.153.5", "192.168.153.6"]);
    d.stop();
}
