//! TTY sessions over the real protocol.

mod common;

use std::time::Duration;

use bhatti_proto::frame::FrameType;
use bhatti_proto::{ExecKill, ExecRequest, Message, SessionInfo, SCROLLBACK_BYTES};
use common::{Agent, Conn, Opts};

fn tty(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        tty: true,
        ..ExecRequest::command(argv.iter().copied())
    }
}

fn create(a: &Agent, req: ExecRequest) -> (Conn, SessionInfo) {
    let mut c = a.connect();
    c.send(&Message::ExecReq(req));
    match c.recv_msg() {
        Message::SessionInfo(i) => (c, i),
        other => panic!("expected SESSION_INFO first, got {other:?}"),
    }
}

fn attach_req(id: &str, if_detached: bool) -> ExecRequest {
    ExecRequest {
        session_id: Some(id.into()),
        if_detached,
        ..Default::default()
    }
}

fn attach(a: &Agent, id: &str) -> (Conn, SessionInfo) {
    create(a, attach_req(id, false))
}

fn ticks(out: &[u8]) -> Vec<u64> {
    let s = String::from_utf8_lossy(out);
    s.split("tick-")
        .skip(1)
        .filter_map(|p| p.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

#[test]
fn io_goes_through_a_real_pty() {
    let a = Agent::start();
    let (mut c, info) = create(
        &a,
        tty(&["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty; cat"]),
    );
    assert!(info.running && info.attached && info.tty);
    assert!(info.session_id.starts_with('s'));
    let mut acc = Vec::new();
    c.read_until(&mut acc, "is-a-tty");
    c.send(&Message::Stdin(b"hello pty\n".to_vec()));
    // The terminal echoes the line and cat prints it again, both with CRLF.
    c.read_until(&mut acc, "hello pty\r\nhello pty\r\n");
}

#[test]
fn rows_cols_and_resize_reach_the_process() {
    let a = Agent::start();
    let req = ExecRequest {
        rows: Some(30),
        cols: Some(100),
        ..tty(&["sh", "-c", "stty -echo; echo A $(stty size); read x; echo B $(stty size); read y; echo C $(stty size); sleep 5"])
    };
    let (mut c, _) = create(&a, req);
    let mut acc = Vec::new();
    c.read_until(&mut acc, "A 30 100");
    // A RESIZE that is not exactly 4 bytes is ignored.
    c.send_raw(FrameType::Resize, &[0, 50, 0]);
    c.send(&Message::Stdin(b"\n".to_vec()));
    c.read_until(&mut acc, "B 30 100");
    c.send(&Message::Resize {
        rows: 40,
        cols: 120,
    });
    c.send(&Message::Stdin(b"\n".to_vec()));
    c.read_until(&mut acc, "C 40 120");
}

#[test]
fn detach_keeps_running_and_reattach_replays_then_goes_live_without_gaps() {
    let a = Agent::start();
    let script = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.02; done";
    let (mut c, info) = create(&a, tty(&["sh", "-c", script]));
    let mut first = Vec::new();
    c.read_until(&mut first, "tick-3");
    drop(c);
    // The agent notices the detach asynchronously.
    a.wait_for(Duration::from_secs(5), || {
        a.session(&info.session_id).is_some_and(|s| !s.attached)
    });
    let listed = a.session(&info.session_id).unwrap();
    assert!(listed.running && !listed.attached, "{listed:?}");
    // Time passing on purpose: the process must tick on while nobody listens.
    std::thread::sleep(Duration::from_millis(300));

    let (mut c, info2) = attach(&a, &info.session_id);
    assert!(info2.running && info2.attached);
    let replay = c.recv();
    assert_eq!(
        replay.kind,
        FrameType::Stdout,
        "scrollback comes right after SESSION_INFO"
    );
    let replayed = ticks(&replay.payload);
    assert!(
        replayed.len() >= 10,
        "process kept running while detached: {replayed:?}"
    );
    let mut all = replay.payload.clone();
    let last = *replayed.last().unwrap();
    c.read_until(&mut all, &format!("tick-{}", last + 10));
    let got = ticks(&all);
    let want: Vec<u64> = (0..got.len() as u64).collect();
    assert_eq!(got, want, "replay + live must be every tick exactly once");
}

#[test]
fn second_attach_displaces_the_first() {
    let a = Agent::start();
    let (c0, info) = create(
        &a,
        tty(&["sh", "-c", "while true; do echo tick-x; sleep 0.05; done"]),
    );
    drop(c0);
    let (mut first, _) = attach(&a, &info.session_id);
    let (mut second, _) = attach(&a, &info.session_id);
    // The first client gets EXIT and is dropped.
    loop {
        let f = first.recv();
        match f.kind {
            FrameType::Stdout => continue,
            FrameType::Exit => break,
            other => panic!("displaced client got {other:?}"),
        }
    }
    first.expect_closed();
    let mut acc = Vec::new();
    second.read_until(&mut acc, "tick-x\r\ntick-x");
    assert!(a.session(&info.session_id).unwrap().attached);
}

#[test]
fn if_detached_refuses_while_attached() {
    let a = Agent::start();
    let (c, info) = create(&a, tty(&["sleep", "30"]));
    let mut refused = a.connect();
    refused.send(&Message::ExecReq(attach_req(&info.session_id, true)));
    assert!(refused.expect_error().contains("attached"));
    refused.expect_closed();
    drop(c);
    assert!(a.wait_for(Duration::from_secs(3), || !a
        .session(&info.session_id)
        .unwrap()
        .attached));
    let (_c, info2) = create(&a, attach_req(&info.session_id, true));
    assert!(info2.attached);
}

#[test]
fn max_idle_kills_an_abandoned_session_but_not_an_attached_one() {
    let a = Agent::start();
    let req = ExecRequest {
        max_idle_sec: Some(1),
        ..tty(&["sleep", "60"])
    };
    let (watched, kept) = create(&a, req.clone());
    let (abandoned, gone) = create(&a, req);
    drop(abandoned);
    assert!(
        a.wait_for(Duration::from_secs(5), || !a
            .session(&gone.session_id)
            .unwrap()
            .running),
        "idle session was not killed"
    );
    assert_eq!(a.session(&gone.session_id).unwrap().exit_code, Some(137));
    // The attached one, idle just as long, still runs.
    assert!(a.session(&kept.session_id).unwrap().running);
    drop(watched);
}

#[test]
fn list_shows_running_attached_and_exit_code() {
    let a = Agent::start();
    let (mut c, info) = create(&a, tty(&["sh", "-c", "read x; exit 7"]));
    let l = a.session(&info.session_id).unwrap();
    assert!(l.running && l.attached && l.exit_code.is_none());
    assert_eq!(l.argv, "sh -c read x; exit 7");
    c.send(&Message::Stdin(b"\n".to_vec()));
    let o = c.collect();
    assert_eq!(o.code, Some(7));
    let l = a.session(&info.session_id).unwrap();
    assert!(!l.running && !l.attached, "{l:?}");
    assert_eq!(l.exit_code, Some(7));

    // Attaching to an exited session replays and reports the code.
    let (mut c, i) = attach(&a, &info.session_id);
    assert!(!i.running);
    assert_eq!(i.exit_code, Some(7));
    assert_eq!(c.collect().code, Some(7));
}

#[test]
fn exec_kill_sigkills_and_kill_frame_sigterms() {
    let a = Agent::start();
    let (c, info) = create(&a, tty(&["sleep", "60"]));
    drop(c);
    let mut k = a.connect();
    k.send(&Message::ExecKill(ExecKill {
        session_id: info.session_id.clone(),
    }));
    assert_eq!(k.recv_msg(), Message::Exit(0));
    assert!(a.wait_for(Duration::from_secs(3), || a
        .session(&info.session_id)
        .unwrap()
        .exit_code
        == Some(137)));

    let mut k = a.connect();
    k.send(&Message::ExecKill(ExecKill {
        session_id: "nope".into(),
    }));
    assert!(k.expect_error().contains("not found"));

    let (mut c, _) = create(&a, tty(&["sleep", "60"]));
    c.send(&Message::Kill);
    assert_eq!(c.collect().code, Some(128 + 15));
}

#[test]
fn scrollback_keeps_only_the_newest_64_kib() {
    let a = Agent::start();
    let (mut c, info) = create(&a, tty(&["sh", "-c", "seq 1 40000; echo END; sleep 60"]));
    let mut total = Vec::new();
    c.read_until(&mut total, "END\r\n");
    assert!(total.len() > 3 * SCROLLBACK_BYTES);
    drop(c);
    let (mut c, _) = attach(&a, &info.session_id);
    let replay = c.recv();
    assert_eq!(replay.kind, FrameType::Stdout);
    assert_eq!(replay.payload.len(), SCROLLBACK_BYTES);
    assert!(replay.payload[..] == total[total.len() - SCROLLBACK_BYTES..]);
}

#[test]
fn unknown_session_is_an_error() {
    let a = Agent::start();
    let mut c = a.connect();
    c.send(&Message::ExecReq(attach_req("s999", false)));
    assert!(c.expect_error().contains("not found"));
    c.expect_closed();
}

#[test]
fn init_script_runs_as_session_init() {
    let a = Agent::with(Opts {
        init: Some("echo init-ran; sleep 60".into()),
        ..Default::default()
    });
    let l = a.list();
    let init = l
        .iter()
        .find(|s| s.session_id == "init")
        .expect("init session listed");
    assert!(init.running && !init.attached);
    let (mut c, _) = attach(&a, "init");
    let mut acc = Vec::new();
    c.read_until(&mut acc, "init-ran");
}

#[test]
fn session_registry_is_capped() {
    let a = Agent::start();
    let mut ids = Vec::new();
    loop {
        let mut c = a.connect();
        c.send(&Message::ExecReq(tty(&["sleep", "60"])));
        match c.recv_msg() {
            Message::SessionInfo(i) => ids.push(i.session_id),
            Message::ErrorCode(code) => {
                assert_eq!(code, bhatti_proto::ErrorCode::Busy);
                let e = c.expect_error_only();
                assert!(e.contains("too many sessions"), "{e}");
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(ids.len() <= 1000, "no cap on sessions");
    }
    assert_eq!(ids.len(), 128);
    // An exited session makes room: it is evicted for the new one.
    let mut k = a.connect();
    k.send(&Message::ExecKill(ExecKill {
        session_id: ids[5].clone(),
    }));
    assert_eq!(k.recv_msg(), Message::Exit(0));
    assert!(a.wait_for(Duration::from_secs(3), || !a
        .session(&ids[5])
        .unwrap()
        .running));
    let (_c, i) = create(&a, tty(&["true"]));
    assert!(a.session(&ids[5]).is_none());
    assert!(a.session(&i.session_id).is_some());
}
