//! The control socket: the daemon serves the API on `<data_dir>/api.sock`
//! (mode 0600) beside, or instead of, its TCP listener, and the CLI talks
//! to it with a `unix://` URL (what it uses by default when no URL is
//! configured and the default socket is there: see config/client.rs).

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::{Command, Output, Stdio};

use common::{TestDaemon, BIN};

/// The CLI with a clean environment: an empty HOME (no config file), no
/// BHATTI_URL / BHATTI_TOKEN, plus `env`.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let home = tempfile::tempdir().expect("home");
    let mut c = Command::new(BIN);
    c.args(args)
        .env("HOME", home.path())
        .env_remove("BHATTI_URL")
        .env_remove("BHATTI_TOKEN")
        .env_remove("BHATTI_SOCKET")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run bhatti")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_private_socket(d: &TestDaemon) {
    let meta = std::fs::symlink_metadata(d.socket()).expect("the control socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "mode");
    assert_eq!(meta.uid(), 0, "owned by root, the daemon's user");
}

/// The CLI over the socket, both plain requests and the exec WebSocket,
/// on a daemon that also listens on TCP.
#[test]
fn cli_over_the_control_socket() {
    let d = TestDaemon::start("sock");
    assert_private_socket(&d);
    let key = d.create_user("alice", &[]);
    let url = format!("unix://{}", d.socket().display());
    let run = |args: &[&str]| {
        let mut all = vec!["--url", url.as_str(), "--token", key.as_str()];
        all.extend_from_slice(args);
        cli(&all, &[])
    };
    assert_eq!(ok(run(&["--json", "list"])).trim(), "[]");
    ok(run(&["create", "--name", "s1"]));
    // exec streams over a WebSocket: through the socket too.
    let out = ok(run(&[
        "exec",
        "s1",
        "--",
        "sh",
        "-c",
        "echo over-the-socket",
    ]));
    assert_eq!(out.trim(), "over-the-socket");

    // A second daemon on the same data dir (other ports, namespace and
    // subnet) refuses before it touches anything: the first one's sandbox
    // stays running.
    let second = d.data_dir.path().join("second.yaml");
    std::fs::write(
        &second,
        format!(
            "listen: off\npublic_listen: 127.0.0.1:0\ndata_dir: {}\nimages_dir: {}\n\
             netns: bt-second-{}\nbridge: brbt1\nsubnet: 192.168.151.0/24\negress: false\n",
            d.data_dir.path().display(),
            common::images_dir().display(),
            std::process::id()
        ),
    )
    .expect("second config");
    let o = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&second)
        .stdin(Stdio::null())
        .output()
        .expect("second daemon");
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a second daemon started: {said}");
    assert!(said.contains("one data dir, one daemon"), "{said}");
    let out = ok(run(&["exec", "s1", "--", "echo", "still-mine"]));
    assert_eq!(out.trim(), "still-mine");
    let listed = ok(run(&["--json", "list"]));
    assert!(listed.contains("\"running\""), "{listed}");
    // With no URL configured anywhere, the CLI finds the socket by itself
    // (here named by BHATTI_SOCKET instead of /var/lib/bhatti/api.sock).
    let sock = d.socket().display().to_string();
    let listed = ok(cli(
        &["--json", "list"],
        &[
            ("BHATTI_SOCKET", sock.as_str()),
            ("BHATTI_TOKEN", key.as_str()),
        ],
    ));
    assert!(listed.contains("\"s1\""), "{listed}");
    let v = ok(cli(
        &["--json", "version"],
        &[("BHATTI_SOCKET", sock.as_str())],
    ));
    assert!(v.contains(&url), "{v}");
    // The environment names the socket just as well.
    let listed = ok(cli(
        &["--json", "list"],
        &[("BHATTI_URL", url.as_str()), ("BHATTI_TOKEN", key.as_str())],
    ));
    assert!(listed.contains("\"s1\""), "{listed}");
    ok(run(&["destroy", "-y", "s1"]));
    // A user other than root is told the socket is root's, not that the
    // daemon may be down. (The CLI copied where `nobody` may run it.)
    let bin_dir = tempfile::tempdir().expect("bin dir");
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let bin = bin_dir.path().join("bhatti");
    std::fs::copy(BIN, &bin).expect("copy the CLI");
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["--url", url.as_str(), "--token", key.as_str(), "list"])
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("for root only"), "{err}");
    assert!(!err.contains("is the daemon running"), "{err}");
    // A bad key is still refused over the socket: it is not a way around auth.
    let o = cli(
        &["--url", url.as_str(), "--token", "bht_wrong", "list"],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("API key"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `listen: off`: nothing on TCP, everything on the socket; a restart
/// after a crash replaces the socket the dead daemon left.
#[test]
fn listen_off_serves_only_the_socket() {
    let mut d = TestDaemon::start_with("sockonly", "listen: off\n");
    assert!(!d.tcp);
    assert_private_socket(&d);
    let addr = d.url.trim_start_matches("http://").to_string();
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "nothing listens on {addr}"
    );
    let key = d.create_user("bob", &[]);
    let url = format!("unix://{}", d.socket().display());
    let list = |url: &str| {
        cli(
            &["--url", url, "--token", key.as_str(), "--json", "list"],
            &[],
        )
    };
    assert_eq!(ok(list(&url)).trim(), "[]");
    // The TCP URL finds nobody, and says which URL it tried.
    let o = list(&d.url);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&addr),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    d.kill9();
    assert!(d.socket().exists(), "a crash leaves the socket file");
    d.restart();
    assert_private_socket(&d);
    assert_eq!(ok(list(&url)).trim(), "[]");
}
