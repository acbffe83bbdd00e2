//! Checkpoints and restores into a new identity on real VMs (issue 13), at
//! the engine: a running VM forked twice (memory, files and a listening
//! process carry over; identity, address, token, machine-id and random
//! state differ; changes stay apart), a stopped VM forked, the parent
//! destroyed under its forks, and the disk chain kept short.
//!
//! Needs root and the guest images, like `vm_engine.rs`.

mod engine_harness;
use engine_harness::{images, require_root, sh, spec, TestEngine};

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bhatti::engine::agent_client::AgentClient;
use bhatti::engine::qemu::network;
use bhatti::engine::{Engine, VmRuntime};

async fn sh_ok(agent: &AgentClient, script: &str) -> String {
    let out = sh(agent, script).await;
    assert_eq!(
        out.exit_code,
        0,
        "{script}: stdout {:?} stderr {:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A server in the guest keeping a counter in memory: every connection to
/// `port` gets the counter, incremented.
const COUNTER: &str = r#"
cat > /tmp/counter.py <<'PY'
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7070)); s.listen(8)
n = 0
while True:
    c, _ = s.accept(); n += 1; c.sendall(b"%d\n" % n); c.close()
PY
nohup python3 /tmp/counter.py >/dev/null 2>&1 &
for i in $(seq 1 200); do python3 -c 'import socket; socket.create_connection(("127.0.0.1", 7070)).close()' 2>/dev/null && exit 0; sleep 0.05; done; exit 1
"#;

const BUMP: &str =
    "python3 -c 'import socket; print(socket.create_connection((\"127.0.0.1\", 7070)).recv(16).decode().strip())'";

async fn identity(agent: &AgentClient) -> (String, String, String, String) {
    let out = sh_ok(
        agent,
        "hostname; cat /etc/machine-id 2>/dev/null || echo none; ip -4 -o addr show eth0 | awk '{print $4}'; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
    )
    .await;
    let l: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(l.len(), 4, "{out}");
    (l[0].clone(), l[1].clone(), l[2].clone(), l[3].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_running_and_stopped_vms_into_new_identities() {
    require_root();
    let images = images().await;
    let t = TestEngine::new("f", "192.168.141.0/24", images, |_| {}).await;
    let e = &t.engine;
    let ip = |n| Ipv4Addr::new(192, 168, 141, n);

    let mut a = spec("fk-a", ip(10));
    a.name = "alpha".into();
    a.env.insert("WHO".into(), "alpha".into());
    let rt_a = e.create(&a).await.expect("create a");
    let ag_a = e.agent("fk-a", &rt_a);
    sh_ok(&ag_a, "echo from-a > /workspace/file.txt && sync").await;
    sh_ok(&ag_a, COUNTER).await;
    assert_eq!(sh_ok(&ag_a, BUMP).await, "2");

    // Fork A (running) into B.
    let t0 = Instant::now();
    let cp = e
        .checkpoint("fk-a", &rt_a, "cp1", "layer1")
        .await
        .expect("checkpoint");
    let pause = cp.pause_ms.expect("a running VM is paused");
    assert!(
        cp.ram_file,
        "RAM in a file: device state only in the stream"
    );
    eprintln!(
        "checkpoint of a running VM: pause {pause} ms, total {:?}",
        t0.elapsed()
    );
    // A copy whose agent refuses the identity (a host name it does not
    // take) fails at once, with the agent's reason, not as a timeout; the
    // checkpoint stays usable.
    let mut bad = spec("fk-x", ip(12));
    bad.name = "not a host name".into();
    let t_bad = Instant::now();
    let err = e
        .restore_checkpoint("cp1", &rt_a.token, &bad)
        .await
        .expect_err("a refused identity");
    let msg = err.to_string();
    assert!(msg.contains("refused its new identity"), "{msg}");
    assert!(msg.contains("not a valid host name"), "{msg}");
    assert!(
        t_bad.elapsed() < Duration::from_secs(15),
        "{:?}",
        t_bad.elapsed()
    );

    let mut b = spec("fk-b", ip(11));
    b.name = "bravo".into();
    b.env.insert("WHO".into(), "bravo".into());
    let t1 = Instant::now();
    let rt_b = e
        .restore_checkpoint("cp1", &rt_a.token, &b)
        .await
        .expect("restore b");
    let ag_b = e.agent("fk-b", &rt_b);
    assert_eq!(sh_ok(&ag_b, "cat /workspace/file.txt").await, "from-a");
    eprintln!("restore → first exec answered: {:?}", t1.elapsed());

    // The counter process came along with its memory; from here each runs on its own.
    assert_eq!(sh_ok(&ag_b, BUMP).await, "3");
    assert_eq!(sh_ok(&ag_b, BUMP).await, "4");
    assert_eq!(sh_ok(&ag_a, BUMP).await, "3");
    // A still runs and serves.
    assert_eq!(sh_ok(&ag_a, "cat /workspace/file.txt").await, "from-a");
    // Files apart, both ways.
    sh_ok(
        &ag_b,
        "echo from-b > /workspace/file.txt; touch /workspace/only-b; sync",
    )
    .await;
    sh_ok(&ag_a, "touch /workspace/only-a; sync").await;
    assert_eq!(
        sh_ok(
            &ag_a,
            "cat /workspace/file.txt; ls /workspace | tr '\\n' ' '"
        )
        .await,
        "from-a\nfile.txt only-a"
    );
    assert_eq!(
        sh_ok(
            &ag_b,
            "cat /workspace/file.txt; ls /workspace | tr '\\n' ' '"
        )
        .await,
        "from-b\nfile.txt only-b"
    );
    // Identity: hostname, machine-id, address, random state; env; token.
    let (ha, ma, ia, ra) = identity(&ag_a).await;
    let (hb, mb, ib, rb) = identity(&ag_b).await;
    assert_eq!((ha.as_str(), ia.as_str()), ("alpha", "192.168.141.10/24"));
    assert_eq!((hb.as_str(), ib.as_str()), ("bravo", "192.168.141.11/24"));
    assert_ne!(ma, mb, "machine-ids");
    assert_ne!(ra, rb, "urandom");
    assert_eq!(sh_ok(&ag_b, "echo $WHO").await, "bravo");
    assert_eq!(sh_ok(&ag_a, "echo $WHO").await, "alpha");
    let wrong = e.agent(
        "fk-b",
        &VmRuntime {
            ip: rt_b.ip,
            token: rt_a.token.clone(),
        },
    );
    assert!(wrong.activity().await.is_err(), "B must refuse A's token");

    // A second fork of A, and a fork of a stopped A.
    let cp2 = e
        .checkpoint("fk-a", &rt_a, "cp2", "layer2")
        .await
        .expect("checkpoint 2");
    e.stop("fk-a").await.expect("stop a");
    let cp3 = e
        .checkpoint("fk-a", &rt_a, "cp3", "layer3")
        .await
        .expect("checkpoint of stopped a");
    assert!(cp3.pause_ms.is_none());
    assert!(cp3.ram_file, "a stopped VM's RAM file is its saved memory");
    // A host restart empties the ramfs: the copy on disk serves.
    let cow_ram = t.cfg.data_dir.join("cow/cp3.ram");
    assert!(t.cfg.data_dir.join("checkpoints/cp3/mem.ram").is_file());
    std::fs::remove_file(&cow_ram).expect("drop the ramfs copy");
    let durable_blocks = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(t.cfg.data_dir.join("checkpoints/cp3/mem.ram"))
            .expect("disk copy")
            .blocks()
    };
    // The reload is never seen half-done under the checkpoint's name (a
    // crash midway left a partial file every later resume mapped).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (done, path) = (done.clone(), cow_ram.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::MetadataExt;
            let mut seen = Vec::new();
            loop {
                let last = done.load(std::sync::atomic::Ordering::Relaxed);
                if let Ok(m) = std::fs::metadata(&path) {
                    seen.push(m.blocks());
                }
                if last {
                    return seen;
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let c = spec("fk-c", ip(12));
    let rt_c = e
        .restore_checkpoint("cp3", &rt_a.token, &c)
        .await
        .expect("restore c");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().expect("watcher");
    // Its first sight holds all the data (a partial one would have almost
    // none); it grows later only as the copy's guest reads holes (ramfs
    // allocates those pages).
    let first = seen.first().copied().unwrap_or(0);
    assert!(
        first >= durable_blocks * 9 / 10,
        "the RAM file under the checkpoint's name was partial: first seen with {first} blocks, the disk copy has {durable_blocks}"
    );
    let ag_c = e.agent("fk-c", &rt_c);
    assert_eq!(sh_ok(&ag_c, "cat /workspace/file.txt").await, "from-a");
    assert_eq!(sh_ok(&ag_c, BUMP).await, "4");
    e.start("fk-a", &rt_a).await.expect("start a");
    assert_eq!(sh_ok(&ag_a, BUMP).await, "4");
    drop(cp2);

    // A fork of a copy: B maps cp1's RAM privately, so its checkpoint
    // streams all of its RAM. D loads that stream into anonymous memory (a
    // new RAM file on disk made the load several times slower), and gets
    // a RAM file of its own only when it is stopped.
    let cp4 = e
        .checkpoint("fk-b", &rt_b, "cp4", "layer4")
        .await
        .expect("checkpoint of a copy");
    assert!(!cp4.ram_file, "a copy's RAM is no file of its own");
    let d = spec("fk-d", ip(13));
    let rt_d = e
        .restore_checkpoint("cp4", &rt_b.token, &d)
        .await
        .expect("restore d");
    let ag_d = e.agent("fk-d", &rt_d);
    assert_eq!(sh_ok(&ag_d, BUMP).await, "5", "B's counter came along");
    let d_dir = t.cfg.data_dir.join("sandboxes/fk-d");
    let argv_of = |dir: &std::path::Path| -> String {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("vm.json")).expect("vm.json"))
                .expect("json");
        meta["argv"]
            .as_array()
            .expect("argv")
            .iter()
            .filter_map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        argv_of(&d_dir).contains("memory-backend-ram,id=mem,size="),
        "{}",
        argv_of(&d_dir)
    );
    assert!(!d_dir.join("mem.ram").exists());
    e.stop("fk-d").await.expect("stop d");
    e.start("fk-d", &rt_d).await.expect("start d");
    assert_eq!(sh_ok(&ag_d, BUMP).await, "6");
    assert!(
        argv_of(&d_dir).contains("mem.ram,share=on"),
        "{}",
        argv_of(&d_dir)
    );
    assert_eq!(sh_ok(&ag_b, BUMP).await, "5", "B runs on alone");
    e.destroy("fk-d").await.expect("destroy d");
    e.delete_checkpoint("cp4").await.expect("delete cp4");

    // The parent goes; its forks' chains stay valid.
    e.destroy("fk-a").await.expect("destroy a");
    assert_eq!(
        sh_ok(&ag_b, "cat /workspace/file.txt; cat /etc/hostname").await,
        "from-b\nbravo"
    );
    assert_eq!(sh_ok(&ag_c, BUMP).await, "5");
    let depth = e.disk_chain_depth("fk-c").expect("depth");
    assert!(depth <= 4, "chain depth {depth}");
    for id in ["fk-b", "fk-c"] {
        e.destroy(id).await.expect("destroy");
    }
    for cp in ["cp1", "cp2", "cp3"] {
        e.delete_checkpoint(cp).await.expect("delete checkpoint");
    }
}

/// When process `pid` started, as nanoseconds since the Unix epoch (to the
/// kernel's clock tick, 10 ms here).
fn process_start_ns(pid: u32) -> u128 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    // Field 22 of the line, the 20th after the command name.
    let ticks: u128 = after
        .split_whitespace()
        .nth(19)
        .expect("starttime")
        .parse()
        .expect("ticks");
    let btime: u128 = std::fs::read_to_string("/proc/stat")
        .expect("/proc/stat")
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .expect("btime")
        .trim()
        .parse()
        .expect("btime");
    // SAFETY: sysconf has no preconditions.
    let hz = u128::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).expect("hz");
    btime * 1_000_000_000 + ticks * 1_000_000_000 / hz
}

/// A fork runs the copy's restore alongside the source's checkpoint: the
/// copy's QEMU is running before the checkpoint is complete (its record
/// written last), the copy carries the source's memory on, and a fork
/// whose checkpoint fails leaves no copy behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_starts_the_copy_while_the_source_is_checkpointed() {
    require_root();
    let images = images().await;
    let t = TestEngine::new("ov", "192.168.152.0/24", images, |_| {}).await;
    let e = &t.engine;
    let ip = |n| Ipv4Addr::new(192, 168, 152, n);
    let a = spec("ov-a", ip(10));
    let rt_a = e.create(&a).await.expect("create a");
    let ag_a = e.agent("ov-a", &rt_a);
    sh_ok(&ag_a, "echo from-a > /workspace/file.txt && sync").await;
    sh_ok(&ag_a, COUNTER).await;
    assert_eq!(sh_ok(&ag_a, BUMP).await, "2");

    let b = spec("ov-b", ip(11));
    let (info, restored) = e
        .fork("ov-a", &rt_a, "fork-0123456789abcdef", "lov1", &b)
        .await
        .expect("checkpoint");
    let rt_b = restored.expect("restore");
    assert!(info.ram_file && info.new_layer && info.pause_ms.is_some());
    let pid_b: u32 = std::fs::read_to_string(t.cfg.data_dir.join("sandboxes/ov-b/qemu.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let recorded = std::fs::metadata(
        t.cfg
            .data_dir
            .join("checkpoints/fork-0123456789abcdef/checkpoint.json"),
    )
    .expect("checkpoint record")
    .modified()
    .expect("mtime")
    .duration_since(std::time::UNIX_EPOCH)
    .expect("epoch")
    .as_nanos();
    let started = process_start_ns(pid_b);
    assert!(
        started < recorded,
        "the copy's QEMU started {} ms after the checkpoint was complete",
        (started - recorded) / 1_000_000
    );
    let ag_b = e.agent("ov-b", &rt_b);
    assert_eq!(sh_ok(&ag_b, BUMP).await, "3");
    assert_eq!(sh_ok(&ag_b, "cat /workspace/file.txt").await, "from-a");
    assert_eq!(sh_ok(&ag_a, BUMP).await, "3");
    assert_eq!(
        sh_ok(
            &ag_b,
            "hostname; ip -4 -o addr show eth0 | awk '{print $4}'"
        )
        .await,
        format!("{}\n192.168.152.11/24", b.name)
    );

    // The checkpoint fails (its layer exists already): no copy is made and
    // nothing of it stays.
    std::fs::write(e.layer_path("lov2"), b"taken").expect("layer file");
    let c = spec("ov-c", ip(12));
    let failed = e
        .fork("ov-a", &rt_a, "fork-00000000000000cc", "lov2", &c)
        .await;
    assert!(failed.is_err(), "a fork whose checkpoint fails");
    assert!(!t.cfg.data_dir.join("sandboxes/ov-c").exists());
    let quarantines: Vec<String> = std::fs::read_dir("/run/netns")
        .expect("/run/netns")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{}-q", t.cfg.netns)))
        .collect();
    assert!(quarantines.is_empty(), "{quarantines:?}");
    assert_eq!(sh_ok(&ag_a, BUMP).await, "4", "the source runs on");

    for id in ["ov-a", "ov-b"] {
        e.destroy(id).await.expect("destroy");
    }
    e.delete_checkpoint("fork-0123456789abcdef")
        .await
        .expect("delete checkpoint");
}

/// A crash mid-fork leaves a checkpoint, its RAM file and a quarantine
/// namespace; the sweep at daemon start removes them and keeps a named
/// snapshot's checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_removes_what_a_crashed_fork_left() {
    require_root();
    let images = images().await;
    let t = TestEngine::new("w", "192.168.142.0/24", images, |_| {}).await;
    let data = &t.cfg.data_dir;
    let cow = data.join("cow");
    assert!(
        bhatti::engine::qemu::ramfile::is_ramfs(&cow),
        "checkpoint RAM lives on a ramfs"
    );
    for cp in ["fork-0123456789abcdef", "s0123456789abcdef"] {
        std::fs::create_dir_all(data.join("checkpoints").join(cp)).expect("dir");
        std::fs::write(data.join("checkpoints").join(cp).join("vm.state"), b"x").expect("state");
        std::fs::write(cow.join(format!("{cp}.ram")), b"ram").expect("ram");
    }
    std::fs::write(cow.join("gone.ram"), b"ram").expect("orphan ram");
    let qns = network::quarantine_netns(t.engine.net_config(), "crashed-copy");
    network::ensure_netns(&qns).expect("quarantine");

    t.engine.sweep(&[]).await.expect("sweep");
    assert!(!data.join("checkpoints/fork-0123456789abcdef").exists());
    assert!(!cow.join("fork-0123456789abcdef.ram").exists());
    assert!(!cow.join("gone.ram").exists());
    assert!(!network::netns_path(&qns).exists(), "quarantine {qns} left");
    // A snapshot's checkpoint is the service's to delete.
    assert!(data.join("checkpoints/s0123456789abcdef/vm.state").exists());
    assert!(cow.join("s0123456789abcdef.ram").exists());
}

/// A sandbox that writes between forks, forked 10 times in a row: its own
/// disk chain is flattened onto the base whenever it reaches the bound (before
/// its disk is frozen), its copies' chains stay as short, and every file is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_stay_short_over_many_forks() {
    require_root();
    let images = images().await;
    let t = TestEngine::new("c", "192.168.143.0/24", images, |_| {}).await;
    let e = &t.engine;
    let ip = |n| Ipv4Addr::new(192, 168, 143, n);
    let a = spec("ch-a", ip(10));
    let rt_a = e.create(&a).await.expect("create a");
    let ag_a = e.agent("ch-a", &rt_a);
    let mut depths = Vec::new();
    let mut flattened = 0;
    for n in 0..10 {
        sh_ok(&ag_a, &format!("echo {n} > /workspace/f{n}; sync")).await;
        let cp = e
            .checkpoint("ch-a", &rt_a, &format!("fork-{n}"), &format!("l{n}"))
            .await
            .expect("checkpoint");
        assert!(cp.new_layer, "round {n} wrote, so it froze a layer");
        flattened += usize::from(cp.source_flattened);
        depths.push(e.disk_chain_depth("ch-a").expect("depth"));
    }
    eprintln!("source chain depth after each fork: {depths:?}, flattened {flattened}×");
    assert!(depths.iter().all(|d| *d <= 4), "{depths:?}");
    assert!(flattened >= 2, "{depths:?}");
    // The last fork's copy: a short chain, every file.
    let b = spec("ch-b", ip(11));
    let rt_b = e
        .restore_checkpoint("fork-9", &rt_a.token, &b)
        .await
        .expect("restore");
    let ag_b = e.agent("ch-b", &rt_b);
    let depth_b = e.disk_chain_depth("ch-b").expect("depth b");
    assert!(depth_b <= 4, "copy's chain {depth_b}");
    let all = "cat /workspace/f0 /workspace/f1 /workspace/f5 /workspace/f9 | tr '\\n' ' '";
    assert_eq!(sh_ok(&ag_b, all).await, "0 1 5 9");
    assert_eq!(sh_ok(&ag_a, all).await, "0 1 5 9");
    for n in 0..10 {
        e.delete_checkpoint(&format!("fork-{n}"))
            .await
            .expect("delete");
    }
    for id in ["ch-a", "ch-b"] {
        e.destroy(id).await.expect("destroy");
    }
}

/// A daemon killed late in a checkpoint leaves its source's QEMU done
/// migrating into the state file, in run state `postmigrate` (vCPUs
/// stopped, disks inactive). The next engine's adopt resumes it: the VM
/// runs on, its disk writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_resumes_a_vm_left_by_an_interrupted_checkpoint() {
    use bhatti::engine::qemu::qmp::commands::{MigrationStatus, RunState};
    use bhatti::engine::qemu::qmp::Qmp;
    use bhatti::engine::VmState;
    use std::os::fd::AsFd;

    require_root();
    let images = images().await;
    let mut t = TestEngine::new("pm", "192.168.149.0/24", images, |_| {}).await;
    let s = spec("pm-a", Ipv4Addr::new(192, 168, 149, 10));
    let rt = t.engine.create(&s).await.expect("create");
    sh_ok(
        &t.engine.agent("pm-a", &rt),
        "echo before > /workspace/f && sync",
    )
    .await;

    // The daemon dies: a fresh engine on the same config (VMs run on).
    let restarted = bhatti::engine::qemu::QemuEngine::new(t.cfg.clone())
        .await
        .expect("engine after restart");
    drop(std::mem::replace(&mut t.engine, restarted));

    // What the checkpoint had done before the crash: pause, then migrate
    // the state into a file, without the `cont` that would have followed.
    let dir = t.cfg.data_dir.join("sandboxes").join("pm-a");
    let qmp = Qmp::connect_retry(&dir.join("qmp.sock"), std::time::Duration::from_secs(10))
        .await
        .expect("qmp");
    qmp.set_migrate_max_bandwidth(1 << 34)
        .await
        .expect("bandwidth");
    qmp.stop().await.expect("stop");
    let file = tempfile::tempfile_in(&t.cfg.data_dir).expect("state file");
    qmp.getfd("st", file.as_fd()).await.expect("getfd");
    qmp.migrate("fd:st").await.expect("migrate");
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let m = qmp.query_migrate().await.expect("query-migrate");
        if m.status == Some(MigrationStatus::Completed) {
            break;
        }
        assert!(Instant::now() < deadline, "migration stuck: {:?}", m.status);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        qmp.query_status().await.expect("status").status,
        RunState::Postmigrate
    );
    drop(qmp);

    assert_eq!(t.engine.adopt("pm-a", &rt).await, VmState::Running);
    assert!(!t.engine.paused("pm-a").await.expect("paused"));
    let ag = t.engine.agent("pm-a", &rt);
    assert_eq!(
        sh_ok(
            &ag,
            "cat /workspace/f; echo after > /workspace/g && sync && cat /workspace/g"
        )
        .await,
        "before\nafter"
    );
    t.engine.destroy("pm-a").await.expect("destroy");
}

/// A daemon killed in the middle of a running VM's disk freeze leaves its
/// dir without `disk.qcow2`: the overlay already renamed into a layer, the
/// new overlay still `disk.next.qcow2`. The next engine's adopt repairs it
/// from what QEMU has open: back when QEMU still writes the old overlay,
/// forward when it was switched onto the new one. Either way the VM's
/// next stop and start work and nothing written is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_repairs_a_disk_freeze_cut_short() {
    use bhatti::engine::qemu::disks;
    use bhatti::engine::qemu::qmp::Qmp;
    use bhatti::engine::VmState;
    use std::os::fd::AsFd;

    require_root();
    let images = images().await;
    let mut t = TestEngine::new("dr", "192.168.148.0/24", images, |_| {}).await;
    let s = spec("dr-a", Ipv4Addr::new(192, 168, 148, 10));
    let rt = t.engine.create(&s).await.expect("create");
    sh_ok(
        &t.engine.agent("dr-a", &rt),
        "echo one > /workspace/f && sync",
    )
    .await;
    let dir = t.cfg.data_dir.join("sandboxes").join("dr-a");
    let (disk, next) = (dir.join("disk.qcow2"), dir.join("disk.next.qcow2"));
    let layers = t.cfg.data_dir.join("layers");
    std::fs::create_dir_all(&layers).expect("layers dir");
    let size = disks::info(&disk).expect("info").virtual_size;
    let restart = |t: &mut TestEngine| {
        let cfg = t.cfg.clone();
        async move {
            bhatti::engine::qemu::QemuEngine::new(cfg)
                .await
                .expect("engine after restart")
        }
    };

    // Back: the overlay renamed and the new one made, QEMU not switched yet.
    let e = restart(&mut t).await;
    drop(std::mem::replace(&mut t.engine, e));
    let la = layers.join("la.qcow2");
    std::fs::rename(&disk, &la).expect("rename to layer");
    disks::create_overlay_on_layer(&la, &next, size).expect("next");
    assert_eq!(t.engine.adopt("dr-a", &rt).await, VmState::Running);
    assert!(
        disk.is_file() && !next.exists() && !la.exists(),
        "not rolled back"
    );
    sh_ok(
        &t.engine.agent("dr-a", &rt),
        "echo two > /workspace/g && sync",
    )
    .await;

    // Forward: QEMU already writes the new overlay.
    let e = restart(&mut t).await;
    drop(std::mem::replace(&mut t.engine, e));
    let lb = layers.join("lb.qcow2");
    let qmp = Qmp::connect_retry(&dir.join("qmp.sock"), std::time::Duration::from_secs(10))
        .await
        .expect("qmp");
    qmp.stop().await.expect("stop");
    std::fs::rename(&disk, &lb).expect("rename to layer");
    disks::create_overlay_on_layer(&lb, &next, size).expect("next");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&next)
        .expect("open next");
    let set = qmp.add_fd(f.as_fd()).await.expect("add-fd");
    qmp.snapshot_onto("root", &format!("/dev/fdset/{set}"), "ov-test")
        .await
        .expect("switch");
    qmp.cont().await.expect("cont");
    drop((qmp, f));
    assert_eq!(t.engine.adopt("dr-a", &rt).await, VmState::Running);
    assert!(
        disk.is_file() && !next.exists() && lb.is_file(),
        "not rolled forward"
    );
    assert_eq!(
        disks::info(&disk)
            .expect("info")
            .backing_filename
            .as_deref(),
        lb.to_str()
    );
    sh_ok(
        &t.engine.agent("dr-a", &rt),
        "echo three > /workspace/h && sync",
    )
    .await;

    // The disk files are whole again: a stop and start keep every write.
    t.engine.stop("dr-a").await.expect("stop");
    t.engine.start("dr-a", &rt).await.expect("start");
    assert_eq!(
        sh_ok(
            &t.engine.agent("dr-a", &rt),
            "cat /workspace/f /workspace/g /workspace/h"
        )
        .await,
        "one\ntwo\nthree"
    );
    t.engine.destroy("dr-a").await.expect("destroy");
}

/// A daemon killed in the middle of a stopped VM's disk freeze (a fork or
/// snapshot of a stopped sandbox) leaves the freeze marker naming the layer
/// and the disk files at one of its steps. The next engine's adopt undoes
/// it: the VM is stopped, its old overlay is its whole disk. A cut after
/// the new overlay took its place keeps it. Either way the VM starts with
/// every write, and a real checkpoint of it afterwards leaves no marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_undoes_an_offline_freeze_cut_short() {
    use bhatti::engine::qemu::{disks, FREEZE_MARKER};
    use bhatti::engine::VmState;

    require_root();
    let images = images().await;
    let mut t = TestEngine::new("of", "192.168.147.0/24", images, |_| {}).await;
    let s = spec("of-a", Ipv4Addr::new(192, 168, 147, 10));
    let rt = t.engine.create(&s).await.expect("create");
    sh_ok(
        &t.engine.agent("of-a", &rt),
        "echo one > /workspace/f && sync",
    )
    .await;
    t.engine.stop("of-a").await.expect("stop");
    let dir = t.cfg.data_dir.join("sandboxes").join("of-a");
    let (disk, next, marker) = (
        dir.join("disk.qcow2"),
        dir.join("disk.next.qcow2"),
        dir.join(FREEZE_MARKER),
    );
    let layers = t.cfg.data_dir.join("layers");
    std::fs::create_dir_all(&layers).expect("layers dir");
    let size = disks::info(&disk).expect("info").virtual_size;
    let base = disks::info(&disk).expect("info").backing_filename;
    let cfg = t.cfg.clone();
    let restart = || {
        let cfg = cfg.clone();
        async move {
            bhatti::engine::qemu::QemuEngine::new(cfg)
                .await
                .expect("engine after restart")
        }
    };

    // Cut after the overlay was renamed into the layer, before the new one was made.
    let la = layers.join("la.qcow2");
    std::fs::write(&marker, la.to_str().expect("utf-8")).expect("marker");
    std::fs::rename(&disk, &la).expect("rename to layer");
    let e = restart().await;
    drop(std::mem::replace(&mut t.engine, e));
    assert_eq!(t.engine.adopt("of-a", &rt).await, VmState::Stopped);
    assert!(
        disk.is_file() && !la.exists() && !marker.exists(),
        "not rolled back"
    );

    // Cut with the new overlay made aside and the old one renamed.
    let lb = layers.join("lb.qcow2");
    std::fs::write(&marker, lb.to_str().expect("utf-8")).expect("marker");
    disks::create_overlay_on_layer(&lb, &next, size).expect("next");
    std::fs::rename(&disk, &lb).expect("rename to layer");
    let e = restart().await;
    drop(std::mem::replace(&mut t.engine, e));
    assert_eq!(t.engine.adopt("of-a", &rt).await, VmState::Stopped);
    assert!(
        disk.is_file() && !next.exists() && !lb.exists() && !marker.exists(),
        "not rolled back"
    );
    assert_eq!(disks::info(&disk).expect("info").backing_filename, base);

    // Cut before the marker went: the new overlay in place stays.
    let lc = layers.join("lc.qcow2");
    std::fs::write(&marker, lc.to_str().expect("utf-8")).expect("marker");
    disks::create_overlay_on_layer(&lc, &next, size).expect("next");
    std::fs::rename(&disk, &lc).expect("rename to layer");
    std::fs::rename(&next, &disk).expect("rename into place");
    let e = restart().await;
    drop(std::mem::replace(&mut t.engine, e));
    assert_eq!(t.engine.adopt("of-a", &rt).await, VmState::Stopped);
    assert!(disk.is_file() && lc.is_file() && !marker.exists());

    t.engine.start("of-a", &rt).await.expect("start");
    let ag = t.engine.agent("of-a", &rt);
    assert_eq!(
        sh_ok(&ag, "cat /workspace/f; echo two > /workspace/g && sync").await,
        "one"
    );
    // A real offline freeze completes and leaves no marker.
    t.engine.stop("of-a").await.expect("stop");
    let cp = t
        .engine
        .checkpoint("of-a", &rt, "cp-of", "lof")
        .await
        .expect("checkpoint of the stopped VM");
    assert!(cp.new_layer && cp.pause_ms.is_none());
    assert_eq!(cp.parent_layer.as_deref(), Some("lc"));
    assert!(!marker.exists() && !next.exists());
    t.engine.start("of-a", &rt).await.expect("start");
    assert_eq!(
        sh_ok(
            &t.engine.agent("of-a", &rt),
            "cat /workspace/f /workspace/g; echo three > /workspace/h && sync"
        )
        .await,
        "one\ntwo"
    );
    // Its chain is at the bound (overlay, lof, lc, base): the next freeze
    // of the stopped VM flattens it offline first, so the new layer backs
    // onto the base.
    t.engine.stop("of-a").await.expect("stop");
    assert_eq!(t.engine.disk_chain_depth("of-a").expect("depth"), 4);
    let cp2 = t
        .engine
        .checkpoint("of-a", &rt, "cp-of2", "lof2")
        .await
        .expect("second checkpoint of the stopped VM");
    assert!(
        cp2.source_flattened && cp2.parent_layer.is_none(),
        "{cp2:?}"
    );
    assert_eq!(t.engine.disk_chain_depth("of-a").expect("depth"), 3);
    t.engine.start("of-a", &rt).await.expect("start");
    assert_eq!(
        sh_ok(
            &t.engine.agent("of-a", &rt),
            "cat /workspace/f /workspace/g /workspace/h"
        )
        .await,
        "one\ntwo\nthree"
    );
    t.engine.destroy("of-a").await.expect("destroy");
    for cp in ["cp-of", "cp-of2"] {
        t.engine.delete_checkpoint(cp).await.expect("delete");
    }
}
