//! Egress policy of a sandbox: where its guest may open connections.
//!
//! Two postures. `public`: any public IPv4 address. `deny`: nothing. In
//! both, `allow_cidrs` and the addresses that the daemon's own resolver
//! returned for `allow_hosts` names are reachable too, private ranges
//! included. Whatever the policy, the host, link-local addresses (cloud
//! metadata), loopback, multicast and the daemon's own addresses stay
//! unreachable; private ranges (RFC 1918, CGNAT) only through an explicit
//! allowance. The engine enforces it with nftables (see
//! `engine::qemu::network`) and its resolver (`engine::qemu::dns`).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// At most this many `allow_hosts` and `allow_cidrs` each.
pub const MAX_ALLOWANCES: usize = 64;

/// Destinations no policy opens: "this network", loopback, link-local
/// (169.254/16, cloud metadata included), multicast and the reserved 240/4.
pub const NEVER: &[&str] = &["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3"];

/// Private ranges, reachable only when a policy allows them: RFC 1918,
/// CGNAT (RFC 6598) and the IETF protocol assignments (192.0.0.0/24).
pub const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
];

/// The two postures of a sandbox's egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Posture {
    /// Every public address (private ones only when allowed).
    #[default]
    Public,
    /// Only what `allow_hosts` and `allow_cidrs` name.
    Deny,
}

impl Posture {
    pub fn as_str(self) -> &'static str {
        match self {
            Posture::Public => "public",
            Posture::Deny => "deny",
        }
    }
}

impl std::str::FromStr for Posture {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "public" => Ok(Posture::Public),
            "deny" => Ok(Posture::Deny),
            other => Err(format!("{other:?} is not an egress posture (public, deny)")),
        }
    }
}

/// A sandbox's whole egress policy, as stored and as the engine enforces it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct EgressPolicy {
    pub mode: Posture,
    /// Names (`api.example.com`) or suffix patterns (`*.example.com`: any
    /// name under example.com, not example.com itself), lowercase.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// IPv4 networks, e.g. `10.99.0.0/24` or `203.0.113.7/32`.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub allow_cidrs: Vec<Ipv4Net>,
}

/// Why a policy is not acceptable; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field `{field}`: {message}")]
pub struct PolicyError {
    pub field: &'static str,
    pub message: String,
}

impl PolicyError {
    /// The daemon config key of the field (`egress_allow_hosts`, ...).
    pub fn field_key(&self) -> &'static str {
        match self.field {
            "allow_hosts" => "egress_allow_hosts",
            "allow_cidrs" => "egress_allow_cidrs",
            _ => "egress_default",
        }
    }
}

fn bad(field: &'static str, message: String) -> PolicyError {
    PolicyError { field, message }
}

impl EgressPolicy {
    /// Builds a policy from user input: hosts are checked and lowercased,
    /// CIDRs parsed (a host address alone means /32) and checked against
    /// [`NEVER`].
    ///
    /// Errors: [`PolicyError`] naming `allow_hosts` or `allow_cidrs`.
    pub fn parse(
        mode: Posture,
        hosts: &[String],
        cidrs: &[String],
    ) -> Result<EgressPolicy, PolicyError> {
        if hosts.len() > MAX_ALLOWANCES {
            return Err(bad(
                "allow_hosts",
                format!("at most {MAX_ALLOWANCES} entries"),
            ));
        }
        if cidrs.len() > MAX_ALLOWANCES {
            return Err(bad(
                "allow_cidrs",
                format!("at most {MAX_ALLOWANCES} entries"),
            ));
        }
        let mut allow_hosts = Vec::new();
        for h in hosts {
            let h = check_host_pattern(h).map_err(|m| bad("allow_hosts", m))?;
            if !allow_hosts.contains(&h) {
                allow_hosts.push(h);
            }
        }
        let mut allow_cidrs = Vec::new();
        for c in cidrs {
            let net = parse_cidr(c).map_err(|m| bad("allow_cidrs", m))?;
            if !allow_cidrs.contains(&net) {
                allow_cidrs.push(net);
            }
        }
        Ok(EgressPolicy {
            mode,
            allow_hosts,
            allow_cidrs,
        })
    }

    /// Refuses `allow_cidrs` entries that overlap the daemon's sandbox
    /// subnet (its gateway, the subnet, a part of it or a network around
    /// it): the firewall never opens the gateway or other guests through
    /// an allowance, so such an entry would be accepted and never work.
    ///
    /// Errors: [`PolicyError`] naming `allow_cidrs`.
    pub fn check_subnet(&self, subnet: Ipv4Net) -> Result<(), PolicyError> {
        for net in &self.allow_cidrs {
            if net.contains(&subnet.network()) || subnet.contains(&net.network()) {
                return Err(bad(
                    "allow_cidrs",
                    format!(
                        "{net} overlaps the sandbox network {subnet} (its gateway {} is the daemon; other sandboxes are reached only as peers), which no allowance opens",
                        subnet.hosts().next().unwrap_or(subnet.network())
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether a DNS name (any case, trailing dot or not) is one of `allow_hosts`.
    pub fn allows_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.allow_hosts.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => name
                .strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => *p == name,
        })
    }
}

/// Checks a host pattern: a DNS name, or `*.` followed by one; lowercased.
pub fn check_host_pattern(h: &str) -> Result<String, String> {
    let lower = h.trim().trim_end_matches('.').to_ascii_lowercase();
    let name = lower.strip_prefix("*.").unwrap_or(&lower);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !ok {
        return Err(format!(
            "{h:?} is not a host name or a `*.suffix` pattern (e.g. api.example.com, *.example.com)"
        ));
    }
    if name.parse::<Ipv4Addr>().is_ok() {
        return Err(format!("{h:?} is an address: put it in allow_cidrs"));
    }
    Ok(lower)
}

/// Parses an IPv4 CIDR (`10.0.0.0/8`) or a single address (as /32), and
/// refuses networks inside [`NEVER`] ranges (those inside a wider allowed
/// network stay closed all the same). Host bits are cleared.
pub fn parse_cidr(c: &str) -> Result<Ipv4Net, String> {
    let c = c.trim();
    let net = match c.parse::<Ipv4Net>() {
        Ok(n) => n.trunc(),
        Err(_) => match c.parse::<Ipv4Addr>() {
            Ok(a) => Ipv4Net::from(a),
            Err(_) => {
                return Err(format!(
                    "{c:?} is not an IPv4 network like 10.1.0.0/16 or an IPv4 address"
                ))
            }
        },
    };
    for never in NEVER {
        let never: Ipv4Net = never
            .parse()
            .map_err(|_| "bad built-in range".to_string())?;
        // A wider network is fine: the never-ranges inside it stay closed.
        if never.contains(&net) {
            return Err(format!(
                "{c} is inside {never}, which is never reachable from a sandbox"
            ));
        }
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn hosts() {
        let p = EgressPolicy::parse(Posture::Deny, &s(&["API.example.com.", "*.pkg.dev"]), &[])
            .expect("valid");
        assert_eq!(p.allow_hosts, vec!["api.example.com", "*.pkg.dev"]);
        assert!(p.allows_name("api.example.com"));
        assert!(p.allows_name("API.Example.com."));
        assert!(!p.allows_name("x.api.example.com"));
        assert!(!p.allows_name("example.com"));
        assert!(p.allows_name("a.pkg.dev"));
        assert!(p.allows_name("a.b.pkg.dev"));
        assert!(!p.allows_name("pkg.dev"));
        assert!(!p.allows_name("evilpkg.dev"));
        for bad in [
            "", "*", "*.", "a..b", "-a.com", "a b.com", "1.2.3.4", "a.*.com", "x/y",
        ] {
            assert!(
                EgressPolicy::parse(Posture::Deny, &s(&[bad]), &[]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cidrs() {
        let p = EgressPolicy::parse(
            Posture::Public,
            &[],
            &s(&["10.99.0.7/24", "203.0.113.10", "0.0.0.0/1"]),
        )
        .expect("valid");
        assert_eq!(
            p.allow_cidrs,
            vec![
                "10.99.0.0/24".parse::<Ipv4Net>().expect("net"),
                "203.0.113.10/32".parse().expect("net"),
                "0.0.0.0/1".parse().expect("net"),
            ]
        );
        for bad in [
            "169.254.169.254",
            "169.254.0.0/16",
            "127.0.0.1",
            "10.0.0.0/33",
            "fd00::/8",
            "nonsense",
            "224.0.0.1",
        ] {
            let e = EgressPolicy::parse(Posture::Public, &[], &s(&[bad])).expect_err(bad);
            assert_eq!(e.field, "allow_cidrs");
        }
    }

    #[test]
    fn the_sandbox_subnet_is_refused() {
        let subnet: Ipv4Net = "192.168.211.0/24".parse().expect("net");
        for bad in [
            "192.168.211.1",
            "192.168.211.0/24",
            "192.168.211.128/25",
            "192.168.0.0/16",
            "0.0.0.0/0",
        ] {
            let p = EgressPolicy::parse(Posture::Deny, &[], &s(&[bad])).expect(bad);
            let e = p.check_subnet(subnet).expect_err(bad);
            assert_eq!(e.field, "allow_cidrs");
            assert!(e.message.contains("192.168.211.0/24"), "{}", e.message);
        }
        for good in ["192.168.212.0/24", "10.0.0.0/8", "192.168.210.255"] {
            let p = EgressPolicy::parse(Posture::Deny, &[], &s(&[good])).expect(good);
            assert!(p.check_subnet(subnet).is_ok(), "{good}");
        }
    }

    #[test]
    fn json_shape() {
        let p =
            EgressPolicy::parse(Posture::Deny, &s(&["a.com"]), &s(&["10.0.0.0/8"])).expect("valid");
        let v = serde_json::to_value(&p).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"mode": "deny", "allow_hosts": ["a.com"], "allow_cidrs": ["10.0.0.0/8"]})
        );
        let back: EgressPolicy = serde_json::from_value(v).expect("parse");
        assert_eq!(back, p);
    }
}
