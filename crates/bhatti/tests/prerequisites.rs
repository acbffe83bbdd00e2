//! `bhatti serve` refuses to start on a host missing a tool it runs, in one
//! line naming the tool and its package; `bhatti doctor` prints every check.
//! Regression: a fresh machine whose qemu-img was removed by the QEMU install
//! started a daemon that failed at every create ("cannot run qemu-img").

use std::process::Command;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir: {}\nimages_dir: {}\nlisten: 127.0.0.1:1\n",
            dir.join("data").display(),
            dir.join("images").display()
        ),
    )
    .expect("write config");
    cfg
}

#[test]
fn serve_refuses_without_qemu_and_names_the_packages() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (serve checks root first)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).expect("mkdir");
    // A PATH without /usr/bin hides qemu-img and qemu-system-x86_64.
    let out = Command::new(env!("CARGO_BIN_EXE_bhatti"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("PATH", &empty)
        .output()
        .expect("run bhatti serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing prerequisites"), "{err}");
    assert!(
        err.contains("qemu-img") && err.contains("qemu-utils"),
        "{err}"
    );
    assert!(err.contains("qemu-system-x86_64"), "{err}");
    // Refused before anything was built or created.
    assert!(!dir.path().join("images").exists());
    assert!(!dir.path().join("data").join("state.db").exists());
}

#[test]
fn doctor_lists_every_check_and_fails_on_a_missing_tool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let run = |path: Option<&std::path::Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bhatti"));
        c.args(["doctor", "--json", "--config"]).arg(&cfg);
        if let Some(p) = path {
            c.env("PATH", p);
        }
        c.output().expect("run bhatti doctor")
    };
    let out = run(None);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let names: Vec<&str> = checks
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for want in [
        "accelerator",
        "qemu-system-x86_64",
        "qemu-img",
        "nft",
        "network namespaces",
        "guest images",
        "free disk",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let images = checks
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "guest images"))
        .expect("images check");
    assert_eq!(images["ok"], false, "a fresh images dir has no images");

    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).expect("mkdir");
    let out = run(Some(&empty));
    assert_eq!(out.status.code(), Some(1));
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let img = checks
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "qemu-img"))
        .expect("qemu-img check");
    assert_eq!(img["ok"], false);
    assert!(img["fix"].as_str().unwrap_or("").contains("qemu-utils"));
}
