//! Fleet commands of the CLI against a real daemon and one real VM:
//! labels on create, `list --label` / `-o wide`, `edit`, `inspect`,
//! a create retried on an existing name, `destroy -y`.

mod common;

use common::{cli_ok as ok, cli_run as run, TestDaemon};

#[test]
fn labels_edit_inspect_and_destroy() {
    common::require_root();
    let d = TestDaemon::start("fleet");
    let key = d.create_user("fran", &[]);

    let out = ok(
        &d,
        &key,
        &[
            "create", "--name", "fl", "--label", "team=ml", "--label", "tier=gpu",
        ],
    );
    assert!(out.contains("created sandbox fl"), "{out}");
    // The same create again: nothing new, and it says so.
    let o = run(&d, &key, &["create", "--name", "fl", "--label", "team=ml"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    // A bad label is a usage error before any request.
    let o = run(&d, &key, &["create", "--label", "-x=1"]);
    assert_eq!(o.status.code(), Some(2));

    let out = ok(&d, &key, &["list", "--label", "team=ml"]);
    assert!(out.contains("fl"), "{out}");
    let out = ok(
        &d,
        &key,
        &["list", "--label", "team=ml", "--label", "tier=cpu"],
    );
    assert!(!out.contains("fl"), "{out}");
    let out = ok(&d, &key, &["list", "-o", "wide"]);
    assert!(
        out.contains("LABELS") && out.contains("team=ml,tier=gpu"),
        "{out}"
    );

    let out = ok(
        &d,
        &key,
        &[
            "edit",
            "fl",
            "--name",
            "fl2",
            "--label",
            "env=dev",
            "--label-delete",
            "tier",
        ],
    );
    assert!(out.contains("env=dev,team=ml"), "{out}");
    let o = run(&d, &key, &["edit", "fl2"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "edit with nothing to change is a usage error"
    );

    let v: serde_json::Value =
        serde_json::from_str(&ok(&d, &key, &["--json", "inspect", "fl2"])).expect("json");
    assert_eq!(v["sandbox"]["name"], "fl2");
    assert_eq!(v["sandbox"]["labels"]["env"], "dev");
    assert!(v["disk_bytes"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["volumes"], serde_json::json!([]), "{v}");
    assert!(
        v["sessions"].is_array(),
        "a hot sandbox lists its sessions: {v}"
    );
    let out = ok(&d, &key, &["inspect", "fl2"]);
    for want in [
        "status:",
        "thermal:",
        "disk:",
        "labels:    env=dev, team=ml",
        "image:     (default)",
        "volumes:   -",
    ] {
        assert!(out.contains(want), "{want} in {out}");
    }
    let o = run(&d, &key, &["inspect", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));

    // exec --json: the buffered result, and the exit code forwarded.
    let o = run(
        &d,
        &key,
        &[
            "--json",
            "exec",
            "fl2",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (
            v["exit_code"].as_i64(),
            v["stdout"].as_str(),
            v["stderr"].as_str()
        ),
        (Some(3), Some("out\n"), Some("err\n"))
    );

    // Without a terminal destroy proceeds; -y is accepted too.
    ok(&d, &key, &["destroy", "-y", "fl2"]);
    let out = ok(&d, &key, &["list"]);
    assert!(!out.contains("fl2"), "{out}");
}
