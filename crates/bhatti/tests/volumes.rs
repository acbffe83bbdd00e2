//! Persistent volumes through the API on real VMs (issue 15): a volume
//! written in sandbox A outlives A and is read in B; read-write is one
//! sandbox at a time, read-only many; it survives stop/start and a daemon
//! restart; growing it (attached read-write, and detached) grows the
//! filesystem the guest sees; quota, name, mount-path and copy errors are clear.

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

async fn sh(api: &Api, sb: &str, script: &str) -> String {
    let (code, out, err) = api.exec(sb, &["bash", "-c", script]).await;
    assert_eq!(code, 0, "{sb}: {script}: {out} {err}");
    out.trim().to_string()
}

async fn create(api: &Api, name: &str, volumes: Value) -> (StatusCode, Value) {
    status_of(
        api.post(
            "/sandboxes",
            json!({"name": name, "volumes": volumes, "init": "echo from-init > /data/init-was-here || true"}),
        )
        .await,
    )
    .await
}

/// Size of the filesystem on `path` in the guest, MiB.
async fn fs_mb(api: &Api, sb: &str, path: &str) -> u64 {
    sh(api, sb, &format!("df -m --output=size {path} | tail -1"))
        .await
        .trim()
        .parse()
        .expect("df size")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_outlive_sandboxes_and_keep_their_rules() {
    let mut d = TestDaemon::start("vol");
    let key = d.create_user("vol", &["--max-storage", "300"]);
    let api = Api::new(&d.url, &key);
    let doc: Value = reqwest::get(format!("{}/openapi.json", d.url))
        .await
        .expect("openapi")
        .json()
        .await
        .expect("openapi json");
    for p in ["/volumes", "/volumes/{name}", "/volumes/{name}/resize"] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    assert!(
        doc["components"]["schemas"]["CreateSandboxRequest"]["properties"]
            .get("volumes")
            .is_some(),
        "openapi: create lacks volumes"
    );

    // Names, sizes and the storage quota.
    let (s, v) = status_of(
        api.post("/volumes", json!({"name": "data", "size_mb": 64}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["size_mb"], 64);
    assert!(v["attachments"].as_array().expect("list").is_empty());
    let (s, v) = status_of(
        api.post("/volumes", json!({"name": "data", "size_mb": 8}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        err_text(&v).contains("a volume named data already exists"),
        "{v}"
    );
    let (s, v) = status_of(
        api.post("/volumes", json!({"name": "no good", "size_mb": 8}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("invalid volume name"), "{v}");
    let (s, v) = status_of(
        api.post(
            "/volumes",
            json!({"name": "vol-0123456789ab", "size_mb": 8}),
        )
        .await,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("must not start with vol-"), "{v}");
    let (s, v) = status_of(
        api.post("/volumes", json!({"name": "zero", "size_mb": 0}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = status_of(
        api.post("/volumes", json!({"name": "big", "size_mb": 250}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(
        err_text(&v).contains("storage quota exceeded: 64 MB of 300 MB in use, 250 MB more asked"),
        "{v}"
    );

    // Mount path rules, checked before anything boots.
    for (bad, why) in [
        ("/etc", "is a system directory"),
        ("/usr/local/x", "inside the system directory /usr"),
        ("data", "must be absolute"),
        ("/a/../b", ". or .. components"),
    ] {
        let (s, v) = create(&api, "bad", json!([{"volume": "data", "mount": bad}])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(err_text(&v).contains(why), "{bad}: {v}");
    }
    let (s, v) = create(&api, "bad", json!([{"volume": "nope", "mount": "/data"}])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("no volume named nope"), "{v}");
    assert!(
        api.get("/sandboxes")
            .await
            .json::<Value>()
            .await
            .expect("list")
            .as_array()
            .expect("arr")
            .is_empty(),
        "a refused create leaves no sandbox"
    );

    // A writes, owned by the sandbox user, mounted before the init script.
    let (s, v) = create(&api, "a", json!([{"volume": "data", "mount": "/data"}])).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(sh(&api, "a", "stat -c %u:%g /data").await, "1000:1000");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, _) = api.exec("a", &["cat", "/data/init-was-here"]).await;
        if code == 0 {
            assert_eq!(out.trim(), "from-init");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the init script never wrote to the volume"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sh(&api, "a", "echo hello-from-a > /data/hello && sync").await;
    let mb = fs_mb(&api, "a", "/data").await;
    assert!((50..=64).contains(&mb), "{mb} MiB");
    // Inspect shows the sandbox's volumes (and no custom image).
    let (s, v) = status_of(api.get("/sandboxes/a/inspect").await).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["volumes"],
        json!([{"volume": "data", "mount": "/data", "read_only": false}])
    );
    assert!(v.get("image").is_none(), "{v}");

    // Read-write is one sandbox at a time.
    let (s, v) = create(
        &api,
        "b",
        json!([{"volume": "data", "mount": "/data", "read_only": true}]),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        err_text(&v).contains("attached read-write to sandbox a"),
        "{v}"
    );
    // Attached: no delete, no fork.
    let (s, v) = status_of(api.delete("/volumes/data").await).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(err_text(&v).contains("attached to sandbox a"), "{v}");
    let (s, v) = status_of(
        api.post("/sandboxes", json!({"name": "a2", "from": "a"}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        err_text(&v).contains("forks and snapshots of a sandbox with volumes are not supported"),
        "{v}"
    );

    // Stop/start: the saved VM comes back onto the same devices.
    let (s, v) = status_of(api.post("/sandboxes/a/stop", json!({})).await).await;
    assert!(s.is_success(), "{v}");
    let (s, v) = status_of(api.post("/sandboxes/a/start", json!({})).await).await;
    assert!(s.is_success(), "{v}");
    assert_eq!(sh(&api, "a", "cat /data/hello").await, "hello-from-a");

    // Grow while attached read-write: the guest's filesystem grows online.
    let (s, v) = status_of(
        api.post("/volumes/data/resize", json!({"size_mb": 32}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("can only grow"), "{v}");
    let (s, v) = status_of(
        api.post("/volumes/data/resize", json!({"size_mb": 128}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["size_mb"], 128);
    let mb = fs_mb(&api, "a", "/data").await;
    assert!((110..=128).contains(&mb), "{mb} MiB after growing to 128");
    assert_eq!(sh(&api, "a", "cat /data/hello").await, "hello-from-a");

    // A grow whose guest half fails: the disk grew, so the record says so
    // (never below the disk), and the message names the guest step.
    sh(
        &api,
        "a",
        "sudo -n sh -c 'p=$(command -v resize2fs); mv $p $p.off'",
    )
    .await;
    let (s, v) = status_of(
        api.post("/volumes/data/resize", json!({"size_mb": 144}))
            .await,
    )
    .await;
    assert!(s.is_server_error(), "{s}: {v}");
    assert!(
        err_text(&v).contains("filesystem in sandbox a did not"),
        "{v}"
    );
    let (_, v) = status_of(api.get("/volumes/data").await).await;
    assert_eq!(v["size_mb"], 144, "{v}");
    let disk = d
        .data_dir
        .path()
        .join("volumes")
        .join(format!("{}.img", v["id"].as_str().expect("id")));
    assert_eq!(std::fs::metadata(&disk).expect("disk").len(), 144 << 20);
    // With the tool back, a further grow finishes the job.
    sh(
        &api,
        "a",
        "sudo -n sh -c 'p=$(command -v resize2fs.off); mv $p ${p%.off}'",
    )
    .await;
    let (s, v) = status_of(
        api.post("/volumes/data/resize", json!({"size_mb": 150}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mb = fs_mb(&api, "a", "/data").await;
    assert!((130..=150).contains(&mb), "{mb} MiB after growing to 150");

    // Written without a sync just before the destroy: the daemon has the
    // guest sync its volumes before the VM goes, so nothing is lost.
    sh(&api, "a", "echo written-late > /data/late").await;
    // Destroy A: the volume stays, detached, and read-only goes to many.
    assert!(api.delete("/sandboxes/a").await.status().is_success());
    let (s, v) = status_of(api.get("/volumes/data").await).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["attachments"].as_array().expect("arr").is_empty(), "{v}");
    for sb in ["b", "c"] {
        let (s, v) = create(
            &api,
            sb,
            json!([{"volume": "data", "mount": "/mnt/data", "read_only": true}]),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{sb}: {v}");
        assert_eq!(sh(&api, sb, "cat /mnt/data/hello").await, "hello-from-a");
        assert_eq!(sh(&api, sb, "cat /mnt/data/late").await, "written-late");
        let (code, _, err) = api.exec(sb, &["bash", "-c", "echo x > /mnt/data/x"]).await;
        assert_ne!(code, 0, "{sb} wrote to a read-only volume");
        assert!(err.contains("Read-only file system"), "{err}");
    }
    let (s, v) = create(&api, "d", json!([{"volume": "data", "mount": "/data"}])).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(err_text(&v).contains("attached read-only to b, c"), "{v}");
    let (s, v) = status_of(
        api.post("/volumes/data/resize", json!({"size_mb": 160}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = status_of(api.get("/volumes").await).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["attachments"].as_array().expect("arr").len(), 2, "{v}");
    assert!(api.delete("/sandboxes/b").await.status().is_success());
    assert!(api.delete("/sandboxes/c").await.status().is_success());

    // Grow while detached (on the host), then B gets it read-write and sees it all.
    let (s, v) = status_of(
        api.post("/volumes/data/resize", json!({"size_mb": 160}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = status_of(
        api.post("/volumes/data/resize", json!({"size_mb": 400}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // B also gets a volume inside the first one's path, named first: it is
    // still mounted on top (outer paths first), not hidden under /data.
    let (s, v) = status_of(
        api.post("/volumes", json!({"name": "inner", "size_mb": 8}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = create(
        &api,
        "b",
        json!([{"volume": "inner", "mount": "/data/sub"}, {"volume": "data", "mount": "/data"}]),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    sh(&api, "b", "mountpoint -q /data/sub && mountpoint -q /data").await;
    sh(&api, "b", "echo inner > /data/sub/mark").await;
    let (_, v) = status_of(api.get("/sandboxes/b/inspect").await).await;
    assert_eq!(v["volumes"][0]["volume"], "inner", "{v}");
    assert_eq!(sh(&api, "b", "cat /data/hello").await, "hello-from-a");
    let mb = fs_mb(&api, "b", "/data").await;
    assert!((140..=160).contains(&mb), "{mb} MiB after growing to 160");

    // A daemon restart adopts B with its volume.
    d.restart();
    sh(&api, "b", "echo after-restart >> /data/hello").await;
    assert_eq!(sh(&api, "b", "tail -1 /data/hello").await, "after-restart");

    assert!(api.delete("/sandboxes/b").await.status().is_success());
    let disk = {
        let (_, v) = status_of(api.get("/volumes/data").await).await;
        d.data_dir
            .path()
            .join("volumes")
            .join(format!("{}.img", v["id"].as_str().expect("id")))
    };
    assert!(disk.is_file());
    let (s, v) = status_of(api.delete("/volumes/data").await).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert!(!disk.exists(), "the disk goes with the volume");
    let (s, v) = status_of(api.delete("/volumes/inner").await).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, _) = status_of(api.get("/volumes/data").await).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The CLI: volume create, list, resize, delete; a bad --volume is refused before any request.
    let home = tempfile::tempdir().expect("home");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .args(["--url", &d.url, "--token", &key])
            .args(args)
            .env("HOME", home.path())
            .env_remove("BHATTI_URL")
            .env_remove("BHATTI_TOKEN")
            .env_remove("BHATTI_CONFIG")
            .output()
            .expect("run bhatti");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(&["volume", "create", "--name", "clivol", "--size", "8"]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("volume clivol created (8 MB)"), "{out}");
    let (code, out, _) = cli(&["volume", "resize", "clivol", "--size", "16"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("now 16 MB"), "{out}");
    let (code, out, _) = cli(&["volume", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("clivol") && out.contains("16 MB"), "{out}");
    let (code, _, err) = cli(&["create", "--name", "x", "--volume", "clivol"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("expected NAME:/mount[:ro]"), "{err}");
    let (code, out, err) = cli(&["volume", "delete", "clivol"]);
    assert_eq!(code, Some(0), "{out} {err}");
    let (code, _, err) = cli(&["volume", "delete", "clivol"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("no volume named clivol"), "{err}");
}
