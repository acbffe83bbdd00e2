//! The proxies' upstream pool against the real agent: lohar in test mode
//! (Unix sockets; a forward dials 127.0.0.1:<port> on this host) and a
//! keep-alive HTTP/1.1 app on loopback that answers with the port its
//! client connected from, so a test sees which connection served it.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti::engine::agent_client::{AgentClient, UnixDialer};
use bhatti::proxy::relay::{relay, Forwarded, UpstreamBody};
use bhatti::proxy::{ProxyError, Target, UpstreamPool};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// The lohar binary: `$BHATTI_LOHAR` (set by scripts/test.sh), else a build
/// in this workspace.
fn lohar_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BHATTI_LOHAR") {
        return p.into();
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    ["x86_64-unknown-linux-gnu/release/lohar", "debug/lohar"]
        .iter()
        .map(|p| target.join(p))
        .find(|p| p.is_file())
        .expect("no lohar binary: build it (cargo build -p lohar) or set BHATTI_LOHAR")
}

/// lohar in test mode, killed on drop.
struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
    client: AgentClient,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let (control, forward) = (dir.path().join("c.sock"), dir.path().join("f.sock"));
        let child = Command::new(lohar_bin())
            .env("LOHAR_TEST", "1")
            .env("LOHAR_SOCK", &control)
            .env("LOHAR_FWD_SOCK", &forward)
            .env("LOHAR_TOKEN", "t")
            .env_remove("LOHAR_ENV")
            .env_remove("LOHAR_INIT")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .spawn()
            .expect("start lohar");
        let t0 = Instant::now();
        while !(control.exists() && forward.exists()) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "lohar did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let client = AgentClient::new(Arc::new(UnixDialer { control, forward }), b"t".to_vec());
        Agent {
            child,
            _dir: dir,
            client,
        }
    }

    fn target(&self, sandbox_id: &str, port: u16) -> Target {
        Target::new(sandbox_id.into(), port, self.client.clone())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keep-alive app on 127.0.0.1 that answers every request with its
/// client's port, `/slow` after 300 ms. Returns its port.
async fn peer_port_app() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                    peer.port().to_string(),
                ))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    port
}

fn get(path: &str) -> Request<UpstreamBody> {
    let mut req = Request::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
    *req.uri_mut() = path.parse().expect("path");
    req.headers_mut()
        .insert(hyper::header::HOST, "localhost".parse().expect("host"));
    req
}

/// One request; the app's answer (its client's port).
async fn peer(pool: &UpstreamPool, target: &Target) -> Result<String, ProxyError> {
    peer_at(pool, target, "/x?y=1").await
}

async fn peer_at(pool: &UpstreamPool, target: &Target, path: &str) -> Result<String, ProxyError> {
    let resp = pool.send(target, get(path)).await?;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Ok(String::from_utf8(body.to_vec()).expect("utf-8"))
}

#[tokio::test]
async fn connections_are_reused_per_sandbox_until_forgotten() {
    let agent = Agent::start();
    let port = peer_port_app().await;
    let pool = UpstreamPool::default();
    let a = agent.target("sb_0123456789ab", port);
    let b = agent.target("sb_ba9876543210", port);

    let first = peer(&pool, &a).await.expect("first request");
    for _ in 0..5 {
        assert_eq!(peer(&pool, &a).await.expect("request"), first, "reused");
    }
    // Another sandbox never gets a's connections, even to the same port.
    let other = peer(&pool, &b).await.expect("other sandbox");
    assert_ne!(other, first);

    // Forgotten (stopped, destroyed): a new forward, the old one not reused.
    pool.forget_sandbox("sb_0123456789ab");
    let after = peer(&pool, &a).await.expect("after forget");
    assert_ne!(after, first, "a forgotten sandbox's connection was reused");
    assert_eq!(peer(&pool, &a).await.expect("again"), after);
    assert_eq!(peer(&pool, &b).await.expect("b untouched"), other);

    // Two slow requests at once: two connections, both kept for later.
    let (x, y) = tokio::join!(peer_at(&pool, &a, "/slow"), peer_at(&pool, &a, "/slow"));
    let (x, y) = (x.expect("x"), y.expect("y"));
    assert_ne!(x, y);
    let (x2, y2) = tokio::join!(peer_at(&pool, &a, "/slow"), peer_at(&pool, &a, "/slow"));
    let mut before = [x, y];
    let mut now = [x2.expect("x2"), y2.expect("y2")];
    before.sort();
    now.sort();
    assert_eq!(before, now, "both idle connections reused");
}

#[tokio::test]
async fn errors_say_what_failed() {
    let agent = Agent::start();
    let pool = UpstreamPool::default();
    // A port nobody listens on (bound then closed).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    match peer(&pool, &agent.target("sb_0123456789ab", closed)).await {
        Err(ProxyError::NotListening { port }) => assert_eq!(port, closed),
        other => panic!("expected NotListening, got {other:?}"),
    }

    // An app that answers with something else than HTTP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let garbage = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"SSH-2.0-nope\r\n\r\n").await;
        }
    });
    match peer(&pool, &agent.target("sb_0123456789ab", garbage)).await {
        Err(ProxyError::Upstream { port, detail }) => {
            assert_eq!(port, garbage);
            assert!(!detail.contains("client error"), "hyper's reason: {detail}");
        }
        other => panic!("expected Upstream, got {other:?}"),
    }

    // The agent is gone.
    drop(agent);
    let t = Target::new(
        "sb_0123456789ab".into(),
        closed,
        AgentClient::new(
            Arc::new(UnixDialer {
                control: "/nonexistent/c".into(),
                forward: "/nonexistent/f".into(),
            }),
            b"t".to_vec(),
        ),
    );
    let pool = UpstreamPool::default();
    match peer(&pool, &t).await {
        Err(ProxyError::Unreachable(_)) => {}
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

/// One request through the relay both proxies use; the app's answer.
async fn one(pool: &UpstreamPool, target: &Target) -> String {
    let req = Request::new(Empty::<Bytes>::new());
    let resp = relay(pool, target, req, "/", &Forwarded::default())
        .await
        .expect("relay");
    assert_eq!(resp.status(), 200);
    let b = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(b.to_vec()).expect("utf-8")
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// Relay + pool overhead on loopback, sequential and 8 at once, with the
/// number of upstream connections that served them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing, by hand: cargo test --release -p bhatti --test proxy_pool -- --ignored --nocapture"]
async fn relay_timing() {
    let agent = Agent::start();
    let port = peer_port_app().await;
    let pool = Arc::new(UpstreamPool::default());
    let target = agent.target("sb_0123456789ab", port);
    for _ in 0..500 {
        one(&pool, &target).await;
    }
    for round in 0..3 {
        let n = 5000;
        let mut times = Vec::with_capacity(n);
        let mut peers = std::collections::HashSet::new();
        let t0 = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            peers.insert(one(&pool, &target).await);
            times.push(t.elapsed());
        }
        let wall = t0.elapsed();
        println!(
            "TIMING round {round} sequential n={n} p50={:?} p99={:?} req/s={:.0} upstream conns={}",
            pct(&mut times, 50.0),
            pct(&mut times, 99.0),
            n as f64 / wall.as_secs_f64(),
            peers.len()
        );
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (pool, target) = (pool.clone(), target.clone());
            tasks.push(tokio::spawn(async move {
                let mut peers = std::collections::HashSet::new();
                for _ in 0..1000 {
                    peers.insert(one(&pool, &target).await);
                }
                peers
            }));
        }
        let mut peers = std::collections::HashSet::new();
        for t in tasks {
            peers.extend(t.await.expect("task"));
        }
        println!(
            "TIMING round {round} 8 concurrent n=8000 req/s={:.0} upstream conns={}",
            8000.0 / t0.elapsed().as_secs_f64(),
            peers.len()
        );
    }
}
