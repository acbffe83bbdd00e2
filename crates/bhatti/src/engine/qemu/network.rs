//! Host networking of the sandboxes, all inside the daemon's own network
//! namespace: a bridge holding the gateway address, one TAP per sandbox,
//! static neighbour entries and nftables rules. Egress (a veth pair into the
//! host namespace plus NAT) exists only when the config asks for it.
//!
//! Everything is done with the `ip` and `nft` commands and is idempotent:
//! calling a function twice leaves the same state as calling it once.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// Prefix of every sandbox TAP, so a sweep can tell ours from anything else.
pub const TAP_PREFIX: &str = "bt-";
/// Name of the egress veth end inside the namespace.
const NS_VETH: &str = "bhe0";
/// nftables table (inet and bridge families) inside the namespace.
const NS_TABLE: &str = "bhatti";
/// Packet mark of guest-to-guest traffic the bridge table allowed (see [`ns_ruleset`]).
const PEER_MARK: u32 = 0x6268_7031;

/// Errors of host network setup, naming the command that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A command ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// A command could not be started at all.
    #[error("cannot run `{cmd}`: {source} (is iproute2/nftables installed?)")]
    Spawn { cmd: String, source: std::io::Error },
    /// A name or address in the config is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

/// The sandbox subnet: one type for the config, the store and the engine.
pub use crate::config::Ipv4Subnet as Subnet;

/// The daemon's network: which namespace, bridge and subnet, and whether guests get egress.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub netns: String,
    pub bridge: String,
    pub subnet: Subnet,
    pub egress: bool,
    /// Namespace that plays "the host" for egress: the outer end of the
    /// egress veth and the NAT live there. `None`: the host's own namespace.
    /// Tests point it at a namespace of their own, so that no guest packet
    /// ever reaches the machine's real network.
    pub uplink_netns: Option<String>,
    /// Guests may query the daemon's resolver on the gateway, port 53.
    pub dns: bool,
}

impl NetConfig {
    /// Checks names before any of them reaches a command line.
    pub fn validate(&self) -> Result<(), NetworkError> {
        check_name(&self.netns, "netns", 64)?;
        check_name(&self.bridge, "bridge", 15)?;
        if let Some(up) = &self.uplink_netns {
            check_name(up, "uplink_netns", 64)?;
        }
        if self.bridge.starts_with(TAP_PREFIX) {
            return Err(NetworkError::Invalid(format!(
                "bridge name {:?} must not start with {TAP_PREFIX:?}",
                self.bridge
            )));
        }
        Ok(())
    }
}

fn check_name(name: &str, what: &str, max: usize) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Invalid(format!(
            "{what} name {name:?} must be 1-{max} characters of [A-Za-z0-9_.-]"
        )))
    }
}

fn short_hash(s: &str, bytes: usize) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..bytes])
}

/// The TAP of a sandbox: `bt-` + 12 hex digits of a hash of the id (15 characters).
pub fn tap_name(id: &str) -> String {
    format!("{TAP_PREFIX}{}", short_hash(id, 6))
}

/// The guest's MAC, derived from its address: locally administered `02:b4` + the 4 address bytes.
pub fn guest_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:b4:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// The bridge's fixed MAC, derived from the namespace name (locally administered).
pub fn bridge_mac(netns: &str) -> String {
    let h = Sha256::digest(netns.as_bytes());
    format!("02:b5:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3])
}

/// The namespace a restored copy's TAP lives in until the copy has taken
/// its own identity (it answers as its parent until then; see docs/forks.md).
pub fn quarantine_netns(cfg: &NetConfig, id: &str) -> String {
    format!("{}-q{}", cfg.netns, short_hash(id, 6))
}

/// Creates the quarantine namespace `qns` with the TAP `tap`, which plays
/// the gateway for a copy that still has its parent's address `parent_ip`
/// (and MAC `parent_mac`): the gateway address, the bridge's MAC (the copy's
/// neighbour cache holds it), a permanent entry for the copy.
pub fn quarantine_up(
    cfg: &NetConfig,
    qns: &str,
    tap: &str,
    parent_ip: Ipv4Addr,
    parent_mac: &str,
) -> Result<(), NetworkError> {
    check_name(qns, "netns", 64)?;
    if netns_path(qns).exists() {
        let _ = run("ip", &["netns", "delete", qns], None);
    }
    run("ip", &["netns", "add", qns], None)?;
    // One `ip` process for the lot: a restore waits for this.
    let gw = format!("{}/{}", cfg.subnet.gateway(), cfg.subnet.prefix());
    let script = format!(
        "link set lo up\n\
         tuntap add dev {tap} mode tap\n\
         link set {tap} address {mac}\n\
         addr add {gw} dev {tap}\n\
         link set {tap} up\n\
         neigh replace {parent_ip} lladdr {parent_mac} dev {tap} nud permanent\n",
        mac = bridge_mac(&cfg.netns),
    );
    ip_batch(qns, &script)
}

/// Moves the copy's TAP from its quarantine namespace onto the bridge, with
/// a MAC of its own and the permanent entry for the copy's new address.
pub fn quarantine_release(
    cfg: &NetConfig,
    qns: &str,
    tap: &str,
    ip: Ipv4Addr,
    mac: &str,
) -> Result<(), NetworkError> {
    ip_in(qns, &["link", "set", tap, "netns", &cfg.netns])?;
    let own = format!("02:b6:{}", {
        let h = short_hash(tap, 4);
        format!("{}:{}:{}:{}", &h[0..2], &h[2..4], &h[4..6], &h[6..8])
    });
    let script = format!(
        "link set {tap} address {own}\n\
         link set {tap} master {br}\n\
         link set {tap} up\n\
         neigh replace {ip} lladdr {mac} dev {br} nud permanent\n",
        br = cfg.bridge,
    );
    ip_batch(&cfg.netns, &script)?;
    // Nothing waits for the empty namespace to go (a sweep finds it if this fails).
    let q = qns.to_string();
    std::thread::spawn(move || quarantine_delete(&q));
    Ok(())
}

/// Runs `ip -batch` commands inside `netns`, stopping at the first failure.
fn ip_batch(netns: &str, script: &str) -> Result<(), NetworkError> {
    run("ip", &["-n", netns, "-batch", "-"], Some(script)).map(|_| ())
}

/// Deletes a quarantine namespace (and a TAP still in it); absent is fine.
pub fn quarantine_delete(qns: &str) {
    if netns_path(qns).exists() {
        let _ = run("ip", &["netns", "delete", qns], None);
    }
}

/// Quarantine namespaces of `netns` (leftovers after a crash mid-restore).
pub fn list_quarantines(cfg: &NetConfig) -> Vec<String> {
    let prefix = format!("{}-q", cfg.netns);
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix) && n.len() == prefix.len() + 12)
                .collect()
        })
        .unwrap_or_default()
}

/// Host-side end of the egress veth of a namespace.
fn host_veth_name(netns: &str) -> String {
    format!("bhv{}", short_hash(netns, 4))
}

/// Host table holding the egress NAT and filter rules of a namespace.
fn host_table_name(netns: &str) -> String {
    format!("bhatti_egress_{}", short_hash(netns, 4))
}

/// The /30 linking the namespace to the host for egress, picked from
/// 169.254.200.0-169.254.249.255 by a hash of the namespace name.
/// Returns (host end, namespace end).
fn egress_link(netns: &str) -> (Ipv4Addr, Ipv4Addr) {
    let h = Sha256::digest(netns.as_bytes());
    let third = 200 + h[0] % 50;
    let fourth = (h[1] % 64) * 4;
    (
        Ipv4Addr::new(169, 254, third, fourth + 1),
        Ipv4Addr::new(169, 254, third, fourth + 2),
    )
}

fn command_line(prog: &str, args: &[&str]) -> String {
    std::iter::once(prog)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command, returning its stdout, or an error with its stderr.
fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetworkError> {
    let cmd = command_line(prog, args);
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetworkError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| NetworkError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetworkError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetworkError::Command {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn ip_in(netns: &str, args: &[&str]) -> Result<String, NetworkError> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run("ip", &full, None)
}

fn nft_in(netns: &str, script: &str) -> Result<String, NetworkError> {
    run(
        "ip",
        &["netns", "exec", netns, "nft", "-f", "-"],
        Some(script),
    )
}

fn link_exists_in(netns: &str, dev: &str) -> bool {
    ip_in(netns, &["link", "show", "dev", dev]).is_ok()
}

/// Path of a named namespace's handle.
pub fn netns_path(netns: &str) -> std::path::PathBuf {
    Path::new("/run/netns").join(netns)
}

/// Creates the namespace unless it exists and works; brings up its loopback.
pub fn ensure_netns(netns: &str) -> Result<(), NetworkError> {
    check_name(netns, "netns", 64)?;
    if netns_path(netns).exists() {
        if ip_in(netns, &["link", "set", "lo", "up"]).is_ok() {
            return Ok(());
        }
        // A stale handle (e.g. not a mount any more): replace it.
        let _ = run("ip", &["netns", "delete", netns], None);
    }
    run("ip", &["netns", "add", netns], None)?;
    ip_in(netns, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Sets up (or repairs) the namespace, bridge, gateway address, firewall
/// and, only if enabled, egress. Safe to call at every daemon start.
pub fn ensure_base(cfg: &NetConfig) -> Result<(), NetworkError> {
    cfg.validate()?;
    ensure_netns(&cfg.netns)?;
    let br = cfg.bridge.as_str();
    if !link_exists_in(&cfg.netns, br) {
        ip_in(&cfg.netns, &["link", "add", br, "type", "bridge"])?;
    }
    let gw = format!("{}/{}", cfg.subnet.gateway(), cfg.subnet.prefix());
    ip_in(&cfg.netns, &["addr", "replace", &gw, "dev", br])?;
    // A changed subnet leaves the old gateway address behind: remove it.
    let addrs = ip_in(&cfg.netns, &["-4", "-o", "addr", "show", "dev", br])?;
    for stale in parse_inet_addrs(&addrs).into_iter().filter(|a| *a != gw) {
        ip_in(&cfg.netns, &["addr", "del", &stale, "dev", br])?;
    }
    // A fixed bridge MAC: otherwise it follows the lowest port MAC and
    // changes as TAPs come and go, and a guest restored from a snapshot
    // would hold a stale gateway entry. The quarantine TAP of a restored
    // copy also answers as this MAC (see [`quarantine_up`]).
    ip_in(
        &cfg.netns,
        &["link", "set", br, "address", &bridge_mac(&cfg.netns)],
    )?;
    ip_in(&cfg.netns, &["link", "set", br, "up"])?;
    nft_in(&cfg.netns, &ns_ruleset(cfg))?;
    if cfg.egress {
        ensure_egress(cfg)?;
    } else {
        remove_egress(&cfg.netns, cfg.uplink_netns.as_deref())?;
    }
    Ok(())
}

/// Whether the bridge of this config exists (a cheap check before each create).
pub fn base_present(cfg: &NetConfig) -> bool {
    netns_path(&cfg.netns).exists() && link_exists_in(&cfg.netns, &cfg.bridge)
}

/// The namespace's whole ruleset, replaced atomically in one `nft -f`.
///
/// Guest-to-guest frames are judged by the bridge table (source check,
/// peer pairs). Where `br_netfilter` is loaded, bridged IPv4 also passes the
/// inet forward hook, with the bridge as both devices: the bridge table
/// marks the pairs it let through ([`PEER_MARK`]) and the inet table lets
/// exactly those pass. Routed packets never cross the bridge's forward
/// hook, so a guest cannot reach another through the gateway.
///
/// Per-sandbox parts are added by [`install_sandbox`] into its sets and
/// map: until then (and after a failed install) a guest's frames do not
/// pass the bridge's source check and its packets match no egress verdict,
/// so everything it sends is dropped (fail closed).
pub fn ns_ruleset(cfg: &NetConfig) -> String {
    let br = &cfg.bridge;
    let gw = cfg.subnet.gateway();
    let never = crate::egress::NEVER
        .iter()
        .map(|n| n.to_string())
        .chain([cfg.subnet.to_string()])
        .collect::<Vec<_>>()
        .join(", ");
    let private = crate::egress::PRIVATE.join(", ");
    let (egress_fwd, egress_nat) = if cfg.egress {
        (
            format!(
                "    iifname \"{NS_VETH}\" oifname \"{br}\" ct state established,related accept\n\
                 \x20   iifname \"{br}\" oifname \"{NS_VETH}\" ip daddr @never drop\n\
                 \x20   iifname \"{br}\" oifname \"{NS_VETH}\" ip saddr vmap @egress\n"
            ),
            format!(
                "table ip {NS_TABLE}_nat {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{NS_VETH}\" ip saddr {} masquerade\n  }}\n}}\n",
                cfg.subnet
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let dns_in = if cfg.dns {
        format!(
            "    iifname \"{br}\" ip daddr {gw} udp dport 53 accept\n\
             \x20   iifname \"{br}\" ip daddr {gw} tcp dport 53 accept\n"
        )
    } else {
        String::new()
    };
    format!(
        "table inet {NS_TABLE} {{}}\ndelete table inet {NS_TABLE}\n\
         table ip {NS_TABLE}_nat {{}}\ndelete table ip {NS_TABLE}_nat\n\
         table bridge {NS_TABLE} {{}}\ndelete table bridge {NS_TABLE}\n\
         table inet {NS_TABLE} {{\n\
         \x20 set never {{ type ipv4_addr; flags interval; elements = {{ {never} }} }}\n\
         \x20 set private {{ type ipv4_addr; flags interval; elements = {{ {private} }} }}\n\
         \x20 map egress {{ type ipv4_addr : verdict; }}\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"{br}\" ct state established,related accept\n\
         {dns_in}\
         \x20   iifname \"{br}\" drop\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy drop;\n\
         \x20   iifname \"{br}\" oifname \"{br}\" meta mark {PEER_MARK:#x} accept\n\
         {egress_fwd}\
         \x20 }}\n\
         }}\n\
         {egress_nat}\
         table bridge {NS_TABLE} {{\n\
         \x20 set guest {{ type ifname . ether_addr . ipv4_addr; }}\n\
         \x20 set peers {{ type ipv4_addr . ipv4_addr; }}\n\
         \x20 chain prerouting {{\n\
         \x20   type filter hook prerouting priority filter; policy accept;\n\
         \x20   iifname != \"{TAP_PREFIX}*\" accept\n\
         \x20   ether type ip iifname . ether saddr . ip saddr @guest accept\n\
         \x20   ether type arp iifname . ether saddr . arp saddr ip @guest iifname . arp saddr ether . arp saddr ip @guest accept\n\
         \x20   counter drop\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         \x20   iifname \"{TAP_PREFIX}*\" oifname \"{TAP_PREFIX}*\" ip saddr . ip daddr @peers meta mark set {PEER_MARK:#x} accept\n\
         \x20   iifname \"{TAP_PREFIX}*\" oifname \"{TAP_PREFIX}*\" arp saddr ip . arp daddr ip @peers accept\n\
         \x20   iifname \"{TAP_PREFIX}*\" oifname \"{TAP_PREFIX}*\" drop\n\
         \x20 }}\n\
         }}\n"
    )
}

/// What the firewall needs to know of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNet {
    pub tap: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub policy: crate::egress::EgressPolicy,
    /// Guests this one may reach and be reached by (same owner, when the config allows it).
    pub peers: Vec<Ipv4Addr>,
}

/// Suffix naming a sandbox's nftables objects: the hash part of its TAP.
fn sandbox_tag(tap: &str) -> &str {
    tap.strip_prefix(TAP_PREFIX).unwrap_or(tap)
}

/// The name of the set the resolver fills for a sandbox (see [`add_resolved`]).
pub fn resolved_set(tap: &str) -> String {
    format!("d_{}", sandbox_tag(tap))
}

/// The `nft` script that gives one sandbox its source check, egress chain
/// (allowed networks, resolved names, private ranges dropped, then the
/// posture) and peer pairs. Assumes [`remove_sandbox_script`] ran first.
pub fn install_sandbox_script(sb: &SandboxNet) -> String {
    use crate::egress::Posture;
    let tag = sandbox_tag(&sb.tap);
    let (tap, ip, mac) = (&sb.tap, sb.ip, &sb.mac);
    let mut s = format!(
        "add set inet {NS_TABLE} c_{tag} {{ type ipv4_addr; flags interval; }}\n\
         add set inet {NS_TABLE} d_{tag} {{ type ipv4_addr; flags timeout; }}\n\
         add chain inet {NS_TABLE} s_{tag}\n"
    );
    if !sb.policy.allow_cidrs.is_empty() {
        let nets = sb
            .policy
            .allow_cidrs
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        s += &format!("add element inet {NS_TABLE} c_{tag} {{ {nets} }}\n");
    }
    s += &format!(
        "add rule inet {NS_TABLE} s_{tag} ip daddr @c_{tag} accept\n\
         add rule inet {NS_TABLE} s_{tag} ip daddr @d_{tag} accept\n\
         add rule inet {NS_TABLE} s_{tag} ip daddr @private drop\n"
    );
    s += &match sb.policy.mode {
        Posture::Public => format!("add rule inet {NS_TABLE} s_{tag} accept\n"),
        Posture::Deny => format!("add rule inet {NS_TABLE} s_{tag} drop\n"),
    };
    s += &format!(
        "add element inet {NS_TABLE} egress {{ {ip} : jump s_{tag} }}\n\
         add element bridge {NS_TABLE} guest {{ \"{tap}\" . {mac} . {ip} }}\n"
    );
    if !sb.peers.is_empty() {
        let pairs = sb
            .peers
            .iter()
            .flat_map(|p| [format!("{ip} . {p}"), format!("{p} . {ip}")])
            .collect::<Vec<_>>()
            .join(", ");
        s += &format!("add element bridge {NS_TABLE} peers {{ {pairs} }}\n");
    }
    s
}

/// The `nft` script removing what [`install_sandbox_script`] added (absent
/// objects are fine), except the egress map element: see [`remove_sandbox`].
fn remove_sandbox_script(sb: &SandboxNet) -> String {
    let tag = sandbox_tag(&sb.tap);
    let (tap, ip, mac) = (&sb.tap, sb.ip, &sb.mac);
    // `add` then `delete`: deleting what may not exist, in one transaction.
    let mut s = format!(
        "add element bridge {NS_TABLE} guest {{ \"{tap}\" . {mac} . {ip} }}\n\
         delete element bridge {NS_TABLE} guest {{ \"{tap}\" . {mac} . {ip} }}\n\
         add chain inet {NS_TABLE} s_{tag}\n\
         flush chain inet {NS_TABLE} s_{tag}\n\
         delete chain inet {NS_TABLE} s_{tag}\n\
         add set inet {NS_TABLE} c_{tag} {{ type ipv4_addr; flags interval; }}\n\
         delete set inet {NS_TABLE} c_{tag}\n\
         add set inet {NS_TABLE} d_{tag} {{ type ipv4_addr; flags timeout; }}\n\
         delete set inet {NS_TABLE} d_{tag}\n"
    );
    if !sb.peers.is_empty() {
        let pairs = sb
            .peers
            .iter()
            .flat_map(|p| [format!("{ip} . {p}"), format!("{p} . {ip}")])
            .collect::<Vec<_>>()
            .join(", ");
        s += &format!(
            "add element bridge {NS_TABLE} peers {{ {pairs} }}\n\
             delete element bridge {NS_TABLE} peers {{ {pairs} }}\n"
        );
    }
    s
}

/// Puts a sandbox's firewall in place, replacing an earlier one of the
/// same TAP or address. The guest's frames pass the bridge only once this
/// succeeded: call it before the VM starts, and fail the start if it fails.
pub fn install_sandbox(cfg: &NetConfig, sb: &SandboxNet) -> Result<(), NetworkError> {
    remove_sandbox(cfg, sb)?;
    nft_in(&cfg.netns, &install_sandbox_script(sb))?;
    Ok(())
}

/// Removes a sandbox's firewall (absent parts are fine).
pub fn remove_sandbox(cfg: &NetConfig, sb: &SandboxNet) -> Result<(), NetworkError> {
    if !netns_path(&cfg.netns).exists() {
        return Ok(());
    }
    // The map element goes first (it references the chain); by key, so a
    // stale element of an earlier sandbox with this address goes too.
    let _ = nft_in(
        &cfg.netns,
        &format!("delete element inet {NS_TABLE} egress {{ {} }}\n", sb.ip),
    );
    nft_in(&cfg.netns, &remove_sandbox_script(sb))?;
    Ok(())
}

/// Adds addresses the resolver answered for an allowed name to the
/// sandbox's set, each for `ttl_secs`.
pub fn add_resolved(
    cfg: &NetConfig,
    tap: &str,
    addrs: &[Ipv4Addr],
    ttl_secs: u32,
) -> Result<(), NetworkError> {
    if addrs.is_empty() {
        return Ok(());
    }
    let elems = addrs
        .iter()
        .map(|a| format!("{a} timeout {ttl_secs}s"))
        .collect::<Vec<_>>()
        .join(", ");
    // `add` keeps an element's old timeout; delete first so the TTL is renewed.
    let plain = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let set = resolved_set(tap);
    nft_in(
        &cfg.netns,
        &format!(
            "add element inet {NS_TABLE} {set} {{ {plain} }}\n\
             delete element inet {NS_TABLE} {set} {{ {plain} }}\n\
             add element inet {NS_TABLE} {set} {{ {elems} }}\n"
        ),
    )?;
    Ok(())
}

/// Runs `ip` in the uplink namespace (`None`: the host's own).
fn ip_up(uplink: Option<&str>, args: &[&str]) -> Result<String, NetworkError> {
    match uplink {
        Some(up) => ip_in(up, args),
        None => run("ip", args, None),
    }
}

/// Runs a command in the uplink namespace (`None`: the host's own).
fn run_up(
    uplink: Option<&str>,
    prog: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetworkError> {
    match uplink {
        Some(up) => {
            let mut full = vec!["netns", "exec", up, prog];
            full.extend_from_slice(args);
            run("ip", &full, stdin)
        }
        None => run(prog, args, stdin),
    }
}

/// Veth into the uplink (by default the host) namespace, routing and NAT on both sides.
fn ensure_egress(cfg: &NetConfig) -> Result<(), NetworkError> {
    let ns = cfg.netns.as_str();
    let up = cfg.uplink_netns.as_deref();
    if let Some(u) = up {
        if !netns_path(u).exists() {
            return Err(NetworkError::Invalid(format!(
                "uplink namespace {u:?} does not exist"
            )));
        }
    }
    let host_veth = host_veth_name(ns);
    let (host_ip, ns_ip) = egress_link(ns);
    if ip_up(up, &["link", "show", "dev", &host_veth]).is_err() {
        let _ = ip_in(ns, &["link", "del", NS_VETH]);
        ip_up(
            up,
            &[
                "link", "add", &host_veth, "type", "veth", "peer", "name", NS_VETH, "netns", ns,
            ],
        )?;
    }
    ip_up(
        up,
        &[
            "addr",
            "replace",
            &format!("{host_ip}/30"),
            "dev",
            &host_veth,
        ],
    )?;
    ip_up(up, &["link", "set", &host_veth, "up"])?;
    ip_in(
        ns,
        &["addr", "replace", &format!("{ns_ip}/30"), "dev", NS_VETH],
    )?;
    ip_in(ns, &["link", "set", NS_VETH, "up"])?;
    ip_in(
        ns,
        &["route", "replace", "default", "via", &host_ip.to_string()],
    )?;
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
        None,
    )?;
    run_up(up, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], None)?;
    run_up(up, "nft", &["-f", "-"], Some(&host_egress_ruleset(ns)))?;
    Ok(())
}

/// The host-namespace rules of a namespace's egress: NAT for its link
/// address, nothing from guests to host services or link-local addresses
/// (cloud metadata).
pub fn host_egress_ruleset(ns: &str) -> String {
    let host_veth = host_veth_name(ns);
    let (_, ns_ip) = egress_link(ns);
    let table = host_table_name(ns);
    format!(
        "table inet {table} {{}}\ndelete table inet {table}\n\
         table inet {table} {{\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter - 1; policy accept;\n\
         \x20   iifname \"{host_veth}\" ct state established,related accept\n\
         \x20   iifname \"{host_veth}\" drop\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter - 1; policy accept;\n\
         \x20   iifname \"{host_veth}\" ip daddr 169.254.0.0/16 drop\n\
         \x20   iifname \"{host_veth}\" accept\n\
         \x20   oifname \"{host_veth}\" ct state established,related accept\n\
         \x20 }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {ns_ip} oifname != \"{host_veth}\" masquerade\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Removes the egress veth and uplink rules of a namespace, if any
/// (`uplink`: where they live; `None`: the host's own namespace).
pub fn remove_egress(netns: &str, uplink: Option<&str>) -> Result<(), NetworkError> {
    if uplink.is_some_and(|u| !netns_path(u).exists()) {
        // The uplink namespace took its end of the veth and its rules with it.
        if netns_path(netns).exists() {
            let _ = ip_in(netns, &["link", "del", NS_VETH]);
        }
        return Ok(());
    }
    let host_veth = host_veth_name(netns);
    if ip_up(uplink, &["link", "show", "dev", &host_veth]).is_ok() {
        ip_up(uplink, &["link", "del", &host_veth])?;
    }
    let table = host_table_name(netns);
    if run_up(uplink, "nft", &["list", "table", "inet", &table], None).is_ok() {
        run_up(uplink, "nft", &["delete", "table", "inet", &table], None)?;
    }
    if netns_path(netns).exists() {
        let _ = ip_in(netns, &["route", "del", "default"]);
    }
    Ok(())
}

/// Creates the sandbox's TAP on the bridge and a permanent neighbour entry
/// for the guest, replacing stale leftovers of the same name.
pub fn add_tap(cfg: &NetConfig, tap: &str, ip: Ipv4Addr, mac: &str) -> Result<(), NetworkError> {
    let ns = cfg.netns.as_str();
    if link_exists_in(ns, tap) {
        ip_in(ns, &["link", "del", tap])?;
    }
    ip_in(ns, &["tuntap", "add", "dev", tap, "mode", "tap"])?;
    ip_in(ns, &["link", "set", tap, "master", &cfg.bridge])?;
    ip_in(ns, &["link", "set", tap, "up"])?;
    ensure_neighbour(cfg, ip, mac)
}

/// Makes sure the TAP exists on the bridge (it outlives QEMU, not a host
/// reboot) and the guest's neighbour entry is in place.
pub fn ensure_tap(cfg: &NetConfig, tap: &str, ip: Ipv4Addr, mac: &str) -> Result<(), NetworkError> {
    if link_exists_in(&cfg.netns, tap) {
        ensure_neighbour(cfg, ip, mac)
    } else {
        add_tap(cfg, tap, ip, mac)
    }
}

/// (Re-)adds the guest's permanent neighbour entry.
pub fn ensure_neighbour(cfg: &NetConfig, ip: Ipv4Addr, mac: &str) -> Result<(), NetworkError> {
    ip_in(
        &cfg.netns,
        &[
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            mac,
            "dev",
            &cfg.bridge,
            "nud",
            "permanent",
        ],
    )?;
    Ok(())
}

/// Removes a sandbox's TAP and neighbour entry; absent ones are fine.
pub fn remove_tap(cfg: &NetConfig, tap: &str, ip: Option<Ipv4Addr>) -> Result<(), NetworkError> {
    let ns = cfg.netns.as_str();
    if !netns_path(ns).exists() {
        return Ok(());
    }
    if let Some(ip) = ip {
        remove_neighbour(cfg, ip);
    }
    if link_exists_in(ns, tap) {
        ip_in(ns, &["link", "del", tap])?;
    }
    Ok(())
}

/// Removes the permanent neighbour entry of a guest address, if present.
pub fn remove_neighbour(cfg: &NetConfig, ip: Ipv4Addr) {
    if netns_path(&cfg.netns).exists() {
        let _ = ip_in(
            &cfg.netns,
            &["neigh", "del", &ip.to_string(), "dev", &cfg.bridge],
        );
    }
}

/// Names of all sandbox TAPs in the namespace.
pub fn list_taps(netns: &str) -> Result<Vec<String>, NetworkError> {
    if !netns_path(netns).exists() {
        return Ok(Vec::new());
    }
    let out = ip_in(netns, &["-o", "link", "show"])?;
    Ok(parse_link_names(&out)
        .into_iter()
        .filter(|n| n.starts_with(TAP_PREFIX))
        .collect())
}

/// Permanent neighbour entries on the bridge: (address, MAC).
pub fn list_neighbours(cfg: &NetConfig) -> Result<Vec<(Ipv4Addr, String)>, NetworkError> {
    if !netns_path(&cfg.netns).exists() {
        return Ok(Vec::new());
    }
    let out = ip_in(
        &cfg.netns,
        &[
            "-4",
            "neigh",
            "show",
            "dev",
            &cfg.bridge,
            "nud",
            "permanent",
        ],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let ip = it.next()?.parse().ok()?;
            let mac = it.skip_while(|w| *w != "lladdr").nth(1)?.to_string();
            Some((ip, mac))
        })
        .collect())
}

/// Parses `ip -4 -o addr show`: "5: br0    inet 192.168.137.1/24 brd ..." → "192.168.137.1/24".
fn parse_inet_addrs(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next().map(str::to_string)
        })
        .collect()
}

/// Parses `ip -o link show`: "3: name@peer: <...> ..." → "name".
fn parse_link_names(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            Some(name.split('@').next().unwrap_or(name).to_string())
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Deletes the namespace and everything in it, egress in the host
/// namespace included (tests, uninstall).
pub fn delete_all(netns: &str) -> Result<(), NetworkError> {
    remove_egress(netns, None)?;
    if netns_path(netns).exists() {
        run("ip", &["netns", "delete", netns], None)?;
    }
    Ok(())
}

/// Runs a command inside the namespace (diagnostics, tests).
pub fn exec_in(netns: &str, args: &[&str]) -> Result<String, NetworkError> {
    let mut full = vec!["netns", "exec", netns];
    full.extend_from_slice(args);
    run("ip", &full, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let t = tap_name("some-very-long-sandbox-identifier-1234");
        assert_eq!(t.len(), 15);
        assert!(t.starts_with(TAP_PREFIX));
        assert_eq!(t, tap_name("some-very-long-sandbox-identifier-1234"));
        assert_ne!(t, tap_name("some-very-long-sandbox-identifier-1235"));
        assert_eq!(
            guest_mac(Ipv4Addr::new(192, 168, 137, 5)),
            "02:b4:c0:a8:89:05"
        );
        assert!(host_veth_name("bhatti").len() <= 15);
        let (h, n) = egress_link("bhatti");
        assert_eq!(u32::from(n), u32::from(h) + 1);
        assert_eq!(u32::from(h) % 4, 1);
    }

    #[test]
    fn config_validation() {
        let subnet = "192.168.137.0/24".parse::<Subnet>().expect("parse");
        let ok = NetConfig {
            netns: "bhatti".into(),
            bridge: "brbhatti0".into(),
            subnet,
            egress: false,
            uplink_netns: None,
            dns: false,
        };
        assert!(ok.validate().is_ok());
        for (netns, bridge) in [
            ("bh atti", "br0"),
            ("bhatti", "a-bridge-name-too-long"),
            ("", "br0"),
            ("ok", "bt-x"),
            ("-x", "br0"),
            ("ok", "br;rm"),
        ] {
            let c = NetConfig {
                netns: netns.into(),
                bridge: bridge.into(),
                subnet,
                egress: false,
                uplink_netns: None,
                dns: false,
            };
            assert!(c.validate().is_err(), "{netns} {bridge}");
        }
    }

    #[test]
    fn addr_parsing() {
        let out = "5: br0    inet 192.168.137.1/24 scope global br0\\       valid_lft forever\n5: br0    inet 192.168.140.1/24 scope global br0\n";
        assert_eq!(
            parse_inet_addrs(out),
            vec!["192.168.137.1/24", "192.168.140.1/24"]
        );
    }

    #[test]
    fn link_name_parsing() {
        let out = "1: lo: <LOOPBACK,UP> mtu 65536\n2: brbhatti0: <BROADCAST> mtu 1500\n3: bt-0a1b2c3d4e5f: <BROADCAST> master brbhatti0\n4: bhe0@if9: <UP>\n";
        assert_eq!(
            parse_link_names(out),
            vec!["lo", "brbhatti0", "bt-0a1b2c3d4e5f", "bhe0"]
        );
    }

    #[test]
    fn ruleset_without_egress_has_no_nat() {
        let subnet = "192.168.137.0/24".parse::<Subnet>().expect("parse");
        let cfg = NetConfig {
            netns: "n".into(),
            bridge: "br0".into(),
            subnet,
            egress: false,
            uplink_netns: None,
            dns: false,
        };
        let r = ns_ruleset(&cfg);
        assert!(r.contains("iifname \"br0\" drop"));
        assert!(r.contains("iifname \"bt-*\" oifname \"bt-*\" drop"));
        assert!(!r.contains("masquerade"));
        let r = ns_ruleset(&NetConfig {
            egress: true,
            ..cfg
        });
        assert!(r.contains("masquerade"));
    }
}
