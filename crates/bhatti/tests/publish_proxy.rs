//! Publish, the public proxy and the authenticated proxy against a real
//! daemon with real VMs (`egress: false`). Every request goes to 127.0.0.1:
//! the public proxy is reached at `d.public_addr` with a `Host:` header.
//!
//! One daemon and two sandboxes (alice's "web", bob's "bobbox") serve the
//! whole scenario, because booting is the expensive part.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Api, TestDaemon, BIN};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

const APP_PY: &str = include_str!("fixtures/proxy_app.py");
const WS_ECHO_PY: &str = include_str!("fixtures/ws_echo.py");
const INDEX_HTML: &str = "<h1>hello from a published sandbox</h1>\n";
/// Per-alias rate of this daemon's public proxy.
const RATE_PER_ALIAS: usize = 10;

async fn status_of(r: reqwest::Response) -> (StatusCode, Value) {
    let s = r.status();
    let text = r.text().await.unwrap_or_default();
    (
        s,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// A request to the public proxy for `<alias>.bhatti.test`.
fn public(
    http: &reqwest::Client,
    d: &TestDaemon,
    method: reqwest::Method,
    alias: &str,
    path: &str,
) -> reqwest::RequestBuilder {
    http.request(method, format!("http://{}{path}", d.public_addr))
        .header("Host", format!("{alias}.bhatti.test"))
}

async fn public_get(
    http: &reqwest::Client,
    d: &TestDaemon,
    alias: &str,
    path: &str,
) -> (StatusCode, String) {
    let r = public(http, d, reqwest::Method::GET, alias, path)
        .send()
        .await
        .expect("public GET");
    let s = r.status();
    (s, r.text().await.unwrap_or_default())
}

/// The CLI binary against this daemon, with a throwaway HOME.
fn cli(d: &TestDaemon, key: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .env("HOME", d.data_dir.path())
        .env_remove("BHATTI_URL")
        .env_remove("BHATTI_TOKEN")
        .env_remove("BHATTI_CONFIG")
        .args(["--url", &d.url, "--token", key])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run bhatti")
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

async fn put_file(api: &Api, sandbox: &str, path: &str, data: Vec<u8>) {
    let r = api
        .req(
            reqwest::Method::PUT,
            &format!("/sandboxes/{sandbox}/files?path={path}"),
        )
        .body(data)
        .send()
        .await
        .expect("PUT file");
    assert_eq!(
        r.status(),
        204,
        "write {path}: {}",
        r.text().await.unwrap_or_default()
    );
}

/// Starts `cmd` in its own session so that it outlives the exec.
async fn start_detached(api: &Api, sandbox: &str, cmd: &str, log: &str) {
    let line = format!("cd /workspace && exec {cmd} >{log} 2>&1 </dev/null");
    let (code, out, err) = api
        .exec(sandbox, &["setsid", "-f", "sh", "-c", &line])
        .await;
    assert_eq!(code, 0, "start {cmd}: {out} {err}");
}

/// Polls `GET /sandboxes/:id/ports` until every port in `want` listens.
async fn wait_listening(api: &Api, sandbox: &str, want: &[u16]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (s, v) = status_of(api.get(&format!("/sandboxes/{sandbox}/ports")).await).await;
        assert_eq!(s, 200, "ports: {v}");
        let ports: Vec<u64> = v
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|p| p["port"].as_u64())
            .collect();
        if want.iter().all(|w| ports.contains(&u64::from(*w))) {
            return v;
        }
        if Instant::now() > deadline {
            let (_, out, _) = api.exec(sandbox, &["sh", "-c", "cat /tmp/*.log"]).await;
            panic!("ports {want:?} not listening in time; got {v}; server logs:\n{out}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_and_proxy() {
    let d = TestDaemon::start_with(
        "pub",
        &format!("public_rate_per_alias: {RATE_PER_ALIAS}\npublic_rate_global: 0\n"),
    );
    let alice_key = d.create_user("alice", &[]);
    let bob_key = d.create_user("bob", &[]);
    let alice = Api::new(&d.url, &alice_key);
    let bob = Api::new(&d.url, &bob_key);
    let http = client();
    let t_all = Instant::now();

    // --- two sandboxes, booted together
    let t0 = Instant::now();
    let (a, b) = tokio::join!(
        alice.post("/sandboxes", json!({"name": "web"})),
        bob.post("/sandboxes", json!({"name": "bobbox"}))
    );
    let ((sa, va), (sb, vb)) = (status_of(a).await, status_of(b).await);
    assert_eq!(sa, 201, "{va}\nlog:\n{}", d.log());
    assert_eq!(sb, 201, "{vb}\nlog:\n{}", d.log());
    println!("2 sandboxes in {:?}", t0.elapsed());

    // --- apps: python's file server on 3000, a keep-alive app on 8001, a WebSocket echo on 8765
    let big = noise(10 * 1024 * 1024, 0x9e37_79b9_7f4a_7c15);
    put_file(&alice, "web", "/workspace/index.html", INDEX_HTML.into()).await;
    put_file(&alice, "web", "/workspace/big.bin", big.clone()).await;
    put_file(&alice, "web", "/workspace/app.py", APP_PY.into()).await;
    put_file(&alice, "web", "/workspace/ws_echo.py", WS_ECHO_PY.into()).await;
    start_detached(
        &alice,
        "web",
        "python3 -m http.server 3000",
        "/tmp/http.log",
    )
    .await;
    start_detached(&alice, "web", "python3 app.py 8001", "/tmp/app.log").await;
    start_detached(&alice, "web", "python3 ws_echo.py 8765", "/tmp/ws.log").await;
    put_file(
        &bob,
        "bobbox",
        "/workspace/index.html",
        b"bob's page\n".to_vec(),
    )
    .await;
    start_detached(
        &bob,
        "bobbox",
        "python3 -m http.server 3000",
        "/tmp/http.log",
    )
    .await;

    // --- GET /sandboxes/:id/ports sees them (and not the agent's own ports)
    let t0 = Instant::now();
    let ports = wait_listening(&alice, "web", &[3000, 8001, 8765]).await;
    println!("servers listening after {:?}: {ports}", t0.elapsed());
    for p in ports.as_array().expect("array") {
        let port = p["port"].as_u64().expect("port");
        assert!(
            port != 1024 && port != 1025,
            "agent ports are hidden: {ports}"
        );
        assert!(p["address"].is_string(), "{p}");
    }
    wait_listening(&bob, "bobbox", &[3000]).await;
    let (s, _) = status_of(bob.get("/sandboxes/web/ports").await).await;
    assert_eq!(s, 404, "another user's sandbox is a 404");

    // --- publish through the real CLI; it prints the URL
    let o = cli(
        &d,
        &alice_key,
        &["publish", "web", "-p", "3000", "-a", "my-app"],
    );
    assert!(
        o.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "https://my-app.bhatti.test"
    );

    // a plain client, no key, gets the page
    let (s, body) = public_get(&http, &d, "my-app", "/index.html").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, INDEX_HTML));
    // Host matching ignores case and the port
    let r = http
        .get(format!("http://{}/index.html", d.public_addr))
        .header(
            "Host",
            format!(
                "My-App.BHATTI.test:{}",
                d.public_addr.rsplit(':').next().expect("port")
            ),
        )
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);

    // --- publish API rules
    let (s, v) = status_of(
        alice
            .post("/sandboxes/web/publish", json!({"port": 3000}))
            .await,
    )
    .await;
    assert_eq!(s, 409, "same port twice: {v}");
    let (s, v) = status_of(
        bob.post(
            "/sandboxes/bobbox/publish",
            json!({"port": 3000, "alias": "my-app"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 409, "alias clash across users: {v}");
    assert!(v["error"].as_str().unwrap_or("").contains("my-app"), "{v}");
    for bad in ["Bad_Alias", "-x", "a.b", "x-", &"a".repeat(64)] {
        let (s, v) = status_of(
            alice
                .post(
                    "/sandboxes/web/publish",
                    json!({"port": 9000, "alias": bad}),
                )
                .await,
        )
        .await;
        assert_eq!(s, 400, "alias {bad:?}: {v}");
        assert!(v["error"].as_str().unwrap_or("").contains("alias"), "{v}");
    }
    for bad in [
        json!({"port": 0}),
        json!({"port": 70000}),
        json!({"port": -1}),
        json!({"port": "x"}),
        json!({}),
    ] {
        let (s, v) = status_of(alice.post("/sandboxes/web/publish", bad.clone()).await).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap_or("").contains("port"), "{v}");
    }
    let (s, _) = status_of(
        bob.post("/sandboxes/web/publish", json!({"port": 8001}))
            .await,
    )
    .await;
    assert_eq!(s, 404, "tenant isolation");
    let (s, _) = status_of(bob.delete("/sandboxes/web/publish/3000").await).await;
    assert_eq!(s, 404, "tenant isolation");
    let (s, _) = status_of(bob.get("/sandboxes/web/publish").await).await;
    assert_eq!(s, 404, "tenant isolation");

    // auto alias: <name>-<6 random>
    let (s, v) = status_of(
        alice
            .post("/sandboxes/web/publish", json!({"port": 8001}))
            .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let app_alias = v["alias"].as_str().expect("alias").to_string();
    let suffix = app_alias
        .strip_prefix("web-")
        .unwrap_or_else(|| panic!("{app_alias}"));
    assert!(
        suffix.len() == 6
            && suffix
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "{app_alias}"
    );
    assert_eq!(v["url"], format!("https://{app_alias}.bhatti.test"));
    assert_eq!(v["port"], 8001);
    assert_eq!(v["sandbox_id"], va["id"]);
    assert!(
        v["id"].is_number() && v["created_at"].as_str().unwrap_or("").contains('T'),
        "{v}"
    );
    let (s, v) = status_of(
        alice
            .post(
                "/sandboxes/web/publish",
                json!({"port": 8765, "alias": "ws-echo"}),
            )
            .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = status_of(
        alice
            .post(
                "/sandboxes/web/publish",
                json!({"port": 4999, "alias": "closed-app"}),
            )
            .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = status_of(alice.get("/sandboxes/web/publish").await).await;
    assert_eq!(s, 200);
    let listed: Vec<(u64, String)> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["port"].as_u64().unwrap_or(0),
                r["alias"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (3000, "my-app".to_string()),
            (4999, "closed-app".to_string()),
            (8001, app_alias.clone()),
            (8765, "ws-echo".to_string())
        ]
    );

    // --- errors of the public proxy
    let (s, body) = public_get(&http, &d, "nobody-here", "/").await;
    assert_eq!(s, 404, "{body}");
    let r = http
        .get(format!("http://{}/", d.public_addr))
        .header("Host", "my-app.example.com")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404, "host outside the domain");
    let (s, body) = public_get(&http, &d, "closed-app", "/").await;
    assert_eq!(s, 502, "{body}");
    assert!(body.contains("not listening on port 4999"), "{body}");
    // over 50 MiB, announced: 413 before a byte of the body is read
    let mut tcp = tokio::net::TcpStream::connect(&d.public_addr)
        .await
        .expect("connect");
    tcp.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: {app_alias}.bhatti.test\r\nContent-Length: {}\r\n\r\n",
            60 * 1024 * 1024
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut head))
        .await
        .expect("answer in time")
        .expect("read");
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    drop(tcp);

    // --- 10 MiB down and up, byte-exact
    let t0 = Instant::now();
    let r = public(&http, &d, reqwest::Method::GET, "my-app", "/big.bin")
        .send()
        .await
        .expect("download");
    assert_eq!(r.status(), 200);
    let got = r.bytes().await.expect("body");
    assert_eq!(got.len(), big.len());
    assert!(got == big, "download is byte-exact");
    println!(
        "10 MiB download through the public proxy: {:?}",
        t0.elapsed()
    );
    let t0 = Instant::now();
    let (s, v) = status_of(
        public(&http, &d, reqwest::Method::POST, &app_alias, "/upload")
            .body(big.clone())
            .send()
            .await
            .expect("upload"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["len"], big.len());
    assert_eq!(v["sha256"], sha256_hex(&big));
    println!("10 MiB upload through the public proxy: {:?}", t0.elapsed());
    // a streamed (chunked) body: fine below the cap, 413 past it
    let (s, v) = status_of(
        public(&http, &d, reqwest::Method::POST, &app_alias, "/upload")
            .body(chunked(big.len()))
            .send()
            .await
            .expect("chunked upload"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["len"], big.len());
    let t0 = Instant::now();
    let r = public(&http, &d, reqwest::Method::POST, &app_alias, "/upload")
        .body(chunked(51 * 1024 * 1024))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 413),
        // The proxy may answer and close while the client still sends.
        Err(e) => panic!("chunked upload over the cap: {e:?}"),
    }
    println!("51 MiB chunked upload refused after {:?}", t0.elapsed());

    // --- a server-sent stream arrives as it is written
    let t0 = Instant::now();
    let mut r = public(&http, &d, reqwest::Method::GET, &app_alias, "/stream")
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    let mut first = None;
    while let Some(chunk) = r.chunk().await.expect("chunk") {
        first.get_or_insert_with(|| t0.elapsed());
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let (first, total) = (first.expect("some data"), t0.elapsed());
    println!("event stream: first chunk after {first:?}, end after {total:?}");
    assert!(
        text.contains("data: tick 0") && text.contains("data: tick 5"),
        "{text}"
    );
    assert!(total >= Duration::from_millis(1500), "{total:?}");
    assert!(
        first + Duration::from_millis(1000) < total,
        "first chunk {first:?} of {total:?}: not incremental"
    );

    // --- WebSocket through the public proxy and the authenticated one
    let req = "ws://ws-echo.bhatti.test/chat"
        .into_client_request()
        .expect("request");
    let tcp = tokio::net::TcpStream::connect(&d.public_addr)
        .await
        .expect("connect");
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("public ws");
    assert_eq!(resp.status(), 101);
    ws_echo_roundtrip(ws).await;
    let api_host = d.url.trim_start_matches("http://");
    let mut req = format!("ws://{api_host}/sandboxes/web/proxy/8765/")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {alice_key}").parse().expect("header"),
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("authed ws");
    assert_eq!(resp.status(), 101);
    ws_echo_roundtrip(ws).await;
    let req = format!("ws://{api_host}/sandboxes/web/proxy/8765/?token={bob_key}")
        .into_client_request()
        .expect("request");
    let e = tokio_tungstenite::connect_async(req)
        .await
        .expect_err("bob");
    assert!(e.to_string().contains("404"), "{e}");

    // --- the authenticated HTTP proxy
    let r = alice.get("/sandboxes/web/proxy/3000/index.html").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), INDEX_HTML);
    let (s, v) = status_of(
        alice
            .get("/sandboxes/web/proxy/8001/echo/a%20b?x=1&token=zzz&y=2")
            .await,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["path"], "/echo/a%20b?x=1&y=2",
        "path and query, minus token"
    );
    assert_eq!(v["host"], "localhost:8001");
    assert_eq!(
        v["authorization"],
        Value::Null,
        "the API key never reaches the app"
    );
    assert_eq!(v["x_forwarded_for"], "127.0.0.1");
    let (s, v) = status_of(alice.get("/sandboxes/web/proxy/8001").await).await;
    assert_eq!(
        (s, v),
        (StatusCode::OK, Value::String("ok".into())),
        "no path is /"
    );
    let r = alice
        .req(reqwest::Method::POST, "/sandboxes/web/proxy/8001/upload")
        .body(b"hello".to_vec())
        .send()
        .await
        .expect("POST");
    let (s, v) = status_of(r).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["sha256"], sha256_hex(b"hello"));
    let (s, v) = status_of(alice.get("/sandboxes/web/proxy/4999/").await).await;
    assert_eq!(s, 502, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("not listening on port 4999"),
        "{v}"
    );
    let (s, _) = status_of(alice.get("/sandboxes/web/proxy/0/").await).await;
    assert_eq!(s, 400);
    let (s, _) = status_of(bob.get("/sandboxes/web/proxy/3000/").await).await;
    assert_eq!(s, 404, "tenant isolation");
    let (s, _) = status_of(
        http.get(format!("{}/sandboxes/web/proxy/3000/", d.url))
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(s, 401, "the authenticated proxy needs a key");
    // the public proxy passes Host through and says who asked
    let (s, body) = public_get(&http, &d, &app_alias, "/echo").await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["host"], format!("{app_alias}.bhatti.test"));
    assert_eq!(v["x_forwarded_proto"], "https");
    // keep-alive connections to the app are reused across requests
    let mut peers = std::collections::HashSet::new();
    for _ in 0..5 {
        let (s, body) = public_get(&http, &d, &app_alias, "/echo").await;
        assert_eq!(s, 200);
        let v: Value = serde_json::from_str(&body).expect("json");
        peers.insert(v["peer_port"].as_u64().expect("peer port"));
    }
    assert!(
        peers.len() <= 2,
        "upstream connections are pooled: {peers:?}"
    );

    // --- rate limit: past RATE_PER_ALIAS requests/s one alias gets 429s, others do not
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (mut ok, mut limited) = (0, 0);
    // All at once: the limiter sees them arrive within one budget window
    // however slow each round trip is on a loaded machine (one at a time,
    // under load, the budget refilled between them and none was limited).
    let burst = (0..4 * RATE_PER_ALIAS).map(|_| public_get(&http, &d, "my-app", "/index.html"));
    for (s, _) in futures_util::future::join_all(burst).await {
        match s {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    println!("rate limit: {ok} ok, {limited} limited");
    assert!(ok >= RATE_PER_ALIAS, "the burst passes: {ok}");
    assert!(limited >= RATE_PER_ALIAS, "then 429: {limited}");
    let (s, _) = public_get(&http, &d, &app_alias, "/").await;
    assert_eq!(s, 200, "another alias is unaffected");

    // --- unpublish through the CLI: the very next request is a 404
    let (s, _) = public_get(&http, &d, &app_alias, "/").await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, _) = public_get(&http, &d, "my-app", "/index.html").await;
    assert_eq!(s, 200, "cached route");
    let o = cli(&d, &alice_key, &["unpublish", "web", "-p", "3000"]);
    assert!(
        o.status.success(),
        "unpublish: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (s, _) = public_get(&http, &d, "my-app", "/index.html").await;
    assert_eq!(s, 404, "unpublished URL fails at once");
    let (s, _) = status_of(alice.delete("/sandboxes/web/publish/3000").await).await;
    assert_eq!(s, 404, "not published any more");
    let (s, _) = status_of(alice.delete("/sandboxes/web/publish/abc").await).await;
    assert_eq!(s, 400);
    // and the alias is free again, for anyone
    let (s, v) = status_of(
        bob.post(
            "/sandboxes/bobbox/publish",
            json!({"port": 3000, "alias": "my-app"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, body) = public_get(&http, &d, "my-app", "/index.html").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "bob's page\n"));

    // --- destroy: the sandbox's rules go, its URLs stop working at once
    let (s, _) = status_of(bob.delete("/sandboxes/bobbox").await).await;
    assert_eq!(s, 204);
    let (s, _) = public_get(&http, &d, "my-app", "/index.html").await;
    assert_eq!(s, 404, "destroyed sandbox's URL");
    let (s, _) = status_of(bob.get("/sandboxes/bobbox/publish").await).await;
    assert_eq!(s, 404);
    let (s, v) = status_of(
        alice
            .post(
                "/sandboxes/web/publish",
                json!({"port": 3000, "alias": "my-app"}),
            )
            .await,
    )
    .await;
    assert_eq!(s, 201, "the destroyed sandbox's alias is free: {v}");

    // --- the OpenAPI document describes the new routes
    let (_, v) = status_of(
        http.get(format!("{}/openapi.json", d.url))
            .send()
            .await
            .expect("GET"),
    )
    .await;
    for path in [
        "/sandboxes/{id}/publish",
        "/sandboxes/{id}/publish/{port}",
        "/sandboxes/{id}/ports",
        "/sandboxes/{id}/proxy/{port}",
        "/sandboxes/{id}/proxy/{port}/{path}",
    ] {
        assert!(
            v["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    assert!(v["paths"]["/sandboxes/{id}/proxy/{port}/{path}"]["post"].is_object());
    println!("publish_and_proxy total {:?}", t_all.elapsed());
}

/// A body of `len` bytes streamed in 1 MiB chunks, without Content-Length.
fn chunked(len: usize) -> reqwest::Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..len.div_ceil(1 << 20))
        .map(|i| Ok(vec![b'x'; (len - i * (1 << 20)).min(1 << 20)]))
        .collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

/// Text and a 100 KiB binary message come back unchanged; close is answered.
async fn ws_echo_roundtrip<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let binary = noise(100 * 1024, 7);
    ws.send(Ws::Text("hello through the proxy".into()))
        .await
        .expect("send");
    ws.send(Ws::Binary(binary.clone().into()))
        .await
        .expect("send");
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(m @ (Ws::Text(_) | Ws::Binary(_))))) => got.push(m),
            Ok(Some(Ok(_))) => {}
            other => panic!("websocket ended early: {other:?}"),
        }
    }
    assert_eq!(got[0], Ws::Text("hello through the proxy".into()));
    assert_eq!(got[1], Ws::Binary(binary.into()));
    ws.close(None).await.expect("close");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {}
}
