//! lohar: the bhatti guest agent.
//!
//! In a VM it is `/init`: stage-1 boot, then PID 1 duties, then the protocol
//! server. With `LOHAR_TEST=1` it skips everything but the server and listens
//! on Unix sockets, so the whole protocol is testable without a VM or root.

// Tests may unwrap; shipped code handles every error (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod acceptors;
mod activity;
mod config;
mod handlers;
mod init;
mod leftover;
mod reaper;
mod server;
mod session;
mod spawn;
mod stream;
mod wire;

use config::{AgentConfig, Endpoints};

fn main() {
    let (cfg, endpoints) = configure();
    // The reaper starts only after boot: boot helpers are waited for by
    // their own code, which a waitpid(-1) running alongside would rob.
    let reaper = reaper::Reaper::start().unwrap_or_else(|e| fatal(&format!("reaper: {e}")));
    let listeners = server::bind(&endpoints)
        .unwrap_or_else(|e| fatal(&format!("listen on {endpoints:?}: {e}")));
    let agent = server::Agent::new(cfg, reaper);
    init::ready();
    if let Err(e) = agent.start_init() {
        // A broken init script is the user's problem, not a reason to die.
        eprintln!("lohar: init script: {e}");
    }
    if let Err(e) = server::serve(agent, listeners) {
        fatal(&format!("serve: {e}"));
    }
    // The connection threads serve from here on; main has nothing left to do.
    loop {
        std::thread::park();
    }
}

/// Test mode from the environment, or the VM boot sequence.
fn configure() -> (AgentConfig, Endpoints) {
    if std::env::var_os("LOHAR_TEST").is_some_and(|v| v == "1") {
        let cfg = AgentConfig::test_from_env().unwrap_or_else(|e| fatal(&e));
        // Orphans of our children come to us, as they would to PID 1, so
        // the reaper's orphan path runs in tests too.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        return cfg;
    }
    match init::boot() {
        Ok(booted) => AgentConfig::vm(&booted.config),
        Err(e) => fatal(&e),
    }
}

/// Reports on the console and stops (powers the VM off as PID 1).
fn fatal(msg: &str) -> ! {
    init::fatal(msg)
}
