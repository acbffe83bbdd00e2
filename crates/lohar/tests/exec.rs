//! Piped exec over the real protocol.

mod common;

use std::time::{Duration, Instant};

use bhatti_proto::frame::FrameType;
use bhatti_proto::{ExecRequest, Message};
use common::{alive, read_pid, Agent, Opts};

#[test]
fn exit_codes_and_signals() {
    let a = Agent::start();
    assert_eq!(a.exec(&["true"]).code, Some(0));
    assert_eq!(a.exec(&["false"]).code, Some(1));
    assert_eq!(a.sh("exit 42").code, Some(42));
    assert_eq!(a.sh("kill -TERM $$").code, Some(128 + 15));
    assert_eq!(a.sh("kill -KILL $$").code, Some(128 + 9));
}

#[test]
fn missing_command_is_an_error_frame_naming_it() {
    let a = Agent::start();
    let o = a.exec(&["definitely-not-a-command-xyz", "arg"]);
    assert_eq!(o.code, None, "no EXIT: {o:?}");
    let e = o.error.as_deref().unwrap_or_default();
    assert!(e.contains("definitely-not-a-command-xyz"), "error: {e}");
    assert!(e.contains("not found"), "error: {e}");
    assert_eq!(o.error_code, Some(bhatti_proto::ErrorCode::NotFound));
    // The agent keeps serving.
    assert_eq!(a.exec(&["true"]).code, Some(0));
}

#[test]
fn stdout_and_stderr_are_separate_and_in_order() {
    let a = Agent::start();
    let o = a.sh(
        "echo o1; sleep 0.05; echo e1 >&2; sleep 0.05; echo o2; sleep 0.05; echo e2 >&2; exit 3",
    );
    assert_eq!(o.out(), "o1\no2\n");
    assert_eq!(o.err(), "e1\ne2\n");
    let seq: Vec<(FrameType, String)> = o
        .chunks
        .iter()
        .map(|(k, b)| (*k, String::from_utf8_lossy(b).into_owned()))
        .filter(|(_, s)| !s.is_empty())
        .collect();
    assert_eq!(
        seq,
        vec![
            (FrameType::Stdout, "o1\n".into()),
            (FrameType::Stderr, "e1\n".into()),
            (FrameType::Stdout, "o2\n".into()),
            (FrameType::Stderr, "e2\n".into()),
        ]
    );
    assert_eq!(
        o.kinds.last(),
        Some(&FrameType::Exit),
        "EXIT comes after all output"
    );
    assert_eq!(o.code, Some(3));
}

#[test]
fn env_merge_order_defaults_then_sandbox_then_request() {
    let a = Agent::with(Opts {
        env_json: Some(r#"{"A":"sandbox","B":"sandbox","LANG":"sandbox-lang"}"#.into()),
        ..Default::default()
    });
    let mut req = ExecRequest::command([
        "sh",
        "-c",
        "echo \"$A|$B|$LANG|$TERM|$C\"; test -n \"$PATH\" && echo path-ok",
    ]);
    req.env = Some(
        [
            ("B".to_string(), "request".to_string()),
            ("C".to_string(), "c".to_string()),
        ]
        .into(),
    );
    let o = a.exec_req(req, &[]);
    assert_eq!(
        o.out(),
        "sandbox|request|sandbox-lang|xterm-256color|c\npath-ok\n"
    );
    // Nothing of the agent's own environment leaks beyond the defaults.
    let o = a.sh("env | cut -d= -f1 | sort | tr '\\n' ' '");
    for k in o.out().split_whitespace() {
        assert!(
            ["A", "B", "HOME", "LANG", "PATH", "PWD", "SHLVL", "TERM", "USER", "_", "OLDPWD"]
                .contains(&k),
            "unexpected env var {k}"
        );
    }
}

#[test]
fn cwd_default_explicit_and_missing() {
    let a = Agent::start();
    assert_eq!(
        a.exec(&["pwd"]).out().trim(),
        a.work().canonicalize().unwrap().to_str().unwrap()
    );
    let sub = a.work().join("sub dir");
    std::fs::create_dir(&sub).unwrap();
    let mut req = ExecRequest::command(["pwd"]);
    req.cwd = Some(sub.to_str().unwrap().into());
    assert_eq!(
        a.exec_req(req, &[]).out().trim(),
        sub.canonicalize().unwrap().to_str().unwrap()
    );
    let mut req = ExecRequest::command(["pwd"]);
    req.cwd = Some("sub dir".into());
    assert_eq!(
        a.exec_req(req, &[]).out().trim(),
        sub.canonicalize().unwrap().to_str().unwrap(),
        "relative cwd"
    );

    let mut req = ExecRequest::command(["pwd"]);
    req.cwd = Some("/no/such/dir".into());
    let mut c = a.connect();
    c.send(&Message::ExecReq(req));
    let e = c.expect_error();
    assert!(e.contains("/no/such/dir"), "{e}");
    c.expect_closed();
}

#[test]
fn stdin_is_streamed_and_closed_by_half_close() {
    let a = Agent::start();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let o = a.exec_req(ExecRequest::command(["cat"]), &data);
    assert_eq!(o.code, Some(0));
    assert!(
        o.stdout == data,
        "cat echoed {} of {} bytes",
        o.stdout.len(),
        data.len()
    );
}

#[test]
fn stdin_is_interactive_and_closed_by_empty_frame() {
    let a = Agent::start();
    let mut c = a.connect();
    c.send(&Message::ExecReq(ExecRequest::command([
        "sh",
        "-c",
        "read x; echo got-$x; read y; echo got-$y; cat",
    ])));
    c.send(&Message::Stdin(b"one\n".to_vec()));
    let mut acc = Vec::new();
    c.read_until(&mut acc, "got-one");
    c.send(&Message::Stdin(b"two\nrest".to_vec()));
    c.read_until(&mut acc, "got-two");
    // An empty STDIN frame ends stdin without a half-close: cat finishes.
    c.send(&Message::Stdin(Vec::new()));
    let o = c.collect();
    acc.extend(o.stdout);
    assert_eq!(String::from_utf8_lossy(&acc), "got-one\ngot-two\nrest");
    assert_eq!(o.code, Some(0));
}

#[test]
fn ten_mib_of_output_arrives_intact() {
    let a = Agent::start();
    let n = 1_500_000;
    let o = a.exec(&["seq", "1", &n.to_string()]);
    assert_eq!(o.code, Some(0));
    let want: String = (1..=n).map(|i| format!("{i}\n")).collect();
    assert!(want.len() > 10 * 1024 * 1024);
    assert_eq!(o.stdout.len(), want.len());
    assert!(o.stdout == want.as_bytes());
}

#[test]
fn binary_output_is_byte_exact() {
    let a = Agent::start();
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let f = a.path("bin");
    std::fs::write(&f, &data).unwrap();
    let o = a.sh(&format!("cat '{0}'; cat '{0}' >&2", f.display()));
    assert!(o.stdout == data);
    assert!(o.stderr == data);
}

fn start_group(a: &Agent) -> (common::Conn, i32, i32) {
    let gpid = a.path("grandchild.pid");
    let spid = a.path("sh.pid");
    let mut c = a.connect();
    let script = format!(
        "echo $$ > '{}'; sleep 1000 & echo $! > '{}'; echo started; wait",
        spid.display(),
        gpid.display()
    );
    c.send(&Message::ExecReq(ExecRequest::command([
        "sh", "-c", &script,
    ])));
    let mut acc = Vec::new();
    c.read_until(&mut acc, "started");
    let (sh, grandchild) = (read_pid(&spid), read_pid(&gpid));
    assert!(alive(sh) && alive(grandchild));
    (c, sh, grandchild)
}

#[test]
fn kill_frame_kills_the_whole_group() {
    let a = Agent::start();
    let (mut c, sh, grandchild) = start_group(&a);
    c.send(&Message::Kill);
    let o = c.collect();
    assert_eq!(o.code, Some(137));
    assert!(
        a.wait_for(Duration::from_secs(3), || !alive(grandchild) && !alive(sh)),
        "group survived KILL"
    );
}

#[test]
fn dropped_connection_kills_the_whole_group() {
    let a = Agent::start();
    let (c, sh, grandchild) = start_group(&a);
    drop(c);
    assert!(
        a.wait_for(Duration::from_secs(3), || !alive(grandchild) && !alive(sh)),
        "group survived disconnect"
    );
}

#[test]
fn half_close_does_not_kill() {
    let a = Agent::start();
    let mut c = a.connect();
    c.send(&Message::ExecReq(ExecRequest::command([
        "sh",
        "-c",
        "sleep 0.3; echo still-here",
    ])));
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    let o = c.collect();
    assert_eq!(o.out(), "still-here\n");
    assert_eq!(o.code, Some(0));
}

#[test]
fn background_process_holding_pipes_does_not_block_exit() {
    let a = Agent::start();
    let pidf = a.path("bg.pid");
    let t = Instant::now();
    let o = a.sh(&format!(
        "sleep 30 & echo $! > '{}'; echo done",
        pidf.display()
    ));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "EXIT waited for the background process"
    );
    assert_eq!(o.out(), "done\n");
    assert_eq!(o.code, Some(0));
    let bg = read_pid(&pidf);
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(bg), "background process must survive EXIT");
    // SAFETY: test cleanup of our own process.
    unsafe { libc::kill(bg, libc::SIGKILL) };
}

#[test]
fn bad_requests_get_one_error_then_close() {
    let a = Agent::start();
    let mut c = a.connect();
    c.send_raw(FrameType::ExecReq, b"{not json");
    assert!(c.expect_error().contains("bad request"));
    c.expect_closed();

    let mut c = a.connect();
    c.send(&Message::ExecReq(
        ExecRequest::command(Vec::<String>::new()),
    ));
    assert!(c.expect_error().contains("empty argv"));
    c.expect_closed();

    let mut c = a.connect();
    c.send(&Message::Stdout(b"hi".to_vec()));
    assert!(c.expect_error().contains("unexpected frame"));
    c.expect_closed();

    let mut c = a.connect();
    c.send(&Message::FwdReq(bhatti_proto::FwdRequest { port: 1 }));
    assert!(
        c.expect_error().contains("unexpected frame"),
        "FWD_REQ belongs on the forward socket"
    );
    c.expect_closed();
    assert_eq!(a.exec(&["true"]).code, Some(0));
}

#[test]
fn activity_tracks_exec_and_counts() {
    let a = Agent::start();
    let mut c = a.connect();
    c.send(&Message::ActivityReq);
    let Message::ActivityResp(before) = c.recv_msg() else {
        panic!("expected ACTIVITY_RESP")
    };
    assert_eq!(before.active_sessions, 0);
    assert_eq!(before.attached_sessions, 0);

    let mut running = a.connect();
    running.send(&Message::ExecReq(ExecRequest::command([
        "sh",
        "-c",
        "echo up; sleep 5",
    ])));
    running.read_until(&mut Vec::new(), "up");
    let mut c = a.connect();
    c.send(&Message::ActivityReq);
    let Message::ActivityResp(during) = c.recv_msg() else {
        panic!("expected ACTIVITY_RESP")
    };
    assert_eq!(during.active_sessions, 1);
    assert_eq!(during.attached_sessions, 1);
    assert!(during.last_activity_unix >= before.last_activity_unix);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - during.last_activity_unix).abs() <= 2);
    running.send(&Message::Kill);
    assert_eq!(running.collect().code, Some(137));
}
