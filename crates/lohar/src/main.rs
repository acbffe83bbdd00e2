//! lohar: the bhatti guest agent.
//!
//! In a VM it is `/init`: stage-1 boot, then PID 1 duties, then the protocol
//! server. With `LOHAR_TEST=1` it skips everything but the server and listens
//! on Unix sockets, so the whole protocol is testable without a VM or root.

mod init;

fn main() {
    // Phases are filled in by the server and init modules.
    let _ = init::boot;
}
