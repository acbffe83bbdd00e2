//! IDENTITY: the new identity of a VM restored from another VM's memory (a
//! fork or a resumed snapshot). The copy comes up as its parent, with its
//! parent's hostname, address, token and random state; the host sends this
//! before anything else reaches it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Entropy bytes the host sends along; the agent mixes them into the guest
/// RNG and reseeds it, so two copies never share random state.
pub const IDENTITY_ENTROPY_BYTES: usize = 64;

/// IDENTITY (host→guest JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// New hostname (the sandbox name).
    pub hostname: String,
    /// New guest address with prefix length, e.g. "192.168.137.7/24".
    pub ip: String,
    /// Default gateway, e.g. "192.168.137.1".
    pub gateway: String,
    /// New MAC of eth0, "52:54:00:..".
    pub mac: String,
    /// New AUTH token; every connection after the answer must present it.
    pub token: String,
    /// New `/etc/machine-id`: 32 lowercase hex digits.
    pub machine_id: String,
    /// New sandbox env (replaces the parent's) for children started from now on.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Fresh host entropy, lowercase hex of [`IDENTITY_ENTROPY_BYTES`] bytes.
    pub entropy_hex: String,
    /// Host wall clock, unix milliseconds (the copy's clock stood still).
    pub time_unix_ms: i64,
    /// Init script to start as TTY session "init" once the identity (the
    /// network included) is taken: a sandbox born from a template runs
    /// its create request's script as a booted one does. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
}

/// IDENTITY_RESP (guest→host JSON): everything but the network is applied;
/// the agent changes eth0 right after this answer is sent (the connection it
/// travels on uses the old address), so the host reaches the copy at the new
/// address from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityResp {
    /// "ok".
    pub status: String,
    /// The guest's wall clock before it was set, unix milliseconds.
    pub clock_before_unix_ms: i64,
}
