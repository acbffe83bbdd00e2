//! Custom images through the API on real VMs (issue 15): save an image from
//! a sandbox where a package was installed and boot another from it (the
//! package is there; the source runs on); import a `docker save` tarball
//! built here from host files (two layers, a whiteout) and boot it; images
//! in use cannot be deleted; images count against the storage quota.

mod common;

use std::path::Path;

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
    assert!(api.delete("/sandboxes/copy").await.status().is_success());
    let (s, v) = status_of(api.delete("/images/withpkg").await).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let files = std::fs::read_dir(d.data_dir.path().join("custom-images"))
        .expect("dir")
        .count();
    assert_eq!(files, 0, "the image file goes with the image");
}

/// A tar of entries: (path, Some(contents), mode) files or (path, None, _) directories.
fn tar_of(entries: &[(&str, Option<Vec<u8>>, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_mode(*mode);
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                h.set_cksum();
                b.append_data(&mut h, path, d.as_slice()).expect("append");
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_cksum();
                b.append_data(&mut h, path, &[][..]).expect("append");
            }
        }
    }
    b.into_inner().expect("tar")
}

fn host_file(p: &str) -> Vec<u8> {
    let real = Path::new(p).canonicalize().expect("host file");
    std::fs::read(real).expect("read host file")
}

/// A `docker save` tarball: layer 1 a tiny root (dash, cat, ls and their
/// libraries from the host), layer 2 (gzipped) a whiteout and a new file.
fn docker_save_tarball() -> Vec<u8> {
    let lib = "lib/x86_64-linux-gnu";
    let mut l1: Vec<(&str, Option<Vec<u8>>, u32)> = vec![
        ("bin/", None, 0o755),
        ("bin/sh", Some(host_file("/bin/sh")), 0o755),
        ("bin/cat", Some(host_file("/bin/cat")), 0o755),
        ("bin/ls", Some(host_file("/bin/ls")), 0o755),
        ("lib/", None, 0o755),
        ("lib/x86_64-linux-gnu/", None, 0o755),
        ("lib64/", None, 0o755),
        (
            "lib64/ld-linux-x86-64.so.2",
            Some(host_file("/lib64/ld-linux-x86-64.so.2")),
            0o755,
        ),
        ("etc/", None, 0o755),
        (
            "etc/passwd",
            Some(b"root:x:0:0:root:/root:/bin/sh\n".to_vec()),
            0o644,
        ),
        ("etc/group", Some(b"root:x:0:\n".to_vec()), 0o644),
        ("etc/removed-me", Some(b"lower layer\n".to_vec()), 0o644),
    ];
    let libs: Vec<(String, Vec<u8>)> = ["libc.so.6", "libselinux.so.1", "libpcre2-8.so.0"]
        .iter()
        .map(|l| (format!("{lib}/{l}"), host_file(&format!("/{lib}/{l}"))))
        .collect();
    for (p, data) in &libs {
        l1.push((p.as_str(), Some(data.clone()), 0o755));
    }
    let layer1 = tar_of(&l1);
    let layer2 = {
        let raw = tar_of(&[
            ("etc/", None, 0o755),
            ("etc/.wh.removed-me", Some(Vec::new()), 0o644),
            ("etc/added", Some(b"layer-two\n".to_vec()), 0o644),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).expect("gzip");
        gz.finish().expect("gzip")
    };
    let manifest =
        br#"[{"Config":"cfg.json","RepoTags":["tiny:1"],"Layers":["a/layer.tar","b/layer.tar"]}]"#
            .to_vec();
    tar_of(&[
        ("manifest.json", Some(manifest), 0o644),
        ("cfg.json", Some(b"{}".to_vec()), 0o644),
        ("a/", None, 0o755),
        ("a/layer.tar", Some(layer1), 0o644),
        ("b/", None, 0o755),
        ("b/layer.tar", Some(layer2), 0o644),
    ])
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

    let (s, v) = status_of(
        import("junk", b"not a tarball at all".to_vec())
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(err_text(&v).contains("not an image"), "{v}");

    let (s, v) = status_of(import("tiny", docker_save_tarball()).await.expect("post")).await;
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
}
