//! `bhatti snapshot create/list/resume/delete` through the CLI against a
//! real daemon and real VMs: the snapshot's state comes back in a new
//! sandbox, and name, unknown-snapshot and quota errors read clearly.

mod common;

use common::{cli_ok as ok, cli_run as run, TestDaemon};

/// Runs a command that must fail; returns its stderr.
fn fails(d: &TestDaemon, key: &str, args: &[&str]) -> String {
    let o = run(d, key, args);
    assert!(
        !o.status.success(),
        "bhatti {args:?} should fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn snapshot_commands_and_their_errors() {
    common::require_root();
    let d = TestDaemon::start("snapcli");
    let key = d.create_user("sam", &[]);

    ok(&d, &key, &["create", "--name", "a"]);
    ok(
        &d,
        &key,
        &[
            "exec",
            "a",
            "--",
            "sh",
            "-c",
            "echo one > /workspace/f; sync",
        ],
    );
    let out = ok(&d, &key, &["snapshot", "create", "a", "--name", "s1"]);
    assert!(out.contains("snapshot s1 of a taken"), "{out}");
    ok(
        &d,
        &key,
        &[
            "exec",
            "a",
            "--",
            "sh",
            "-c",
            "echo two > /workspace/f; sync",
        ],
    );

    let out = ok(&d, &key, &["snapshot", "list"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("s1"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(" a ") && line.contains("MB"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&d, &key, &["--json", "snapshot", "list"])).expect("json");
    assert_eq!(json[0]["name"], "s1", "{json}");
    assert!(json[0]["size_bytes"].as_u64().unwrap_or(0) > 0, "{json}");

    // Errors: a taken name, a bad name, an unknown snapshot or sandbox.
    let err = fails(&d, &key, &["snapshot", "create", "a", "--name", "s1"]);
    assert!(err.contains("s1") && err.contains("exists"), "{err}");
    let err = fails(&d, &key, &["snapshot", "create", "a", "--name", "bad name"]);
    assert!(err.contains("name"), "{err}");
    let err = fails(&d, &key, &["snapshot", "resume", "nope", "--name", "x"]);
    assert!(err.contains("no snapshot named nope"), "{err}");
    let err = fails(&d, &key, &["snapshot", "create", "ghost", "--name", "s9"]);
    assert!(err.contains("ghost"), "{err}");

    // Resume: the snapshot's state, in a new sandbox.
    let out = ok(&d, &key, &["snapshot", "resume", "s1", "--name", "b"]);
    assert!(out.contains("created sandbox b from snapshot s1"), "{out}");
    assert_eq!(
        ok(&d, &key, &["exec", "b", "--", "cat", "/workspace/f"]).trim(),
        "one"
    );
    assert_eq!(
        ok(&d, &key, &["exec", "a", "--", "cat", "/workspace/f"]).trim(),
        "two"
    );
    assert_eq!(ok(&d, &key, &["exec", "b", "--", "hostname"]).trim(), "b");
    // A taken name: nothing is made, and the CLI says so.
    let o = run(&d, &key, &["snapshot", "resume", "s1", "--name", "b"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(!out.contains("created"), "{out}");
    assert!(err.contains("already exists; nothing was created"), "{err}");
    assert_eq!(o.status.code(), Some(1), "not resumed is a failure");
    // The same for a fork onto a taken name: b is no copy of a.
    let o = run(&d, &key, &["create", "--name", "b", "--from", "a"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already exists; nothing was created") && err.contains("not forked from a"),
        "{err}"
    );
    assert_eq!(
        ok(&d, &key, &["exec", "b", "--", "hostname"]).trim(),
        "b",
        "b is left as it was"
    );

    // Quota: 5 by default.
    for n in 2..=5 {
        ok(
            &d,
            &key,
            &["snapshot", "create", "a", "--name", &format!("s{n}")],
        );
    }
    let err = fails(&d, &key, &["snapshot", "create", "a", "--name", "s6"]);
    assert!(
        err.contains("quota") && err.contains("snapshot delete"),
        "{err}"
    );
    // At the quota an unknown sandbox is still "not found", a taken name "exists".
    let err = fails(&d, &key, &["snapshot", "create", "nosuch", "--name", "s6"]);
    assert!(err.contains("nosuch") && !err.contains("quota"), "{err}");
    let err = fails(&d, &key, &["snapshot", "create", "a", "--name", "s1"]);
    assert!(err.contains("exists") && !err.contains("quota"), "{err}");

    let out = ok(&d, &key, &["snapshot", "delete", "s1"]);
    assert!(out.contains("snapshot s1 deleted"), "{out}");
    let err = fails(&d, &key, &["snapshot", "delete", "s1"]);
    assert!(err.contains("s1"), "{err}");
    let out = ok(&d, &key, &["snapshot", "list"]);
    assert!(!out.lines().any(|l| l.starts_with("s1 ")), "{out}");
    // The copy runs on without its snapshot.
    assert_eq!(
        ok(&d, &key, &["exec", "b", "--", "cat", "/workspace/f"]).trim(),
        "one"
    );
    ok(&d, &key, &["snapshot", "create", "a", "--name", "s6"]);

    for sb in ["a", "b"] {
        ok(&d, &key, &["destroy", "-y", sb]);
    }
}
