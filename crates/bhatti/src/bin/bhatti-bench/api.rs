//! Bench of the HTTP API of a real daemon: health, list with 20 sandboxes,
//! exec on a hot sandbox, and the daemon's memory idle and under load.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::daemon::{rss_kib, Api, Daemon};
use crate::stats::{fmt, Samples};

#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// Requests per sequential measurement.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Sandboxes in the store while `list` is timed.
    #[arg(long, default_value_t = 20)]
    sandboxes: usize,
    /// The bhatti binary (default: next to this one).
    #[arg(long)]
    bhatti: Option<PathBuf>,
    /// Guest images.
    #[arg(long, default_value = "/var/lib/bhatti/images")]
    images_dir: PathBuf,
}

pub async fn run(args: ApiArgs) -> anyhow::Result<()> {
    let d = Daemon::start("api", args.bhatti.as_deref(), &args.images_dir)?;
    let api = Api {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(300))
            .build()?,
        url: d.url.clone(),
        token: d.token.clone(),
    };
    let result = measure(&args, &api, d.pid()).await;
    for i in 0..args.sandboxes {
        let _ = api
            .call(
                reqwest::Method::DELETE,
                &format!("/sandboxes/bench-{i}"),
                None,
            )
            .await;
    }
    drop(d);
    result
}

async fn measure(args: &ApiArgs, api: &Api, pid: u32) -> anyhow::Result<()> {
    println!("API bench: daemon pid {pid}, {} sandboxes", args.sandboxes);
    let idle_rss = rss_kib(pid).unwrap_or(0);

    // Boot the sandboxes four at a time.
    let t0 = Instant::now();
    for batch in (0..args.sandboxes).collect::<Vec<_>>().chunks(4) {
        let mut tasks = Vec::new();
        for i in batch {
            let body = json!({"name": format!("bench-{i}"), "memory_mb": 256});
            let api = api.clone();
            tasks.push(tokio::spawn(async move {
                api.call(reqwest::Method::POST, "/sandboxes", Some(body))
                    .await
            }));
        }
        for t in tasks {
            t.await??;
        }
    }
    println!(
        "{} sandboxes created in {}",
        args.sandboxes,
        fmt(t0.elapsed())
    );
    let with_vms_rss = rss_kib(pid).unwrap_or(0);

    let url = api.url.clone();
    Samples::sequential("GET /health", args.n, || async {
        let r = api.http.get(format!("{url}/health")).send().await?;
        anyhow::ensure!(r.status() == 200);
        r.bytes().await?;
        Ok(())
    })
    .await?
    .print(None);

    Samples::sequential(
        &format!("GET /sandboxes ({} in store)", args.sandboxes),
        args.n,
        || async {
            let v = api.call(reqwest::Method::GET, "/sandboxes", None).await?;
            anyhow::ensure!(v.as_array().map(|a| a.len()) == Some(args.sandboxes));
            Ok(())
        },
    )
    .await?
    .print(None);

    Samples::sequential("POST exec true (hot sandbox)", args.n / 2, || async {
        api.exec("bench-0", &["true"]).await?;
        Ok(())
    })
    .await?
    .print(None);

    // Load: 10 clients running exec on 5 sandboxes while RSS is sampled.
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid).unwrap_or(0), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let api2 = api.clone();
    let spread = args.sandboxes.clamp(1, 5);
    let load = Samples::concurrent("POST exec true, 10 clients", 10, args.n / 10, move |task| {
        let api = api2.clone();
        async move {
            api.exec(&format!("bench-{}", task % spread), &["true"])
                .await?;
            Ok(())
        }
    })
    .await?;
    done.store(true, Ordering::Relaxed);
    sampler.await?;
    load.print(None);
    println!(
        "daemon RSS: idle {} MiB, with {} sandboxes {} MiB, peak under exec load {} MiB",
        idle_rss / 1024,
        args.sandboxes,
        with_vms_rss / 1024,
        peak.load(Ordering::Relaxed) / 1024
    );
    Ok(())
}
