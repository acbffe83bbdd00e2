//! The real `bhatti` CLI against a real daemon with real VMs: what a user types.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{TestDaemon, BIN};

struct User {
    home: tempfile::TempDir,
}

impl User {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("HOME", self.home.path())
            .env_remove("BHATTI_URL")
            .env_remove("BHATTI_TOKEN");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run bhatti")
    }

    fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
        child.wait_with_output().expect("wait")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "bhatti {args:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn cli_against_a_real_daemon() {
    let d = TestDaemon::start("cli");
    let key = d.create_user("carol", &["--max-sandboxes", "2"]);
    let u = User {
        home: tempfile::tempdir().expect("home"),
    };

    // setup writes the config (0600) and tests the connection
    let out = u.ok(&["setup", "--url", &d.url, "--token", &key]);
    assert!(!out.contains(&key), "setup must not echo the key");
    let cfg: PathBuf = u.home.path().join(".bhatti/config.yaml");
    let mode = std::fs::metadata(&cfg)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .expect("config written");
    assert_eq!(mode, 0o600);
    let v = u.ok(&["version"]);
    assert!(
        v.contains("bhatti v") && v.contains(&d.url) && v.contains("ok"),
        "{v}"
    );
    let server = format!("server: v{}", env!("CARGO_PKG_VERSION"));
    assert!(v.contains(&server), "the server's version is shown: {v}");

    // a wrong key says what to do
    let o = u.run(&["list", "--token", "bht_nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("bhatti setup"),
        "{}",
        text(&o.stderr)
    );

    // create with env and init
    let out = u.ok(&[
        "create",
        "--name",
        "dev",
        "--env",
        "API_KEY=sk-abc,NODE_ENV=prod",
        "--init",
        "echo init-says-hi",
    ]);
    assert!(out.contains("dev"), "{out}");
    let o = u.run(&["create", "--name", "x2", "--env", "GOOD=1,broken"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("broken"),
        "malformed pair named: {}",
        text(&o.stderr)
    );

    // exec: env, exit code, stdout/stderr separation, stdin, byte-exact pipes
    assert_eq!(
        u.ok(&["exec", "dev", "--", "sh", "-c", "echo $API_KEY $NODE_ENV"]),
        "sk-abc prod\n"
    );
    let o = u.run(&[
        "exec",
        "dev",
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(text(&o.stdout), "to-out\n");
    assert_eq!(text(&o.stderr), "to-err\n");
    let o = u.run_stdin(
        &[
            "exec",
            "dev",
            "--",
            "sh",
            "-c",
            "cat > /workspace/data.json; cat /workspace/data.json | wc -c",
        ],
        br#"{"name": "bhatti", "n": 1}"#,
    );
    assert_eq!(text(&o.stdout).trim(), "26");
    let o = u.run_stdin(
        &[
            "exec",
            "dev",
            "--",
            "python3",
            "-c",
            "import json,sys; print(json.load(sys.stdin)['name'])",
        ],
        br#"{"name": "piped"}"#,
    );
    assert_eq!(text(&o.stdout), "piped\n");
    let bin: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let o = u.run_stdin(&["exec", "dev", "--", "cat"], &bin);
    assert!(
        o.stdout == bin,
        "binary round trip through exec is byte-exact"
    );
    // `bhatti exec dev -- cat /workspace/data.json | <json tool>`: only the command's bytes on stdout
    let o = u.run(&["exec", "dev", "--", "cat", "/workspace/data.json"]);
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is exactly the file");
    assert_eq!(v["name"], "bhatti");
    let o = u.run(&["exec", "nope", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("no sandbox named nope"),
        "{}",
        text(&o.stderr)
    );

    // Ctrl+C stops the remote command: SIGINT to the CLI, exit 130, nothing left running
    let mut child = u
        .cmd(&[
            "exec",
            "dev",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 4343",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut first = [0u8; 8];
    std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut first)
        .expect("output streams before the command ends");
    assert_eq!(&first, b"started\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = child.wait().expect("wait exec");
    assert_eq!(status.code(), Some(130));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = u.ok(&[
            "exec",
            "dev",
            "--",
            "sh",
            "-c",
            "pgrep -f 'slee[p] 4343' || true",
        ]);
        if left.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "remote command still running after Ctrl+C: {left}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // files
    let o = u.run_stdin(&["file", "write", "dev", "/workspace/a.txt"], b"hi\n");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(u.ok(&["file", "read", "dev", "/workspace/a.txt"]), "hi\n");
    let ls = u.ok(&["file", "ls", "dev", "/workspace/"]);
    let line = ls
        .lines()
        .find(|l| l.contains("a.txt"))
        .unwrap_or_else(|| panic!("a.txt listed: {ls}"));
    assert!(
        line.contains('3') && line.contains("06"),
        "size and mode shown: {line}"
    );
    let big = tempfile::NamedTempFile::new().expect("tmp");
    big.as_file()
        .set_len(100 * 1024 * 1024 + 1)
        .expect("sparse file");
    let o = u.run(&[
        "file",
        "write",
        "dev",
        "/workspace/a.txt",
        "--from",
        &big.path().to_string_lossy(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("100"), "{}", text(&o.stderr));
    assert_eq!(
        u.ok(&["file", "read", "dev", "/workspace/a.txt"]),
        "hi\n",
        "a refused write changes nothing"
    );

    // list / ps / --json hold the same facts as the tables
    let table = u.ok(&["list"]);
    let json: serde_json::Value =
        serde_json::from_str(&u.ok(&["list", "--json"])).expect("list --json parses");
    let sb = &json[0];
    for fact in [
        sb["name"].as_str().unwrap(),
        sb["id"].as_str().unwrap(),
        sb["ip"].as_str().unwrap(),
        sb["status"].as_str().unwrap(),
    ] {
        assert!(table.contains(fact), "table lacks {fact}: {table}");
    }
    let ps = u.ok(&["ps", "dev"]);
    assert!(ps.contains("init"), "{ps}");
    let ps_json: serde_json::Value =
        serde_json::from_str(&u.ok(&["ps", "dev", "--json"])).expect("ps --json");
    assert!(ps_json
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["session_id"] == "init"));

    // secrets
    u.ok(&["secret", "set", "TOKEN_A", "s3cr3t-value"]);
    let l = u.ok(&["secret", "list"]);
    assert!(l.contains("TOKEN_A") && !l.contains("s3cr3t-value"), "{l}");
    let j: serde_json::Value = serde_json::from_str(&u.ok(&["secret", "list", "--json"])).unwrap();
    assert_eq!(j[0]["name"], "TOKEN_A");
    u.ok(&["secret", "delete", "TOKEN_A"]);
    assert!(!u.ok(&["secret", "list"]).contains("TOKEN_A"));

    // operator commands while the daemon runs
    let out = d.operator(&["user", "list", "--json"]);
    let users: serde_json::Value = serde_json::from_slice(&out.stdout).expect("user list --json");
    assert_eq!(
        users
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == "carol")
            .expect("carol")["sandboxes"],
        1
    );
    let o = d.operator(&["user", "delete", "carol"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "delete refuses while carol has a sandbox"
    );

    // the shell, through a real terminal (tmux)
    shell_in_tmux(&u);

    // stop frees the VM; the next command wakes it, files intact
    assert_eq!(u.ok(&["stop", "dev"]).trim(), "sandbox dev is stopped");
    assert!(d.qemu_pids().is_empty(), "no QEMU while stopped");
    assert!(
        u.ok(&["ls"]).contains("stopped"),
        "list shows it stopped without waking it"
    );
    assert_eq!(u.ok(&["file", "read", "dev", "/workspace/a.txt"]), "hi\n");
    assert_eq!(u.ok(&["start", "dev"]).trim(), "sandbox dev is running");

    // destroy
    u.ok(&["destroy", "dev"]);
    let j: serde_json::Value = serde_json::from_str(&u.ok(&["ls", "--json"])).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 0);
    assert!(d.qemu_pids().is_empty());
    assert!(d.operator(&["user", "delete", "carol"]).status.success());
}

/// A tmux server of our own: a fresh socket per use, so no earlier (maybe
/// still exiting) server is ever reused.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(n: u32) -> Tmux {
        Tmux {
            socket: format!("bhatti-test-{}-{n}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux")
    }

    fn start(&self, cmd: &str) {
        let o = self.run(&["new-session", "-d", "-s", "t", "-x", "120", "-y", "40", cmd]);
        assert!(o.status.success(), "tmux: {}", text(&o.stderr));
    }

    fn keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "t", keys]);
    }

    fn enter(&self, line: &str) {
        self.run(&["send-keys", "-t", "t", line, "Enter"]);
    }

    fn wait_screen(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = text(
                &self
                    .run(&["capture-pane", "-p", "-t", "t", "-S", "-200"])
                    .stdout,
            );
            if s.contains(what) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn shell_in_tmux(u: &User) {
    let home = u.home.path().to_string_lossy().into_owned();
    let cmd = format!("env HOME={home} {BIN} shell dev; echo shell-ended-$?; sleep 60");
    let t = Tmux::new(1);
    t.start(&cmd);
    t.wait_screen("$");
    // The marker after `stty size` is computed, so the typed line cannot
    // match it: the screen is read once the size has been printed.
    t.enter("echo tmux-$((6*7)); stty size; echo size-$((2+3))-shown");
    let s = t.wait_screen("size-5-shown");
    assert!(s.contains("tmux-42"), "command output on screen: {s}");
    assert!(
        s.contains("40 120") || s.contains("39 120"),
        "window size sent: {s}"
    );
    // Ctrl+\ detaches and says how to come back
    t.keys("C-\\");
    let s = t.wait_screen("shell-ended-0");
    assert!(s.contains("bhatti shell"), "detach message: {s}");
    drop(t);
    // again: same session, scrollback replayed
    let t = Tmux::new(2);
    t.start(&cmd);
    let s = t.wait_screen("tmux-42");
    assert!(s.contains("tmux-42"), "reattach shows earlier output: {s}");
    t.enter("exit 5");
    let s = t.wait_screen("shell-ended-5");
    assert!(
        s.contains("shell-ended-5"),
        "remote exit code forwarded: {s}"
    );
}
