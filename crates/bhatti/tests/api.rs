//! The HTTP API against a real daemon with real VMs (TCG here), `egress: false`.
//!
//! One daemon and three sandboxes are shared by the whole scenario, because
//! booting is the expensive part; each step asserts what a user would notice.

mod common;

use std::time::{Duration, Instant};

use common::{Api, TestDaemon};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET_VALUE: &str = "sk-live-7f3a9c1e5b2d4068";

async fn status_of(r: reqwest::Response) -> (StatusCode, Value) {
    let s = r.status();
    let text = r.text().await.unwrap_or_default();
    (
        s,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn err_text(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_scenario() {
    let mut d = TestDaemon::start("api");
    let alice_key = d.create_user(
        "alice",
        &[
            "--max-sandboxes",
            "3",
            "--max-cpus",
            "2",
            "--max-memory",
            "1024",
        ],
    );
    let bob_key = d.create_user("bob", &[]);
    let alice = Api::new(&d.url, &alice_key);
    let bob = Api::new(&d.url, &bob_key);
    let anon = reqwest::Client::new();

    // --- health and auth
    let (s, v) = status_of(anon.get(format!("{}/health", d.url)).send().await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["sandboxes"], 0);
    assert!(v["uptime"].as_str().unwrap().ends_with('s'));
    let (s, v) = status_of(
        anon.get(format!("{}/sandboxes", d.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401, "{v}");
    let (s, _) = status_of(Api::new(&d.url, "bht_wrong").get("/sandboxes").await).await;
    assert_eq!(s, 401);

    // --- input validation: clear 400s naming the field, nothing created
    let long64 = "a".repeat(64);
    for (body, field) in [
        (json!({"name": long64}), "name"),
        (json!({"name": "-dev"}), "name"),
        (json!({"name": "has space"}), "name"),
        (json!({"cpus": 0}), "cpus"),
        (json!({"cpus": -1}), "cpus"),
        (json!({"cpus": "two"}), "cpus"),
        (json!({"memory_mb": 0}), "memory_mb"),
        (json!({"memory_mb": "lots"}), "memory_mb"),
        (json!({"secrets": ["NOPE"]}), "secrets"),
        (json!({"env": {"BAD-KEY": "x"}}), "env"),
    ] {
        let (s, v) = status_of(alice.post("/sandboxes", body.clone()).await).await;
        assert_eq!(s, 400, "{body} -> {v}");
        assert!(
            err_text(&v).contains(field),
            "error for {body} should name {field}: {v}"
        );
    }
    let (s, v) = status_of(alice.get("/sandboxes").await).await;
    assert_eq!(
        (s, v.as_array().map(|a| a.len())),
        (StatusCode::OK, Some(0))
    );

    // --- secrets
    let (s, v) = status_of(
        alice
            .post(
                "/secrets",
                json!({"name": "API_KEY", "value": SECRET_VALUE}),
            )
            .await,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert!(!v.to_string().contains(SECRET_VALUE));
    let (s, v) = status_of(
        alice
            .post("/secrets", json!({"name": "1BAD", "value": "x"}))
            .await,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (_, v) = status_of(alice.get("/secrets").await).await;
    assert_eq!(v[0]["name"], "API_KEY");
    assert!(!v.to_string().contains(SECRET_VALUE));

    // --- cpus/memory past alice's per-sandbox caps: a 400 naming the cap, nothing created
    for (body, want) in [
        (json!({"name": "big", "cpus": 3}), "limit of 2 vCPUs"),
        (
            json!({"name": "big", "memory_mb": 1025}),
            "limit of 1024 MB",
        ),
    ] {
        let (s, v) = status_of(alice.post("/sandboxes", body).await).await;
        assert_eq!(s, 400, "{v}");
        assert!(err_text(&v).contains(want), "{v}");
    }

    // --- three sandboxes, booted concurrently, at alice's caps
    let name63 = format!("d{}", "e".repeat(62));
    let create = |name: String, extra: Value| {
        let alice = alice.clone();
        async move {
            let mut body = json!({"name": name, "cpus": 2, "memory_mb": 1024});
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            status_of(alice.post("/sandboxes", body).await).await
        }
    };
    let t0 = Instant::now();
    let (a, b, c) = tokio::join!(
        create(
            name63.clone(),
            json!({"env": {"FOO": "bar", "API_KEY": "overridden-by-secret"}, "secrets": ["API_KEY"], "init": "echo hello-from-init; echo init-ran > /tmp/init.txt"})
        ),
        create("web".into(), json!({})),
        create("worker".into(), json!({"keep_hot": true}))
    );
    println!("3 sandboxes created in {:?}", t0.elapsed());
    for (s, v) in [&a, &b, &c] {
        assert_eq!(*s, 201, "create failed: {v}\nlog:\n{}", d.log());
        assert_eq!(v["status"], "running");
        assert_eq!(v["cpus"], 2);
        assert_eq!(v["memory_mb"], 1024);
        assert!(v["ip"].as_str().unwrap().starts_with("192.168.150."));
        assert!(v["created_at"].as_str().unwrap().contains('T'));
    }
    let dev = a.1.clone();
    let dev_id = dev["id"].as_str().unwrap().to_string();
    assert_eq!(dev["name"], name63.as_str());
    assert_eq!(c.1["keep_hot"], true);
    let ips: std::collections::HashSet<_> = [&a.1, &b.1, &c.1]
        .iter()
        .map(|v| v["ip"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), 3, "each sandbox has its own IP");

    // over the sandbox quota: 429 naming the limit, before any VM boots
    let (s, v) = status_of(alice.post("/sandboxes", json!({"name": "fourth"})).await).await;
    assert_eq!(s, 429, "{v}");
    assert!(err_text(&v).contains("at most 3 sandboxes"), "{v}");
    // creating a name that exists: that sandbox, 200, and a header saying so
    let r = alice.post("/sandboxes", json!({"name": "web"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-bhatti-existed"], "true");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], b.1["id"]);
    // another user's "web" stays invisible: 5 identical concurrent creates
    // by bob make one sandbox of his own (one 201, four 200s, one id)
    let creates = (0..5).map(|_| {
        let bob = bob.clone();
        async move {
            status_of(
                bob.post(
                    "/sandboxes",
                    json!({"name": "web", "cpus": 1, "memory_mb": 128}),
                )
                .await,
            )
            .await
        }
    });
    let results = futures_util::future::join_all(creates).await;
    let mut statuses: Vec<u16> = results.iter().map(|(s, _)| s.as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 200, 201], "{results:?}");
    let ids: std::collections::HashSet<_> =
        results.iter().map(|(_, v)| v["id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "{results:?}");
    assert_ne!(results[0].1["id"], b.1["id"]);
    let (_, v) = status_of(bob.get("/sandboxes").await).await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (s, _) = status_of(bob.delete("/sandboxes/web").await).await;
    assert_eq!(s, 204);

    // --- get/list by id and name
    for key in [dev_id.as_str(), name63.as_str()] {
        let (s, v) = status_of(alice.get(&format!("/sandboxes/{key}")).await).await;
        assert_eq!(
            (s, v["id"].as_str()),
            (StatusCode::OK, Some(dev_id.as_str()))
        );
    }
    let (_, v) = status_of(alice.get("/sandboxes").await).await;
    assert_eq!(v.as_array().unwrap().len(), 3);

    // --- labels: set, filter (AND), delete; rules at and past their limits
    let r = alice
        .req(Method::PATCH, "/sandboxes/web")
        .json(&json!({"labels": {"team": "ml", "tier": "gpu"}}))
        .send()
        .await
        .unwrap();
    let (s, v) = status_of(r).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["labels"], json!({"team": "ml", "tier": "gpu"}));
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, v) = status_of(alice.get("/sandboxes?label=team=ml").await).await;
    assert_eq!(names(&v), ["web"]);
    let (_, v) = status_of(alice.get("/sandboxes?label=team=ml&label=tier=cpu").await).await;
    assert!(names(&v).is_empty(), "AND of both pairs: {v}");
    let (s, v) = status_of(alice.get("/sandboxes?label=nope").await).await;
    assert_eq!(s, 400, "{v}");
    let sixteen: serde_json::Map<String, Value> =
        (0..14).map(|i| (format!("k{i}"), json!("v"))).collect();
    let r = alice
        .req(Method::PATCH, "/sandboxes/web")
        .json(&json!({"labels": sixteen}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "16 labels are allowed");
    let r = alice
        .req(Method::PATCH, "/sandboxes/web")
        .json(&json!({"labels": {"one-more": "v"}}))
        .send()
        .await
        .unwrap();
    let (s, v) = status_of(r).await;
    assert_eq!(s, 400, "the 17th label: {v}");
    assert!(err_text(&v).contains("at most 16"), "{v}");
    let r = alice
        .req(Method::PATCH, "/sandboxes/web")
        .json(&json!({"labels": {"-bad": "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let keys: Vec<String> = (0..14)
        .map(|i| format!("k{i}"))
        .chain(["tier".into()])
        .collect();
    let r = alice
        .req(Method::PATCH, "/sandboxes/web")
        .json(&json!({"labels_delete": keys}))
        .send()
        .await
        .unwrap();
    let (_, v) = status_of(r).await;
    assert_eq!(v["labels"], json!({"team": "ml"}));

    // --- tenant isolation: every sandbox route of bob on alice's sandbox is a 404
    let (_, v) = status_of(bob.get("/sandboxes").await).await;
    assert_eq!(
        v.as_array().unwrap().len(),
        0,
        "bob sees none of alice's sandboxes"
    );
    for key in [dev_id.as_str(), name63.as_str()] {
        let routes: Vec<(Method, String, Option<Value>)> = vec![
            (Method::GET, format!("/sandboxes/{key}"), None),
            (
                Method::PATCH,
                format!("/sandboxes/{key}"),
                Some(json!({"keep_hot": true})),
            ),
            (
                Method::POST,
                format!("/sandboxes/{key}/exec"),
                Some(json!({"cmd": ["id"]})),
            ),
            (
                Method::GET,
                format!("/sandboxes/{key}/files?path=/etc/hostname"),
                None,
            ),
            (
                Method::HEAD,
                format!("/sandboxes/{key}/files?path=/etc/hostname"),
                None,
            ),
            (Method::GET, format!("/sandboxes/{key}/sessions"), None),
            (
                Method::DELETE,
                format!("/sandboxes/{key}/sessions/init"),
                None,
            ),
            (Method::GET, format!("/sandboxes/{key}/ws"), None),
            (Method::POST, format!("/sandboxes/{key}/stop"), None),
            (Method::POST, format!("/sandboxes/{key}/start"), None),
            (Method::DELETE, format!("/sandboxes/{key}"), None),
        ];
        for (m, path, body) in routes {
            let mut r = bob.req(m.clone(), &path);
            if let Some(b) = body {
                r = r.json(&b);
            }
            let resp = r.send().await.unwrap();
            assert_eq!(resp.status(), 404, "bob {m} {path}");
        }
        let put = bob
            .req(Method::PUT, &format!("/sandboxes/{key}/files?path=/tmp/x"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 404, "bob PUT file");
    }

    // --- exec in the guest: user, hostname, env, secret, init script
    let (code, out, _) = alice.exec(&dev_id, &["id"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("uid=1000(lohar)"), "{out}");
    let (_, out, _) = alice.exec(&dev_id, &["hostname"]).await;
    assert_eq!(out.trim(), name63);
    let (_, out, _) = alice
        .exec(&dev_id, &["sh", "-c", "echo $FOO:$API_KEY"])
        .await;
    assert_eq!(
        out.trim(),
        format!("bar:{SECRET_VALUE}"),
        "sandbox env and the injected secret"
    );
    let (code, out, err) = alice
        .exec(&dev_id, &["sh", "-c", "echo out; echo err >&2; exit 3"])
        .await;
    assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
    let (code, _, err) = alice.exec(&dev_id, &["no-such-command"]).await;
    assert_eq!(code, 127);
    assert!(
        err.contains("no-such-command") && err.contains("not found"),
        "{err}"
    );
    // The same locale and PATH as the reference agent gives every child.
    let (_, out, _) = alice
        .exec(
            &dev_id,
            &["sh", "-c", "echo $LANG; echo $PATH; locale 2>&1 >/dev/null"],
        )
        .await;
    assert_eq!(
        out,
        "en_US.UTF-8\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    let (s, v) = status_of(
        alice
            .post(&format!("/sandboxes/{dev_id}/exec"), json!({"cmd": []}))
            .await,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let r = alice
        .post(
            &format!("/sandboxes/{dev_id}/exec"),
            json!({"cmd": ["pwd"], "cwd": "/tmp", "env": {"FOO": "req"}}),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["stdout"], "/tmp\n");
    let (_, out, _) = alice.exec(&dev_id, &["cat", "/tmp/init.txt"]).await;
    assert_eq!(out, "init-ran\n", "init script ran");
    let r = alice
        .post(
            &format!("/sandboxes/{dev_id}/exec"),
            json!({"cmd": ["cat"], "stdin_b64": "AAEC/w=="}),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["stdout_b64"], "AAEC/w==",
        "binary output comes back byte-exact: {v}"
    );
    let r = alice
        .post(
            &format!("/sandboxes/{dev_id}/exec"),
            json!({"cmd": ["sleep", "30"], "timeout": 1}),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["timed_out"], true, "{v}");

    // --- streaming exec: the first line arrives long before the end
    let t0 = Instant::now();
    let resp = alice
        .req(Method::POST, &format!("/sandboxes/{dev_id}/exec"))
        .header("accept", "application/x-ndjson")
        .json(&json!({"cmd": ["sh", "-c", "echo a; sleep 2; echo b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut first_at = None;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        if first_at.is_none() && buf.contains(&b'\n') {
            first_at = Some(t0.elapsed());
        }
    }
    let lines: Vec<Value> = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(
        lines.first().unwrap(),
        &json!({"type": "stdout", "data": "a\n"})
    );
    assert_eq!(
        lines.last().unwrap(),
        &json!({"type": "exit", "exit_code": 0})
    );
    let total = t0.elapsed();
    let first = first_at.unwrap();
    assert!(
        first + Duration::from_millis(1500) < total,
        "first line at {first:?}, end at {total:?}"
    );

    // a client that goes away kills the command (a raw socket, so that "goes away" is exact)
    let body = json!({"cmd": ["sh", "-c", "echo started; exec sleep 4242"]}).to_string();
    let mut sock = tokio::net::TcpStream::connect(d.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /sandboxes/{dev_id}/exec HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice_key}\r\nAccept: application/x-ndjson\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("started") {
        let mut b = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&b[..n]);
    }
    drop(sock);
    let mut gone = false;
    for _ in 0..50 {
        let (_, out, _) = alice
            .exec(&dev_id, &["sh", "-c", "pgrep -f 'slee[p] 4242' || true"])
            .await;
        if out.trim().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "the command of a disconnected client must be killed");

    // --- files
    let files = format!("/sandboxes/{dev_id}/files");
    let r = alice
        .req(
            Method::PUT,
            &format!("{files}?path=/workspace/dir/a.txt&mode=0600"),
        )
        .body("line1\nline2\nline3\n")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let r = alice
        .get(&format!("{files}?path=/workspace/dir/a.txt"))
        .await;
    assert_eq!(r.headers()["x-file-size"], "18");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"line1\nline2\nline3\n");
    let r = alice
        .get(&format!(
            "{files}?path=/workspace/dir/a.txt&offset=2&limit=1"
        ))
        .await;
    assert_eq!(
        r.headers()["x-file-size"],
        "18",
        "total size always reported"
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"line2\n");
    let r = alice
        .get(&format!("{files}?path=/workspace/dir/a.txt&max_bytes=4"))
        .await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"line");
    let r = alice
        .req(Method::HEAD, &format!("{files}?path=/workspace/dir/a.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            r.headers()["x-file-size"].to_str().unwrap(),
            r.headers()["x-file-mode"].to_str().unwrap(),
            r.headers()["x-file-isdir"].to_str().unwrap()
        ),
        ("18", "0600", "false")
    );
    let r = alice
        .req(Method::HEAD, &format!("{files}?path=/workspace/dir"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-file-isdir"], "true");
    let (s, v) = status_of(
        alice
            .get(&format!("{files}?path=/workspace/dir&ls=true"))
            .await,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v[0]["name"], "a.txt");
    assert_eq!(v[0]["size"], 18);
    assert_eq!(v[0]["mode"], "0600");
    let (s, v) = status_of(alice.get(&format!("{files}?path=/nope/missing")).await).await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = status_of(alice.get(&format!("{files}?path=/workspace/dir")).await).await;
    assert_eq!(s, 400, "reading a directory: {v}");
    let (s, _) = status_of(alice.get(&files).await).await;
    assert_eq!(s, 400, "missing path");
    let (s, _) = status_of(
        alice
            .req(Method::PUT, &format!("{files}?path=/workspace/m&mode=9z9"))
            .body("x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400, "bad mode");
    // 411 without Content-Length (a chunked body)
    let chunked =
        reqwest::Body::wrap_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
            bytes::Bytes::from_static(b"abc"),
        )]));
    let (s, v) = status_of(
        alice
            .req(Method::PUT, &format!("{files}?path=/workspace/dir/a.txt"))
            .body(chunked)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 411, "{v}");
    // 413 just past 100 MiB, answered before the body is sent; nothing written
    let addr = d.url.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!("PUT {files}?path=/workspace/dir/a.txt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice_key}\r\nContent-Length: {}\r\n\r\n", 100 * 1024 * 1024 + 1);
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut resp = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut resp))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&resp[..n]).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&resp[..n])
    );
    let r = alice
        .get(&format!("{files}?path=/workspace/dir/a.txt"))
        .await;
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        b"line1\nline2\nline3\n",
        "a refused write changes nothing"
    );
    // exactly 100 MiB is accepted
    let big: Vec<u8> = (0..100 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let r = alice
        .req(Method::PUT, &format!("{files}?path=/workspace/big.bin"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "100 MiB write: {}", r.status());
    let r = alice
        .req(Method::HEAD, &format!("{files}?path=/workspace/big.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-file-size"], "104857600");
    let (code, _, _) = alice.exec(&dev_id, &["rm", "/workspace/big.bin"]).await;
    assert_eq!(code, 0);

    // --- agent refusals keep their kind: the agent's code decides the status
    // A large write refused up front is the agent's 400, not a 503 "Broken pipe".
    let (s, v) = status_of(
        alice
            .req(Method::PUT, &format!("{files}?path=/workspace"))
            .body(vec![0u8; 20_000_000])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, err_text(&v)),
        (
            StatusCode::BAD_REQUEST,
            "write /workspace: is a directory".into()
        )
    );
    // A full disk is a 507, also for writes past the agent's buffers.
    let (code, _, err) = alice
        .exec(
            &dev_id,
            &[
                "sudo",
                "-n",
                "sh",
                "-c",
                "mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small && chmod 777 /mnt/small",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let (s, v) = status_of(
        alice
            .req(Method::PUT, &format!("{files}?path=/mnt/small/big"))
            .body(vec![1u8; 9_000_000])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, err_text(&v)),
        (
            StatusCode::INSUFFICIENT_STORAGE,
            "write /mnt/small/big: no space left on device".into()
        )
    );
    // Not a directory: 400 with the POSIX phrase and no "(os error N)".
    let (s, v) = status_of(
        alice
            .get(&format!("{files}?path=/workspace/dir/a.txt/x"))
            .await,
    )
    .await;
    assert_eq!(
        (s, err_text(&v)),
        (
            StatusCode::BAD_REQUEST,
            "open /workspace/dir/a.txt/x: not a directory".into()
        )
    );
    // Words in a path do not change the status: this is a directory (400).
    let (code, _, _) = alice
        .exec(&dev_id, &["mkdir", "-p", "/workspace/not found"])
        .await;
    assert_eq!(code, 0);
    let (s, v) = status_of(
        alice
            .get(&format!("{files}?path=/workspace/not%20found"))
            .await,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // A cwd that is missing or cannot be entered: 400 naming the cwd.
    for (cwd, why) in [
        ("/no/such/dir", "no such file or directory"),
        ("/root", "permission denied"),
    ] {
        let (s, v) = status_of(
            alice
                .post(
                    &format!("/sandboxes/{dev_id}/exec"),
                    json!({"cmd": ["pwd"], "cwd": cwd}),
                )
                .await,
        )
        .await;
        assert_eq!(
            (s, err_text(&v)),
            (StatusCode::BAD_REQUEST, format!("cwd {cwd}: {why}"))
        );
    }

    // --- sessions: the init script's session, its output attachable
    let (s, v) = status_of(alice.get(&format!("/sandboxes/{dev_id}/sessions")).await).await;
    assert_eq!(s, 200);
    let init = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session_id"] == "init")
        .expect("init session listed")
        .clone();
    assert_eq!(init["tty"], true);
    let text = common::ws_collect(
        &d.url,
        &alice_key,
        &dev_id,
        "session=init",
        None,
        "hello-from-init",
    )
    .await;
    assert!(
        text.contains("hello-from-init"),
        "init output attachable: {text:?}"
    );
    let (s, _) = status_of(
        alice
            .delete(&format!("/sandboxes/{dev_id}/sessions/no-such-session"))
            .await,
    )
    .await;
    assert_eq!(s, 404);

    // --- WebSocket shell: type, read, resize, close, reconnect and see the scrollback
    let text = common::ws_collect(
        &d.url,
        &alice_key,
        &dev_id,
        "rows=30&cols=100",
        Some(("echo ws-$((40+2))\n", Some((33, 99)), "stty size\n")),
        "33 99",
    )
    .await;
    assert!(text.contains("ws-42"), "{text:?}");
    assert!(text.contains("33 99"), "resize seen by stty: {text:?}");
    // The agent notices a closed WebSocket asynchronously: reattach once
    // it lists the shell as detached (else the reconnect gets a new shell).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list: Value = alice
            .get(&format!("/sandboxes/{dev_id}/sessions"))
            .await
            .json()
            .await
            .expect("sessions");
        let detached = list.as_array().is_some_and(|a| {
            a.iter().any(|s| {
                s["tty"] == true
                    && s["running"] == true
                    && s["attached"] == false
                    && s["session_id"] != "init"
            })
        });
        if detached {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the shell never showed as detached: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = common::ws_collect(&d.url, &alice_key, &dev_id, "", None, "ws-42").await;
    assert!(
        text.contains("ws-42"),
        "reattach replays scrollback: {text:?}"
    );
    let (_, v) = status_of(alice.get(&format!("/sandboxes/{dev_id}/sessions")).await).await;
    let shell = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session_id"] != "init")
        .expect("shell session")
        .clone();
    assert_eq!(
        shell["running"], true,
        "closing the socket detaches, never kills"
    );
    let sid = shell["session_id"].as_str().unwrap().to_string();
    let (s, _) = status_of(
        alice
            .delete(&format!("/sandboxes/{dev_id}/sessions/{sid}"))
            .await,
    )
    .await;
    assert_eq!(s, 204);

    // --- patch: rename, clash
    let (s, v) = status_of(
        alice
            .req(Method::PATCH, "/sandboxes/web")
            .json(&json!({"name": "web2", "keep_hot": true}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, v["name"].as_str(), v["keep_hot"].as_bool()),
        (StatusCode::OK, Some("web2"), Some(true))
    );
    let (s, _) = status_of(
        alice
            .req(Method::PATCH, "/sandboxes/web2")
            .json(&json!({"name": "worker"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 409);
    let (s, _) = status_of(
        alice
            .req(Method::PATCH, "/sandboxes/web2")
            .json(&json!({"name": "bad name"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);

    // --- concurrency: 20 execs on one sandbox, and 5 on each of the three
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (a, id) = (alice.clone(), dev_id.clone());
        tasks.push(tokio::spawn(async move {
            (
                format!("one-{i}"),
                a.exec(&id, &["echo", &format!("one-{i}")]).await,
            )
        }));
    }
    for sb in [dev_id.as_str(), "web2", "worker"] {
        for i in 0..5 {
            let (a, id) = (alice.clone(), sb.to_string());
            tasks.push(tokio::spawn(async move {
                (
                    format!("{id}-{i}"),
                    a.exec(&id, &["echo", &format!("{id}-{i}")]).await,
                )
            }));
        }
    }
    for t in tasks {
        let (want, (code, out, _)) = t.await.unwrap();
        assert_eq!((code, out.trim()), (0, want.as_str()));
    }

    // a slow exec on one sandbox does not block others or list/health
    let slow = {
        let a = alice.clone();
        tokio::spawn(async move { a.exec("worker", &["sleep", "3"]).await })
    };
    // Measure only once the slow exec is really running.
    let deadline = Instant::now() + Duration::from_secs(10);
    while alice.exec("worker", &["pgrep", "-x", "sleep"]).await.0 != 0 {
        assert!(Instant::now() < deadline, "the slow exec never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let _ = alice.exec("web2", &["true"]).await;
    let (s, _) = status_of(alice.get("/sandboxes").await).await;
    assert_eq!(s, 200);
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "other requests waited for a slow exec: {:?}",
        t0.elapsed()
    );
    slow.await.unwrap();

    // --- starting a running sandbox changes nothing (stop/start: tests/thermal.rs)
    let (s, v) = status_of(
        alice
            .post(&format!("/sandboxes/{dev_id}/start"), json!({}))
            .await,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "running", "{v}");

    // --- openapi
    let (s, v) = status_of(
        anon.get(format!("{}/openapi.json", d.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    for p in [
        "/health",
        "/sandboxes",
        "/sandboxes/{id}",
        "/sandboxes/{id}/exec",
        "/sandboxes/{id}/files",
        "/sandboxes/{id}/sessions",
        "/sandboxes/{id}/ws",
        "/sandboxes/{id}/exec/ws",
        "/sandboxes/{id}/inspect",
        "/sandboxes/{id}/ports",
        "/secrets",
        "/secrets/{name}",
    ] {
        assert!(v["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    // New fields are in the schemas.
    let schemas = &v["components"]["schemas"];
    for (schema, field) in [
        ("ExecBody", "timeout_sec"),
        ("ExecBody", "detach"),
        ("ExecBody", "output_file"),
        ("ExecResult", "truncated"),
        ("ExecWsStart", "max_idle_sec"),
        ("Sandbox", "labels"),
        ("Sandbox", "thermal"),
        ("CreateSandboxRequest", "labels"),
        ("PatchSandboxRequest", "labels_delete"),
        ("ListeningPort", "proxy_url"),
        ("SandboxDetail", "disk_bytes"),
        ("ExecDetached", "pid"),
    ] {
        assert!(
            schemas[schema]["properties"].get(field).is_some(),
            "openapi schema {schema} lacks {field}"
        );
    }

    // --- restart after SIGKILL: same ids, names, IPs; exec works
    let (_, before) = status_of(alice.get("/sandboxes").await).await;
    d.kill9();
    d.restart();
    let (_, after) = status_of(alice.get("/sandboxes").await).await;
    let key = |v: &Value| {
        let mut l: Vec<(String, String, String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].to_string(),
                    s["name"].to_string(),
                    s["ip"].to_string(),
                    s["status"].to_string(),
                )
            })
            .collect();
        l.sort();
        l
    };
    assert_eq!(
        key(&before),
        key(&after),
        "sandboxes survive a daemon crash"
    );
    let (code, out, _) = alice.exec(&dev_id, &["cat", "/workspace/dir/a.txt"]).await;
    assert_eq!((code, out.as_str()), (0, "line1\nline2\nline3\n"));

    // --- keys: rotation and deletion take effect at once
    let out = d.operator(&["user", "rotate-key", "bob"]);
    assert!(out.status.success());
    let (s, _) = status_of(bob.get("/sandboxes").await).await;
    assert_eq!(s, 401, "old key refused right after rotation");
    let new_bob = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("bht_"))
        .unwrap()
        .to_string();
    let (s, _) = status_of(Api::new(&d.url, &new_bob).get("/sandboxes").await).await;
    assert_eq!(s, 200);
    assert!(d.operator(&["user", "delete", "bob"]).status.success());
    let (s, _) = status_of(Api::new(&d.url, &new_bob).get("/sandboxes").await).await;
    assert_eq!(s, 401, "a deleted user's key is refused");
    assert!(
        !d.operator(&["user", "delete", "alice"]).status.success(),
        "delete refuses while the user has sandboxes"
    );

    // --- secrets: deletable, and never in plaintext on disk or in the log
    let (s, _) = status_of(alice.delete("/secrets/API_KEY").await).await;
    assert_eq!(s, 204);
    let (s, _) = status_of(alice.delete("/secrets/API_KEY").await).await;
    assert_eq!(s, 404);
    assert!(!d.log().contains(SECRET_VALUE), "secret in the daemon log");
    for entry in walk(d.data_dir.path()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        // The guest's own disk and memory (its RAM file: the guest holds
        // its env) are the guest's data, root-only; the daemon's files
        // must hold no secret.
        if entry
            .extension()
            .is_some_and(|e| e == "qcow2" || e == "log" || e == "ram")
        {
            continue;
        }
        assert!(
            !contains(&bytes, SECRET_VALUE.as_bytes()),
            "secret in plaintext in {}",
            entry.display()
        );
    }

    // --- a VM that dies is reported honestly, and can still be destroyed
    let worker_id = c.1["id"].as_str().unwrap().to_string();
    let pids = common::pids_matching(&d.data_dir.path().join("sandboxes").join(&worker_id));
    assert_eq!(pids.len(), 1, "one QEMU for worker");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = status_of(alice.get("/sandboxes/worker").await).await;
        if v["status"] == "error" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a dead VM still shows as {}",
            v["status"]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (s, v) = status_of(
        alice
            .post("/sandboxes/worker/exec", json!({"cmd": ["true"]}))
            .await,
    )
    .await;
    assert_eq!(s, 503, "{v}");
    assert!(err_text(&v).contains("not running"), "{v}");

    // --- destroy: 204, then gone everywhere
    let qemu_before = d.qemu_pids().len();
    assert_eq!(qemu_before, 2, "dev and web2 still run");
    for sb in [dev_id.as_str(), "web2", "worker"] {
        let (s, v) = status_of(alice.delete(&format!("/sandboxes/{sb}")).await).await;
        assert_eq!(s, 204, "{v}");
        let (s, _) = status_of(alice.get(&format!("/sandboxes/{sb}")).await).await;
        assert_eq!(s, 404);
    }
    assert!(d.qemu_pids().is_empty(), "no QEMU left after destroy");
    let (_, v) = status_of(anon.get(format!("{}/health", d.url)).send().await.unwrap()).await;
    assert_eq!(v["sandboxes"], 0);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
