//! The per-sandbox part of the firewall: which guest sits behind which TAP
//! with which egress policy and peers. The engine installs a sandbox's
//! rules before its VM runs (boot, restore, fork) and removes them with the
//! VM; the resolver looks guests up here by address.
//!
//! The namespace ruleset (see [`network::ns_ruleset`]) drops whatever a
//! guest sends until its rules are in place, so a failed install leaves the
//! guest cut off, never open.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use super::network::{self, NetConfig, NetworkError, SandboxNet};
use crate::egress::EgressPolicy;

/// One sandbox as the firewall knows it.
#[derive(Debug, Clone)]
struct Entry {
    net: SandboxNet,
    /// Sandboxes of one group reach each other (`None`: no peers).
    group: Option<String>,
}

/// The sandboxes whose rules are installed, by id.
#[derive(Debug)]
pub struct Firewall {
    cfg: NetConfig,
    entries: Mutex<HashMap<String, Entry>>,
    /// One install or removal at a time: two sandboxes of a group created
    /// at once must each see the other, or neither gets the pair.
    changing: Mutex<()>,
}

impl Firewall {
    pub fn new(cfg: NetConfig) -> Firewall {
        Firewall {
            cfg,
            entries: Mutex::new(HashMap::new()),
            changing: Mutex::new(()),
        }
    }

    /// Installs (or replaces) sandbox `id`'s rules: source check on its
    /// TAP, egress chain of `policy`, and peer pairs with the other members
    /// of `group`. Blocking (runs `nft`).
    ///
    /// Errors: the `nft` failure; the sandbox then has no rules at all.
    pub fn install(
        &self,
        id: &str,
        tap: &str,
        ip: Ipv4Addr,
        mac: &str,
        policy: &EgressPolicy,
        group: Option<&str>,
    ) -> Result<(), NetworkError> {
        // Holds no data: a panic under it leaves nothing to repair.
        let _one = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let peers: Vec<Ipv4Addr> = match group {
            Some(g) => self
                .entries()
                .iter()
                .filter(|(other, e)| other.as_str() != id && e.group.as_deref() == Some(g))
                .map(|(_, e)| e.net.ip)
                .filter(|p| *p != ip)
                .collect(),
            None => Vec::new(),
        };
        let net = SandboxNet {
            tap: tap.to_string(),
            ip,
            mac: mac.to_string(),
            policy: policy.clone(),
            peers,
        };
        // Whatever was there for this id goes first (its peers may differ).
        self.remove_locked(id);
        match network::install_sandbox(&self.cfg, &net) {
            Ok(()) => {
                self.entries().insert(
                    id.to_string(),
                    Entry {
                        net,
                        group: group.map(str::to_string),
                    },
                );
                Ok(())
            }
            Err(e) => {
                let _ = network::remove_sandbox(&self.cfg, &net);
                Err(e)
            }
        }
    }

    /// Removes sandbox `id`'s rules, if the firewall knows it. Blocking.
    pub fn remove(&self, id: &str) {
        let _one = self.changing.lock();
        self.remove_locked(id);
    }

    fn remove_locked(&self, id: &str) {
        let entry = {
            let mut entries = self.entries();
            entries.remove(id).map(|mut entry| {
                // Pairs with members that joined later were added by their
                // installs: remove every pair with the group's current members,
                // or a later holder of this address would inherit them.
                if let Some(g) = entry.group.as_deref() {
                    for e in entries.values() {
                        if e.group.as_deref() == Some(g) && !entry.net.peers.contains(&e.net.ip) {
                            entry.net.peers.push(e.net.ip);
                        }
                    }
                }
                entry
            })
        };
        if let Some(entry) = entry {
            if let Err(e) = network::remove_sandbox(&self.cfg, &entry.net) {
                tracing::warn!(id, error = %e, "cannot remove a sandbox's firewall rules");
            }
        }
    }

    /// The TAP and policy of the guest at `ip` (the resolver's view).
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<(String, EgressPolicy)> {
        self.entries()
            .values()
            .find(|e| e.net.ip == ip)
            .map(|e| (e.net.tap.clone(), e.net.policy.clone()))
    }

    /// Forgets every entry (the namespace ruleset was just replaced).
    pub fn clear(&self) {
        self.entries().clear();
    }

    /// The entries; a panic elsewhere while holding them leaves them
    /// consistent (every change is one map operation), so a poisoned lock
    /// is recovered rather than ignored (which would leak rules or peers).
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The network this firewall works in.
    pub fn net(&self) -> &NetConfig {
        &self.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while the entries were held must not make the firewall
    /// forget its guests (the resolver would then refuse their names).
    #[test]
    fn a_poisoned_lock_keeps_the_entries() {
        let fw = Firewall::new(NetConfig {
            netns: "bhatti".into(),
            bridge: "brbhatti0".into(),
            subnet: "192.168.137.0/24".parse().expect("subnet"),
            egress: false,
            uplink_netns: None,
            dns: false,
        });
        let ip = Ipv4Addr::new(192, 168, 137, 5);
        fw.entries().insert(
            "sb".into(),
            Entry {
                net: SandboxNet {
                    tap: "tap0".into(),
                    ip,
                    mac: "02:00:00:00:00:05".into(),
                    policy: EgressPolicy::default(),
                    peers: Vec::new(),
                },
                group: None,
            },
        );
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let _held = fw.entries.lock();
                    panic!("poison the lock");
                })
                .join();
        });
        assert!(fw.entries.is_poisoned());
        assert_eq!(fw.lookup(ip).map(|(tap, _)| tap).as_deref(), Some("tap0"));
        fw.clear();
        assert!(fw.lookup(ip).is_none());
    }
}
