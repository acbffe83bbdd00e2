//! Exec, stdin and connection faults on the host side, against a real daemon
//! and one shared real VM (TCG here), `egress: false`. Regressions of faults
//! found by using bhatti as its users do:
//! - `sleep 60 | bhatti exec SB -- echo hi` took 60 s: stdin was read whole
//!   before the command started (and 200 MB of it cost the CLI 530 MB);
//! - buffered exec output had no cap; an exec body over the limit was a 400;
//! - a rotated key left open shells working;
//! - a guest that died left in-flight requests hanging forever.
//!
//! The guest-death step destroys the VM's usefulness, so it runs last.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Api, TestDaemon, BIN};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

fn cli(d: &TestDaemon, key: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--url", &d.url, "--token", key])
        .args(args)
        .env_remove("BHATTI_URL")
        .env_remove("BHATTI_TOKEN");
    c
}

/// Waits for `child` up to `within`; kills it and fails when it takes longer.
fn wait_within(child: &mut std::process::Child, within: Duration, what: &str) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Peak RSS of an exited child, in KiB (`wait4`'s rusage).
fn wait_rusage(pid: u32) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child; status and ru are valid for writes.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut ru) };
    assert_eq!(r, pid as i32, "wait4");
    (libc::WEXITSTATUS(status), ru.ru_maxrss)
}

async fn ws_exec(d: &TestDaemon, key: &str, sb: &str) -> common::WsStream {
    ws_exec_query(d, key, sb, "").await.expect("ws connect")
}

async fn ws_exec_query(
    d: &TestDaemon,
    key: &str,
    sb: &str,
    query: &str,
) -> Result<common::WsStream, tokio_tungstenite::tungstenite::Error> {
    let url = format!(
        "{}/sandboxes/{sb}/exec/ws{query}",
        d.url.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header"),
    );
    tokio_tungstenite::connect_async(req).await.map(|c| c.0)
}

/// The session id of the first message of an exec WebSocket.
async fn ws_session_id(ws: &mut common::WsStream) -> String {
    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
        Ok(Some(Ok(Ws::Text(t)))) => {
            let v: Value = serde_json::from_str(&t).expect("json");
            assert_eq!(v["type"], "session", "{v}");
            v["session_id"].as_str().expect("id").to_string()
        }
        other => panic!("no session message: {other:?}"),
    }
}

/// Reads exec events until exit or error; returns (stdout, exit event).
async fn ws_events(ws: &mut common::WsStream) -> (String, Value) {
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Ws::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("event json");
                match v["type"].as_str() {
                    Some("stdout") => out.push_str(v["data"].as_str().unwrap_or("")),
                    Some("exit") | Some("error") => return (out, v),
                    _ => {}
                }
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(None) | Ok(Some(Err(_))) => break,
        }
    }
    panic!("no exit event; output so far: {out:?}");
}

// The big-stdin child is reaped by `wait_rusage` (wait4), which clippy cannot see.
#[allow(clippy::zombie_processes)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_stdin_limits_and_dead_guests() {
    common::require_root();
    let d = TestDaemon::start("exechost");
    let key = d.create_user("erin", &[]);
    let api = Api::new(&d.url, &key);
    let r = api.post("/sandboxes", json!({"name": "ex"})).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());

    // --- a command that does not read stdin is not held up by it: the CLI's
    // stdin stays open (the writer is kept) and the command returns anyway.
    let mut child = cli(&d, &key, &["exec", "ex", "--", "echo", "hi"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let _writer = child.stdin.take();
    let code = wait_within(&mut child, Duration::from_secs(60), "exec with open stdin");
    assert_eq!(code, 0);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out)
        .expect("read");
    assert_eq!(out, "hi\n");

    // --- --no-stdin: the command sees EOF although our stdin is a pipe.
    let o = cli(&d, &key, &["exec", "--no-stdin", "ex", "--", "cat"])
        .stdin(Stdio::piped())
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0));
    assert!(o.stdout.is_empty());

    // --- --json with piped stdin: the stdin still reaches the command.
    let mut child = cli(&d, &key, &["--json", "exec", "ex", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello\n")
        .expect("write");
    let o = child.wait_with_output().expect("wait");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (v["exit_code"].as_i64(), v["stdout"].as_str()),
        (Some(0), Some("hello\n"))
    );

    // --- --cwd, --env, --timeout
    let o = cli(
        &d,
        &key,
        &[
            "exec",
            "--cwd",
            "/tmp",
            "-e",
            "GREETING=hej",
            "ex",
            "--",
            "sh",
            "-c",
            "pwd; echo $GREETING",
        ],
    )
    .stdin(Stdio::null())
    .output()
    .expect("run");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "/tmp\nhej\n");
    let o = cli(
        &d,
        &key,
        &["exec", "--timeout", "1", "ex", "--", "sleep", "30"],
    )
    .stdin(Stdio::null())
    .output()
    .expect("run");
    assert_eq!(o.status.code(), Some(137));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("timed out"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = cli(&d, &key, &["exec", "-e", "NOEQUALS", "ex", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));

    // --- stdin past the old 64 MiB JSON limit streams through, in bounded memory.
    const BIG: usize = 80 << 20;
    let mut child = cli(&d, &key, &["exec", "ex", "--", "wc", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b'z'; 1 << 20];
        for _ in 0..(BIG >> 20) {
            if input.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let (code, maxrss_kib) = wait_rusage(child.id());
    feeder.join().expect("feeder");
    assert_eq!(code, 0);
    assert_eq!(reader.join().expect("reader").trim(), BIG.to_string());
    assert!(
        (maxrss_kib as usize) * 1024 < BIG / 2,
        "the CLI held {maxrss_kib} KiB for {BIG} bytes of stdin"
    );

    // --- the exec WebSocket: stdin in, output out, exit code at the end.
    let mut ws = ws_exec(&d, &key, "ex").await;
    ws.send(Ws::Text(
        json!({"cmd": ["sh", "-c", "cat; exit 3"]})
            .to_string()
            .into(),
    ))
    .await
    .expect("start");
    ws.send(Ws::Binary(b"ping\n".to_vec().into()))
        .await
        .expect("stdin");
    ws.send(Ws::Text(json!({"type": "eof"}).to_string().into()))
        .await
        .expect("eof");
    let (out, exit) = ws_events(&mut ws).await;
    assert_eq!(out, "ping\n");
    assert_eq!(exit["type"], "exit", "{exit}");
    assert_eq!(exit["exit_code"], 3);
    // A bad start message is an error event, not a hang.
    let mut ws = ws_exec(&d, &key, "ex").await;
    ws.send(Ws::Text(json!({"cmd": []}).to_string().into()))
        .await
        .expect("start");
    let (_, ev) = ws_events(&mut ws).await;
    assert_eq!(ev["type"], "error", "{ev}");
    assert!(ev["data"].as_str().unwrap_or("").contains("cmd"), "{ev}");
    assert_eq!(ev["data"], ev["message"]);

    // --- a detachable piped session: stdin, detach, reattach with the output
    // kept meanwhile replayed, the exit code at the end.
    let mut ws = ws_exec(&d, &key, "ex").await;
    let script = "read x; echo got-$x; for i in 1 2 3; do echo tick$i; sleep 1; done; exit 7";
    ws.send(Ws::Text(
        json!({"cmd": ["sh", "-c", script], "max_idle_sec": 60})
            .to_string()
            .into(),
    ))
    .await
    .expect("start");
    let sid = ws_session_id(&mut ws).await;
    ws.send(Ws::Binary(b"hello\n".to_vec().into()))
        .await
        .expect("stdin");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(ws); // detach: the command keeps running
    let mut ws = ws_exec_query(&d, &key, "ex", &format!("?session={sid}"))
        .await
        .expect("reattach");
    assert_eq!(ws_session_id(&mut ws).await, sid);
    let (out, exit) = ws_events(&mut ws).await;
    assert!(
        out.contains("got-hello") && out.contains("tick3"),
        "{out:?}"
    );
    assert_eq!(exit["exit_code"], 7, "{exit}");
    // Unknown session: refused before the upgrade.
    assert!(ws_exec_query(&d, &key, "ex", "?session=es_nope")
        .await
        .is_err());
    // Detached past its idle limit: killed and forgotten.
    let mut ws = ws_exec(&d, &key, "ex").await;
    ws.send(Ws::Text(
        json!({"cmd": ["sleep", "60"], "max_idle_sec": 1})
            .to_string()
            .into(),
    ))
    .await
    .expect("start");
    let sid = ws_session_id(&mut ws).await;
    drop(ws);
    // (A reattach is use: look less often than the limit.)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        if ws_exec_query(&d, &key, "ex", &format!("?session={sid}"))
            .await
            .is_err()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle session was never reaped"
        );
    }

    // --- timeouts: the default applies, past the maximum is refused.
    let r = api
        .post(
            "/sandboxes/ex/exec",
            json!({"cmd": ["true"], "timeout_sec": 86_401}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let r = api
        .post(
            "/sandboxes/ex/exec",
            json!({"cmd": ["true"], "timeout_sec": 86_400}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = api
        .req(reqwest::Method::POST, "/sandboxes/ex/exec")
        .header("accept", "application/x-ndjson")
        .json(&json!({"cmd": ["sleep", "30"], "timeout": 1}))
        .send()
        .await
        .expect("post");
    let body = r.text().await.expect("body");
    let last: Value = serde_json::from_str(body.lines().last().expect("a line")).expect("json");
    assert_eq!(last["type"], "exit", "{body}");
    assert_eq!(last["timed_out"], true, "{body}");

    // --- buffered output is capped, and the answer says so.
    let r = api
        .post(
            "/sandboxes/ex/exec",
            json!({"cmd": ["head", "-c", "20000000", "/dev/zero"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["truncated"], true);
    assert_eq!(v["stdout"].as_str().map(str::len), Some(16 << 20));
    assert_eq!(v["exit_code"], 0);

    // --- JSON body limit: at the limit accepted, one byte past it 413.
    let limit = 64 << 20;
    let mut body = br#"{"cmd":["true"]}"#.to_vec();
    body.resize(limit, b' ');
    let r = api
        .req(reqwest::Method::POST, "/sandboxes/ex/exec")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    body.push(b' ');
    let r = api
        .req(reqwest::Method::POST, "/sandboxes/ex/exec")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.expect("json");
    assert!(v["error"].as_str().unwrap_or("").contains("64 MiB"), "{v}");

    // --- detach: answers at once with a pid; the output lands in the file,
    // and the command keeps running after the exec returned.
    let r = api
        .post(
            "/sandboxes/ex/exec",
            json!({"cmd": ["sh", "-c", "echo started; python3 -m http.server 3005 --bind 0.0.0.0"],
                   "detach": true, "output_file": "/tmp/web.log"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.headers()
            .get("x-bhatti-version")
            .and_then(|v| v.to_str().ok()),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let v: Value = r.json().await.expect("json");
    assert!(v["pid"].as_u64().unwrap_or(0) > 1, "{v}");
    assert_eq!(v["output_file"], "/tmp/web.log");
    for (body, want) in [
        (
            json!({"cmd": ["true"], "detach": true, "output_file": "rel.log"}),
            "output_file",
        ),
        (
            json!({"cmd": ["true"], "detach": true, "output_file": "/nope/x.log"}),
            "output_file",
        ),
        (
            json!({"cmd": ["true"], "detach": true, "output_file": "/tmp"}),
            "output_file",
        ),
        (
            json!({"cmd": ["no-such-prog"], "detach": true}),
            "no-such-prog",
        ),
    ] {
        let r = api.post("/sandboxes/ex/exec", body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.expect("json");
        assert!(
            v["error"].as_str().unwrap_or("").contains(want),
            "{body}: {v}"
        );
    }

    // --- ports carry container_port and a proxy URL that works.
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        let ports: Value = api
            .get("/sandboxes/ex/ports")
            .await
            .json()
            .await
            .expect("json");
        if let Some(p) = ports
            .as_array()
            .and_then(|a| a.iter().find(|p| p["port"] == 3005))
        {
            break p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "port 3005 never listened: {ports}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(port["container_port"], 3005);
    let proxy_url = port["proxy_url"].as_str().expect("proxy_url").to_string();
    assert!(
        proxy_url.contains("/sandboxes/sb_") && proxy_url.ends_with("/proxy/3005/"),
        "{proxy_url}"
    );
    let r = api
        .http
        .get(&proxy_url)
        .bearer_auth(&key)
        .send()
        .await
        .expect("proxy");
    assert_eq!(r.status(), 200);
    let (_, log, _) = api.exec("ex", &["cat", "/tmp/web.log"]).await;
    assert!(log.starts_with("started\n"), "{log:?}");
    let o = cli(&d, &key, &["ports", "ex"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&o.stdout).contains("3005"));

    // --- a rotated key ends open WebSockets of that key.
    let mut ws = ws_exec(&d, &key, "ex").await;
    ws.send(Ws::Text(json!({"cmd": ["sleep", "60"]}).to_string().into()))
        .await
        .expect("start");
    let rotated = d.operator(&["user", "rotate-key", "erin"]);
    assert!(rotated.status.success());
    let new_key = String::from_utf8_lossy(&rotated.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("bht_"))
        .expect("new key")
        .to_string();
    let said = tokio::time::timeout(Duration::from_secs(15), async {
        let mut said = String::new();
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Ws::Close(_))) => return said,
                Some(Ok(Ws::Text(t))) => said.push_str(&t),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the WebSocket stayed open after the key was rotated");
    assert!(said.contains("rotated or revoked"), "told why: {said}");
    let api = Api::new(&d.url, &new_key);

    // --- a guest that dies ends every in-flight call promptly, with an error.
    let slow = {
        let api = Api::new(&d.url, &new_key);
        tokio::spawn(async move {
            api.post("/sandboxes/ex/exec", json!({"cmd": ["sleep", "100"]}))
                .await
                .status()
        })
    };
    // Crash the guest only once that exec is really in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = api
            .post(
                "/sandboxes/ex/exec",
                json!({"cmd": ["pgrep", "-fx", "sleep 100"]}),
            )
            .await;
        let v: Value = r.json().await.expect("exec json");
        if v["exit_code"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow exec never started: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let crash = api
        .post(
            "/sandboxes/ex/exec",
            json!({"cmd": ["sudo", "sh", "-c", "echo c > /proc/sysrq-trigger"]}),
        )
        .await
        .status();
    let slow = tokio::time::timeout(Duration::from_secs(40), slow)
        .await
        .expect("the in-flight exec must end when its guest dies")
        .expect("join");
    assert!(crash.is_server_error(), "crash exec answered {crash}");
    assert!(slow.is_server_error(), "in-flight exec answered {slow}");
    eprintln!(
        "in-flight calls ended {:?} after the panic",
        started.elapsed()
    );
}
