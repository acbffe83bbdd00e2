//! Sockets inside the daemon's network namespace, and the [`Dialer`] that
//! reaches guests with them.
//!
//! A socket belongs to the namespace of the thread that created it, for its
//! whole life. So one thread `setns`es into the namespace once and creates
//! sockets on request; the daemon then connects (or binds) them from tokio
//! like any other socket. The daemon's own threads never change namespace.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use tokio::sync::oneshot;

use crate::engine::agent_client::{AgentStream, Channel, DialFuture, Dialer};

/// How long a connect to a guest may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A socket request: its type and where the socket goes.
type Reply = (SockType, oneshot::Sender<io::Result<OwnedFd>>);

/// Creates TCP and UDP sockets inside one network namespace. Cheap to clone.
#[derive(Clone)]
pub struct NetnsSockets {
    netns: Arc<str>,
    requests: mpsc::Sender<Reply>,
}

impl std::fmt::Debug for NetnsSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetnsSockets")
            .field("netns", &self.netns)
            .finish()
    }
}

impl NetnsSockets {
    /// Starts the socket thread of the named namespace (`/run/netns/<netns>`).
    /// The thread ends when the last clone is dropped.
    pub fn new(netns: &str) -> io::Result<NetnsSockets> {
        let path = super::network::netns_path(netns);
        let ns_file = std::fs::File::open(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open network namespace {}: {e}", path.display()),
            )
        })?;
        let (tx, rx) = mpsc::channel::<Reply>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        std::thread::Builder::new()
            .name(format!("netns-{netns}"))
            .spawn(move || {
                // setns(CLONE_NEWNET) changes only this thread's namespace.
                if let Err(e) = nix::sched::setns(&ns_file, CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(io::Error::other(format!(
                        "setns into network namespace failed: {e}"
                    ))));
                    return;
                }
                drop(ns_file);
                let _ = ready_tx.send(Ok(()));
                while let Ok((kind, reply)) = rx.recv() {
                    let sock = socket(
                        AddressFamily::Inet,
                        kind,
                        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                        None,
                    )
                    .map_err(io::Error::from);
                    let _ = reply.send(sock);
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("network namespace socket thread died"))??;
        Ok(NetnsSockets {
            netns: netns.into(),
            requests: tx,
        })
    }

    /// Name of the namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    async fn socket(&self, kind: SockType) -> io::Result<OwnedFd> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((kind, tx))
            .map_err(|_| io::Error::other("network namespace socket thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("network namespace socket thread is gone"))?
    }

    /// A fresh, unconnected, non-blocking IPv4 TCP socket inside the namespace.
    pub async fn tcp_socket(&self) -> io::Result<tokio::net::TcpSocket> {
        let fd = self.socket(SockType::Stream).await?;
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(fd),
        ))
    }

    /// A UDP socket inside the namespace, bound to `addr` (port 0: any).
    pub async fn udp_bind(&self, addr: SocketAddrV4) -> io::Result<tokio::net::UdpSocket> {
        let fd = self.socket(SockType::Datagram).await?;
        let std_sock = std::net::UdpSocket::from(fd);
        nix::sys::socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&std_sock),
            &nix::sys::socket::SockaddrIn::from(addr),
        )?;
        tokio::net::UdpSocket::from_std(std_sock)
    }

    /// Connects to `addr` from inside the namespace, with [`CONNECT_TIMEOUT`].
    pub async fn connect(&self, addr: SocketAddrV4) -> io::Result<tokio::net::TcpStream> {
        let sock = self.tcp_socket().await?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(SocketAddr::V4(addr)))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out"),
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// A TCP listener bound inside the namespace (tests, in-namespace services).
    pub async fn listen(&self, addr: SocketAddrV4) -> io::Result<tokio::net::TcpListener> {
        let sock = self.tcp_socket().await?;
        sock.set_reuseaddr(true)?;
        sock.bind(SocketAddr::V4(addr))?;
        sock.listen(64)
    }
}

/// Keep-alive probes after this long without traffic on an agent connection.
const KEEPALIVE_IDLE_SECS: u32 = 3;
/// Between unanswered probes.
const KEEPALIVE_INTERVAL_SECS: u32 = 1;
/// Unanswered probes before the connection counts as dead.
const KEEPALIVE_PROBES: u32 = 3;
/// Sent data unacknowledged for this long also ends the connection.
const USER_TIMEOUT_MS: u32 = 8_000;

/// A guest whose QEMU died sends no RST: its TAP is simply gone, and a call
/// waiting on its agent would wait forever (measured: an exec of `sleep 100`
/// never answered after a guest kernel panic). Keep-alive probes and a user
/// timeout end such a connection with ETIMEDOUT after ~6 s of silence; a live
/// guest, even one busy under TCG, answers probes from its kernel.
fn set_dead_peer_deadlines(stream: &tokio::net::TcpStream) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let fd = std::os::fd::AsFd::as_fd(stream);
    setsockopt(&fd, sockopt::KeepAlive, &true)?;
    setsockopt(&fd, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_SECS)?;
    setsockopt(&fd, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_SECS)?;
    setsockopt(&fd, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    setsockopt(&fd, sockopt::TcpUserTimeout, &USER_TIMEOUT_MS)?;
    Ok(())
}

/// Reaches one guest's agent at `ip:1024` / `ip:1025` from inside the namespace.
#[derive(Debug, Clone)]
pub struct NetnsDialer {
    sockets: NetnsSockets,
    ip: Ipv4Addr,
}

impl NetnsDialer {
    pub fn new(sockets: NetnsSockets, ip: Ipv4Addr) -> NetnsDialer {
        NetnsDialer { sockets, ip }
    }
}

impl Dialer for NetnsDialer {
    fn dial(&self, channel: Channel) -> DialFuture {
        let port = match channel {
            Channel::Control => bhatti_proto::CONTROL_PORT,
            Channel::Forward => bhatti_proto::FORWARD_PORT,
        };
        let sockets = self.sockets.clone();
        let addr = SocketAddrV4::new(self.ip, port);
        Box::pin(async move {
            let stream = sockets.connect(addr).await?;
            set_dead_peer_deadlines(&stream)?;
            Ok(Box::new(stream) as Box<dyn AgentStream>)
        })
    }
}
