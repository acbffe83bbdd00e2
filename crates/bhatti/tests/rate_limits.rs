//! Per-user API rate limits and the public proxy's per-client limit, over
//! real HTTP against a real daemon configured with tiny budgets. No VM is
//! booted: refused creates (bad names) and requests for missing sandboxes
//! count against the budgets like any other request.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{Api, TestDaemon};
use reqwest::StatusCode;
use serde_json::{json, Value};

const CONFIG: &str = "api_create_per_min: 3\napi_write_per_min: 4\napi_read_per_min: 5\n\
                      public_rate_per_client: 2\n";

/// A create the daemon refuses (400) after counting it.
async fn bad_create(api: &Api) -> reqwest::Response {
    api.post("/sandboxes", json!({"name": "not a valid name!"}))
        .await
}

/// Checks a 429 from the per-user limits: `Retry-After` in whole seconds,
/// and the body naming the limit.
async fn assert_limited(resp: reqwest::Response, limit: &str, per_minute: u64) {
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    // One request every 60/n s refills the budget.
    assert!(
        (1..=60 / per_minute + 1).contains(&retry),
        "Retry-After {retry}"
    );
    let body: Value = resp.json().await.expect("JSON body");
    assert_eq!(body["limit"], limit, "{body}");
    assert_eq!(body["limit_per_minute"], per_minute, "{body}");
    assert_eq!(body["retry_after_secs"], retry, "{body}");
    let msg = body["error"].as_str().expect("error message");
    assert!(msg.contains(limit) && msg.contains("per minute"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_budgets_and_per_client_public_limit() {
    let d = TestDaemon::start_with("rl", CONFIG);
    let alice = Api::new(&d.url, &d.create_user("alice", &[]));
    let bob = Api::new(&d.url, &d.create_user("bob", &[]));

    // --- reads: 5 pass, the 6th is refused; they do not touch creates.
    for _ in 0..5 {
        assert_eq!(alice.get("/sandboxes").await.status(), StatusCode::OK);
    }
    assert_limited(alice.get("/sandboxes").await, "read", 5).await;
    assert_limited(alice.get("/secrets").await, "read", 5).await;

    // --- creates: 3 counted (refused as invalid), the 4th is 429.
    for _ in 0..3 {
        assert_eq!(bad_create(&alice).await.status(), StatusCode::BAD_REQUEST);
    }
    assert_limited(bad_create(&alice).await, "create", 3).await;
    // Snapshot resumes make sandboxes too.
    assert_limited(
        alice
            .post("/snapshots/nope/resume", json!({"name": "x"}))
            .await,
        "create",
        3,
    )
    .await;

    // Snapshots and images copy whole memories and disks: creates too.
    for (path, body) in [
        ("/snapshots", json!({"sandbox": "nope", "name": "s"})),
        ("/sandboxes/nope/checkpoint", json!({"name": "s"})),
        ("/images/save", json!({"sandbox": "nope", "name": "i"})),
        ("/images/pull", json!({"reference": "x/y:z", "name": "i"})),
    ] {
        assert_limited(alice.post(path, body).await, "create", 3).await;
    }

    // --- writes (exec, deletes) have their own budget.
    for _ in 0..4 {
        let r = alice
            .post("/sandboxes/nope/exec", json!({"cmd": ["true"]}))
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
    assert_limited(alice.delete("/sandboxes/nope").await, "write", 4).await;
    // A WebSocket upgrade is a GET that runs commands: it counts as a write.
    let ws = alice
        .req(reqwest::Method::GET, "/sandboxes/nope/exec/ws")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("GET ws");
    assert_limited(ws, "write", 4).await;

    // --- another user is unaffected by alice's empty budgets.
    assert_eq!(bad_create(&bob).await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(bob.get("/sandboxes").await.status(), StatusCode::OK);
    assert_eq!(
        bob.post("/sandboxes/nope/exec", json!({"cmd": ["true"]}))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );

    // --- unauthenticated requests are not limited per user: still 401.
    let stranger = Api::new(&d.url, "bht_not_a_key");
    for _ in 0..8 {
        assert_eq!(
            stranger.get("/sandboxes").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // The health check needs no key and is never limited.
    for _ in 0..8 {
        let r = alice.http.get(format!("{}/health", d.url)).send().await;
        assert_eq!(r.expect("health").status(), StatusCode::OK);
    }

    // --- budgets refill: one read every 12 s at 5/min.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(alice.get("/sandboxes").await.status(), StatusCode::OK);
    assert_limited(alice.get("/sandboxes").await, "read", 5).await;

    // --- public proxy: 2 requests/s per client address. Checked before the
    // alias is looked up, so an unknown alias (404) is enough.
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .no_proxy()
            .local_address(IpAddr::from(ip))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
    };
    let get = |c: &reqwest::Client, xff: Option<&str>| {
        let mut r = c
            .get(format!("http://{}/", d.public_addr))
            .header("Host", "nothing-here.bhatti.test");
        if let Some(x) = xff {
            r = r.header("X-Forwarded-For", x);
        }
        r.send()
    };
    let one = from([127, 0, 0, 1]);
    let codes: Vec<u16> = futures_util::future::join_all((0..6).map(|_| get(&one, None)))
        .await
        .into_iter()
        .map(|r| r.expect("public request").status().as_u16())
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == 404).count(), 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 4, "{codes:?}");
    // Another client address has its own budget...
    let two = from([127, 0, 0, 2]);
    assert_eq!(get(&two, None).await.expect("public").status(), 404);
    // ...and so has the client a terminator on loopback names last.
    assert_eq!(
        get(&one, Some("198.51.100.1, 203.0.113.7"))
            .await
            .expect("public")
            .status(),
        404
    );
    // The page names whose budget it was: this client's, not the app's.
    let r = get(&one, None).await.expect("public");
    assert_eq!(r.status(), 429);
    let page = r.text().await.expect("page");
    assert!(page.contains("more requests than one client may"), "{page}");
    assert!(!page.contains("This app"), "{page}");
}
