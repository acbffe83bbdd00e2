//! The service and the HTTP API over real HTTP against real agents, fast and
//! without root: the engine's "VMs" are lohar processes in test mode (see
//! `lohar_engine`). Covers the error mapping of every agent error code,
//! wake races, create rollback, destroy idempotence and limits.

mod common;
mod lohar_engine;

use std::time::{Duration, Instant};

use bhatti::store::UserLimits;
use futures_util::StreamExt;
use lohar_engine::{Counts, FastDaemon, FILE_SIZE_LIMIT, SMALL_DISK};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

async fn create(api: &common::Api, name: &str) -> reqwest::Response {
    api.post("/sandboxes", serde_json::json!({ "name": name }))
        .await
}

/// Creates `name` and returns its id.
async fn create_ok(api: &common::Api, name: &str) -> String {
    let r = create(api, name).await;
    assert_eq!(r.status(), 201, "create {name}");
    let v: serde_json::Value = r.json().await.expect("json");
    v["id"].as_str().expect("id").to_string()
}

async fn put(api: &common::Api, sb: &str, path: &str, body: Vec<u8>) -> reqwest::Response {
    api.req(reqwest::Method::PUT, &format!("/sandboxes/{sb}/files"))
        .query(&[("path", path)])
        .body(body)
        .send()
        .await
        .expect("PUT")
}

async fn read(api: &common::Api, sb: &str, path: &str) -> reqwest::Response {
    api.req(reqwest::Method::GET, &format!("/sandboxes/{sb}/files"))
        .query(&[("path", path)])
        .send()
        .await
        .expect("GET")
}

/// `(status, error message)` of a failed answer.
async fn failure(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.expect("error json");
    (status, v["error"].as_str().unwrap_or_default().to_string())
}

/// Opens the shell WebSocket; `Err(status)` when the upgrade is refused.
async fn shell(d: &FastDaemon, sb: &str, query: &str) -> Result<common::WsStream, u16> {
    let url = format!(
        "{}/sandboxes/{sb}/ws?{query}",
        d.url.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().expect("ws request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", d.key).parse().expect("header"),
    );
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("shell websocket: {e}"),
    }
}

/// Reattaches to `session` once its last client has let go (the agent
/// notices a closed WebSocket asynchronously).
async fn poll_shell(d: &FastDaemon, sb: &str, session: &str) -> common::WsStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let api = d.api();
        let list: Vec<serde_json::Value> = api
            .get(&format!("/sandboxes/{sb}/sessions"))
            .await
            .json()
            .await
            .expect("sessions");
        let detached = list
            .iter()
            .any(|s| s["session_id"] == session && s["attached"] == false);
        if detached {
            return shell(d, sb, "").await.expect("reattach");
        }
        assert!(
            Instant::now() < deadline,
            "session {session} never detached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The session id a shell announces first.
async fn session_of(ws: &mut common::WsStream) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(Ok(Ws::Text(t)))) =
            tokio::time::timeout(Duration::from_secs(1), ws.next()).await
        {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            if v["type"] == "session" {
                return v["session_id"].as_str().expect("id").to_string();
            }
        }
    }
    panic!("no session message");
}

/// Every code the agent sends reaches the client as its one HTTP status,
/// whatever the message says (paths here contain "not found").
#[tokio::test]
async fn every_agent_error_code_has_its_status() {
    let d = FastDaemon::start(UserLimits::default()).await;
    d.engine
        .small_disk
        .lock()
        .expect("lock")
        .insert("codes".into());
    let api = d.api();
    let sb = create_ok(&api, "codes").await;
    let home = d.engine.home(&sb).expect("home");
    let home = home.to_string_lossy();

    // not_found: the path does not exist.
    let (s, m) = failure(read(&api, "codes", &format!("{home}/nothing here")).await).await;
    assert_eq!(s, 404, "{m}");

    // not_a_directory: a file used as a directory; the message contains
    // "not found", the code decides.
    assert_eq!(
        put(&api, "codes", &format!("{home}/not found"), b"x".to_vec())
            .await
            .status(),
        204
    );
    let (s, m) = failure(read(&api, "codes", &format!("{home}/not found/x")).await).await;
    assert_eq!((s, m.contains("not found")), (400, true), "{m}");

    // is_a_directory: reading a directory.
    let (s, m) = failure(read(&api, "codes", &home).await).await;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("is a directory"), "{m}");

    // invalid: a loop of symlinks.
    api.exec(
        "codes",
        &["sh", "-c", "ln -s loop2 loop1 && ln -s loop1 loop2"],
    )
    .await;
    let (s, m) = failure(read(&api, "codes", &format!("{home}/loop1")).await).await;
    assert_eq!(s, 400, "{m}");

    // permission_denied: /sys refuses new files, to root as well.
    let (s, m) = failure(put(&api, "codes", "/sys/bhatti-test", b"x".to_vec()).await).await;
    assert_eq!(s, 403, "{m}");

    // too_large: over the agent's file size limit (EFBIG), under the API's.
    let big = vec![b'x'; FILE_SIZE_LIMIT as usize + 4096];
    let (s, m) = failure(put(&api, "codes", &format!("{home}/big"), big).await).await;
    assert_eq!(s, 413, "{m}");

    // internal: a Unix socket cannot be opened (ENXIO).
    let sock = d.engine.home(&sb).expect("home").with_file_name("c.sock");
    let (s, m) = failure(read(&api, "codes", &sock.to_string_lossy()).await).await;
    assert_eq!(s, 500, "{m}");

    // Sessions: a detached shell is listed, reattached and killed.
    let mut ws = shell(&d, "codes", "").await.expect("shell");
    let id = session_of(&mut ws).await;
    drop(ws);
    let list: Vec<serde_json::Value> = api
        .get("/sandboxes/codes/sessions")
        .await
        .json()
        .await
        .expect("sessions");
    assert!(
        list.iter().any(|s| s["session_id"] == id.as_str()),
        "{list:?}"
    );
    let mut again = poll_shell(&d, "codes", &id).await;
    assert_eq!(session_of(&mut again).await, id);
    drop(again);
    let path = format!("/sandboxes/codes/sessions/{id}");
    assert_eq!(api.delete(&path).await.status(), 204);
    let unknown = api.delete("/sandboxes/codes/sessions/nosuch").await;
    assert_eq!(failure(unknown).await.0, 404);

    // not_found again, through the shell: an unknown session.
    let unknown = shell(&d, "codes", "session=no-such-session").await;
    assert_eq!(unknown.err(), Some(404));

    // no_space: the small disk is full (needs a user namespace).
    let over = vec![b'x'; SMALL_DISK as usize * 2];
    let r = put(&api, "codes", &format!("{home}/small/f"), over).await;
    let (s, m) = failure(r).await;
    assert_eq!(s, 507, "{m}");
}

/// busy: with every session slot of the agent taken by attached shells, a
/// new shell is refused with 409. (`exists` has no route: the host never
/// names a new session; its mapping is a unit test of the service.)
#[tokio::test]
async fn a_full_session_table_is_busy() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    create_ok(&api, "full").await;
    // lohar's MAX_SESSIONS, opened at once (each a new login shell: an
    // attached one is never shared).
    // The session exists once the upgrade is answered.
    let t0 = Instant::now();
    let open = futures_util::future::join_all((0..128).map(|_| shell(&d, "full", ""))).await;
    assert!(open.iter().all(Result::is_ok));
    eprintln!("128 shells in {:?}", t0.elapsed());
    assert_eq!(shell(&d, "full", "").await.err(), Some(409));
    drop(open);
}

/// Requests that find a sandbox cold restore it once, however many come at once.
#[tokio::test]
async fn concurrent_requests_wake_a_stopped_sandbox_once() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    create_ok(&api, "waker").await;
    let r = api
        .post("/sandboxes/waker/stop", serde_json::json!({}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(d.engine.running(), 0);
    *d.engine.start_delay.lock().expect("lock") = Duration::from_millis(300);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            api.exec("waker", &["echo", &i.to_string()]).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (code, out, _) = t.await.expect("task");
        assert_eq!((code, out.trim()), (0, i.to_string().as_str()));
    }
    assert_eq!(Counts::get(&d.engine.counts.starts), 1);
    let v: serde_json::Value = api
        .get("/sandboxes/waker")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "running");
}

/// A create whose VM fails to boot leaves no row behind: the name is free
/// and the quota not used.
#[tokio::test]
async fn failed_create_rolls_back() {
    let limits = UserLimits {
        max_sandboxes: 1,
        ..UserLimits::default()
    };
    let d = FastDaemon::start(limits).await;
    d.engine
        .fail_create
        .lock()
        .expect("lock")
        .insert("doomed".into());
    let api = d.api();
    let (s, m) = failure(create(&api, "doomed").await).await;
    assert_eq!(s, 503, "{m}");
    assert!(m.contains("injected failure"), "{m}");
    let list: Vec<serde_json::Value> = api.get("/sandboxes").await.json().await.expect("json");
    assert!(list.is_empty(), "{list:?}");
    assert!(d.engine.ids().is_empty());
    // The one slot of the quota is free.
    create_ok(&api, "fine").await;
    // And now it is used.
    let (s, m) = failure(create(&api, "second").await).await;
    assert_eq!(s, 429, "{m}");
}

/// Destroy removes the VM once; a second destroy is a 404; a VM the engine
/// lost is no obstacle.
#[tokio::test]
async fn destroy_is_idempotent() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    let id = create_ok(&api, "gone").await;
    assert_eq!(api.delete("/sandboxes/gone").await.status(), 204);
    assert!(d.engine.ids().is_empty());
    assert_eq!(api.delete("/sandboxes/gone").await.status(), 404);
    assert_eq!(api.delete(&format!("/sandboxes/{id}")).await.status(), 404);

    let id = create_ok(&api, "lost").await;
    d.engine.forget(&id);
    assert_eq!(api.delete("/sandboxes/lost").await.status(), 204);
    assert_eq!(api.get("/sandboxes/lost").await.status(), 404);
}

/// Limits: the user's caps on size and count, and the API's cap on writes.
#[tokio::test]
async fn limits() {
    let limits = UserLimits {
        max_sandboxes: 2,
        max_cpus: 2,
        max_memory_mb: 1024,
    };
    let d = FastDaemon::start(limits).await;
    let api = d.api();
    let over_cpus = api
        .post("/sandboxes", serde_json::json!({"name": "a", "cpus": 3}))
        .await;
    let (s, m) = failure(over_cpus).await;
    assert_eq!(s, 400);
    assert!(m.contains("limit of 2 vCPUs"), "{m}");
    let over_mem = api
        .post(
            "/sandboxes",
            serde_json::json!({"name": "a", "memory_mb": 2048}),
        )
        .await;
    assert_eq!(failure(over_mem).await.0, 400);
    create_ok(&api, "a").await;
    create_ok(&api, "b").await;
    assert_eq!(failure(create(&api, "c").await).await.0, 429);
    // The same name again is the same sandbox, not a new one.
    assert_eq!(create(&api, "a").await.status(), 200);

    // Writes over 100 MiB are refused by their length alone, before any body.
    let addr = d.url.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "PUT /sandboxes/a/files?path=/tmp/x HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        d.key,
        (100u64 << 20) + 1
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(head.as_bytes()).await.expect("send");
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer))
        .await
        .expect("answered without the body")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A bad mode is the caller's error, checked before the sandbox.
    let r = api
        .req(reqwest::Method::PUT, "/sandboxes/nosuch/files")
        .query(&[("path", "/tmp/x"), ("mode", "rwx")])
        .body(b"x".to_vec())
        .send()
        .await
        .expect("PUT");
    assert_eq!(failure(r).await.0, 400);
}

/// A sandbox whose VM died answers 503 with a reason, never hangs.
#[tokio::test]
async fn dead_agent_is_unavailable() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    let id = create_ok(&api, "dies").await;
    d.engine.crash(&id);
    let r = api
        .post("/sandboxes/dies/exec", serde_json::json!({"cmd": ["true"]}))
        .await;
    let (s, m) = failure(r).await;
    assert_eq!(s, 503, "{m}");
    assert!(m.contains("sandbox agent unavailable"), "{m}");
}

/// An app on this host's loopback, which a test agent's forwards reach:
/// answers every request with `hello from <path>`.
async fn loopback_app() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new()
        .fallback(|uri: axum::http::Uri| async move { format!("hello from {}", uri.path()) });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// Both proxies through the service's route cache and upstream pool: the
/// public one by alias, the authenticated one by port; unpublish and
/// destroy end the public route at once.
#[tokio::test]
async fn proxies_reach_a_published_port() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    create_ok(&api, "web").await;
    let port = loopback_app().await;
    let http = reqwest::Client::new();
    let public = |alias: &str, path: &str| {
        http.get(format!("http://{}{path}", d.public))
            .header("host", format!("{alias}.localhost"))
            .send()
    };

    let r = api
        .post(
            "/sandboxes/web/publish",
            serde_json::json!({"port": port, "alias": "my-app"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    for _ in 0..3 {
        let r = public("my-app", "/x").await.expect("public");
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.expect("body"), "hello from /x");
    }
    assert_eq!(public("nope", "/").await.expect("public").status(), 404);

    let r = api.get(&format!("/sandboxes/web/proxy/{port}/y")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "hello from /y");
    // Nothing listens on the port: 502 from either proxy.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let r = api.get(&format!("/sandboxes/web/proxy/{closed}/")).await;
    assert_eq!(r.status(), 502);

    let r = api.delete(&format!("/sandboxes/web/publish/{port}")).await;
    assert_eq!(r.status(), 204);
    assert_eq!(public("my-app", "/x").await.expect("public").status(), 404);

    let r = api
        .post(
            "/sandboxes/web/publish",
            serde_json::json!({"port": port, "alias": "again"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(public("again", "/").await.expect("public").status(), 200);
    assert_eq!(api.delete("/sandboxes/web").await.status(), 204);
    assert_eq!(public("again", "/").await.expect("public").status(), 404);
}
