//! IDENTITY: a VM restored from another VM's memory (a fork, a resumed
//! snapshot) takes an identity of its own: token, env, hostname,
//! machine-id, a reseeded RNG, the clock, and last the network (MAC,
//! address, route), once the host has read the answer and hung up (the
//! answer travels on the parent's address).

use std::time::Duration;

use bhatti_proto::{ErrorCode, Identity, IdentityResp, Message, IDENTITY_ENTROPY_BYTES};

use super::{refuse, HandlerError};
use crate::init::rng::{decode_hex, reseed};
use crate::init::{clock, network, say, set_hostname, write_etc};
use crate::server::Agent;
use crate::stream::Stream;
use crate::wire;

/// How long the host may take to hang up after the answer before eth0 changes anyway.
const HANGUP_WAIT: Duration = Duration::from_secs(2);

/// Every sandbox name is one (`[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}`): a cold
/// boot sets it as it is, so a copy must take it too.
fn valid_hostname(h: &str) -> bool {
    h.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && h.len() <= 63
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Checks every field before anything changes: a bad request changes nothing.
fn check(id: &Identity) -> Result<Vec<u8>, String> {
    if !valid_hostname(&id.hostname) {
        return Err(format!(
            "hostname {:?} is not a valid host name",
            id.hostname
        ));
    }
    network::parse_cidr(&id.ip)?;
    id.gateway
        .parse::<std::net::Ipv4Addr>()
        .map_err(|_| format!("gateway {:?} is not IPv4", id.gateway))?;
    network::parse_mac(&id.mac)?;
    if id.token.is_empty() {
        return Err("token must not be empty".into());
    }
    if id.machine_id.len() != 32
        || !id
            .machine_id
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err("machine_id must be 32 lowercase hex digits".into());
    }
    let entropy = decode_hex(&id.entropy_hex)
        .filter(|e| e.len() == IDENTITY_ENTROPY_BYTES)
        .ok_or_else(|| format!("entropy_hex must be {IDENTITY_ENTROPY_BYTES} bytes of hex"))?;
    Ok(entropy)
}

/// New host keys when the image has an SSH server: the parent's keys must
/// not serve a second machine. Runs in the background (key generation is
/// slow under TCG).
fn renew_ssh_host_keys() {
    let keygen = std::path::Path::new("/usr/bin/ssh-keygen");
    let Ok(dir) = std::fs::read_dir("/etc/ssh") else {
        return;
    };
    let keys: Vec<_> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ssh_host_"))
        })
        .collect();
    if keys.is_empty() || !keygen.exists() {
        return;
    }
    std::thread::spawn(move || {
        for k in keys {
            let _ = std::fs::remove_file(k);
        }
        if let Err(e) = std::process::Command::new(keygen).arg("-A").status() {
            say(&format!("warning: ssh-keygen -A: {e}"));
        }
    });
}

/// Applies `id` and answers IDENTITY_RESP; then, in a VM, changes eth0.
pub fn apply(agent: &Agent, conn: &Stream, id: Identity) -> Result<(), HandlerError> {
    let entropy = match check(&id) {
        Ok(e) => e,
        Err(msg) => return refuse(ErrorCode::Invalid, format!("IDENTITY: {msg}")),
    };
    let before = clock::now_unix_ms();
    if agent.cfg.owns_machine {
        if let Err(e) = reseed(&entropy) {
            return refuse(ErrorCode::Internal, format!("cannot reseed the RNG: {e}"));
        }
        if let Err(e) = set_hostname(&id.hostname) {
            return refuse(ErrorCode::Internal, e);
        }
        if let Err(e) = write_etc("/etc/machine-id", &format!("{}\n", id.machine_id)) {
            return refuse(ErrorCode::Internal, e);
        }
        renew_ssh_host_keys();
    }
    if agent.cfg.owns_clock {
        if let Err(e) = clock::set_wall_clock(id.time_unix_ms) {
            say(&format!("warning: {e}"));
        }
    }
    *agent
        .cfg
        .sandbox_env
        .write()
        .unwrap_or_else(|p| p.into_inner()) = id.env.clone();
    *agent.cfg.token.write().unwrap_or_else(|p| p.into_inner()) =
        Some(id.token.as_bytes().to_vec());
    wire::send(
        conn,
        &Message::IdentityResp(IdentityResp {
            status: "ok".into(),
            clock_before_unix_ms: before,
        }),
    )?;
    if agent.cfg.owns_machine {
        // Wait for the host to hang up: it has the answer then, and nothing
        // more travels on the old address.
        let _ = conn.set_read_timeout(Some(HANGUP_WAIT));
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut &*conn, &mut buf);
        if let Err(e) = network::readdress(&id.ip, &id.gateway, &id.mac) {
            say(&format!("IDENTITY: network: {e}"));
        }
    }
    // A template-born sandbox's init script, under its own identity and env.
    if let Some(script) = id.init.as_deref().filter(|s| !s.trim().is_empty()) {
        if let Err(e) = agent.start_init_argv(&crate::config::init_argv_for(script)) {
            say(&format!("IDENTITY: init script: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Identity {
        Identity {
            hostname: "b".into(),
            ip: "10.0.0.7/24".into(),
            gateway: "10.0.0.1".into(),
            mac: "52:54:00:0a:00:07".into(),
            token: "t".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            env: Default::default(),
            entropy_hex: "ab".repeat(IDENTITY_ENTROPY_BYTES),
            time_unix_ms: 1,
            init: None,
        }
    }

    #[test]
    fn every_sandbox_name_is_a_hostname() {
        for h in ["b", "k0.3", "my_box", "a-b.c_d", &"x".repeat(63)] {
            let mut i = good();
            i.hostname = h.into();
            assert!(check(&i).is_ok(), "{h}");
        }
        for h in ["", "-a", ".a", "_a", "a/b", &"x".repeat(64)] {
            let mut i = good();
            i.hostname = h.into();
            assert!(check(&i).is_err(), "{h}");
        }
    }

    #[test]
    fn checks() {
        assert!(check(&good()).is_ok());
        let bad: [fn(&mut Identity); 6] = [
            |i| i.hostname = "a b".into(),
            |i| i.ip = "10.0.0.7".into(),
            |i| i.mac = "52:54:00".into(),
            |i| i.token.clear(),
            |i| i.machine_id = "ABC".into(),
            |i| i.entropy_hex = "abc".into(),
        ];
        for f in bad {
            let mut i = good();
            f(&mut i);
            assert!(check(&i).is_err(), "{i:?}");
        }
    }
}
