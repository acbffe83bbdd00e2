//! Hostile or heavy clients must neither crash nor wedge the agent.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bhatti_proto::{ExecRequest, Message};
use common::{Agent, Conn};

fn still_serving(a: &Agent) {
    assert_eq!(a.exec(&["echo", "ok"]).out(), "ok\n");
}

#[test]
fn garbage_bytes_get_an_error_and_a_close() {
    let a = Agent::start();
    let mut c = a.connect_raw();
    c.s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let e = c.expect_error();
    assert!(e.contains("bad frame"), "{e}");
    c.expect_closed();

    // A zero length field, and random bytes.
    let mut c = a.connect_raw();
    c.s.write_all(&[0, 0, 0, 0, 9, 9, 9]).unwrap();
    c.expect_error();
    let mut c = a.connect_raw();
    let junk: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let _ = c.s.write_all(&junk);
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    // A frame stream cut in the middle of a frame, then closed.
    let mut c = a.connect_raw();
    c.s.write_all(&[0, 0, 0, 50, 0x10, b'{']).unwrap();
    drop(c);
    still_serving(&a);
}

#[test]
fn oversized_length_is_refused_without_reading_it() {
    let a = Agent::start();
    let mut c = a.connect_raw();
    c.s.write_all(&[0x7f, 0xff, 0xff, 0xff, 0x10]).unwrap();
    assert!(c.expect_error().contains("exceeds"));
    c.expect_closed();
    // Exactly one byte over the limit.
    let mut c = a.connect_raw();
    c.s.write_all(&((1024 * 1024 + 1) as u32).to_be_bytes())
        .unwrap();
    c.s.write_all(&[0x10]).unwrap();
    assert!(c.expect_error().contains("exceeds"));
    // In the middle of an exec, an oversized frame ends the connection.
    let mut c = a.connect();
    c.send(&Message::ExecReq(ExecRequest::command(["cat"])));
    c.s.write_all(&[0x7f, 0xff, 0xff, 0xff, 0x01]).unwrap();
    let o = c.collect();
    assert!(o.code.is_none());
    still_serving(&a);
}

#[test]
fn two_hundred_concurrent_connections() {
    let a = Agent::start();
    // 200 connections open at the same time, each mid-exec...
    let mut conns: Vec<Conn> = (0..200)
        .map(|i| {
            let mut c = a.connect();
            c.send(&Message::ExecReq(ExecRequest::command([
                "sh",
                "-c",
                &format!("read x; echo $x-{i}"),
            ])));
            c
        })
        .collect();
    // ...plus 100 idle ones that never send anything.
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&a.sock).unwrap())
        .collect();
    still_serving(&a);
    for c in conns.iter_mut() {
        c.send(&Message::Stdin(b"v\n".to_vec()));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let o = c.collect();
        assert_eq!(o.out(), format!("v-{i}\n"));
        assert_eq!(o.code, Some(0));
    }
    drop(idle);

    // And 200 short-lived ones from many threads at once.
    let a = std::sync::Arc::new(a);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let mut c = a.connect();
                    c.send(&Message::ActivityReq);
                    assert!(matches!(c.recv_msg(), Message::ActivityResp(_)));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    still_serving(&a);
}

#[test]
fn abrupt_disconnects_everywhere() {
    let a = Agent::start();
    for _ in 0..20 {
        // Mid-request, mid-exec, mid-upload.
        let mut c = a.connect_raw();
        c.s.write_all(&[0, 0, 0, 10]).unwrap();
        drop(c);
        let mut c = a.connect();
        c.send(&Message::ExecReq(ExecRequest::command(["yes"])));
        let _ = c.recv();
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    still_serving(&a);
}
