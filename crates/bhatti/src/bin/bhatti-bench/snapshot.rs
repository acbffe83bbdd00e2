//! Bench of forks and snapshots (issue 13), on a daemon of its own, for a
//! fresh guest and one that has touched `--touched-mb` of its memory:
//! snapshot create (the longest stall a process inside the running guest
//! sees, and the API call), fork → first exec answered, resume → first
//! exec answered; each against a cold boot (create → first exec) measured
//! in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::daemon::{Api, Daemon};
use crate::stats::{fmt, Samples};

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Rounds of each measurement.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Memory of the guests, MB.
    #[arg(long, default_value_t = 512)]
    memory_mb: u32,
    /// Memory the second source guest fills with random bytes, MB.
    #[arg(long, default_value_t = 300)]
    touched_mb: u32,
    /// The bhatti binary (default: next to this one).
    #[arg(long)]
    bhatti: Option<PathBuf>,
    /// Guest images.
    #[arg(long, default_value = "/var/lib/bhatti/images")]
    images_dir: PathBuf,
}

/// Records every stall of more than 5 ms in its own loop (monotonic clock),
/// one line of milliseconds each, to /tmp/stalls.
const STALL_WATCH: &str = r#"import time
last = time.monotonic()
with open("/tmp/stalls", "a", buffering=1) as f:
    while True:
        time.sleep(0.001)
        now = time.monotonic()
        if now - last > 0.005:
            f.write("%.1f\n" % ((now - last) * 1000))
        last = now
"#;

pub async fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be > 0");
    let d = Daemon::start_with(
        "snap",
        args.bhatti.as_deref(),
        &args.images_dir,
        "idle_warm_secs: 0\nidle_cold_secs: 0\n",
    )?;
    let api = Api {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(300))
            .build()?,
        url: d.url.clone(),
        token: d.token.clone(),
    };
    let log = d.data_dir().join("daemon.log");
    wait_for_default_template(&log).await;
    let result = measure(&args, &api, &log).await;
    if let Ok(list) = api.call(reqwest::Method::GET, "/sandboxes", None).await {
        for s in list.as_array().into_iter().flatten() {
            if let Some(id) = s["id"].as_str() {
                let _ = api
                    .call(reqwest::Method::DELETE, &format!("/sandboxes/{id}"), None)
                    .await;
            }
        }
    }
    result
}

async fn create(api: &Api, body: serde_json::Value) -> anyhow::Result<()> {
    api.call(reqwest::Method::POST, "/sandboxes", Some(body))
        .await
        .map(|_| ())
}

async fn destroy(api: &Api, name: &str) -> anyhow::Result<()> {
    api.call(reqwest::Method::DELETE, &format!("/sandboxes/{name}"), None)
        .await
        .map(|_| ())
}

fn ratio(a: &Samples, b: &Samples) -> String {
    let s = |d: Duration| d.as_secs_f64().max(1e-9);
    format!(
        "p50 {:.2}x, p99 {:.2}x",
        s(a.p50()) / s(b.p50()),
        s(a.percentile(99.0)) / s(b.percentile(99.0))
    )
}

/// The longest stall the guest's watcher saw since its log had `from` lines.
async fn max_stall(api: &Api, src: &str, from: usize) -> anyhow::Result<(f64, usize)> {
    // No file yet: the watcher has seen no stall (or is still starting).
    let out = api
        .exec(src, &["sh", "-c", "cat /tmp/stalls 2>/dev/null; true"])
        .await?;
    let lines: Vec<f64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let worst = lines.iter().skip(from).fold(0.0f64, |a, b| a.max(*b));
    Ok((worst, lines.len()))
}

/// Medians of the `*_ms` fields of the daemon's log lines containing
/// `what`, written after byte `from` of the log, in the order they appear.
fn phase_medians(log: &std::path::Path, from: usize, what: &str) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
    let mut fields: Vec<(String, Vec<u64>)> = Vec::new();
    for line in text.lines().filter(|l| l.contains(what)) {
        // Drop colour codes, then read `key=value` words.
        let plain: String = {
            let mut out = String::new();
            let mut esc = false;
            for c in line.chars() {
                match (esc, c) {
                    (false, '\u{1b}') => esc = true,
                    (true, 'm') => esc = false,
                    (true, _) => {}
                    (false, c) => out.push(c),
                }
            }
            out
        };
        for word in plain.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            let v = v.trim_start_matches("Some(").trim_end_matches(')');
            let (Some(k), Ok(v)) = (k.strip_suffix("_ms"), v.parse::<u64>()) else {
                continue;
            };
            match fields.iter_mut().find(|(n, _)| n == k) {
                Some((_, vs)) => vs.push(v),
                None => fields.push((k.to_string(), vec![v])),
            }
        }
    }
    fields
        .into_iter()
        .map(|(k, mut vs)| {
            vs.sort_unstable();
            format!("{k} {} ms", vs[vs.len() / 2])
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits (at most 2 min) until the daemon's log says its default template is
/// built, failed or off: a template build running alongside would slow the
/// cold boots the forks are compared with (a template build is a boot and
/// a checkpoint, on the same 2 cores).
async fn wait_for_default_template(log: &std::path::Path) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if ["template ready", "template build failed", "templates off"]
            .iter()
            .any(|m| text.contains(m))
        {
            println!(
                "(waited {} for the daemon's default template before measuring)",
                fmt(started.elapsed())
            );
            return;
        }
        if Instant::now() >= deadline {
            println!("(the default template was not ready after 2 min; measuring anyway)");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn log_len(log: &std::path::Path) -> usize {
    std::fs::metadata(log).map_or(0, |m| m.len() as usize)
}

async fn measure(args: &SnapshotArgs, api: &Api, log: &std::path::Path) -> anyhow::Result<()> {
    let n = args.rounds;
    let mem = args.memory_mb;
    println!(
        "snapshot bench: {n} rounds, {mem} MB guests; sources: booted fresh, booted with {} MB touched, template-born fresh",
        args.touched_mb
    );

    // Cold boot baseline: create → first exec answered.
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let name = format!("boot-{i}");
        let t = Instant::now();
        create(
            api,
            json!({"name": name, "memory_mb": mem, "cold_boot": true}),
        )
        .await?;
        api.exec(&name, &["true"]).await?;
        times.push(t.elapsed());
        destroy(api, &name).await?;
    }
    let boot = Samples::from_parts("cold boot: create → first exec", times, start.elapsed());
    boot.print(None);

    // Booted sources (their RAM is a file of their own: a checkpoint copies
    // it), and a template-born one (its RAM is the template's file mapped
    // privately plus its own pages: a checkpoint streams all of it).
    for (src, touched, cold_boot) in [
        ("src-fresh", 0, true),
        ("src-touched", args.touched_mb, true),
        ("src-template-born", 0, false),
    ] {
        create(
            api,
            json!({"name": src, "memory_mb": mem, "cold_boot": cold_boot}),
        )
        .await?;
        api.put_file(src, "/tmp/stallwatch.py", STALL_WATCH).await?;
        api.exec(
            src,
            &[
                "setsid",
                "-f",
                "sh",
                "-c",
                "exec python3 /tmp/stallwatch.py </dev/null >/dev/null 2>&1",
            ],
        )
        .await?;
        if touched > 0 {
            let hold = format!(
                "exec python3 -c 'import os,time; b=os.urandom({touched}<<20); open(\"/tmp/touched\",\"w\").close(); time.sleep(10**7)' </dev/null >/dev/null 2>&1"
            );
            api.exec(src, &["setsid", "-f", "sh", "-c", &hold]).await?;
            let deadline = Instant::now() + Duration::from_secs(300);
            while api
                .exec(src, &["test", "-e", "/tmp/touched"])
                .await
                .is_err()
            {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the guest did not fill its memory"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let label = match (touched, cold_boot) {
            (0, false) => "template-born".to_string(),
            (0, true) => "fresh".to_string(),
            (t, _) => format!("{t} MB touched"),
        };

        // Snapshot create: the API call and the stall inside the guest.
        let mut times = Vec::with_capacity(n);
        let mut stalls = Vec::with_capacity(n);
        let mut pauses = Vec::with_capacity(n);
        let mut size = 0u64;
        let start = Instant::now();
        for i in 0..n {
            let (_, seen) = max_stall(api, src, 0).await?;
            let t = Instant::now();
            let s = api
                .call(
                    reqwest::Method::POST,
                    &format!("/sandboxes/{src}/checkpoint"),
                    Some(json!({"name": format!("b{i}")})),
                )
                .await?;
            times.push(t.elapsed());
            size = s["size_bytes"].as_u64().unwrap_or(0);
            pauses.push(Duration::from_millis(s["pause_ms"].as_u64().unwrap_or(0)));
            // Let the watcher write down what it saw.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (worst, _) = max_stall(api, src, seen).await?;
            stalls.push(Duration::from_secs_f64(worst / 1000.0));
            api.call(reqwest::Method::DELETE, &format!("/snapshots/b{i}"), None)
                .await?;
        }
        Samples::from_parts(
            &format!("{label}: snapshot create (API)"),
            times,
            start.elapsed(),
        )
        .print(None);
        let pause = Samples::from_parts(
            &format!("{label}: snapshot create, VM paused (stop → cont)"),
            pauses,
            start.elapsed(),
        );
        pause.print(None);
        // The guest's own clock stands still while paused: what it notices is only
        // the work around the pause.
        let stall = Samples::from_parts(
            &format!("{label}: snapshot create, longest stall the guest's clock shows"),
            stalls,
            start.elapsed(),
        );
        stall.print(None);
        println!("{label}: snapshot size {} MiB", size >> 20);

        // Fork → first exec answered.
        let mut times = Vec::with_capacity(n);
        let start = Instant::now();
        let log_from = log_len(log);
        for i in 0..n {
            let name = format!("fork-{touched}-{i}");
            let t = Instant::now();
            create(api, json!({"name": name, "from": src})).await?;
            api.exec(&name, &["true"]).await?;
            times.push(t.elapsed());
            destroy(api, &name).await?;
        }
        let fork = Samples::from_parts(
            &format!("{label}: fork → first exec"),
            times,
            start.elapsed(),
        );
        fork.print(None);
        // Where a fork's time goes, from the daemon's own timestamps (p50 per step).
        println!(
            "{label}: fork, checkpoint steps (p50): {}",
            phase_medians(log, log_from, "checkpoint taken")
        );
        println!(
            "{label}: fork, restore steps (p50): {}",
            phase_medians(log, log_from, "restore phases")
        );

        // Resume → first exec answered.
        api.call(
            reqwest::Method::POST,
            &format!("/sandboxes/{src}/checkpoint"),
            Some(json!({"name": "bench"})),
        )
        .await?;
        let mut times = Vec::with_capacity(n);
        let start = Instant::now();
        for i in 0..n {
            let name = format!("resume-{touched}-{i}");
            let t = Instant::now();
            api.call(
                reqwest::Method::POST,
                "/snapshots/bench/resume",
                Some(json!({"name": name})),
            )
            .await?;
            api.exec(&name, &["true"]).await?;
            times.push(t.elapsed());
            destroy(api, &name).await?;
        }
        let resume = Samples::from_parts(
            &format!("{label}: resume → first exec"),
            times,
            start.elapsed(),
        );
        resume.print(None);
        api.call(reqwest::Method::DELETE, "/snapshots/bench", None)
            .await?;
        destroy(api, src).await?;

        println!(
            "{label}: fork → exec {} (goal <= 0.5 s and <= 0.33x of a cold boot: {})",
            fmt(fork.p50()),
            ratio(&fork, &boot)
        );
        println!(
            "{label}: resume → exec {} ({} of a cold boot); snapshot pause p50 {} p99 {}",
            fmt(resume.p50()),
            ratio(&resume, &boot),
            fmt(pause.p50()),
            fmt(pause.percentile(99.0))
        );
    }
    Ok(())
}
