//! Host side of the QEMU engine without a guest: namespace, bridge, TAPs,
//! nftables, sockets inside the namespace, and QMP against a QEMU that boots
//! nothing. Needs root (CI runs as root). Every test uses its own namespace,
//! so tests run in parallel and in separate processes without colliding.
//! No traffic leaves loopback or the test's own namespace.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use bhatti::engine::qemu::netns_dialer::NetnsSockets;
use bhatti::engine::qemu::network::{self, NetConfig, Subnet};
use bhatti::engine::qemu::process;
use bhatti::engine::qemu::qmp::Qmp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (network namespaces, TAPs, nftables)"
    );
}

/// A namespace of this test alone, deleted (with all it holds) on drop.
struct TestNet {
    cfg: NetConfig,
}

impl TestNet {
    fn new(tag: &str) -> TestNet {
        require_root();
        let cfg = NetConfig {
            netns: format!("bhth-{tag}-{}", std::process::id()),
            bridge: "brtest0".into(),
            subnet: "192.168.137.0/24".parse::<Subnet>().expect("subnet"),
            egress: false,
            uplink_netns: None,
            dns: false,
        };
        network::ensure_base(&cfg).expect("ensure_base");
        TestNet { cfg }
    }

    fn exec(&self, args: &[&str]) -> String {
        network::exec_in(&self.cfg.netns, args).expect("exec in netns")
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = network::delete_all(&self.cfg.netns);
    }
}

#[test]
fn network_setup_is_idempotent_and_stays_in_its_namespace() {
    let net = TestNet::new("net");
    // A second run changes nothing and does not fail.
    network::ensure_base(&net.cfg).expect("ensure_base again");
    let addrs = net.exec(&["ip", "-4", "-o", "addr", "show", "dev", "brtest0"]);
    assert_eq!(addrs.matches("192.168.137.1/24").count(), 1, "{addrs}");
    let rules = net.exec(&["nft", "list", "ruleset"]);
    assert!(rules.contains("table inet bhatti"), "{rules}");
    assert!(rules.contains("table bridge bhatti"), "{rules}");
    assert!(rules.contains("iifname \"brtest0\" drop"), "{rules}");
    assert!(!rules.contains("masquerade"), "egress is off: {rules}");
    // Nothing of it in the machine's own namespace.
    let root_links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    let root_links = String::from_utf8_lossy(&root_links.stdout);
    assert!(
        !root_links.contains("brtest0") && !root_links.contains("bt-"),
        "{root_links}"
    );

    let ip = Ipv4Addr::new(192, 168, 137, 9);
    let tap = network::tap_name("sandbox-a");
    let mac = network::guest_mac(ip);
    network::add_tap(&net.cfg, &tap, ip, &mac).expect("add tap");
    network::add_tap(&net.cfg, &tap, ip, &mac).expect("add tap again");
    assert_eq!(
        network::list_taps(&net.cfg.netns).expect("list"),
        vec![tap.clone()]
    );
    let link = net.exec(&["ip", "-o", "link", "show", "dev", &tap]);
    assert!(link.contains("master brtest0"), "{link}");
    assert_eq!(
        network::list_neighbours(&net.cfg).expect("neigh"),
        vec![(ip, mac.clone())]
    );

    network::remove_tap(&net.cfg, &tap, Some(ip)).expect("remove");
    network::remove_tap(&net.cfg, &tap, Some(ip)).expect("remove again");
    assert!(network::list_taps(&net.cfg.netns).expect("list").is_empty());
    assert!(network::list_neighbours(&net.cfg)
        .expect("neigh")
        .is_empty());

    // A changed subnet replaces the gateway address instead of adding one.
    let moved = NetConfig {
        subnet: "192.168.140.0/24".parse::<Subnet>().expect("subnet"),
        ..net.cfg.clone()
    };
    network::ensure_base(&moved).expect("ensure_base with a new subnet");
    let addrs = net.exec(&["ip", "-4", "-o", "addr", "show", "dev", "brtest0"]);
    assert!(
        addrs.contains("192.168.140.1/24") && !addrs.contains("192.168.137.1"),
        "{addrs}"
    );

    let ns = net.cfg.netns.clone();
    drop(net);
    assert!(!network::netns_path(&ns).exists(), "namespace left behind");
}

#[tokio::test]
async fn sockets_are_created_inside_the_namespace() {
    let net = TestNet::new("sock");
    let sockets = NetnsSockets::new(&net.cfg.netns).expect("sockets");
    // Loopback of the namespace, not of the host.
    let listener = sockets
        .listen(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("read");
        s.write_all(&buf).await.expect("write");
    });
    let mut c = sockets
        .connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
        .await
        .expect("connect in netns");
    c.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    c.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"ping");
    server.await.expect("server");
    // The host's loopback does not see the namespace's listener.
    let host = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(
        host.is_err(),
        "port {port} of the namespace is reachable from the host namespace"
    );
}

#[tokio::test]
async fn qmp_controls_a_qemu_in_the_namespace() {
    let net = TestNet::new("qmp");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let tap = network::tap_name("qmp-test");
    let ip = Ipv4Addr::new(192, 168, 137, 20);
    network::add_tap(&net.cfg, &tap, ip, &network::guest_mac(ip)).expect("tap");
    let (qmp_path, pidfile) = (d.join("qmp.sock"), d.join("qemu.pid"));
    // microvm without a kernel: stays up and serves QMP, boots nothing.
    let argv: Vec<String> = [
        "-M",
        "microvm",
        "-accel",
        "tcg,tb-size=64",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-netdev",
        &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device",
        &format!("virtio-net-device,netdev=n0,mac={}", network::guest_mac(ip)),
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp_path.display()),
        "-pidfile",
        &pidfile.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let pid = process::launch("qemu-system-x86_64", &net.cfg.netns, &argv, &pidfile)
        .await
        .expect("launch");
    let guard = KillOnDrop(pid);
    assert!(process::is_our_qemu(pid, d));
    assert!(!process::is_our_qemu(pid, Path::new("/elsewhere")));
    let found = process::find_qemus_under(d.parent().expect("parent"));
    let name = d.file_name().expect("name").to_string_lossy().to_string();
    assert!(found.contains(&(pid, name)), "{found:?}");
    // Own session: it outlives its starter.
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32))).expect("sid");
    assert_ne!(sid, nix::unistd::getsid(None).expect("own sid"));
    // It runs in the test's namespace.
    let ns_of = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).expect("ns link");
    assert_ne!(ns_of(&pid.to_string()), ns_of("self"));

    let qmp = Qmp::connect_retry(&qmp_path, Duration::from_secs(5))
        .await
        .expect("qmp");
    assert_eq!(qmp.query_status().await.expect("status").status, "running");
    qmp.stop().await.expect("stop");
    assert_eq!(qmp.query_status().await.expect("status").status, "paused");
    qmp.cont().await.expect("cont");
    assert!(qmp.query_status().await.expect("status").running);
    let bad = qmp
        .execute(&NoSuchCommand)
        .await
        .expect_err("unknown command");
    assert!(bad.to_string().contains("no-such-command"), "{bad}");
    // A second client waits for the first: no greeting within the timeout.
    let second = tokio::time::timeout(Duration::from_millis(300), Qmp::connect(&qmp_path)).await;
    assert!(
        second.is_err() || second.as_ref().is_ok_and(|r| r.is_err()),
        "a second QMP client was served"
    );
    qmp.quit().await.expect("quit");
    assert!(
        process::wait_exit(pid, Duration::from_secs(5)).await,
        "QEMU still alive after quit"
    );
    // The reader notices the EOF right after the exit.
    for _ in 0..100 {
        if qmp.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(qmp.is_closed());
    assert!(matches!(
        qmp.query_status().await,
        Err(bhatti::engine::qemu::qmp::QmpError::Closed)
    ));
    drop(guard);
}

/// A command QEMU does not know, to see its refusal come back typed.
#[derive(serde::Serialize)]
struct NoSuchCommand;

impl bhatti::engine::qemu::qmp::Command for NoSuchCommand {
    const NAME: &'static str = "no-such-command";
    const HAS_ARGUMENTS: bool = false;
    type Returns = bhatti::engine::qemu::qmp::commands::Empty;
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if process::pid_alive(self.0) {
            process::kill(self.0);
        }
    }
}

/// Egress is never switched on here (no guest traffic may reach the host
/// namespace); its rules are only validated by `nft --check`, inside the
/// test's own namespace, which applies nothing.
#[test]
fn egress_rules_pass_nft_check() {
    let net = TestNet::new("egr");
    let with_egress = NetConfig {
        egress: true,
        ..net.cfg.clone()
    };
    let sandbox = network::SandboxNet {
        tap: "bt-0123456789ab".into(),
        ip: "192.168.137.7".parse().expect("ip"),
        mac: "02:b4:c0:a8:89:07".into(),
        policy: bhatti::egress::EgressPolicy::parse(
            bhatti::egress::Posture::Deny,
            &["api.example.com".into()],
            &["10.99.0.0/24".into()],
        )
        .expect("policy"),
        peers: vec!["192.168.137.8".parse().expect("ip")],
    };
    for script in [
        // The base ruleset, then one sandbox's part on top of it.
        network::ns_ruleset(&with_egress) + &network::install_sandbox_script(&sandbox),
        network::host_egress_ruleset(&net.cfg.netns),
    ] {
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &net.cfg.netns, "nft", "--check", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Checking applied nothing.
    assert!(!net.exec(&["nft", "list", "ruleset"]).contains("masquerade"));
}
