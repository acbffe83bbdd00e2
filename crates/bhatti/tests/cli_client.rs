//! Black-box tests of the `bhatti` client commands that need no daemon:
//! configuration priority, error messages, exit codes, completion, `setup`
//! and the client-side file-size cap. Every URL is on 127.0.0.1.

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MAX_WRITE: u64 = 100 * 1024 * 1024;

/// A throwaway `$HOME` and a `bhatti` command that uses it, with no
/// BHATTI_* variables inherited from the test's environment.
struct Env {
    home: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            home: tempfile::tempdir().expect("temp home"),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.home.path().join(".bhatti").join("config.yaml")
    }

    fn write_config(&self, yaml: &str) {
        let path = self.config_path();
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, yaml).expect("write config");
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bhatti"));
        c.env("HOME", self.home.path())
            .env_remove("BHATTI_URL")
            .env_remove("BHATTI_TOKEN")
            .env_remove("BHATTI_CONFIG")
            // No control socket: the host's own daemon must not change the defaults.
            .env("BHATTI_SOCKET", self.home.path().join("no-daemon.sock"))
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run bhatti")
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A loopback URL on which nothing listens.
fn closed_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// `bhatti --json version` → (api_url, api_url_source).
fn version_json(o: &Output) -> (String, String) {
    assert!(o.status.success(), "version failed: {}", stderr(o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("version --json is JSON");
    (
        v["api_url"].as_str().expect("api_url").to_string(),
        v["api_url_source"]
            .as_str()
            .expect("api_url_source")
            .to_string(),
    )
}

// --- configuration priority: flag > config file > environment > default ---

#[test]
fn priority_flag_beats_config_file_and_env() {
    let env = Env::new();
    env.write_config("api_url: http://127.0.0.1:1001\nauth_token: bht_file\n");
    let o = env
        .cmd()
        .args(["--json", "--url", "http://127.0.0.1:1003", "version"])
        .env("BHATTI_URL", "http://127.0.0.1:1002")
        .output()
        .expect("run");
    assert_eq!(
        version_json(&o),
        ("http://127.0.0.1:1003".into(), "command-line flag".into())
    );
    // The people-facing form says the same.
    let o = env
        .cmd()
        .args(["version", "--url", "http://127.0.0.1:1003"])
        .env("BHATTI_URL", "http://127.0.0.1:1002")
        .output()
        .expect("run");
    let out = stdout(&o);
    assert!(
        out.starts_with(&format!("bhatti v{}\n", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(out.contains("\napi: http://127.0.0.1:1003\n"), "{out}");
    assert!(out.contains("server: unreachable"), "{out}");
}

#[test]
fn priority_config_file_beats_env() {
    let env = Env::new();
    env.write_config("api_url: http://127.0.0.1:1001\n");
    let o = env
        .cmd()
        .args(["--json", "version"])
        .env("BHATTI_URL", "http://127.0.0.1:1002")
        .output()
        .expect("run");
    let (url, source) = version_json(&o);
    assert_eq!(url, "http://127.0.0.1:1001");
    assert_eq!(
        source,
        format!("config file {}", env.config_path().display())
    );
}

#[test]
fn priority_env_when_no_config_file() {
    let env = Env::new();
    let o = env
        .cmd()
        .args(["--json", "version"])
        .env("BHATTI_URL", "http://127.0.0.1:1002")
        .output()
        .expect("run");
    assert_eq!(
        version_json(&o),
        (
            "http://127.0.0.1:1002".into(),
            "environment variable BHATTI_URL".into()
        )
    );
    // A config file without api_url still lets the environment through.
    env.write_config("auth_token: bht_file\n");
    let o = env
        .cmd()
        .args(["--json", "version"])
        .env("BHATTI_URL", "http://127.0.0.1:1002")
        .output()
        .expect("run");
    assert_eq!(version_json(&o).1, "environment variable BHATTI_URL");
}

#[test]
fn priority_default_when_nothing_is_set() {
    let env = Env::new();
    let o = env.run(&["--json", "version"]);
    assert_eq!(
        version_json(&o),
        ("http://127.0.0.1:8080".into(), "built-in default".into())
    );
}

// --- errors a user can act on ---

#[test]
fn unreachable_daemon_names_url_and_source() {
    let env = Env::new();
    let url = closed_url();
    // From the environment.
    let o = env
        .cmd()
        .arg("list")
        .env("BHATTI_URL", &url)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach {url} (from environment variable BHATTI_URL)"
        )),
        "{err}"
    );
    assert!(o.stdout.is_empty());

    // From the config file (which beats the environment).
    let file_url = closed_url();
    env.write_config(&format!("api_url: {file_url}\nauth_token: bht_x\n"));
    let o = env
        .cmd()
        .args(["exec", "dev", "--", "true"])
        .env("BHATTI_URL", &url)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "cannot reach {file_url} (from config file {})",
            env.config_path().display()
        )),
        "{err}"
    );

    // From the flag.
    let flag_url = closed_url();
    let o = env.run(&["--url", &flag_url, "ps", "dev"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("cannot reach {flag_url} (from command-line flag)")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn invalid_url_and_config_file_are_explained() {
    let env = Env::new();
    let o = env
        .cmd()
        .arg("list")
        .env("BHATTI_URL", "127.0.0.1:8080")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("invalid API URL"), "{err}");
    assert!(err.contains("BHATTI_URL"), "{err}");

    env.write_config("api_url: http://127.0.0.1:1\napi-token: x\n");
    let o = env.run(&["list"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("api-token"), "{err}");
    assert!(
        err.contains(&env.config_path().display().to_string()),
        "{err}"
    );
}

#[test]
fn malformed_env_pair_is_named_and_a_usage_error() {
    let env = Env::new();
    let o = env.run(&[
        "create",
        "--name",
        "dev",
        "--env",
        "API_KEY=sk-abc,NODE_ENV",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("\"NODE_ENV\""), "{err}");
    assert!(err.contains("KEY=VALUE"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    for args in [
        &["no-such-command"][..],
        &["exec", "dev"],
        &["exec"],
        &["publish", "dev"],
        &["unpublish", "dev", "-p", "0"],
        &["create", "--cpus", "0"],
        &["create", "--memory", "lots"],
        &["create", "--name", "-bad"],
        &["file", "read", "dev"],
        &["completion", "tcsh"],
    ] {
        let o = env.run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).starts_with("error: "),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    // A group without its subcommand shows its help, also as a usage error.
    let o = env.run(&["secret"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("Usage: bhatti secret"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn aliases_parse() {
    // Each alias reaches the network (and fails there), so parsing succeeded.
    let env = Env::new();
    let url = closed_url();
    for args in [
        &["ls"][..],
        &["rm", "dev"],
        &["sh", "dev"],
        &["list"],
        &["destroy", "dev"],
        &["secret", "list"],
        &["file", "ls", "dev", "/workspace"],
    ] {
        let o = env
            .cmd()
            .args(args)
            .env("BHATTI_URL", &url)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("cannot reach"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn completion_prints_scripts() {
    let env = Env::new();
    let o = env.run(&["completion", "bash"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("_bhatti"), "{out}");
    assert!(out.contains("complete "), "{out}");
    assert!(out.contains("unpublish"), "{out}");
    for shell in ["zsh", "fish"] {
        let o = env.run(&["completion", shell]);
        assert!(o.status.success(), "{shell}");
        assert!(stdout(&o).contains("bhatti"), "{shell}");
    }
}

// --- setup ---

#[test]
fn setup_with_flags_writes_0600_file_and_fails_when_unreachable() {
    let env = Env::new();
    let url = closed_url();
    let o = env.run(&["setup", "--url", &url, "--token", "bht_scripted"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("connection test failed"), "{err}");
    assert!(err.contains(&format!("cannot reach {url}")), "{err}");

    let path = env.config_path();
    let mode = std::fs::metadata(&path)
        .expect("config written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains(&format!("api_url: {url}")), "{text}");
    assert!(text.contains("auth_token: bht_scripted"), "{text}");

    // The saved file is now what the CLI uses.
    let o = env.run(&["--json", "version"]);
    assert_eq!(version_json(&o).0, url);
}

#[test]
fn setup_without_a_terminal_takes_answers_from_stdin() {
    let env = Env::new();
    let url = closed_url();
    let mut child = env
        .cmd()
        .arg("setup")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{url}\nbht_piped\n").as_bytes())
        .expect("answers");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(1));
    let text = std::fs::read_to_string(env.config_path()).expect("config written");
    assert!(text.contains("bht_piped"), "{text}");
    assert!(
        stderr(&o).contains("connection test failed"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn setup_rejects_a_bad_url_before_writing() {
    let env = Env::new();
    let o = env.run(&["setup", "--url", "not a url", "--token", "bht_x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid API URL"), "{}", stderr(&o));
    assert!(!env.config_path().exists());
}

// --- file write cap ---

/// A sparse file one byte over the cap.
fn oversized_file(dir: &Path) -> PathBuf {
    let path = dir.join("big.bin");
    let f = File::create(&path).expect("create");
    f.set_len(MAX_WRITE + 1).expect("sparse");
    path
}

/// Runs `bhatti file write` against a listener and checks it was refused
/// before any connection was made.
fn assert_refused_without_request(env: &Env, configure: impl FnOnce(&mut Command)) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let mut cmd = env.cmd();
    cmd.args([
        "--url",
        &url,
        "--token",
        "bht_x",
        "file",
        "write",
        "dev",
        "/workspace/big.bin",
    ]);
    configure(&mut cmd);
    let o = cmd.output().expect("run");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("100 MiB"), "{err}");
    assert!(err.contains("nothing was sent"), "{err}");
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the CLI connected to the API: {other:?}"),
    }
}

#[test]
fn file_write_over_100_mib_is_refused_before_any_request() {
    let env = Env::new();
    let big = oversized_file(env.home.path());
    // --from FILE
    assert_refused_without_request(&env, |c| {
        c.arg("--from").arg(&big);
    });
    // stdin redirected from the file
    assert_refused_without_request(&env, |c| {
        c.stdin(File::open(&big).expect("open"));
    });
}

#[test]
fn file_write_over_100_mib_from_a_pipe_is_refused() {
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let mut child = env
        .cmd()
        .args(["--url", &url, "file", "write", "dev", "/workspace/x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..=100 {
            if stdin.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let o = child.wait_with_output().expect("wait");
    feeder.join().expect("feeder");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("100 MiB"), "{}", stderr(&o));
    assert!(matches!(
        listener.accept(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    ));
}
