//! `subnet:`: the sandbox network and its address plan.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// An IPv4 network such as `192.168.137.0/24`.
///
/// The first host address (`.1`) is the bridge/gateway; guests get the
/// addresses from the second host address up to the one before broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Subnet {
    /// Builds a subnet; `network` must have no host bits set and the prefix
    /// must leave room for the gateway and at least one guest (`/8`..=`/30`).
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if !(8..=30).contains(&prefix) {
            return Err(format!(
                "prefix /{prefix} is out of range (use /8 to /30, e.g. 192.168.137.0/24)"
            ));
        }
        let mask = Self::mask_of(prefix);
        let net = u32::from(network);
        if net & !mask != 0 {
            let fixed = Ipv4Addr::from(net & mask);
            return Err(format!(
                "{network}/{prefix} has host bits set; did you mean {fixed}/{prefix}?"
            ));
        }
        Ok(Self { network, prefix })
    }

    fn mask_of(prefix: u8) -> u32 {
        u32::MAX << (32 - u32::from(prefix))
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The same network as an [`ipnet::Ipv4Net`].
    pub fn net(&self) -> ipnet::Ipv4Net {
        // A prefix of 8..=30 is always valid.
        ipnet::Ipv4Net::new(self.network, self.prefix).unwrap_or_default()
    }

    /// The netmask, e.g. 255.255.255.0.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask_of(self.prefix))
    }

    /// The bridge's address: the first host address (`192.168.137.1`).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask_of(self.prefix))
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == u32::from(self.network)
    }

    /// Whether `ip` may be given to a guest (inside, and not the network,
    /// gateway or broadcast address).
    pub fn is_guest_addr(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.gateway() && ip != self.broadcast()
    }

    /// Addresses that may be given to guests, lowest first (excludes the
    /// network, gateway and broadcast addresses).
    pub fn guest_hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }
}

/// `192.168.137.0/24`.
impl Default for Ipv4Subnet {
    fn default() -> Self {
        Self {
            network: Ipv4Addr::new(192, 168, 137, 0),
            prefix: 24,
        }
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR network like 192.168.137.0/24"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        Self::new(addr, prefix)
    }
}

impl<'de> Deserialize<'de> for Ipv4Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Ipv4Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DaemonConfig;

    #[test]
    fn subnet_math() {
        let s: Ipv4Subnet = "10.1.2.0/30".parse().expect("subnet");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(
            s.guest_hosts().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 1, 2, 2)]
        );
        assert!(s.contains(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!s.contains(Ipv4Addr::new(10, 1, 2, 4)));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        let d = DaemonConfig::default().subnet;
        assert_eq!(d.guest_hosts().count(), 253);
    }
}
