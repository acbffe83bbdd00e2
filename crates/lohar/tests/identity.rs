//! IDENTITY over the protocol in test mode: the token and the sandbox env
//! change for everything after the answer; a bad identity changes nothing.

mod common;

use bhatti_proto::{ExecRequest, Identity, Message, IDENTITY_ENTROPY_BYTES};
use common::{Agent, Conn, Opts};

fn identity(token: &str) -> Identity {
    Identity {
        hostname: "forked".into(),
        ip: "10.0.0.7/24".into(),
        gateway: "10.0.0.1".into(),
        mac: "52:54:00:0a:00:07".into(),
        token: token.into(),
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        env: [("WHO".to_string(), "child".to_string())].into(),
        entropy_hex: "5a".repeat(IDENTITY_ENTROPY_BYTES),
        time_unix_ms: 1,
        init: None,
    }
}

fn echo_who(a: &Agent, token: &str) -> Conn {
    let mut c = Conn::new(std::os::unix::net::UnixStream::connect(&a.sock).unwrap());
    c.send(&Message::Auth(token.as_bytes().to_vec()));
    c.send(&Message::ExecReq(ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "printf %s \"$WHO\"".into()],
        ..Default::default()
    }));
    c
}

#[test]
fn identity_replaces_token_and_env() {
    let a = Agent::with(Opts {
        token: Some("parent-token".into()),
        env_json: Some(r#"{"WHO":"parent"}"#.into()),
        ..Default::default()
    });
    assert_eq!(echo_who(&a, "parent-token").collect().out(), "parent");

    let mut c = a.connect();
    c.send(&Message::Identity(identity("child-token")));
    let Message::IdentityResp(r) = c.recv_msg() else {
        panic!("expected IDENTITY_RESP")
    };
    assert_eq!(r.status, "ok");
    drop(c);

    assert_eq!(echo_who(&a, "child-token").collect().out(), "child");
    // The parent's token no longer opens the agent.
    let mut old = a.connect_raw();
    old.send(&Message::Auth(b"parent-token".to_vec()));
    assert!(old.expect_error().contains("auth"));
}

#[test]
fn bad_identity_changes_nothing() {
    let a = Agent::with(Opts {
        token: Some("parent-token".into()),
        ..Default::default()
    });
    let mut bad = identity("child-token");
    bad.machine_id = "not-hex".into();
    let mut c = a.connect();
    c.send(&Message::Identity(bad));
    assert!(c.expect_error().contains("machine_id"));
    let mut still = echo_who(&a, "parent-token");
    assert_eq!(still.collect().code, Some(0));
}

/// A template-born sandbox's init script runs once the identity is taken,
/// with the new env, as TTY session "init".
#[test]
fn identity_starts_the_init_script() {
    let mut a = Agent::with(Opts {
        token: Some("parent-token".into()),
        env_json: Some(r#"{"WHO":"parent"}"#.into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("init.txt");
    let mut id = identity("child-token");
    id.init = Some(format!("printf %s \"$WHO\" > {}", out.display()));
    let mut c = a.connect();
    c.send(&Message::Identity(id));
    let Message::IdentityResp(r) = c.recv_msg() else {
        panic!("expected IDENTITY_RESP")
    };
    assert_eq!(r.status, "ok");
    drop(c);
    a.token = Some("child-token".into());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !out.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(std::fs::read_to_string(&out).expect("init ran"), "child");
}
