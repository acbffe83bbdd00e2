//! Bench of lohar in test mode: protocol round trip, exec, files.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti::engine::agent_client::{AgentClient, UnixDialer};
use bhatti_proto::{ExecRequest, FileReadRequest};

use crate::stats::{fmt, Samples};

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The lohar binary (default: next to this bench binary).
    #[arg(long)]
    lohar: Option<PathBuf>,
    /// Iterations of each sequential measurement.
    #[arg(long, default_value_t = 2000)]
    n: usize,
}

/// lohar in test mode, killed on drop.
struct Agent {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(bin: &PathBuf, token: &str) -> anyhow::Result<Agent> {
    // /dev/shm: the file timings measure the agent, not this machine's disk.
    let dir = tempfile::Builder::new()
        .prefix("bhatti-bench")
        .tempdir_in(shm_or_tmp())?;
    let child = std::process::Command::new(bin)
        .env("LOHAR_TEST", "1")
        .env("LOHAR_SOCK", dir.path().join("c.sock"))
        .env("LOHAR_FWD_SOCK", dir.path().join("f.sock"))
        .env("LOHAR_TOKEN", token)
        .current_dir(dir.path())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {}: {e}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.path().join("c.sock").exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "lohar did not create its socket within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Agent { child, dir })
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let bin = match args.lohar {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("lohar"),
    };
    let token = "bench-token-0123456789abcdef";
    let agent = start_agent(&bin, token)?;
    let dialer = UnixDialer {
        control: agent.dir.path().join("c.sock"),
        forward: agent.dir.path().join("f.sock"),
    };
    let client = AgentClient::new(Arc::new(dialer), token.as_bytes().to_vec());
    let n = args.n;
    let work = agent.dir.path().to_path_buf();

    println!(
        "lohar agent bench (test mode, Unix sockets, AUTH on), {}",
        bin.display()
    );

    // The floor: spawning `true` straight from this process.
    let floor = Samples::sequential("fork+exec+wait true (floor)", n, || async {
        let st =
            tokio::task::spawn_blocking(|| std::process::Command::new("true").status()).await??;
        anyhow::ensure!(st.success());
        Ok(())
    })
    .await?;
    floor.print(None);

    let s = Samples::sequential("ACTIVITY round trip", n, || async {
        client.activity().await?;
        Ok(())
    })
    .await?;
    s.print(None);

    let exec_true = Samples::sequential("exec true", n, || async {
        let o = client.exec_buffered(ExecRequest::command(["true"])).await?;
        anyhow::ensure!(o.exit_code == 0);
        Ok(())
    })
    .await?;
    exec_true.print(None);
    println!(
        "{:<34} {:.2}x the fork+exec floor",
        "  exec true / floor (p50)",
        exec_true.p50().as_secs_f64() / floor.p50().as_secs_f64()
    );

    Samples::sequential("exec sh -c 'echo hello'", n / 2, || async {
        let o = client
            .exec_buffered(ExecRequest::command(["sh", "-c", "echo hello"]))
            .await?;
        anyhow::ensure!(o.stdout == b"hello\n");
        Ok(())
    })
    .await?
    .print(None);

    let kib = vec![b'x'; 1024];
    let small = work.join("small.txt").to_string_lossy().into_owned();
    Samples::sequential("write 1 KiB", n, || async {
        client.write_file_bytes(&small, None, &kib).await?;
        Ok(())
    })
    .await?
    .print(Some(1024));

    Samples::sequential("read 1 KiB", n, || async {
        let (_, d) = client
            .read_file_all(FileReadRequest {
                path: small.clone(),
                ..Default::default()
            })
            .await?;
        anyhow::ensure!(d.len() == 1024);
        Ok(())
    })
    .await?
    .print(Some(1024));

    let mib: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let one_mib = work.join("one.bin").to_string_lossy().into_owned();
    client.write_file_bytes(&one_mib, None, &mib).await?;
    Samples::sequential("read 1 MiB", n / 4, || async {
        let (_, d) = client
            .read_file_all(FileReadRequest {
                path: one_mib.clone(),
                ..Default::default()
            })
            .await?;
        anyhow::ensure!(d.len() == 1 << 20);
        Ok(())
    })
    .await?
    .print(Some(1 << 20));

    let big: Vec<u8> = (0..64 << 20).map(|i| (i % 253) as u8).collect();
    let big_path = work.join("big.bin").to_string_lossy().into_owned();
    Samples::sequential("write 64 MiB", 10, || async {
        client.write_file_bytes(&big_path, None, &big).await?;
        Ok(())
    })
    .await?
    .print(Some(64 << 20));

    // 10 tasks running `true` back to back.
    let c = client.clone();
    let conc = Samples::concurrent("exec true x10 concurrent", 10, n / 2, move |_| {
        let c = c.clone();
        async move {
            let o = c.exec_buffered(ExecRequest::command(["true"])).await?;
            anyhow::ensure!(o.exit_code == 0);
            Ok(())
        }
    })
    .await?;
    conc.print(None);
    println!(
        "{:<34} {:.0} execs/s in {}",
        "  concurrent throughput",
        conc.len() as f64 / conc.wall().as_secs_f64(),
        fmt(conc.wall())
    );
    Ok(())
}

fn shm_or_tmp() -> std::path::PathBuf {
    let shm = std::path::PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}
