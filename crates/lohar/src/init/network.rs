//! Guest networking over rtnetlink: `lo` up, then `eth0` with the address,
//! prefix and default route from the boot config. No `ip` binary involved.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// The guest NIC (virtio-net; the kernel names the first one eth0).
pub const IFACE: &str = "eth0";
/// How long eth0 may take to appear after virtio_net loads.
const IFACE_WAIT: Duration = Duration::from_secs(5);

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_OIF: u16 = 4;
const IFLA_ADDRESS: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 0x1;

/// Parses "a.b.c.d/nn".
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("address {s:?} has no /prefix"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("address {s:?} is not IPv4"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("address {s:?} has a bad prefix"))?;
    Ok((addr, prefix))
}

/// Brings up `lo`, and `eth0` with `ip_cidr` and a default route via
/// `gateway` (if not empty). With an empty `ip_cidr` only `lo` is set up.
pub fn configure(ip_cidr: &str, gateway: &str) -> Result<(), String> {
    let nl = Netlink::open().map_err(|e| format!("netlink socket: {e}"))?;
    let lo = if_index("lo")?;
    nl.link_up(lo).map_err(|e| format!("lo up: {e}"))?;
    if ip_cidr.is_empty() {
        return Ok(());
    }
    let (addr, prefix) = parse_cidr(ip_cidr)?;
    let gw: Option<Ipv4Addr> = match gateway {
        "" => None,
        g => Some(
            g.parse()
                .map_err(|_| format!("gateway {g:?} is not IPv4"))?,
        ),
    };
    super::stage1::wait_for(&Path::new("/sys/class/net").join(IFACE), IFACE_WAIT).map_err(|w| {
        format!("{IFACE} did not appear within {w:?} (is a virtio-net-device attached?)")
    })?;
    let eth = if_index(IFACE)?;
    nl.add_addr(eth, addr, prefix)
        .map_err(|e| format!("{IFACE} address {ip_cidr}: {e}"))?;
    remember(addr, prefix);
    nl.link_up(eth).map_err(|e| format!("{IFACE} up: {e}"))?;
    if let Some(gw) = gw {
        nl.add_default_route(eth, gw)
            .map_err(|e| format!("default route via {gw}: {e}"))?;
    }
    Ok(())
}

/// eth0's current address (set at boot, replaced by [`readdress`]).
static CURRENT: std::sync::Mutex<Option<(Ipv4Addr, u8)>> = std::sync::Mutex::new(None);

fn remember(addr: Ipv4Addr, prefix: u8) {
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = Some((addr, prefix));
}

/// Parses "52:54:00:aa:bb:cc".
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("MAC {s:?} must have six octets"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("MAC {s:?} is not hex octets"))?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!("MAC {s:?} is a multicast address"));
    }
    Ok(mac)
}

/// Gives eth0 a new MAC, address and default route (a restored copy taking
/// its own identity). Taking the link down drops the parent's neighbour
/// entries and routes with it.
pub fn readdress(ip_cidr: &str, gateway: &str, mac: &str) -> Result<(), String> {
    let (addr, prefix) = parse_cidr(ip_cidr)?;
    let gw: Ipv4Addr = gateway
        .parse()
        .map_err(|_| format!("gateway {gateway:?} is not IPv4"))?;
    let mac = parse_mac(mac)?;
    let nl = Netlink::open().map_err(|e| format!("netlink socket: {e}"))?;
    let eth = if_index(IFACE)?;
    nl.set_link(eth, false, None)
        .map_err(|e| format!("{IFACE} down: {e}"))?;
    nl.set_link(eth, false, Some(mac))
        .map_err(|e| format!("{IFACE} MAC: {e}"))?;
    let old = *CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((a, p)) = old.filter(|o| *o != (addr, prefix)) {
        nl.addr(RTM_DELADDR, eth, a, p)
            .map_err(|e| format!("{IFACE} remove {a}/{p}: {e}"))?;
    }
    nl.add_addr(eth, addr, prefix)
        .map_err(|e| format!("{IFACE} address {ip_cidr}: {e}"))?;
    remember(addr, prefix);
    nl.set_link(eth, true, None)
        .map_err(|e| format!("{IFACE} up: {e}"))?;
    nl.add_default_route(eth, gw)
        .map_err(|e| format!("default route via {gw}: {e}"))
}

fn if_index(name: &str) -> Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("bad interface name {name:?}"))?;
    // SAFETY: if_nametoindex reads a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(format!("interface {name}: {}", io::Error::last_os_error())),
        i => Ok(i),
    }
}

/// A NETLINK_ROUTE socket that sends one request at a time and waits for its ack.
struct Netlink {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

/// A netlink message under construction: header, fixed part, attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32) -> Msg {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        Msg(b)
    }

    fn bytes(mut self, b: &[u8]) -> Msg {
        self.0.extend_from_slice(b);
        self
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Msg {
        let len = u16::try_from(4 + data.len()).expect("attributes here are a few bytes");
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len()).expect("messages here are small");
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink {
            fd,
            seq: std::cell::Cell::new(1),
        })
    }

    fn next_seq(&self) -> u32 {
        let s = self.seq.get();
        self.seq.set(s.wrapping_add(1));
        s
    }

    /// Sends `msg` and returns the kernel's verdict from the ack.
    fn request(&self, msg: Vec<u8>, seq: u32) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl is valid; we set the family.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msg and kernel are valid for the given lengths during the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: buf is writable for its full length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            let mut off = 0;
            while off + 16 <= n {
                let word = |at: usize| {
                    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
                };
                let len = word(off) as usize;
                let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let rseq = word(off + 8);
                if len < 16 || off + len > n {
                    return Err(io::Error::other("malformed netlink reply"));
                }
                if kind == NLMSG_ERROR && rseq == seq && len >= 20 {
                    let code = i32::from_ne_bytes([
                        buf[off + 16],
                        buf[off + 17],
                        buf[off + 18],
                        buf[off + 19],
                    ]);
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                off += (len + 3) & !3;
            }
        }
    }

    fn link_up(&self, index: u32) -> io::Result<()> {
        let seq = self.next_seq();
        // struct ifinfomsg: family, pad, type, index, flags, change.
        let mut body = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&IFF_UP.to_ne_bytes());
        body.extend_from_slice(&IFF_UP.to_ne_bytes());
        self.request(Msg::new(RTM_NEWLINK, 0, seq).bytes(&body).finish(), seq)
    }

    /// Sets eth0 up or down, and its MAC when given.
    fn set_link(&self, index: u32, up: bool, mac: Option<[u8; 6]>) -> io::Result<()> {
        let seq = self.next_seq();
        let mut body = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&(if up { IFF_UP } else { 0 }).to_ne_bytes());
        body.extend_from_slice(&IFF_UP.to_ne_bytes());
        let mut msg = Msg::new(RTM_NEWLINK, 0, seq).bytes(&body);
        if let Some(mac) = mac {
            msg = msg.attr(IFLA_ADDRESS, &mac);
        }
        self.request(msg.finish(), seq)
    }

    fn add_addr(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        self.addr(RTM_NEWADDR, index, addr, prefix)
    }

    fn addr(&self, kind: u16, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let seq = self.next_seq();
        // struct ifaddrmsg: family, prefixlen, flags, scope, index.
        let mut body = vec![libc::AF_INET as u8, prefix, 0, RT_SCOPE_UNIVERSE];
        body.extend_from_slice(&index.to_ne_bytes());
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        let broadcast = Ipv4Addr::from(u32::from(addr) | !mask);
        let flags = if kind == RTM_NEWADDR {
            NLM_F_CREATE | NLM_F_REPLACE
        } else {
            0
        };
        let msg = Msg::new(kind, flags, seq)
            .bytes(&body)
            .attr(IFA_LOCAL, &addr.octets())
            .attr(IFA_ADDRESS, &addr.octets())
            .attr(IFA_BROADCAST, &broadcast.octets());
        self.request(msg.finish(), seq)
    }

    fn add_default_route(&self, index: u32, gw: Ipv4Addr) -> io::Result<()> {
        let seq = self.next_seq();
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let mut body = vec![
            libc::AF_INET as u8,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ];
        body.extend_from_slice(&0u32.to_ne_bytes());
        let msg = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq)
            .bytes(&body)
            .attr(RTA_GATEWAY, &gw.octets())
            .attr(RTA_OIF, &index.to_ne_bytes());
        self.request(msg.finish(), seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:0a:00:07"),
            Ok([0x52, 0x54, 0, 0x0a, 0, 7])
        );
        for bad in [
            "52:54:00:0a:00",
            "52:54:00:0a:00:7",
            "53:54:00:0a:00:07",
            "zz:54:00:0a:00:07",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr() {
        assert_eq!(
            parse_cidr("192.168.137.5/24"),
            Ok((Ipv4Addr::new(192, 168, 137, 5), 24))
        );
        assert!(parse_cidr("192.168.137.5").is_err());
        assert!(parse_cidr("192.168.137.5/33").is_err());
        assert!(parse_cidr("::1/64").is_err());
    }

    #[test]
    fn message_layout() {
        let m = Msg::new(RTM_NEWADDR, 0, 7)
            .bytes(&[1, 2, 3, 4, 5, 6, 7, 8])
            .attr(IFA_LOCAL, &[10, 0, 0, 1])
            .finish();
        assert_eq!(m.len(), 16 + 8 + 8);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 32);
        assert_eq!(u16::from_ne_bytes([m[24], m[25]]), 8);
        assert_eq!(&m[28..32], &[10, 0, 0, 1]);
    }

    #[test]
    fn loopback_up_is_accepted_or_refused_cleanly() {
        // Unprivileged test runs get EPERM; as root lo is already up. Either
        // way the ack is parsed rather than hanging or misreading.
        let nl = Netlink::open().expect("netlink socket");
        let lo = if_index("lo").expect("lo exists");
        match nl.link_up(lo) {
            Ok(()) => {}
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }
}
