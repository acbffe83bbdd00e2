//! Black-box tests of `bhatti user …` against a temporary data dir.

use std::path::Path;
use std::process::{Command, Output};

use bhatti::config::DaemonConfig;
use bhatti::store::{NewSandbox, Store};

fn bhatti(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bhatti"))
        .arg("user")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("BHATTI_CONFIG")
        .output()
        .expect("run bhatti")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

fn key_from(out: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.starts_with("API key: "))
        .unwrap_or_else(|| panic!("no API key line in {out:?}"));
    assert!(line.ends_with("(shown once)"), "{line}");
    let key = line["API key: ".len()..]
        .split_whitespace()
        .next()
        .expect("key");
    assert!(key.starts_with("bht_") && key.len() >= 36, "{key}");
    key.to_string()
}

#[test]
fn user_lifecycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");

    // list before any database exists: a clear error, nothing created.
    let o = bhatti(&data, &["list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no bhatti database"), "{}", stderr(&o));
    assert!(!data.exists());

    // create with defaults
    let out = ok(bhatti(&data, &["create", "--name", "alice"]));
    let alice_key = key_from(&out);

    // create with explicit limits, JSON output
    let o = Command::new(env!("CARGO_BIN_EXE_bhatti"))
        .args(["--json", "user", "create", "--name", "bob"])
        .args([
            "--max-sandboxes",
            "2",
            "--max-cpus",
            "1",
            "--max-memory",
            "512",
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_str(&ok(o)).expect("json");
    assert_eq!(v["name"], "bob");
    assert_eq!(v["max_sandboxes"], 2);
    assert_eq!(v["max_memory_mb"], 512);
    let bob_key = v["api_key"].as_str().expect("api_key").to_string();
    assert!(bob_key.starts_with("bht_"));

    // duplicate
    let o = bhatti(&data, &["create", "--name", "alice"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("user alice already exists"),
        "{}",
        stderr(&o)
    );

    // invalid name
    let o = bhatti(&data, &["create", "--name", "bad name"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid user name"), "{}", stderr(&o));

    // the keys authenticate through the library
    let store = Store::open(&data).expect("open store");
    let alice = store
        .authenticate(&alice_key)
        .expect("auth")
        .expect("alice's key works");
    assert_eq!(alice.name, "alice");
    assert_eq!(
        (alice.max_sandboxes, alice.max_cpus, alice.max_memory_mb),
        (5, 4, 4096)
    );
    assert!(store.authenticate(&bob_key).expect("auth").is_some());

    // a sandbox row for alice
    let subnet = DaemonConfig::default().subnet;
    let sb = store
        .create_sandbox(&NewSandbox::new(alice.id, "dev"), &subnet)
        .expect("sandbox");

    // list: aligned table
    let out = ok(bhatti(&data, &["list"]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for h in [
        "NAME",
        "MAX SANDBOXES",
        "MAX CPUS",
        "MAX MEMORY",
        "SANDBOXES",
        "CREATED",
    ] {
        assert!(lines[0].contains(h), "{}", lines[0]);
    }
    assert!(lines[1].starts_with("alice "), "{out}");
    assert!(lines[2].starts_with("bob "), "{out}");
    let created_col = lines[0].find("CREATED").expect("col");
    assert!(lines[1][created_col..].starts_with("20"), "{out}");
    assert!(lines[2][created_col..].starts_with("20"), "{out}");
    assert!(!out.contains(&alice_key), "keys are never listed");

    // list --json (global flag after the subcommand)
    let out = ok(bhatti(&data, &["list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let arr = v.as_array().expect("array");
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["name"], "alice");
    assert_eq!(arr[0]["sandboxes"], 1);
    assert_eq!(arr[1]["sandboxes"], 0);
    assert!(arr[0].get("key_hash").is_none());

    // rotate-key: new key works, old one stops immediately
    let out = ok(bhatti(&data, &["rotate-key", "alice"]));
    let new_key = key_from(&out);
    assert_ne!(new_key, alice_key);
    assert!(store.authenticate(&alice_key).expect("auth").is_none());
    assert_eq!(
        store.authenticate(&new_key).expect("auth").map(|u| u.name),
        Some("alice".to_string())
    );

    // unknown user
    for args in [["rotate-key", "carol"], ["delete", "carol"]] {
        let o = bhatti(&data, &args);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("no user named carol"), "{}", stderr(&o));
    }

    // delete refused while alice has a sandbox
    let o = bhatti(&data, &["delete", "alice"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("1 sandbox"), "{}", stderr(&o));
    assert!(store.get_user_by_name("alice").is_ok());

    // after the sandbox is gone, delete works
    store.delete_sandbox(&sb.id).expect("delete sandbox");
    let out = ok(bhatti(&data, &["delete", "alice"]));
    assert!(out.contains("deleted user alice"), "{out}");
    assert!(store.get_user_by_name("alice").is_err());
    assert!(store.authenticate(&new_key).expect("auth").is_none());

    let out = ok(bhatti(&data, &["list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(1));
}

#[test]
fn data_dir_from_daemon_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("state");
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, format!("data_dir: {}\n", data.display())).expect("write config");
    let o = Command::new(env!("CARGO_BIN_EXE_bhatti"))
        .args(["user", "create", "--name", "dave", "--config"])
        .arg(&cfg)
        .env_remove("BHATTI_CONFIG")
        .output()
        .expect("run");
    ok(o);
    assert!(data.join("state.db").is_file());

    // An unknown key in the config is an error that names it.
    std::fs::write(&cfg, "data_dir: /tmp/x\nbogus_key: 1\n").expect("write config");
    let o = Command::new(env!("CARGO_BIN_EXE_bhatti"))
        .args(["user", "list", "--config"])
        .arg(&cfg)
        .env_remove("BHATTI_CONFIG")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bogus_key"), "{}", stderr(&o));

    // --data-dir and --config together are refused by the parser.
    let o = Command::new(env!("CARGO_BIN_EXE_bhatti"))
        .args(["user", "list", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .expect("run");
    assert!(!o.status.success());
}
