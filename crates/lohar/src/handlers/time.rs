//! SET_TIME: the host's wall clock after a pause or a restore, applied to
//! CLOCK_REALTIME in one syscall (no `date` through sudo).

use bhatti_proto::{ErrorCode, Message};

use super::{refuse, HandlerError};
use crate::init::clock;
use crate::server::Agent;
use crate::stream::Stream;
use crate::wire;

/// Sets the clock to `unix_ms` and answers with the time it showed before.
/// Not activity: the host sends it on its own after a wake. In test mode
/// the clock is the host's, so it is only read.
pub fn set(agent: &Agent, conn: &Stream, unix_ms: i64) -> Result<(), HandlerError> {
    if unix_ms <= 0 {
        return refuse(
            ErrorCode::Invalid,
            format!("SET_TIME needs a positive unix time in ms, got {unix_ms}"),
        );
    }
    let before = clock::now_unix_ms();
    if agent.cfg.owns_clock {
        if let Err(e) = clock::set_wall_clock(unix_ms) {
            return refuse(ErrorCode::Internal, format!("cannot set the clock: {e}"));
        }
    }
    wire::send(conn, &Message::SetTimeResp(before))?;
    Ok(())
}
