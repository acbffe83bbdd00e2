//! Bench of real VMs through the QEMU engine: bare boot, create-to-ready,
//! exec round trips, destroy, and host RAM per idle VM; then templates
//! (docs/templates.md): create-to-ready restored from a pre-booted
//! template against a boot, and host RAM of idle template-born VMs
//! against booted ones.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bhatti::engine::qemu::accel::{self, AccelMode};
use bhatti::engine::qemu::image::{self, ImagePaths};
use bhatti::engine::qemu::network::Subnet;
use bhatti::engine::qemu::{process, QemuConfig, QemuEngine};
use bhatti::engine::{Engine, SandboxSpec};
use bhatti_proto::ExecRequest;

use crate::daemon::rss_kib;
use crate::stats::{fmt, Samples};

#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Guest images [default: /var/lib/bhatti/images].
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// VMs booted one after another for the create/destroy timings.
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// exec round trips measured inside one VM.
    #[arg(long, default_value_t = 300)]
    execs: usize,
    /// Guest memory in MB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Idle VMs of each kind (booted, template-born) for the RAM comparison.
    #[arg(long, default_value_t = 10)]
    idle_vms: usize,
}

pub async fn run(args: VmArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the VM bench needs root (namespaces, TAPs)"
    );
    let dir = args
        .images_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(image::DEFAULT_IMAGES_DIR));
    let images =
        tokio::task::spawn_blocking(move || image::ensure_images(&dir, &image::LogProgress))
            .await??;
    let accel = accel::resolve(AccelMode::Auto)?;
    println!(
        "VM bench: accel {accel:?}, {} MB guests, kernel {}",
        args.memory,
        images.kernel.display()
    );

    let bare = bare_boot(&images, accel, args.memory, args.boots).await?;
    bare.print(None);

    let data = tempfile::Builder::new()
        .prefix("bhbench")
        .tempdir_in("/tmp")?;
    let mut cfg = QemuConfig::new(data.path(), images);
    cfg.netns = format!("bhbench-{}", std::process::id());
    cfg.bridge = "brbench0".into();
    cfg.subnet = "192.168.170.0/24"
        .parse::<Subnet>()
        .map_err(anyhow::Error::msg)?;
    cfg.egress = false;
    let engine = QemuEngine::new(cfg.clone()).await?;
    let result = measure(&engine, &args, &bare).await;
    let _ = engine.sweep(&[]).await;
    drop(engine);
    // The engine's ramfs for copies' RAM: mounted, it kept the temp dir.
    bhatti::engine::qemu::ramfile::release_ramfs(&data.path().join("cow"));
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &cfg.netns])
        .status();
    result
}

fn spec(i: usize, memory_mb: u32) -> SandboxSpec {
    SandboxSpec {
        id: format!("sb_bench{i:04}"),
        name: format!("bench{i}"),
        cpus: 1,
        memory_mb,
        ip: std::net::Ipv4Addr::new(192, 168, 170, 10 + i as u8),
        token: format!("bench-token-{i}"),
        env: Default::default(),
        init: None,
        egress: Default::default(),
        peer_group: None,
        volumes: Vec::new(),
        image: None,
        template: false,
    }
}

async fn measure(engine: &QemuEngine, args: &VmArgs, bare: &Samples) -> anyhow::Result<()> {
    let (mut create, mut destroy) = (Vec::new(), Vec::new());
    let wall = Instant::now();
    for i in 0..args.boots {
        let s = spec(i, args.memory);
        let t = Instant::now();
        engine.create(&s).await?;
        create.push(t.elapsed());
        let t = Instant::now();
        engine.destroy(&s.id).await?;
        destroy.push(t.elapsed());
    }
    let create = Samples::from_parts("create to ready (agent answers)", create, wall.elapsed());
    create.print(None);
    let cold_create = create.p50();
    println!(
        "{:<34} {:.2}x the bare kernel+initramfs boot (p50)",
        "  create / bare boot",
        create.p50().as_secs_f64() / bare.p50().as_secs_f64()
    );
    Samples::from_parts("destroy", destroy, wall.elapsed()).print(None);

    // A VM kept for exec round trips and RAM.
    let s = spec(100, args.memory);
    let rt = engine.create(&s).await?;
    let agent = engine.agent(&s.id, &rt);
    Samples::sequential("exec true in the VM", args.execs, || async {
        let o = agent.exec_buffered(ExecRequest::command(["true"])).await?;
        anyhow::ensure!(o.exit_code == 0);
        Ok(())
    })
    .await?
    .print(None);
    Samples::sequential("ACTIVITY round trip to the VM", args.execs, || async {
        agent.activity().await?;
        Ok(())
    })
    .await?
    .print(None);
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    agent
        .write_file_bytes("/tmp/bench-1m.bin", None, &mib)
        .await?;
    Samples::sequential("read 1 MiB from the VM", 50, || async {
        let req = bhatti_proto::FileReadRequest {
            path: "/tmp/bench-1m.bin".into(),
            ..Default::default()
        };
        let (_, d) = agent.read_file_all(req).await?;
        anyhow::ensure!(d.len() == 1 << 20);
        Ok(())
    })
    .await?
    .print(Some(1 << 20));
    // Idle for a while so free-page reporting has returned what boot touched.
    tokio::time::sleep(Duration::from_secs(8)).await;
    if let Some(pid) = engine.pid(&s.id) {
        let rss = rss_kib(pid).unwrap_or(0);
        println!(
            "{:<34} {} MiB RSS of QEMU for an idle {} MB guest",
            "host RAM per idle VM",
            rss / 1024,
            args.memory
        );
    }
    engine.destroy(&s.id).await?;
    templates(engine, args, cold_create).await
}

/// `Pss:` and `Rss:` of a process, KiB (`/proc/<pid>/smaps_rollup`).
fn pss_rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    Some((field("Pss:")?, field("Rss:")?))
}

/// Sum of PSS and RSS (KiB) of the QEMUs of VMs `ids`.
fn ram_of(engine: &QemuEngine, ids: &[String]) -> (u64, u64) {
    ids.iter()
        .filter_map(|id| engine.pid(id).and_then(pss_rss_kib))
        .fold((0, 0), |(p, r), (p1, r1)| (p + p1, r + r1))
}

/// Templates as the daemon keeps them: one VM booted, idle, checkpointed
/// and removed; then creates restored from it into new identities, timed
/// against `cold_p50` (the boots above); then `idle_vms` idle VMs of each
/// kind, their host RAM summed.
async fn templates(engine: &QemuEngine, args: &VmArgs, cold_p50: Duration) -> anyhow::Result<()> {
    let mut t = spec(200, args.memory);
    t.id = "tpl-bench".into();
    t.name = "bhatti-template".into();
    let (cp, layer) = ("tpl-bench-cp", "tpl-bench-l");
    let built = Instant::now();
    let rt = engine.create(&t).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = engine.checkpoint(&t.id, &rt, cp, layer).await?;
    engine.destroy(&t.id).await?;
    println!(
        "{:<34} {} (boot, checkpoint, VM removed); RAM file {} MiB",
        "template built in",
        fmt(built.elapsed()),
        info.state_bytes >> 20
    );
    let result = async {
        let mut times = Vec::new();
        let wall = Instant::now();
        for i in 0..args.boots {
            let s = spec(i, args.memory);
            let t0 = Instant::now();
            engine.restore_checkpoint(cp, &t.token, &s).await?;
            times.push(t0.elapsed());
            engine.destroy(&s.id).await?;
        }
        let tpl = Samples::from_parts("create from a template to ready", times, wall.elapsed());
        tpl.print(None);
        println!(
            "{:<34} {:.1}x faster than a boot (p50 {} vs {})",
            "  template vs boot",
            cold_p50.as_secs_f64() / tpl.p50().as_secs_f64(),
            fmt(tpl.p50()),
            fmt(cold_p50)
        );

        // Host RAM of idle VMs: booted ones, then template-born ones.
        let n = args.idle_vms;
        let booted: Vec<String> = (0..n).map(|i| spec(20 + i, args.memory).id).collect();
        let born: Vec<String> = (0..n).map(|i| spec(40 + i, args.memory).id).collect();
        for i in 0..n {
            engine.create(&spec(20 + i, args.memory)).await?;
        }
        for i in 0..n {
            engine
                .restore_checkpoint(cp, &t.token, &spec(40 + i, args.memory))
                .await?;
        }
        // Idle for a while so free-page reporting has returned what boot touched.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (bp, br) = ram_of(engine, &booted);
        let (tp, tr) = ram_of(engine, &born);
        let per = |kib: u64| kib as f64 / 1024.0 / n.max(1) as f64;
        println!(
            "{:<34} booted: PSS {:.1} MiB, RSS {:.1} MiB per VM ({n} idle {} MB guests)",
            "host RAM per idle VM",
            per(bp),
            per(br),
            args.memory
        );
        println!(
            "{:<34} template-born: PSS {:.1} MiB, RSS {:.1} MiB per VM; PSS {:.0} %, RSS {:.0} % of booted",
            "",
            per(tp),
            per(tr),
            100.0 * tp as f64 / bp.max(1) as f64,
            100.0 * tr as f64 / br.max(1) as f64
        );
        for id in booted.iter().chain(&born) {
            engine.destroy(id).await?;
        }
        anyhow::Ok(())
    }
    .await;
    let _ = engine.delete_checkpoint(cp).await;
    let _ = engine.delete_layer(layer).await;
    result
}

/// Time from QEMU start until the kernel hands over to userspace: the same
/// kernel and initramfs with an init that does not exist, so the kernel
/// panics right where `/init` would start and QEMU exits (`-no-reboot`).
async fn bare_boot(
    images: &ImagePaths,
    accel: accel::Accel,
    memory: u32,
    n: usize,
) -> anyhow::Result<Samples> {
    let cmdline = process::kernel_cmdline(accel::host_tsc_khz(), "rdinit=/bench-no-such-init");
    let mut times = Vec::new();
    let wall = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let st = tokio::process::Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm",
                "-accel",
                accel.qemu_arg(),
                "-m",
                &memory.to_string(),
                "-smp",
                "1",
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-no-reboot",
                "-serial",
                "null",
            ])
            .arg("-kernel")
            .arg(&images.kernel)
            .arg("-initrd")
            .arg(&images.initramfs)
            .args(["-append", &cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(st.code().is_some(), "bare QEMU was killed");
        times.push(t.elapsed());
    }
    let s = Samples::from_parts("bare kernel+initramfs boot", times, wall.elapsed());
    println!(
        "{:<34} (QEMU start to the kernel starting init; {} runs, p50 {})",
        "",
        n,
        fmt(s.p50())
    );
    Ok(s)
}
