//! Bench of the thermal states, on a daemon of its own with
//! `idle_warm_secs: 1`: a `keep_hot` sandbox is the hot baseline, a second
//! one cools to warm after each round and is woken by the measured request.
//! Cold is measured after an explicit stop (the same restore the manager's
//! cold state uses). Prints p50/p99 and the ratios against hot, and the
//! host RSS of QEMU for a hot idle, a warm and a cold sandbox.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::daemon::{rss_kib, Api, Daemon};
use crate::proxy::{Conn, SERVER_PY};
use crate::stats::{fmt, Samples};

const APP_PORT: u16 = 7070;

#[derive(Debug, clap::Args)]
pub struct ThermalArgs {
    /// Rounds of each measurement (each warm round waits for the sandbox to cool).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Memory of the sandboxes, MB.
    #[arg(long, default_value_t = 512)]
    memory_mb: u32,
    /// The bhatti binary (default: next to this one).
    #[arg(long)]
    bhatti: Option<PathBuf>,
    /// Guest images.
    #[arg(long, default_value = "/var/lib/bhatti/images")]
    images_dir: PathBuf,
}

pub async fn run(args: ThermalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be > 0");
    let d = Daemon::start_with(
        "thermal",
        args.bhatti.as_deref(),
        &args.images_dir,
        "idle_warm_secs: 1\nidle_cold_secs: 0\n",
    )?;
    let api = Api {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(300))
            .build()?,
        url: d.url.clone(),
        token: d.token.clone(),
    };
    let result = measure(&args, &d, &api).await;
    for name in ["th-hot", "th-cool"] {
        let _ = api
            .call(reqwest::Method::DELETE, &format!("/sandboxes/{name}"), None)
            .await;
    }
    result
}

async fn thermal(api: &Api, name: &str) -> anyhow::Result<String> {
    let v = api
        .call(reqwest::Method::GET, &format!("/sandboxes/{name}"), None)
        .await?;
    Ok(v["thermal"].as_str().unwrap_or("-").to_string())
}

async fn wait_thermal(api: &Api, name: &str, want: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while thermal(api, name).await? != want {
        anyhow::ensure!(Instant::now() < deadline, "{name} did not become {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// QEMU's RSS of a sandbox, MiB (0 without a process).
fn qemu_rss_mib(d: &Daemon, id: &str) -> u64 {
    let pidfile = d.data_dir().join("sandboxes").join(id).join("qemu.pid");
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .and_then(rss_kib)
        .map_or(0, |k| k / 1024)
}

async fn create(api: &Api, name: &str, memory_mb: u32, keep_hot: bool) -> anyhow::Result<String> {
    let v = api
        .call(
            reqwest::Method::POST,
            "/sandboxes",
            Some(json!({"name": name, "memory_mb": memory_mb, "keep_hot": keep_hot})),
        )
        .await?;
    let id = v["id"].as_str().context("id")?.to_string();
    api.put_file(name, "/workspace/bench_server.py", SERVER_PY)
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
        if ports
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p["port"] == APP_PORT))
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the app did not start listening");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(id)
}

async fn publish(api: &Api, name: &str) -> anyhow::Result<String> {
    let rule = api
        .call(
            reqwest::Method::POST,
            &format!("/sandboxes/{name}/publish"),
            Some(json!({"port": APP_PORT})),
        )
        .await?;
    Ok(format!(
        "{}.bhatti.bench",
        rule["alias"].as_str().context("alias")?
    ))
}

fn ratio(a: &Samples, b: &Samples) -> String {
    let s = |d: Duration| d.as_secs_f64().max(1e-9);
    format!(
        "p50 {:.2}x, p99 {:.2}x",
        s(a.p50()) / s(b.p50()),
        s(a.percentile(99.0)) / s(b.percentile(99.0))
    )
}

async fn measure(args: &ThermalArgs, d: &Daemon, api: &Api) -> anyhow::Result<()> {
    let n = args.rounds;
    let hot_id = create(api, "th-hot", args.memory_mb, true).await?;
    let cool_id = create(api, "th-cool", args.memory_mb, false).await?;
    let hot_host = publish(api, "th-hot").await?;
    let cool_host = publish(api, "th-cool").await?;
    println!(
        "thermal bench: {n} rounds, {} MB guests, idle_warm_secs 1",
        args.memory_mb
    );

    // Hot baselines.
    for _ in 0..3 {
        api.exec("th-hot", &["true"]).await?;
    }
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        api.exec("th-hot", &["true"]).await?;
        times.push(t.elapsed());
    }
    let hot_exec = Samples::from_parts("hot: exec true", times, start.elapsed());
    hot_exec.print(None);

    let public = d.public.clone();
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        // A fresh client connection each time, as for the warm rounds.
        let mut conn = Conn::open(&public).await?;
        let t = Instant::now();
        conn.get(&hot_host).await?;
        times.push(t.elapsed());
    }
    let hot_proxy = Samples::from_parts("hot: public proxy GET", times, start.elapsed());
    hot_proxy.print(None);

    // Warm: wait until paused, then one exec wakes it.
    let mut times = Vec::with_capacity(n);
    let mut next = Vec::with_capacity(n);
    let mut warm_rss = Vec::new();
    let start = Instant::now();
    for _ in 0..n {
        wait_thermal(api, "th-cool", "warm").await?;
        warm_rss.push(qemu_rss_mib(d, &cool_id));
        let t = Instant::now();
        api.exec("th-cool", &["true"]).await?;
        times.push(t.elapsed());
        // The guest itself right after the wake, without the wake.
        let t = Instant::now();
        api.exec("th-cool", &["true"]).await?;
        next.push(t.elapsed());
    }
    let warm_exec = Samples::from_parts("warm: wake + exec true", times, start.elapsed());
    warm_exec.print(None);
    Samples::from_parts("  then: the next exec true", next, start.elapsed()).print(None);

    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        wait_thermal(api, "th-cool", "warm").await?;
        let mut conn = Conn::open(&public).await?;
        let t = Instant::now();
        conn.get(&cool_host).await?;
        times.push(t.elapsed());
    }
    let warm_proxy = Samples::from_parts("warm: wake via public proxy GET", times, start.elapsed());
    warm_proxy.print(None);

    // Cold: saved to disk (explicit stop: the same restore as cold).
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    let mut state_mib = 0;
    for _ in 0..n {
        api.call(
            reqwest::Method::POST,
            "/sandboxes/th-cool/stop",
            Some(json!({})),
        )
        .await?;
        state_mib = std::fs::metadata(
            d.data_dir()
                .join("sandboxes")
                .join(&cool_id)
                .join("vm.state"),
        )
        .map_or(0, |m| m.len() / (1024 * 1024));
        let t = Instant::now();
        api.exec("th-cool", &["true"]).await?;
        times.push(t.elapsed());
    }
    let cold_exec = Samples::from_parts("cold: restore + exec true", times, start.elapsed());
    cold_exec.print(None);

    // Host RSS: hot idle (idle for a while, free pages reported), warm, cold.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let hot_rss = qemu_rss_mib(d, &hot_id);
    wait_thermal(api, "th-cool", "warm").await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let warm_now = qemu_rss_mib(d, &cool_id);
    api.call(
        reqwest::Method::POST,
        "/sandboxes/th-cool/stop",
        Some(json!({})),
    )
    .await?;
    let cold_rss = qemu_rss_mib(d, &cool_id);

    println!(
        "ratio warm wake + exec / hot exec: {} (goal <= 1.3x)",
        ratio(&warm_exec, &hot_exec)
    );
    println!(
        "ratio warm wake via proxy / hot proxy: {} (goal <= 1.5x)",
        ratio(&warm_proxy, &hot_proxy)
    );
    println!(
        "cold wake + exec: p50 {} p99 {} (goal <= 0.5 s)",
        fmt(cold_exec.p50()),
        fmt(cold_exec.percentile(99.0))
    );
    warm_rss.sort_unstable();
    println!(
        "host RSS of QEMU, {} MB guest: hot idle {hot_rss} MiB, warm {warm_now} MiB \
         (median over the warm rounds {} MiB), cold {cold_rss} MiB (state file {state_mib} MiB on disk)",
        args.memory_mb,
        warm_rss.get(warm_rss.len() / 2).copied().unwrap_or(0)
    );
    Ok(())
}
