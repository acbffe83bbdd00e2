//! Findings of the schema-driven API fuzz (tests/api_fuzz.rs), kept as
//! regression tests over real HTTP against a real daemon. None boots a VM.

mod common;

use common::{Api, TestDaemon};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn refused(r: reqwest::Response, field: &str) {
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.expect("JSON body");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(msg.contains(field), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_are_bad_input() {
    let d = TestDaemon::start("inputs");
    let alice = Api::new(&d.url, &d.create_user("alice", &[]));

    // An env value with a NUL made a detached exec fail in the guest: 503.
    let exec = |body: Value| alice.post("/sandboxes/any/exec", body);
    refused(
        exec(json!({"cmd": ["true"], "detach": true, "env": {"K": "a\u{0}b"}})).await,
        "env",
    )
    .await;
    refused(exec(json!({"cmd": ["a\u{0}"]})).await, "cmd").await;
    refused(exec(json!({"cmd": ["true"], "cwd": "/\u{0}"})).await, "cwd").await;
    refused(
        exec(json!({"cmd": ["true"], "env": {"A=B": "v"}})).await,
        "env",
    )
    .await;
    refused(
        exec(json!({"cmd": ["true"], "detach": true, "output_file": "/tmp/\u{0}"})).await,
        "output_file",
    )
    .await;

    // A sandbox's env and a secret reach every exec in it: a NUL there
    // would break them all, so it is refused up front (no VM is booted).
    refused(
        alice
            .post("/sandboxes", json!({"name": "x", "env": {"K": "\u{0}"}}))
            .await,
        "env",
    )
    .await;
    refused(
        alice
            .post("/secrets", json!({"name": "S", "value": "a\u{0}"}))
            .await,
        "value",
    )
    .await;
    assert_eq!(
        alice
            .get("/sandboxes")
            .await
            .json::<Value>()
            .await
            .expect("list"),
        json!([])
    );
}
