//! SET_TIME over the protocol in test mode: the answer carries the agent's
//! clock before the call; the host's clock is never touched in test mode;
//! bad payloads get one ERROR.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use bhatti_proto::{FrameType, Message};
use common::Agent;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

#[test]
fn set_time_answers_with_the_clock_before() {
    let a = Agent::start();
    let mut c = a.connect();
    // An hour off: test mode must leave the (host's) clock alone.
    let wanted = now_ms() - 3_600_000;
    c.send(&Message::SetTime(wanted));
    let Message::SetTimeResp(before) = c.recv_msg() else {
        panic!("expected SET_TIME_RESP")
    };
    assert!((before - now_ms()).abs() < 2_000, "{before}");
    assert!((now_ms() - wanted) > 3_500_000, "the host clock moved");
    c.expect_closed();
}

#[test]
fn set_time_refuses_bad_payloads() {
    let a = Agent::start();
    let mut c = a.connect();
    c.send(&Message::SetTime(0));
    assert!(c.expect_error().contains("positive"));
    let mut c = a.connect();
    c.send_raw(FrameType::SetTime, &[0; 4]);
    assert!(c.expect_error().contains("8 bytes"));
    // The agent still serves.
    assert_eq!(a.exec(&["true"]).code, Some(0));
}
