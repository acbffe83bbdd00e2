//! ACTIVITY_REQ: when the sandbox was last used, for idle detection.

use bhatti_proto::{ActivityInfo, Message};

use super::HandlerError;
use crate::server::Agent;
use crate::stream::Stream;
use crate::wire;

/// Piped execs in flight count as active and attached sessions too: a
/// client is waiting on each of them.
pub fn handle(agent: &Agent, conn: &Stream) -> Result<(), HandlerError> {
    let (running, attached) = agent.sessions.counts();
    let piped = agent.activity.piped_running();
    let info = ActivityInfo {
        last_activity_unix: agent.activity.last_unix(),
        active_sessions: running + piped,
        attached_sessions: attached + piped,
    };
    wire::send(conn, &Message::ActivityResp(info))?;
    Ok(())
}
