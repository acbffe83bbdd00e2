//! Bench of the public proxy: a small HTTP response from an app in a real
//! sandbox, through the proxy (keep-alive client on loopback), against the
//! same request made inside the guest to 127.0.0.1:port.
//!
//! Starts its own daemon (root, guest images) unless `--url`/`--token`
//! (and `--public`, `--domain`) point at one. Traffic stays on loopback and
//! inside the daemon's namespace; the sandbox has no egress.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::daemon::{Api, Daemon};
use crate::stats::{fmt, Samples};

/// The app: keep-alive HTTP/1.1, a 3-byte body.
pub const SERVER_PY: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *a):
        pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// The in-guest baseline: the same request over one keep-alive connection.
const CLIENT_PY: &str = r#"
import http.client, json, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
def one():
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
for _ in range(max(n // 10, 1)):
    one()
times = []
t0 = time.perf_counter()
for _ in range(n):
    t = time.perf_counter()
    one()
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "wall": time.perf_counter() - t0}))
"#;

const APP_PORT: u16 = 7070;

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// API of a running daemon (default: start one).
    #[arg(long, requires = "token")]
    url: Option<String>,
    /// API key for --url.
    #[arg(long)]
    token: Option<String>,
    /// Public proxy address of that daemon, e.g. 127.0.0.1:8081.
    #[arg(long, default_value = "127.0.0.1:8081")]
    public: String,
    /// That daemon's `domain`.
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Requests per measurement.
    #[arg(long, default_value_t = 2000)]
    n: usize,
    /// Keep-alive connections of the throughput run.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// The bhatti binary for a daemon of our own (default: next to this one).
    #[arg(long)]
    bhatti: Option<PathBuf>,
    /// Guest images for a daemon of our own.
    #[arg(long, default_value = "/var/lib/bhatti/images")]
    images_dir: PathBuf,
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.n > 0 && args.concurrency > 0,
        "--n and --concurrency must be > 0"
    );
    let (daemon, url, token, public, domain) = match (&args.url, &args.token) {
        (Some(u), Some(t)) => (
            None,
            u.clone(),
            t.clone(),
            args.public.clone(),
            args.domain.clone(),
        ),
        _ => {
            let d = Daemon::start("proxy", args.bhatti.as_deref(), &args.images_dir)?;
            let (u, t, p) = (d.url.clone(), d.token.clone(), d.public.clone());
            (Some(d), u, t, p, "bhatti.bench".to_string())
        }
    };
    let api = Api {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(300))
            .build()?,
        url,
        token,
    };
    let name = format!("proxy-bench-{}", std::process::id());
    let t0 = Instant::now();
    api.call(
        reqwest::Method::POST,
        "/sandboxes",
        Some(json!({"name": name})),
    )
    .await?;
    println!("sandbox {name} ready in {}", fmt(t0.elapsed()));
    let result = measure(&args, &api, &name, &public, &domain).await;
    if let Err(e) = api
        .call(reqwest::Method::DELETE, &format!("/sandboxes/{name}"), None)
        .await
    {
        eprintln!("warning: could not destroy {name}: {e}");
    }
    drop(daemon);
    result
}

async fn measure(
    args: &ProxyArgs,
    api: &Api,
    name: &str,
    public: &str,
    domain: &str,
) -> anyhow::Result<()> {
    api.put_file(name, "/workspace/bench_server.py", SERVER_PY)
        .await?;
    api.put_file(name, "/workspace/bench_client.py", CLIENT_PY)
        .await?;
    let line = format!(
        "cd /workspace && exec python3 bench_server.py {APP_PORT} >/tmp/bench_server.log 2>&1 </dev/null"
    );
    api.exec(name, &["setsid", "-f", "sh", "-c", &line]).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ports = api
            .call(
                reqwest::Method::GET,
                &format!("/sandboxes/{name}/ports"),
                None,
            )
            .await?;
        let up = ports
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p["port"] == APP_PORT));
        if up {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the app did not start listening");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rule = api
        .call(
            reqwest::Method::POST,
            &format!("/sandboxes/{name}/publish"),
            Some(json!({"port": APP_PORT})),
        )
        .await?;
    let alias = rule["alias"].as_str().context("alias")?.to_string();
    let host = format!("{alias}.{domain}");
    println!(
        "proxy bench: {} requests, small response, via {public} Host: {host}",
        args.n
    );

    // Through the public proxy, one keep-alive connection, sequential.
    let mut conn = Conn::open(public).await?;
    for _ in 0..(args.n / 10).max(1) {
        conn.get(&host).await?;
    }
    let mut times = Vec::with_capacity(args.n);
    let start = Instant::now();
    for _ in 0..args.n {
        let t = Instant::now();
        conn.get(&host).await?;
        times.push(t.elapsed());
    }
    let proxied_wall = start.elapsed();
    let proxied = Samples::from_parts("public proxy, sequential", times, proxied_wall);
    proxied.print(None);

    // Through the public proxy, several connections at once.
    let per = args.n.div_ceil(args.concurrency);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (public, host) = (public.to_string(), host.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&public).await?;
            let mut times = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                conn.get(&host).await?;
                times.push(t.elapsed());
            }
            anyhow::Ok(times)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let concurrent = Samples::from_parts(
        &format!("public proxy, {} connections", args.concurrency),
        all,
        start.elapsed(),
    );
    concurrent.print(None);

    // The authenticated proxy (new upstream request per call, same pool).
    let n_authed = (args.n / 4).max(1);
    let path = format!("/sandboxes/{name}/proxy/{APP_PORT}/");
    let mut times = Vec::with_capacity(n_authed);
    let start = Instant::now();
    for _ in 0..n_authed {
        let t = Instant::now();
        let r = api.req(reqwest::Method::GET, &path).send().await?;
        anyhow::ensure!(r.status() == 200, "authed proxy: {}", r.status());
        r.bytes().await?;
        times.push(t.elapsed());
    }
    Samples::from_parts("authenticated proxy, sequential", times, start.elapsed()).print(None);

    // Inside the guest, straight to the port.
    let n = args.n.to_string();
    let port = APP_PORT.to_string();
    let out = api
        .exec(name, &["python3", "/workspace/bench_client.py", &port, &n])
        .await?;
    let v: Value = serde_json::from_str(out.trim()).context("in-guest client output")?;
    let times: Vec<Duration> = v["times"]
        .as_array()
        .context("times")?
        .iter()
        .filter_map(Value::as_f64)
        .map(Duration::from_secs_f64)
        .collect();
    let wall = Duration::from_secs_f64(v["wall"].as_f64().context("wall")?);
    let direct = Samples::from_parts("in guest, 127.0.0.1 (python client)", times, wall);
    direct.print(None);

    let secs = |d: Duration| d.as_secs_f64().max(1e-9);
    println!(
        "ratio proxy/in-guest (sequential): p50 {:.2}x, p99 {:.2}x; req/s {:.0} vs {:.0} ({:.2}x)",
        secs(proxied.p50()) / secs(direct.p50()),
        secs(proxied.percentile(99.0)) / secs(direct.percentile(99.0)),
        args.n as f64 / secs(proxied_wall),
        args.n as f64 / secs(wall),
        secs(wall) / secs(proxied_wall),
    );
    Ok(())
}

/// One keep-alive HTTP/1.1 connection to the public proxy.
pub struct Conn {
    sender: SendRequest<Empty<Bytes>>,
}

impl Conn {
    pub async fn open(addr: &str) -> anyhow::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Conn { sender })
    }

    pub async fn get(&mut self, host: &str) -> anyhow::Result<()> {
        self.sender.ready().await?;
        let req = hyper::Request::get("/")
            .header(hyper::header::HOST, host)
            .body(Empty::new())?;
        let resp = self.sender.send_request(req).await?;
        anyhow::ensure!(resp.status() == 200, "proxy answered {}", resp.status());
        resp.into_body().collect().await?;
        Ok(())
    }
}
