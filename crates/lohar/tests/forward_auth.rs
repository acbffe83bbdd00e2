//! The forward channel and AUTH, over the real protocol.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::time::{Duration, Instant};

use bhatti_proto::{ExecRequest, FwdRequest, Message, AUTH_REQUIRED};
use common::{Agent, Opts};

/// A one-shot HTTP server on 127.0.0.1 that answers with the request body
/// reversed, after reading the request to EOF (so half-close must travel).
fn http_server() -> (u16, std::thread::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = String::new();
        s.read_to_string(&mut req).unwrap();
        let body = "hello through the tunnel";
        write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        req
    });
    (port, h)
}

fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn http_round_trip_through_the_forward_socket() {
    let a = Agent::start();
    let (port, server) = http_server();
    let mut c = a.connect_fwd();
    c.send(&Message::FwdReq(FwdRequest { port }));
    match c.recv_msg() {
        Message::FwdResp(r) => assert!(r.is_ok(), "{r:?}"),
        other => panic!("expected FWD_RESP, got {other:?}"),
    }
    // From here on: raw bytes, no frames.
    c.s.write_all(b"GET /x HTTP/1.0\r\nHost: sandbox\r\n\r\n")
        .unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    let mut resp = String::new();
    BufReader::new(&c.s).read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.0 200 OK"), "{resp}");
    assert!(resp.ends_with("hello through the tunnel"));
    assert!(server.join().unwrap().starts_with("GET /x HTTP/1.0"));
}

#[test]
fn large_relay_is_intact_both_ways() {
    let a = Agent::start();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // An echo server.
    let echo = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        let mut w = s;
        std::io::copy(&mut r, &mut w).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut c = a.connect_fwd();
    c.send(&Message::FwdReq(FwdRequest { port }));
    assert!(matches!(c.recv_msg(), Message::FwdResp(r) if r.is_ok()));
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut w = c.s.try_clone().unwrap();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&d2).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    c.s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    echo.join().unwrap();
    assert!(back == data);
}

#[test]
fn closed_port_gives_status_error() {
    let a = Agent::start();
    let mut c = a.connect_fwd();
    c.send(&Message::FwdReq(FwdRequest {
        port: closed_port(),
    }));
    match c.recv_msg() {
        Message::FwdResp(r) => {
            assert_eq!(r.status, "error");
            assert!(r.message.is_some_and(|m| !m.is_empty()));
        }
        other => panic!("expected FWD_RESP error, got {other:?}"),
    }
}

#[test]
fn forward_socket_refuses_control_requests() {
    let a = Agent::start();
    let mut c = a.connect_fwd();
    c.send(&Message::ActivityReq);
    assert!(c.expect_error().contains("unexpected"));
}

fn with_token() -> Agent {
    Agent::with(Opts {
        token: Some("s3cret-token".into()),
        ..Default::default()
    })
}

fn assert_refused(c: &mut common::Conn) {
    assert_eq!(c.expect_error(), AUTH_REQUIRED);
    c.expect_closed();
}

#[test]
fn auth_accepts_the_right_token_silently() {
    let a = with_token();
    // `exec` authenticates first; success has no reply of its own.
    assert_eq!(a.exec(&["echo", "in"]).out(), "in\n");
    let mut c = a.connect_fwd();
    c.send(&Message::FwdReq(FwdRequest {
        port: closed_port(),
    }));
    assert!(matches!(c.recv_msg(), Message::FwdResp(_)));
}

#[test]
fn wrong_and_missing_tokens_are_refused() {
    let a = with_token();
    let mut c = a.connect_raw();
    c.send(&Message::Auth(b"s3cret-tokeN".to_vec()));
    assert_refused(&mut c);

    let mut c = a.connect_raw();
    c.send(&Message::Auth(b"s3cret-token-and-more".to_vec()));
    assert_refused(&mut c);

    let mut c = a.connect_raw();
    c.send(&Message::ExecReq(ExecRequest::command(["true"])));
    assert_refused(&mut c);

    // The forward socket checks too.
    let mut c = common::Conn::new(std::os::unix::net::UnixStream::connect(&a.fwd).unwrap());
    c.send(&Message::FwdReq(FwdRequest { port: 1 }));
    assert_refused(&mut c);

    assert_eq!(
        a.exec(&["true"]).code,
        Some(0),
        "the agent keeps serving others"
    );
}

#[test]
fn slow_token_is_refused_after_the_deadline() {
    let a = with_token();
    let t = Instant::now();
    let mut slow = a.connect_raw();
    // Dribble a valid token a byte at a time: the deadline is for the whole
    // frame, so this cannot stretch it.
    let bytes = Message::Auth(b"s3cret-token".to_vec()).to_bytes().unwrap();
    let mut refused_at = None;
    for b in &bytes[..bytes.len() - 1] {
        if slow.s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        // Meanwhile others are served.
        if t.elapsed() < Duration::from_secs(2) {
            assert_eq!(a.exec(&["true"]).code, Some(0));
        }
        if t.elapsed() > Duration::from_secs(6) {
            refused_at = Some(t.elapsed());
            break;
        }
    }
    let _ = refused_at;
    let mut buf = Vec::new();
    let _ = slow.s.read_to_end(&mut buf);
    let elapsed = t.elapsed();
    let mut r = &buf[..];
    let code = bhatti_proto::codec::read_frame(&mut r).expect("an ERROR_CODE frame");
    assert_eq!(
        Message::decode(&code).unwrap(),
        Message::ErrorCode(bhatti_proto::ErrorCode::PermissionDenied)
    );
    let msg = bhatti_proto::codec::read_frame(&mut r).expect("an ERROR frame");
    assert_eq!(
        Message::decode(&msg).unwrap(),
        Message::Error(AUTH_REQUIRED.into())
    );
    assert!(
        elapsed >= Duration::from_millis(4900) && elapsed < Duration::from_secs(8),
        "{elapsed:?}"
    );
    assert_eq!(a.exec(&["true"]).code, Some(0));
}

#[test]
fn silent_client_is_refused_after_the_deadline() {
    let a = with_token();
    let t = Instant::now();
    let mut c = a.connect_raw();
    assert_eq!(c.expect_error(), AUTH_REQUIRED);
    let elapsed = t.elapsed();
    assert!(
        elapsed >= Duration::from_millis(4900) && elapsed < Duration::from_secs(8),
        "{elapsed:?}"
    );
    c.expect_closed();
}
