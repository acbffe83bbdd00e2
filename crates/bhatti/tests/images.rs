//! Custom images through the API on real VMs (issue 15): save an image from
//! a sandbox where a package was installed and boot another from it (the
//! package is there; the source runs on); import a `docker save` tarball
//! built here from host files (two layers, a whiteout) and boot it; images
//! in use cannot be deleted; images count against the storage quota.

mod common;
mod tiny_image;

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

/// Builds a small Debian package in the guest and installs it (no network needed).
const INSTALL_PACKAGE: &str = r#"set -e
mkdir -p /tmp/p/DEBIAN /tmp/p/usr/local/bin
printf 'Package: h10-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.com>\nDescription: test package\n' > /tmp/p/DEBIAN/control
printf '#!/bin/sh\necho hello-from-package\n' > /tmp/p/usr/local/bin/h10-hello
chmod 755 /tmp/p/usr/local/bin/h10-hello
dpkg-deb --root-owner-group --build /tmp/p /tmp/h10.deb >/dev/null
sudo dpkg -i /tmp/h10.deb >/dev/null
echo saved-in-workspace > /workspace/saved.txt
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_an_image_and_boot_from_it() {
    let d = TestDaemon::start("imgsave");
    let key = d.create_user("img", &["--max-storage", "3000"]);
    let api = Api::new(&d.url, &key);

    let (s, v) = status_of(api.post("/sandboxes", json!({"name": "src"})).await).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    sh(&api, "src", INSTALL_PACKAGE).await;

    let (s, v) = status_of(
        api.post(
            "/images/save",
            json!({"sandbox": "src", "name": "bad name"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("invalid image name"), "{v}");
    let (s, v) = status_of(
        api.post("/images/save", json!({"sandbox": "src", "name": "withpkg"}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["owner"], "user");
    assert_eq!(v["source"], "save src");
    let size = v["size_bytes"].as_u64().expect("size");
    assert!(size > 0);
    if let Some(line) = d.log().lines().find(|l| l.contains("disk flattened")) {
        eprintln!("measured: {line}");
    }
    // The source runs on.
    assert_eq!(sh(&api, "src", "h10-hello").await, "hello-from-package");
    let (s, v) = status_of(
        api.post("/images/save", json!({"sandbox": "src", "name": "withpkg"}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        err_text(&v).contains("an image named withpkg already exists"),
        "{v}"
    );

    // A new sandbox from the image has the package and the files.
    let (s, v) = status_of(
        api.post("/sandboxes", json!({"name": "copy", "image": "withpkg"}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(sh(&api, "copy", "h10-hello").await, "hello-from-package");
    let (s, v) = status_of(api.get("/sandboxes/copy/inspect").await).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["image"], "withpkg", "{v}");
    assert_eq!(v["volumes"], json!([]), "{v}");
    assert!(sh(&api, "copy", "dpkg -s h10-hello")
        .await
        .contains("Status: install ok installed"));
    assert_eq!(
        sh(&api, "copy", "cat /workspace/saved.txt; hostname").await,
        "saved-in-workspace\ncopy"
    );
    let (s, v) = status_of(
        api.post("/sandboxes", json!({"name": "x", "image": "nope"}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("no image named nope"), "{v}");

    // The image counts against the storage quota.
    let used = size.div_ceil(1 << 20);
    let (s, v) = status_of(
        api.post("/volumes", json!({"name": "v", "size_mb": 3000 - used + 1}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(
        err_text(&v).contains(&format!("{used} MB of 3000 MB in use")),
        "{v}"
    );

    // In use: no delete; listed; gone with its last user.
    let (s, v) = status_of(api.delete("/images/withpkg").await).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(err_text(&v).contains("in use by copy"), "{v}");
    let (s, v) = status_of(api.get("/images").await).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().expect("arr").len(), 1, "{v}");
    // A snapshot of a sandbox from the image keeps the image in use.
    let (s, v) = status_of(
        api.post("/sandboxes/copy/checkpoint", json!({"name": "snap"}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(api.delete("/sandboxes/copy").await.status().is_success());
    let (s, v) = status_of(api.delete("/images/withpkg").await).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(err_text(&v).contains("in use by snapshot snap"), "{v}");
    assert!(
        !err_text(&v).contains("layer"),
        "named, not by its layer: {v}"
    );
    assert!(api.delete("/snapshots/snap").await.status().is_success());
    let (s, v) = status_of(api.delete("/images/withpkg").await).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let files = std::fs::read_dir(d.data_dir.path().join("custom-images"))
        .expect("dir")
        .count();
    assert_eq!(files, 0, "the image file goes with the image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_a_docker_save_tarball_and_boot_it() {
    let d = TestDaemon::start("imgimp");
    let key = d.create_user("img", &[]);
    let api = Api::new(&d.url, &key);
    let import = |name: &str, body: Vec<u8>| {
        api.req(
            reqwest::Method::POST,
            &format!("/images/import?name={name}"),
        )
        .header("content-type", "application/x-tar")
        .body(body)
        .send()
    };

    let doc: Value = reqwest::get(format!("{}/openapi.json", d.url))
        .await
        .expect("openapi")
        .json()
        .await
        .expect("openapi json");
    for p in [
        "/images",
        "/images/{name}",
        "/images/save",
        "/images/import",
        "/images/pull",
        "/tasks/{id}",
    ] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    let (s, v) = status_of(
        import("junk", b"not a tarball at all".to_vec())
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("not an image"), "{v}");

    // A name shaped like an image id is refused before any work.
    let (s, v) = status_of(
        import("img-0123456789ab", tiny_image::docker_save_tarball())
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("must not start with img-"), "{v}");
    // Also when the refused upload is far bigger than the socket buffers:
    // the client, still sending, must read the answer, not a broken pipe.
    let mut big = tiny_image::docker_save_tarball();
    big.resize(48 << 20, 0);
    let (s, v) = status_of(import("img-0123456789ab", big).await.expect("post")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("must not start with img-"), "{v}");

    let (s, v) = status_of(
        import("tiny", tiny_image::docker_save_tarball())
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["source"], "import");

    let (s, v) = status_of(
        api.post("/sandboxes", json!({"name": "tiny", "image": "tiny"}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let run = |script: &'static str| {
        let api = api.clone();
        async move {
            let (code, out, err) = api.exec("tiny", &["/bin/sh", "-c", script]).await;
            assert_eq!(code, 0, "{script}: {out} {err}");
            out
        }
    };
    assert_eq!(run("cat /etc/added").await.trim(), "layer-two");
    let etc = run("ls /etc").await;
    assert!(!etc.contains("removed-me"), "whiteout not applied: {etc}");
    // What the import added: the lohar user, /workspace, resolv.conf.
    assert!(run("cat /etc/passwd").await.contains("lohar:x:1000:1000"));
    assert!(run("cat /proc/self/status").await.contains("Uid:\t1000"));
    assert_eq!(
        run("ls -dn /workspace").await.split_whitespace().nth(2),
        Some("1000")
    );
    assert_eq!(run("pwd").await.trim(), "/workspace");
    assert!(run("cat /etc/resolv.conf")
        .await
        .contains("written by lohar"));

    // The operator shares it with every user; nobody can delete it through the API.
    let out = d.operator(&["image", "promote", "tiny", "--user", "img"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = Api::new(&d.url, &d.create_user("other", &[]));
    let (s, v) = status_of(other.get("/images").await).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["name"], "tiny", "{v}");
    assert_eq!(v[0]["owner"], "operator", "{v}");
    let (s, v) = status_of(other.delete("/images/tiny").await).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(err_text(&v).contains("belongs to the operator"), "{v}");
    let (s, v) = status_of(
        other
            .post("/sandboxes", json!({"name": "t2", "image": "tiny"}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (code, out, _) = other.exec("t2", &["/bin/cat", "/etc/added"]).await;
    assert_eq!((code, out.trim()), (0, "layer-two"));
}
