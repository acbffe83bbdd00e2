//! `GET /sandboxes/:id/ports`: listening TCP sockets, read from the guest's
//! `/proc/net/tcp{,6}`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use bhatti_proto::ExecRequest;

use super::{Result, Service, ServiceError};
use crate::model::ListeningPort;
use crate::store::User;

/// The agent's own listeners (control and forward), never shown.
const AGENT_PORTS: [u16; 2] = [1024, 1025];

/// `st` of a listening socket in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

impl Service {
    pub async fn listening_ports(&self, user: &User, id: &str) -> Result<Vec<ListeningPort>> {
        let agent = self.agent(user, id).await?;
        let out = agent
            .exec_buffered(ExecRequest::command([
                "cat",
                "/proc/net/tcp",
                "/proc/net/tcp6",
            ]))
            .await?;
        // /proc/net/tcp6 is missing when IPv6 is off: cat fails but prints the rest.
        if out.stdout.is_empty() && out.exit_code != 0 {
            return Err(ServiceError::Unavailable(format!(
                "cannot read the sandbox's sockets: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(parse_proc_net_tcp(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// Listening sockets of `/proc/net/tcp` and `/proc/net/tcp6` text, by port,
/// without the agent's.
pub fn parse_proc_net_tcp(text: &str) -> Vec<ListeningPort> {
    let mut seen = BTreeSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st ...
        if f.len() < 4 || f[3] != TCP_LISTEN {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        if AGENT_PORTS.contains(&port) {
            continue;
        }
        if let Some(address) = parse_addr(addr) {
            seen.insert((port, address));
        }
    }
    seen.into_iter()
        .map(|(port, address)| ListeningPort {
            port,
            address,
            container_port: port,
            proxy_url: None,
        })
        .collect()
}

/// The kernel prints each 32-bit word of the address in host (little-endian) order.
fn parse_addr(hex: &str) -> Option<String> {
    let words: Option<Vec<[u8; 4]>> = (0..hex.len() / 8)
        .map(|i| {
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()
                .map(u32::to_le_bytes)
        })
        .collect();
    let words = words?;
    match (hex.len(), words.as_slice()) {
        (8, [w]) => Some(Ipv4Addr::from(*w).to_string()),
        (32, [a, b, c, d]) => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w[..]);
            }
            let v6 = Ipv6Addr::from(bytes);
            Some(match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => v6.to_string(),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0400 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:0401 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 3 1 0000000000000000 100 0 0 10 0
   3: 0189A8C0:0400 0289A8C0:C350 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 20 4 30 10 -1
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1388 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 6 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 7 1 0000000000000000 100 0 0 10 0
";
        let got: Vec<(u16, String)> = parse_proc_net_tcp(text)
            .into_iter()
            .map(|p| (p.port, p.address))
            .collect();
        assert_eq!(
            got,
            [
                (3000, "::".to_string()),
                (5000, "::1".to_string()),
                (8080, "127.0.0.1".to_string()),
                (9000, "127.0.0.1".to_string()),
            ]
        );
    }
}
