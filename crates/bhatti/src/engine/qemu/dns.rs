//! The guests' resolver: a small DNS forwarder on the gateway (UDP port 53,
//! inside the daemon's namespace) that enforces each sandbox's egress
//! policy on names.
//!
//! A query from a guest whose posture is `deny` is answered only for names
//! of its `allow_hosts` (others get REFUSED, so names cannot carry data out
//! either); the IPv4 addresses of an allowed name's answer are put into the
//! sandbox's nftables set for their TTL (at least [`MIN_ALLOW_SECS`])
//! *before* the answer goes back, so the guest's next connect passes. A
//! `public` guest's queries are all forwarded. Queries from an address that
//! is no known sandbox are refused.
//!
//! Upstream servers are queried from the uplink namespace (the host's own
//! by default), each query from a fresh socket with a random port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::firewall::Firewall;
use super::netns_dialer::NetnsSockets;
use super::network;

/// An allowed name's addresses stay open at least this long, seconds.
pub const MIN_ALLOW_SECS: u32 = 60;
/// And at most this long, seconds (the guest asks again after its TTL).
pub const MAX_ALLOW_SECS: u32 = 3600;
/// How long one upstream server gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Queries handled at once; beyond it new ones are dropped (the guest retries).
const MAX_IN_FLIGHT: usize = 128;
/// Largest DNS message over UDP that we accept or relay, bytes.
const MAX_UDP: usize = 4096;

/// Where upstream sockets come from.
#[derive(Clone)]
enum Uplink {
    Host,
    Netns(NetnsSockets),
}

impl Uplink {
    async fn socket(&self) -> std::io::Result<UdpSocket> {
        match self {
            Uplink::Host => UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await,
            Uplink::Netns(s) => {
                s.udp_bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
                    .await
            }
        }
    }
}

/// The running resolver; stops when dropped.
pub struct Resolver {
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The name servers of `/etc/resolv.conf` (port 53), or 1.1.1.1 if none.
pub fn host_nameservers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let found: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if found.is_empty() {
        vec![SocketAddr::from(([1, 1, 1, 1], 53))]
    } else {
        found
    }
}

impl Resolver {
    /// Binds `gateway:53` (UDP) inside the daemon's namespace and serves
    /// guests' queries, forwarding to `upstream` (empty: the host's name
    /// servers) from `uplink_netns` (`None`: the host's namespace).
    ///
    /// Errors: the socket cannot be made or bound.
    pub async fn start(
        sockets: &NetnsSockets,
        gateway: Ipv4Addr,
        upstream: &[SocketAddr],
        uplink_netns: Option<&str>,
        firewall: Arc<Firewall>,
    ) -> std::io::Result<Resolver> {
        let sock = Arc::new(sockets.udp_bind(SocketAddrV4::new(gateway, 53)).await?);
        let uplink = match uplink_netns {
            Some(ns) => {
                let ns = ns.to_string();
                Uplink::Netns(
                    tokio::task::spawn_blocking(move || NetnsSockets::new(&ns))
                        .await
                        .map_err(std::io::Error::other)??,
                )
            }
            None => Uplink::Host,
        };
        let upstream: Arc<[SocketAddr]> = if upstream.is_empty() {
            host_nameservers().into()
        } else {
            upstream.into()
        };
        tracing::info!(%gateway, ?upstream, "guests' resolver listening on port 53");
        let task = tokio::spawn(serve(sock, uplink, upstream, firewall));
        Ok(Resolver { task })
    }
}

async fn serve(
    sock: Arc<UdpSocket>,
    uplink: Uplink,
    upstream: Arc<[SocketAddr]>,
    firewall: Arc<Firewall>,
) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "resolver: receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, uplink, upstream, firewall) = (
            sock.clone(),
            uplink.clone(),
            upstream.clone(),
            firewall.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(answer) = handle(&query, *from.ip(), &uplink, &upstream, &firewall).await {
                let _ = sock.send_to(&answer, SocketAddr::V4(from)).await;
            }
        });
    }
}

/// What to do with one guest query.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Refuse,
    /// Forward; `true`: open the answer's addresses for the sandbox (on its TAP).
    Forward {
        open_on: Option<String>,
    },
}

fn decide(firewall: &Firewall, guest: Ipv4Addr, name: &str) -> Verdict {
    let Some((tap, policy)) = firewall.lookup(guest) else {
        return Verdict::Refuse;
    };
    if policy.allows_name(name) {
        Verdict::Forward { open_on: Some(tap) }
    } else if policy.mode == crate::egress::Posture::Public {
        Verdict::Forward { open_on: None }
    } else {
        Verdict::Refuse
    }
}

/// Answers one query (`None`: not a query worth an answer).
async fn handle(
    query: &[u8],
    guest: Ipv4Addr,
    uplink: &Uplink,
    upstream: &[SocketAddr],
    firewall: &Firewall,
) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    if msg.metadata.message_type != hickory_proto::op::MessageType::Query {
        return None;
    }
    let refuse = |code| {
        let mut r = Message::error_msg(msg.metadata.id, msg.metadata.op_code, code);
        r.queries = msg.queries.clone();
        r.to_vec().ok()
    };
    let [q] = msg.queries.as_slice() else {
        return refuse(ResponseCode::FormErr);
    };
    let name = q.name.to_ascii();
    let open_on = match decide(firewall, guest, &name) {
        Verdict::Refuse => {
            tracing::debug!(%guest, name, "resolver: refused");
            return refuse(ResponseCode::Refused);
        }
        Verdict::Forward { open_on } => open_on,
    };
    let answer = match forward(query, msg.metadata.id, uplink, upstream).await {
        Some(a) => a,
        None => return refuse(ResponseCode::ServFail),
    };
    if let Some(tap) = open_on {
        let Ok(parsed) = Message::from_vec(&answer) else {
            return refuse(ResponseCode::ServFail);
        };
        let mut addrs = Vec::new();
        let mut ttl = MAX_ALLOW_SECS;
        for r in &parsed.answers {
            if let RData::A(a) = &r.data {
                addrs.push(a.0);
                ttl = ttl.min(r.ttl);
            }
        }
        let ttl = ttl.clamp(MIN_ALLOW_SECS, MAX_ALLOW_SECS);
        let net = firewall.net().clone();
        let opened =
            tokio::task::spawn_blocking(move || network::add_resolved(&net, &tap, &addrs, ttl))
                .await;
        match opened {
            Ok(Ok(())) => {}
            // Unopened addresses would only time out: tell the guest now.
            Ok(Err(e)) => {
                tracing::warn!(%guest, name, error = %e, "resolver: cannot open the answer's addresses");
                return refuse(ResponseCode::ServFail);
            }
            Err(_) => return refuse(ResponseCode::ServFail),
        }
    }
    Some(answer)
}

/// Asks the upstream servers in turn; the first answer with the query's id wins.
async fn forward(
    query: &[u8],
    id: u16,
    uplink: &Uplink,
    upstream: &[SocketAddr],
) -> Option<Vec<u8>> {
    for server in upstream {
        let Ok(sock) = uplink.socket().await else {
            continue;
        };
        if sock.connect(server).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; MAX_UDP];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}
