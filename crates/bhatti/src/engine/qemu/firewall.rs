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
        let _one = self
            .changing
            .lock()
            .map_err(|_| NetworkError::Invalid("firewall state poisoned".into()))?;
        let peers: Vec<Ipv4Addr> = match group {
            Some(g) => self
                .entries
                .lock()
                .map_err(|_| NetworkError::Invalid("firewall state poisoned".into()))?
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
                if let Ok(mut e) = self.entries.lock() {
                    e.insert(
                        id.to_string(),
                        Entry {
                            net,
                            group: group.map(str::to_string),
                        },
                    );
                }
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
        let entry = self.entries.lock().ok().and_then(|mut entries| {
            let mut entry = entries.remove(id)?;
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
            Some(entry)
        });
        if let Some(entry) = entry {
            if let Err(e) = network::remove_sandbox(&self.cfg, &entry.net) {
                tracing::warn!(id, error = %e, "cannot remove a sandbox's firewall rules");
            }
        }
    }

    /// The TAP and policy of the guest at `ip` (the resolver's view).
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<(String, EgressPolicy)> {
        self.entries
            .lock()
            .ok()?
            .values()
            .find(|e| e.net.ip == ip)
            .map(|e| (e.net.tap.clone(), e.net.policy.clone()))
    }

    /// Forgets every entry (the namespace ruleset was just replaced).
    pub fn clear(&self) {
        if let Ok(mut e) = self.entries.lock() {
            e.clear();
        }
    }

    /// The network this firewall works in.
    pub fn net(&self) -> &NetConfig {
        &self.cfg
    }
}
