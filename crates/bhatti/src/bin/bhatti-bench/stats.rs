//! Percentiles and a one-line report per measurement.

use std::time::{Duration, Instant};

/// Samples of one measurement.
pub struct Samples {
    name: String,
    times: Vec<Duration>,
    wall: Duration,
}

impl Samples {
    /// Times `n` sequential runs of `f`, after `n / 10` warm-up runs.
    pub async fn sequential<F, Fut>(name: &str, n: usize, mut f: F) -> anyhow::Result<Samples>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        for _ in 0..(n / 10).max(1) {
            f().await?;
        }
        let mut times = Vec::with_capacity(n);
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            f().await?;
            times.push(t.elapsed());
        }
        Ok(Samples {
            name: name.to_string(),
            times,
            wall: start.elapsed(),
        })
    }

    /// Runs `tasks` tasks, each calling `op(task)` `per_task` times back to
    /// back, and times every call; the wall time covers them all.
    pub async fn concurrent<F, Fut>(
        name: &str,
        tasks: usize,
        per_task: usize,
        op: F,
    ) -> anyhow::Result<Samples>
    where
        F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
    {
        let start = Instant::now();
        let mut handles = Vec::with_capacity(tasks);
        for task in 0..tasks {
            let op = op.clone();
            handles.push(tokio::spawn(async move {
                let mut times = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    let t = Instant::now();
                    op(task).await?;
                    times.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(times)
            }));
        }
        let mut times = Vec::with_capacity(tasks * per_task);
        for h in handles {
            times.extend(h.await??);
        }
        Ok(Samples {
            name: name.to_string(),
            times,
            wall: start.elapsed(),
        })
    }

    pub fn wall(&self) -> Duration {
        self.wall
    }

    pub fn len(&self) -> usize {
        self.times.len()
    }

    pub fn from_parts(name: &str, times: Vec<Duration>, wall: Duration) -> Samples {
        Samples {
            name: name.to_string(),
            times,
            wall,
        }
    }

    pub fn percentile(&self, p: f64) -> Duration {
        let mut t = self.times.clone();
        t.sort();
        if t.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((p / 100.0) * (t.len() - 1) as f64).round() as usize;
        t[idx.min(t.len() - 1)]
    }

    pub fn p50(&self) -> Duration {
        self.percentile(50.0)
    }

    /// Prints `name  n  p50  p95  p99  ops/s  [MB/s]`.
    pub fn print(&self, bytes_per_op: Option<u64>) {
        let ops = self.times.len() as f64 / self.wall.as_secs_f64();
        let mbps = bytes_per_op
            .map(|b| format!("{:>10.1} MB/s", b as f64 * ops / 1e6))
            .unwrap_or_default();
        println!(
            "{:<34} n={:<6} p50={:>10} p95={:>10} p99={:>10} {:>10.0} ops/s{}",
            self.name,
            self.times.len(),
            fmt(self.percentile(50.0)),
            fmt(self.percentile(95.0)),
            fmt(self.percentile(99.0)),
            ops,
            mbps
        );
    }
}

/// Human duration with a unit that keeps three significant digits.
pub fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1}µs")
    } else if us < 1e6 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}
