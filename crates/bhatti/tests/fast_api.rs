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
    let t0 = Instant::now();
    let open = futures_util::future::join_all((0..128).map(|_| shell(&d, "full", ""))).await;
    assert!(open.iter().all(Result::is_ok));
    eprintln!("128 shells in {:?}", t0.elapsed());
    // The agent registers each attachment on its own thread after the
    // upgrade: wait until it lists all 128 as running and attached.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list: Vec<serde_json::Value> = api
            .get("/sandboxes/full/sessions")
            .await
            .json()
            .await
            .expect("sessions");
        let live = list
            .iter()
            .filter(|s| s["attached"] == true && s["running"] == true)
            .count();
        if live == 128 {
            break;
        }
        assert!(Instant::now() < deadline, "{live} of 128 shells attached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// `PATCH /sandboxes/{sb}` with `body`.
async fn patch(api: &common::Api, sb: &str, body: serde_json::Value) -> reqwest::Response {
    api.req(reqwest::Method::PATCH, &format!("/sandboxes/{sb}"))
        .json(&body)
        .send()
        .await
        .expect("PATCH")
}

/// Issue 17: a fork or a resumed snapshot keeps its source's egress policy
/// (not the daemon's default) unless its request names another; a policy
/// is fixed at create (a repeated create with another one is a 409, a PATCH
/// of it a 400); allowances overlapping the sandbox subnet are refused.
#[tokio::test]
async fn egress_is_kept_by_copies_and_fixed_at_create() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    let policy = serde_json::json!({
        "mode": "deny",
        "allow_hosts": ["api.example.com"],
        "allow_cidrs": ["10.99.0.0/24"],
    });
    let r = api
        .post(
            "/sandboxes",
            serde_json::json!({
                "name": "src",
                "egress": "deny",
                "allow_hosts": ["api.example.com"],
                "allow_cidrs": ["10.99.0.0/24"],
            }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["egress"], policy);

    // A fork keeps it (the daemon's default is public).
    let r = api
        .post(
            "/sandboxes",
            serde_json::json!({"name": "f1", "from": "src"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["egress"], policy, "fork");
    // A fork that names a field gets it; the others stay the source's.
    let r = api
        .post(
            "/sandboxes",
            serde_json::json!({"name": "f2", "from": "src", "egress": "public"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["egress"]["mode"], "public");
    assert_eq!(v["egress"]["allow_hosts"], policy["allow_hosts"]);

    // A snapshot stores it; a resume gets it.
    let r = api
        .post(
            "/snapshots",
            serde_json::json!({"sandbox": "src", "name": "snap"}),
        )
        .await;
    assert!(r.status().is_success(), "snapshot: {}", r.status());
    let r = api
        .post("/snapshots/snap/resume", serde_json::json!({"name": "r1"}))
        .await;
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["egress"], policy, "resume");
    let v: serde_json::Value = api.get("/sandboxes/r1").await.json().await.expect("json");
    let stored = if v.get("sandbox").is_some() {
        v["sandbox"]["egress"].clone()
    } else {
        v["egress"].clone()
    };
    assert_eq!(stored, policy, "resume, as stored");

    // A repeated create: the same policy (or none named) is the same sandbox...
    let same = api
        .post(
            "/sandboxes",
            serde_json::json!({"name": "src", "egress": "deny"}),
        )
        .await;
    assert_eq!(same.status(), 200);
    assert_eq!(create(&api, "src").await.status(), 200);
    // ...another is a conflict, not silently the old policy.
    let (s, m) = failure(
        api.post(
            "/sandboxes",
            serde_json::json!({"name": "src", "egress": "public"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 409, "{m}");
    assert!(m.contains("another egress policy"), "{m}");
    let (s, m) = failure(
        api.post(
            "/sandboxes",
            serde_json::json!({"name": "src", "allow_hosts": ["other.example.com"]}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 409, "{m}");

    // PATCH cannot change it: a 400 naming the field, and nothing changes.
    for body in [
        serde_json::json!({"egress": "public"}),
        serde_json::json!({"allow_hosts": []}),
        serde_json::json!({"allow_cidrs": ["203.0.113.0/24"], "keep_hot": true}),
    ] {
        let (s, m) = failure(patch(&api, "src", body.clone()).await).await;
        assert_eq!(s, 400, "{body}: {m}");
        assert!(m.contains("cannot be changed after create"), "{m}");
        let field = body
            .as_object()
            .and_then(|o| o.keys().find(|k| *k != "keep_hot"))
            .expect("field")
            .clone();
        assert!(m.contains(&format!("`{field}`")), "{m}");
    }
    assert_eq!(
        patch(&api, "src", serde_json::json!({"keep_hot": true}))
            .await
            .status(),
        200
    );
    let v: serde_json::Value = api.get("/sandboxes/src").await.json().await.expect("json");
    let now = if v.get("sandbox").is_some() {
        v["sandbox"]["egress"].clone()
    } else {
        v["egress"].clone()
    };
    assert_eq!(now, policy);
    // Inspect says whether the daemon has a route out at all (this one does).
    let v: serde_json::Value = api
        .get("/sandboxes/src/inspect")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["egress_off"], false, "{v}");
    assert_eq!(v["sandbox"]["egress"], policy);

    // The daemon's gateway, its subnet, a part of it or a network around it
    // are never opened by an allowance: refused rather than silently inert.
    for cidr in [
        "10.250.0.1",
        "10.250.0.0/24",
        "10.250.0.64/26",
        "10.0.0.0/8",
    ] {
        let (s, m) = failure(
            api.post(
                "/sandboxes",
                serde_json::json!({"name": "net", "allow_cidrs": [cidr]}),
            )
            .await,
        )
        .await;
        assert_eq!(s, 400, "{cidr}: {m}");
        assert!(
            m.contains("`allow_cidrs`") && m.contains("10.250.0.0/24"),
            "{m}"
        );
    }
    // A fork cannot name one either.
    let (s, _) = failure(
        api.post(
            "/sandboxes",
            serde_json::json!({"name": "f3", "from": "src", "allow_cidrs": ["10.250.0.9"]}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 400);
}

/// Issue 17: an upload whose client breaks off (Content-Length 1000, 10
/// bytes, then nothing more) is the request's fault: 400, never the 503
/// "sandbox agent unavailable" of a server failure; nothing is written.
#[tokio::test]
async fn an_upload_cut_short_is_a_bad_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    let id = create_ok(&api, "up").await;
    let home = d.engine.home(&id).expect("home");
    let target = home.join("cut.bin");
    let target_s = target.to_str().expect("utf-8").to_string();

    let addr = d.url.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "PUT /sandboxes/up/files?path={target_s} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Length: 1000\r\n\r\n0123456789",
        d.key
    );
    tcp.write_all(head.as_bytes()).await.expect("send");
    // The client stops sending (half-close): the body ends 990 bytes short.
    tcp.shutdown().await.expect("shutdown");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    // (hyper still answers a client that only closed its sending half.)
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("ended early"), "{answer}");

    // The same through the service, whose answer reaches a client that is
    // still there: a bad request, not an unavailable agent.
    let user = d
        .store
        .call(|s| s.get_user_by_name("alice"))
        .await
        .expect("alice");
    let mut short: &[u8] = b"0123456789";
    let e = d
        .service
        .write_file(&user, "up", &target_s, None, 1000, &mut short)
        .await
        .expect_err("short body");
    assert_eq!(e.kind(), bhatti::service::ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("ended early"), "{e}");
    assert_eq!(bhatti::api::error::ApiError::from(e).status.as_u16(), 400);
    assert!(!target.exists(), "nothing written");
    // The agent removes its temporary file when it sees the connection end.
    let leftovers = || {
        std::fs::read_dir(&home)
            .expect("home")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("cut.bin"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while leftovers() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(leftovers(), 0, "no temporary file left");
    assert!(!target.exists(), "nothing written");
}

/// Issue 17: environment names are checked as such: a bad one on exec or
/// create is a 400 naming `env` (and not called a secret name).
#[tokio::test]
async fn bad_env_names_are_refused_as_env() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    create_ok(&api, "envs").await;
    let (s, m) = failure(
        api.post(
            "/sandboxes/envs/exec",
            serde_json::json!({"cmd": ["true"], "env": {"A=B": "x", "": "y"}}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("`env`"), "{m}");
    for key in ["A=B", "", "1X"] {
        let (s, m) = failure(
            api.post(
                "/sandboxes",
                serde_json::json!({"name": "e2", "env": {key: "x"}}),
            )
            .await,
        )
        .await;
        assert_eq!(s, 400, "{key:?}: {m}");
        assert!(m.contains("`env`"), "{m}");
        assert!(!m.contains("secret"), "{m}");
    }
}

/// Issue 17: a regular file that fails on its first read (/proc/self/mem)
/// is refused before the answer starts, not a 200 with a broken body.
#[tokio::test]
async fn an_unreadable_file_is_refused_before_the_body() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    create_ok(&api, "mem").await;
    let r = read(&api, "mem", "/proc/self/mem").await;
    let (s, m) = failure(r).await;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("/proc/self/mem"), "{m}");
    // Files of size 0 that read fine still do.
    let r = read(&api, "mem", "/proc/self/status").await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.expect("body");
    assert!(body.contains("Pid:"), "{body}");
}

/// A client that goes away during a create does not cut it short: the
/// sandbox ends up running (or gone), never stuck `creating`.
#[tokio::test]
async fn a_create_outlives_its_client() {
    let d = FastDaemon::start(UserLimits::default()).await;
    *d.engine.create_delay.lock().expect("lock") = Duration::from_millis(800);
    let api = d.api();
    let r = api
        .req(reqwest::Method::POST, "/sandboxes")
        .json(&serde_json::json!({ "name": "hasty" }))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up: {r:?}");
    let t0 = Instant::now();
    loop {
        let r = api.get("/sandboxes/hasty").await;
        if r.status() == 404 {
            break;
        }
        let v: serde_json::Value = r.json().await.expect("json");
        if v["status"] == "running" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still {} after the client left",
            v["status"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And a second create of the name finds it (running), not a half-made one.
    let r = create(&api, "hasty").await;
    assert!(r.status().is_success(), "{}", r.status());
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["status"], "running");
}

/// With no storage quota left, import, pull and save are refused up front
/// (429, before an upload is stored or a sandbox is touched); with room
/// left, the archive itself is judged.
#[tokio::test]
async fn image_work_is_refused_up_front_without_quota() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    let key = d.key.clone();
    let alice = d
        .store
        .call(move |s| s.authenticate(&key))
        .await
        .expect("auth")
        .expect("alice");
    let uid = alice.id;
    d.store
        .call(move |s| s.set_storage_quota(uid, 0))
        .await
        .expect("quota");
    let import = || async {
        api.req(reqwest::Method::POST, "/images/import")
            .query(&[("name", "junk")])
            .body(vec![7u8; 4096])
            .send()
            .await
            .expect("send")
    };
    let (s, m) = failure(import().await).await;
    assert_eq!(s, 429, "{m}");
    assert!(m.contains("storage quota"), "{m}");
    let r = api
        .post(
            "/images/pull",
            serde_json::json!({ "reference": "docker.io/library/alpine:3" }),
        )
        .await;
    let (s, m) = failure(r).await;
    assert_eq!(s, 429, "{m}");
    create_ok(&api, "dev").await;
    let r = api
        .post(
            "/images/save",
            serde_json::json!({ "sandbox": "dev", "name": "mine" }),
        )
        .await;
    let (s, m) = failure(r).await;
    assert_eq!(s, 429, "{m}");
    // With room, the upload is read and judged: not an image.
    d.store
        .call(move |s| s.set_storage_quota(uid, 1))
        .await
        .expect("quota");
    let (s, m) = failure(import().await).await;
    assert_eq!(s, 400, "{m}");
    assert!(!m.contains("import-tmp"), "no host path: {m}");
}

/// A copy request refused for anything but the copy itself is refused
/// before the source is checkpointed; a refusal after it (a bad env name)
/// still removes the fork's checkpoint (which holds the source's RAM).
#[tokio::test]
async fn refused_forks_leave_no_checkpoint() {
    let d = FastDaemon::start(UserLimits {
        max_sandboxes: 2,
        ..UserLimits::default()
    })
    .await;
    let api = d.api();
    create_ok(&api, "g").await;
    let live = || d.engine.checkpoints.lock().expect("lock").len();
    let refused = [
        (
            serde_json::json!({"name": "zz", "from": "g", "image": "x"}),
            400,
            "image",
        ),
        (
            serde_json::json!({"name": "zz", "from": "g", "volumes": [{"name": "v", "mount": "/v"}]}),
            400,
            "volumes",
        ),
        (
            serde_json::json!({"name": "bad name", "from": "g"}),
            400,
            "name",
        ),
        (
            serde_json::json!({"name": "zz", "from": "g", "cpus": 7}),
            400,
            "cpus",
        ),
        (
            serde_json::json!({"name": "zz", "from": "g", "memory_mb": 4096}),
            400,
            "memory_mb",
        ),
        (
            serde_json::json!({"name": "zz", "from": "nope"}),
            400,
            "from",
        ),
        (
            serde_json::json!({"name": "zz", "from": "g", "env": {"1bad": "x"}}),
            400,
            "env",
        ),
    ];
    for (body, status, field) in refused {
        let (s, msg) = failure(api.post("/sandboxes", body.clone()).await).await;
        assert_eq!(s, status, "{body}: {msg}");
        assert!(msg.contains(field), "{body}: {msg}");
        assert_eq!(live(), 0, "{body} left a checkpoint");
    }
    // At the sandbox quota: 429 before any checkpoint.
    create_ok(&api, "h").await;
    let (s, msg) = failure(
        api.post("/sandboxes", serde_json::json!({"name": "zz", "from": "g"}))
            .await,
    )
    .await;
    assert_eq!(s, 429, "{msg}");
    assert_eq!(live(), 0, "a fork over quota left a checkpoint");
}

/// A sandbox still `creating` after a crash (its create never answered;
/// a copy's VM may be alive but without its identity) is removed by
/// recovery, not adopted as running.
#[tokio::test]
async fn recovery_removes_interrupted_creates() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    create_ok(&api, "ok").await;
    let half = create_ok(&api, "half").await;
    let id = half.clone();
    d.store
        .call(move |s| s.set_sandbox_status(&id, bhatti::store::SandboxStatus::Creating))
        .await
        .expect("status");
    let destroys = Counts::get(&d.engine.counts.destroys);
    d.service.recover().await.expect("recover");
    assert_eq!(Counts::get(&d.engine.counts.destroys), destroys + 1);
    let r = api.get("/sandboxes/half").await;
    assert_eq!(r.status(), 404);
    let r = api.get("/sandboxes/ok").await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["status"], "running");
    // The name is free again.
    create_ok(&api, "half").await;
}

/// With the snapshot quota full, an unknown sandbox is still a 404 and a
/// taken name a 409 (they say what to fix); only a valid request is a 429.
/// A resume to a taken name makes nothing and says so (200 + header).
#[tokio::test]
async fn snapshot_errors_before_the_quota() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    create_ok(&api, "a").await;
    for n in 1..=5 {
        let r = api
            .post(
                "/sandboxes/a/checkpoint",
                serde_json::json!({ "name": format!("s{n}") }),
            )
            .await;
        assert_eq!(r.status(), 201, "s{n}");
    }
    let cases = [("nosuch", "s9", 404), ("a", "s1", 409), ("a", "s9", 429)];
    for (sb, name, status) in cases {
        let (s, msg) = failure(
            api.post(
                &format!("/sandboxes/{sb}/checkpoint"),
                serde_json::json!({ "name": name }),
            )
            .await,
        )
        .await;
        assert_eq!(s, status, "{sb} {name}: {msg}");
    }
    let r = api
        .post("/snapshots/s1/resume", serde_json::json!({"name": "a"}))
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-bhatti-existed"));
}

/// A snapshot deleted while a resume of it runs: the delete waits for the
/// resume, which makes its sandbox; a resume after the delete is a 404.
#[tokio::test]
async fn a_snapshot_delete_waits_for_its_resumes() {
    let d = FastDaemon::start(UserLimits::default()).await;
    let api = d.api();
    create_ok(&api, "src").await;
    let r = api
        .post(
            "/sandboxes/src/checkpoint",
            serde_json::json!({"name": "s"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    *d.engine.create_delay.lock().expect("lock") = Duration::from_millis(600);
    let resume = {
        let api = api.clone();
        tokio::spawn(async move {
            api.post("/snapshots/s/resume", serde_json::json!({"name": "r1"}))
                .await
                .status()
        })
    };
    // The resume is under way (its sandbox row exists, its VM is being
    // made in the engine) when the delete comes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.get("/sandboxes/r1").await.status() != 200 {
        assert!(Instant::now() < deadline, "the resume never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deleted = api.delete("/snapshots/s").await;
    assert_eq!(deleted.status(), 204);
    assert!(
        resume.is_finished(),
        "the delete returned before the resume"
    );
    assert_eq!(resume.await.expect("task"), 201);
    let (code, out, _) = api.exec("r1", &["echo", "up"]).await;
    assert_eq!((code, out.trim()), (0, "up"));
    let (s, msg) = failure(
        api.post("/snapshots/s/resume", serde_json::json!({"name": "r2"}))
            .await,
    )
    .await;
    assert_eq!(s, 404, "{msg}");
}
