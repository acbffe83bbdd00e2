//! The shareable web terminal against a real daemon and a real VM: the API
//! and WebSocket protocol, the CLI, and the page itself in headless
//! Chromium (`tests/browser/share_page.py`, driven over the DevTools
//! protocol). One sandbox serves every step; booting is the expensive part.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{venv_python, workspace, Api, TestDaemon, BIN};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket = common::WsStream;

async fn connect(base: &str, sandbox: &str) -> Result<Socket, reqwest::StatusCode> {
    let url = format!(
        "{}/_shell/{sandbox}/ws",
        base.replacen("http://", "ws://", 1)
    );
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status()),
        Err(e) => panic!("web terminal connect: {e}"),
    }
}

/// Connects, retrying while the per-address attempt budget says 429.
async fn connect_ok(base: &str, sandbox: &str) -> Socket {
    for _ in 0..20 {
        match connect(base, sandbox).await {
            Ok(ws) => return ws,
            Err(s) if s == 429 => tokio::time::sleep(Duration::from_millis(400)).await,
            Err(s) => panic!("web terminal refused with {s}"),
        }
    }
    panic!("still rate limited after 8 s");
}

async fn auth(ws: &mut Socket, token: &str) {
    let hello = json!({"type": "auth", "token": token, "rows": 30, "cols": 100});
    ws.send(Ws::Text(hello.to_string().into()))
        .await
        .expect("send auth");
}

/// Reads until `until` shows in the terminal output (30 s at most); returns
/// the output and the text messages seen.
async fn read_until(ws: &mut Socket, until: &str) -> (String, Vec<Value>) {
    let (mut out, mut texts) = (String::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.contains(until) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
            Ok(Some(Ok(Ws::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(Ws::Text(t)))) => texts.push(serde_json::from_str(&t).expect("json")),
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(None) | Ok(Some(Err(_))) => break,
        }
    }
    (out, texts)
}

/// Reads to the end and returns the error message and the close code.
async fn refusal(ws: &mut Socket, within: Duration) -> (String, Option<CloseCode>) {
    let mut message = String::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            Ok(Some(Ok(Ws::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v["type"] == "error" {
                    message = v["message"].as_str().unwrap_or_default().to_string();
                }
            }
            Ok(Some(Ok(Ws::Close(frame)))) => return (message, frame.map(|f| f.code)),
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(None) | Ok(Some(Err(_))) => return (message, None),
        }
    }
    panic!("the web terminal was not closed within {within:?} (message so far: {message:?})");
}

/// Polls until the terminal's `session` in sandbox `dev` is listed,
/// detached and running (the agent notices a closed socket asynchronously).
async fn wait_detached(api: &Api, session: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sessions: Value = api
            .get("/sandboxes/dev/sessions")
            .await
            .json()
            .await
            .expect("sessions");
        let s = sessions
            .as_array()
            .and_then(|a| a.iter().find(|s| s["session_id"] == session).cloned())
            .expect("the web terminal's session is listed");
        if s["attached"] == false && s["running"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "session not detached: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn share(api: &Api, sandbox: &str) -> Value {
    let r = api
        .post(&format!("/sandboxes/{sandbox}/share"), json!({}))
        .await;
    assert_eq!(r.status(), 201);
    r.json().await.expect("share json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn web_terminal_share() {
    let d = TestDaemon::start("share");
    let key = d.create_user("alice", &[]);
    let other_key = d.create_user("bob", &[]);
    let alice = Api::new(&d.url, &key);
    let bob = Api::new(&d.url, &other_key);
    let r = alice.post("/sandboxes", json!({"name": "dev"})).await;
    assert_eq!(r.status(), 201);
    let sb: Value = r.json().await.expect("sandbox");
    let id = sb["id"].as_str().expect("id").to_string();

    // --- minting: hashed at rest, per sandbox, owner only
    let s1 = share(&alice, "dev").await;
    let token = s1["token"].as_str().expect("token").to_string();
    assert!(token.starts_with("bsh_"), "{s1}");
    assert_eq!(s1["path"], format!("/_shell/{id}#token={token}"));
    let db = std::fs::read(d.data_dir.path().join("state.db")).unwrap_or_default();
    let wal = std::fs::read(d.data_dir.path().join("state.db-wal")).unwrap_or_default();
    let needle = token.as_bytes();
    assert!(
        !db.windows(needle.len()).any(|w| w == needle)
            && !wal.windows(needle.len()).any(|w| w == needle),
        "the token is stored in clear"
    );
    assert_eq!(
        bob.post("/sandboxes/dev/share", json!({})).await.status(),
        404
    );
    assert_eq!(
        bob.delete(&format!("/sandboxes/{id}/share")).await.status(),
        404
    );
    let st: Value = alice
        .get("/sandboxes/dev/share")
        .await
        .json()
        .await
        .expect("status");
    assert_eq!(st["sandbox_id"], id.as_str());
    assert_eq!(st["open_terminals"], 0);

    // --- the page: no key needed, strict CSP, only local assets
    let anon = reqwest::Client::new();
    let page = anon
        .get(format!("{}/_shell/{id}", d.url))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_string();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(!csp.contains("unsafe") && !csp.contains('*'), "{csp}");
    let html = page.text().await.expect("html");
    assert!(html.contains("/_shell/assets/xterm.js"), "{html}");
    for asset in [
        "xterm.js",
        "xterm.css",
        "addon-fit.js",
        "share.js",
        "share.css",
    ] {
        let r = anon
            .get(format!("{}/_shell/assets/{asset}", d.url))
            .send()
            .await
            .expect("asset");
        assert_eq!(r.status(), 200, "{asset}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    }
    assert_eq!(
        anon.get(format!("{}/_shell/assets/..%2Fshell.rs", d.url))
            .send()
            .await
            .expect("asset")
            .status(),
        404
    );

    let doc: Value = anon
        .get(format!("{}/openapi.json", d.url))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("openapi json");
    for p in [
        "/sandboxes/{id}/share",
        "/_shell/{id}",
        "/_shell/{id}/ws",
        "/_shell/assets/{file}",
    ] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    assert_eq!(doc["paths"]["/_shell/{id}"]["get"]["security"], json!([{}]));

    // --- refused: a wrong token, no auth message in time
    let mut ws = connect_ok(&d.url, &id).await;
    auth(&mut ws, "bsh_wrong").await;
    let (msg, code) = refusal(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(code, Some(CloseCode::from(4001)), "{msg}");
    assert!(msg.contains("invalid or has been revoked"), "{msg}");
    let mut ws = connect_ok(&d.url, &id).await;
    auth(&mut ws, &token.replace("bsh_", "bsh_x")).await;
    assert_eq!(
        refusal(&mut ws, Duration::from_secs(10)).await.1,
        Some(CloseCode::from(4001))
    );
    // Right token, wrong sandbox: tokens are per sandbox.
    let mut ws = connect_ok(&d.url, "sb_000000000000").await;
    auth(&mut ws, &token).await;
    assert_eq!(
        refusal(&mut ws, Duration::from_secs(10)).await.1,
        Some(CloseCode::from(4001))
    );
    let mut ws = connect_ok(&d.url, &id).await;
    let t0 = Instant::now();
    let (msg, code) = refusal(&mut ws, Duration::from_secs(15)).await;
    assert_eq!(code, Some(CloseCode::from(4008)), "{msg}");
    assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());

    // --- a terminal: type, resize, detach, reattach with scrollback
    let mut ws = connect_ok(&d.url, &id).await;
    auth(&mut ws, &token).await;
    ws.send(Ws::Binary(b"echo $((6*7))\n".to_vec().into()))
        .await
        .expect("type");
    let (out, texts) = read_until(&mut ws, "42\r\n").await;
    assert!(out.contains("42\r\n"), "{out:?}");
    let session = texts
        .iter()
        .find(|t| t["type"] == "session")
        .and_then(|t| t["session_id"].as_str())
        .expect("session hello")
        .to_string();
    let resize = json!({"type": "resize", "rows": 33, "cols": 111});
    ws.send(Ws::Text(resize.to_string().into()))
        .await
        .expect("resize");
    ws.send(Ws::Binary(b"stty size\n".to_vec().into()))
        .await
        .expect("type");
    let (out, _) = read_until(&mut ws, "33 111").await;
    assert!(out.contains("33 111"), "{out:?}");
    let st: Value = alice
        .get("/sandboxes/dev/share")
        .await
        .json()
        .await
        .expect("status");
    assert_eq!(st["open_terminals"], 1);
    ws.close(None).await.expect("close");
    drop(ws);
    // Same session as `bhatti shell`: it is listed, detached and running.
    wait_detached(&alice, &session).await;
    let mut ws = connect_ok(&d.url, &id).await;
    auth(&mut ws, &token).await;
    let (out, texts) = read_until(&mut ws, "42").await;
    assert!(
        out.contains("42"),
        "scrollback replayed on reattach: {out:?}"
    );
    assert!(
        texts.iter().any(|t| t["session_id"] == session.as_str()),
        "{texts:?}"
    );
    // The API's shell attaches to the same session by id.
    ws.close(None).await.expect("close");
    drop(ws);
    wait_detached(&alice, &session).await;
    let seen = common::ws_collect(
        &d.url,
        &key,
        "dev",
        &format!("session={session}"),
        None,
        "42",
    )
    .await;
    assert!(seen.contains("42"), "{seen:?}");

    // --- at most 4 terminals at once
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut ws = connect_ok(&d.url, &id).await;
        auth(&mut ws, &token).await;
        let (_, texts) = read_until(&mut ws, "$ ").await;
        assert!(texts.iter().any(|t| t["type"] == "session"), "{texts:?}");
        open.push(ws);
    }
    let mut ws = connect_ok(&d.url, &id).await;
    auth(&mut ws, &token).await;
    let (msg, code) = refusal(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(code, Some(CloseCode::from(4029)), "{msg}");
    assert!(msg.contains("too many"), "{msg}");

    // --- a new share replaces the old one and closes its terminals
    let s2 = share(&alice, "dev").await;
    let token2 = s2["token"].as_str().expect("token").to_string();
    for mut ws in open.drain(..) {
        let (msg, code) = refusal(&mut ws, Duration::from_secs(10)).await;
        assert_eq!(code, Some(CloseCode::from(4001)), "{msg}");
        assert!(msg.contains("revoked"), "{msg}");
    }
    let mut ws = connect_ok(&d.url, &id).await;
    auth(&mut ws, &token).await;
    assert_eq!(
        refusal(&mut ws, Duration::from_secs(10)).await.1,
        Some(CloseCode::from(4001))
    );

    // --- revoke closes an open terminal and refuses the token
    let mut ws = connect_ok(&d.url, &id).await;
    auth(&mut ws, &token2).await;
    read_until(&mut ws, "$ ").await;
    assert_eq!(alice.delete("/sandboxes/dev/share").await.status(), 204);
    let t0 = Instant::now();
    let (msg, code) = refusal(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(code, Some(CloseCode::from(4001)), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let mut ws = connect_ok(&d.url, &id).await;
    auth(&mut ws, &token2).await;
    assert_eq!(
        refusal(&mut ws, Duration::from_secs(10)).await.1,
        Some(CloseCode::from(4001))
    );
    assert_eq!(alice.get("/sandboxes/dev/share").await.status(), 404);
    assert_eq!(
        alice.delete("/sandboxes/dev/share").await.status(),
        204,
        "idempotent"
    );

    // --- connection attempts are rate limited per client address
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(match connect(&d.url, &id).await {
            Ok(_) => 101,
            Err(s) => s.as_u16(),
        });
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses[0] == 101, "{statuses:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Tokens travel in URL fragments and WebSocket messages: never logged.
    for t in [&token, &token2] {
        assert!(
            !d.log().contains(t.as_str()),
            "a share token is in the daemon log"
        );
    }

    // --- the CLI: share, publish --shell, revoke
    let home = tempfile::tempdir().expect("home");
    let cli = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(["--url", &d.url, "--token", &key])
            .args(args)
            .env("HOME", home.path())
            .env_remove("BHATTI_URL")
            .env_remove("BHATTI_TOKEN")
            .output()
            .expect("run bhatti");
        assert!(
            o.status.success(),
            "bhatti {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = cli(&["share", "dev"]);
    let prefix = format!("{}/_shell/{id}#token=bsh_", d.url);
    assert!(out.trim().starts_with(&prefix), "{out}");
    let out = cli(&["publish", "dev", "-p", "3000", "--shell"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("://dev-"), "{out}");
    let url = lines[1].strip_prefix("shell: ").expect("shell line");
    assert!(url.starts_with(&prefix), "{out}");
    let v: Value = serde_json::from_str(&cli(&["--json", "share", "dev"])).expect("json");
    assert!(v["url"].as_str().expect("url").starts_with(&prefix), "{v}");
    let out = cli(&["share", "dev", "--revoke"]);
    assert!(out.contains("revoked"), "{out}");
    assert_eq!(alice.get("/sandboxes/dev/share").await.status(), 404);

    // --- the page in a real browser: types, sees 42, keeps a screenshot,
    // loads nothing from elsewhere, and is disconnected by a revoke.
    let s3 = share(&alice, "dev").await;
    let url = format!("{}{}", d.url, s3["path"].as_str().expect("path"));
    let artifacts = workspace().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let out = Command::new(venv_python())
        .arg(workspace().join("crates/bhatti/tests/browser/share_page.py"))
        .args(["--url", &url, "--api", &d.url, "--sandbox", &id])
        .arg("--screenshot")
        .arg(artifacts.join("share-terminal.png"))
        .env("BHATTI_TOKEN", &key)
        .output()
        .expect("run the browser test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("report");
    std::fs::write(artifacts.join("share-terminal.json"), report.to_string()).expect("report");
    assert_eq!(report["saw_42"], true, "{report}");
    assert_eq!(report["third_party_requests"], json!([]), "{report}");
    assert_eq!(report["csp_violations"], json!([]), "{report}");
    assert_eq!(report["revoked_page_state"], "error", "{report}");
    assert!(
        artifacts
            .join("share-terminal.png")
            .metadata()
            .expect("screenshot")
            .len()
            > 1000
    );
}
