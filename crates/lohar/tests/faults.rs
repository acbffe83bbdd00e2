//! Regression tests for faults users hit (issue 9) and for the machine
//! codes of ERROR frames (issue 10), over the real protocol in test mode.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::time::{Duration, Instant};

use bhatti_proto::frame::{FrameType, MAX_PAYLOAD_LEN};
use bhatti_proto::{
    ErrorCode, ExecKill, ExecRequest, FileLsRequest, FileReadRequest, FileStatRequest,
    FileWriteRequest, FwdRequest, Message,
};
use common::{Agent, Conn};

fn tty(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        tty: true,
        ..ExecRequest::command(argv.iter().copied())
    }
}

fn start_session(a: &Agent, req: ExecRequest) -> (Conn, String) {
    let mut c = a.connect();
    c.send(&Message::ExecReq(req));
    match c.recv_msg() {
        Message::SessionInfo(i) => (c, i.session_id),
        other => panic!("expected SESSION_INFO, got {other:?}"),
    }
}

/// Sends one request and returns the coded refusal; the connection must
/// close after it.
fn refusal(a: &Agent, m: Message) -> (ErrorCode, String) {
    let mut c = a.connect();
    c.send(&m);
    let e = c.expect_coded_error();
    c.expect_closed();
    e
}

/// `Sig*` lines of /proc/self/status whose mask is not all zeros.
fn nonzero_masks(status: &str) -> Vec<String> {
    status
        .lines()
        .filter(|l| l.starts_with("SigBlk") || l.starts_with("SigIgn"))
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|m| m.chars().any(|c| c != '0'))
        })
        .map(String::from)
        .collect()
}

#[test]
fn piped_children_start_with_a_clean_signal_state() {
    let a = Agent::start();
    let o = a.exec(&["cat", "/proc/self/status"]);
    assert_eq!(o.code, Some(0));
    let masks = o.out();
    assert!(masks.contains("SigBlk"), "{masks}");
    assert_eq!(nonzero_masks(&masks), Vec::<String>::new());

    // The shell can terminate itself: 128 + SIGTERM, nothing printed after.
    let o = a.sh("kill -TERM $$; echo still-here");
    assert_eq!((o.code, o.out()), (Some(143), String::new()));

    // A background job can be killed.
    let o = a.sh("sleep 100 & p=$!; kill $p; wait $p; echo rc=$?");
    assert_eq!(o.out(), "rc=143\n");

    // Its own session (and so its own process group), and no descriptors
    // of the agent beyond stdio.
    let o = a.sh("set -- $(cat /proc/$$/stat); [ \"$1\" = \"$6\" ] && echo leader; ls /proc/$$/fd");
    assert_eq!(o.out(), "leader\n0\n1\n2\n", "stderr: {}", o.err());
}

#[test]
fn tty_children_start_with_a_clean_signal_state_and_ctrl_c_works() {
    let a = Agent::start();
    let (mut c, _) = start_session(
        &a,
        tty(&[
            "sh",
            "-c",
            "grep -E '^Sig(Blk|Ign)' /proc/self/status; echo END",
        ]),
    );
    let mut acc = Vec::new();
    c.read_until(&mut acc, "END");
    let text = String::from_utf8_lossy(&acc).replace('\r', "");
    assert!(text.contains("SigBlk"), "{text}");
    assert_eq!(nonzero_masks(&text), Vec::<String>::new());

    // Ctrl+C on the terminal interrupts the foreground program.
    let (mut c, _) = start_session(&a, tty(&["sleep", "100"]));
    assert!(
        a.wait_for(Duration::from_secs(5), || !a
            .children_named("sleep")
            .is_empty()),
        "sleep never started"
    );
    let t = Instant::now();
    c.send(&Message::Stdin(vec![0x03]));
    let code = loop {
        match c.recv_msg() {
            Message::Exit(code) => break code,
            Message::Stdout(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 130);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn background_jobs_keep_running_and_writing_after_exit() {
    let a = Agent::start();
    let done = a.path("bg-done");
    let t = Instant::now();
    // The job prints after the exec has returned, and more than a pipe holds.
    let o = a.sh(&format!(
        "(sleep 0.5; echo late; head -c 1000000 /dev/zero; touch '{}') & echo started",
        done.display()
    ));
    assert_eq!((o.code, o.out()), (Some(0), "started\n".to_string()));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "exec waited for its job"
    );
    assert!(
        a.wait_for(Duration::from_secs(10), || done.exists()),
        "the background job died (SIGPIPE) or blocked on a full pipe"
    );
}

#[test]
fn forward_reaches_a_listener_on_ipv6_loopback_only() {
    let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback on this machine: skipped");
        return;
    };
    let port = l.local_addr().unwrap().port();
    // Nothing on 127.0.0.1:port (the port is free there, or the check is moot).
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
    });
    let a = Agent::start();
    let mut c = a.connect_fwd();
    c.send(&Message::FwdReq(FwdRequest { port }));
    match c.recv_msg() {
        Message::FwdResp(r) => assert!(r.is_ok(), "{r:?}"),
        other => panic!("{other:?}"),
    }
    c.s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    server.join().unwrap();
}

fn write_file(a: &Agent, path: &str, data: &[u8]) -> Message {
    let mut c = a.connect();
    c.send(&Message::FileWriteReq(FileWriteRequest {
        path: path.into(),
        mode: None,
        size: data.len() as i64,
    }));
    for chunk in data.chunks(MAX_PAYLOAD_LEN) {
        c.send(&Message::Stdin(chunk.to_vec()));
    }
    c.recv_msg()
}

fn no_temp_files(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains("lohar-"), "temp file left: {n}");
    }
}

#[test]
fn writes_through_a_symlink_go_to_its_target() {
    let a = Agent::start();
    let w = a.work();
    let other = a.path("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(w.join("real.txt"), "old").unwrap();
    std::fs::set_permissions(w.join("real.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    symlink("real.txt", w.join("link.txt")).unwrap();
    let ok = Message::FileWriteResp(bhatti_proto::FileWriteResponse::ok());

    assert_eq!(write_file(&a, "link.txt", b"new\n"), ok);
    assert!(std::fs::symlink_metadata(w.join("link.txt"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(w.join("real.txt")).unwrap(), b"new\n");
    let mode = std::fs::metadata(w.join("real.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the target keeps its mode");

    // A chain of links into another directory: the temp file lives (and
    // the rename happens) there, not beside the first link.
    std::fs::write(other.join("far.txt"), "old").unwrap();
    symlink(other.join("far.txt"), w.join("hop2")).unwrap();
    symlink("hop2", w.join("hop1")).unwrap();
    assert_eq!(write_file(&a, "hop1", b"far\n"), ok);
    assert_eq!(std::fs::read(other.join("far.txt")).unwrap(), b"far\n");
    assert!(std::fs::symlink_metadata(w.join("hop1"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::symlink_metadata(w.join("hop2"))
        .unwrap()
        .file_type()
        .is_symlink());

    // A dangling link creates its target.
    symlink("sub/made.txt", w.join("dangling")).unwrap();
    assert_eq!(write_file(&a, "dangling", b"made\n"), ok);
    assert_eq!(std::fs::read(w.join("sub/made.txt")).unwrap(), b"made\n");
    assert!(std::fs::symlink_metadata(w.join("dangling"))
        .unwrap()
        .file_type()
        .is_symlink());

    // A loop of links is refused, not followed forever.
    symlink("loop-b", w.join("loop-a")).unwrap();
    symlink("loop-a", w.join("loop-b")).unwrap();
    match write_file(&a, "loop-a", b"x") {
        Message::ErrorCode(c) => assert_eq!(c, ErrorCode::Invalid),
        other => panic!("{other:?}"),
    }
    no_temp_files(&w);
    no_temp_files(&other);
}

#[test]
fn a_refused_large_write_still_reads_as_the_refusal() {
    let a = Agent::start();
    let dir = a.work().to_str().unwrap().to_string();
    let size = 20_000_000usize;
    let mut c = a.connect();
    c.send(&Message::FileWriteReq(FileWriteRequest {
        path: dir.clone(),
        mode: None,
        size: size as i64,
    }));
    // The whole declared body can be sent: the agent reads and drops it
    // after refusing, instead of closing on the unsent rest.
    let chunk = vec![0u8; MAX_PAYLOAD_LEN];
    let mut sent = 0;
    while sent < size {
        let n = (size - sent).min(chunk.len());
        c.send(&Message::Stdin(chunk[..n].to_vec()));
        sent += n;
    }
    let (code, msg) = c.expect_coded_error();
    assert_eq!(code, ErrorCode::IsADirectory);
    assert_eq!(msg, format!("write {dir}: is a directory"));
    c.expect_closed();

    // A client that gives up after the refusal ends the drain at once.
    let mut c = a.connect();
    c.send(&Message::FileWriteReq(FileWriteRequest {
        path: dir,
        mode: None,
        size: 1 << 40,
    }));
    assert_eq!(c.expect_coded_error().0, ErrorCode::IsADirectory);
    drop(c);
    assert_eq!(a.exec(&["true"]).code, Some(0));
}

#[test]
fn every_reachable_error_code_comes_with_a_posix_message() {
    let a = Agent::start();
    let w = a.work();
    std::fs::write(w.join("file"), "x").unwrap();
    let file = w.join("file").to_str().unwrap().to_string();
    let dir = w.to_str().unwrap().to_string();

    let stat = |p: &str| Message::FileStatReq(FileStatRequest { path: p.into() });
    let ls = |p: &str| Message::FileLsReq(FileLsRequest { path: p.into() });
    let read = |p: &str| {
        Message::FileReadReq(FileReadRequest {
            path: p.into(),
            ..Default::default()
        })
    };

    // not_found
    assert_eq!(
        refusal(&a, stat("/no/such")),
        (
            ErrorCode::NotFound,
            "stat /no/such: no such file or directory".into()
        )
    );
    assert_eq!(
        refusal(&a, read("/no/such")),
        (
            ErrorCode::NotFound,
            "open /no/such: no such file or directory".into()
        )
    );
    assert_eq!(
        refusal(
            &a,
            Message::ExecReq(ExecRequest {
                session_id: Some("nope".into()),
                ..Default::default()
            })
        )
        .0,
        ErrorCode::NotFound
    );
    assert_eq!(
        refusal(
            &a,
            Message::ExecKill(ExecKill {
                session_id: "nope".into()
            })
        )
        .0,
        ErrorCode::NotFound
    );

    // not_a_directory
    assert_eq!(
        refusal(&a, ls(&file)),
        (
            ErrorCode::NotADirectory,
            format!("ls {file}: not a directory")
        )
    );
    let (code, msg) = match write_file(&a, &format!("{file}/child"), b"x") {
        Message::ErrorCode(code) => (code, String::new()),
        other => panic!("{other:?}"),
    };
    assert_eq!(code, ErrorCode::NotADirectory, "{msg}");

    // is_a_directory
    assert_eq!(
        refusal(&a, read(&dir)),
        (
            ErrorCode::IsADirectory,
            format!("read {dir}: is a directory")
        )
    );

    // invalid: a cwd that does not exist or is not a directory names the cwd.
    let mut req = ExecRequest::command(["pwd"]);
    req.cwd = Some("/no/such/dir".into());
    assert_eq!(
        refusal(&a, Message::ExecReq(req)),
        (
            ErrorCode::Invalid,
            "cwd /no/such/dir: no such file or directory".into()
        )
    );
    let mut req = tty(&["pwd"]);
    req.cwd = Some(file.clone());
    assert_eq!(
        refusal(&a, Message::ExecReq(req)),
        (ErrorCode::Invalid, format!("cwd {file}: not a directory"))
    );
    assert_eq!(
        refusal(
            &a,
            Message::FileWriteReq(FileWriteRequest {
                path: "x".into(),
                mode: None,
                size: -1
            })
        )
        .0,
        ErrorCode::Invalid
    );
    let mut c = a.connect();
    c.send_raw(FrameType::ExecReq, b"{not json");
    assert_eq!(c.expect_coded_error().0, ErrorCode::Invalid);

    // busy: attaching "only if detached" to an attached session.
    let (_held, id) = start_session(&a, tty(&["sleep", "60"]));
    assert_eq!(
        refusal(
            &a,
            Message::ExecReq(ExecRequest {
                session_id: Some(id),
                if_detached: true,
                ..Default::default()
            })
        ),
        (
            ErrorCode::Busy,
            "session is attached to another client".into()
        )
    );
}

#[test]
fn attach_applies_the_new_clients_window_size() {
    let a = Agent::start();
    let mut req = tty(&["sh"]);
    req.rows = Some(24);
    req.cols = Some(80);
    let (c, id) = start_session(&a, req);
    drop(c);
    let mut req = ExecRequest {
        session_id: Some(id.clone()),
        rows: Some(50),
        cols: Some(132),
        ..Default::default()
    };
    let (mut c, _) = start_session(&a, req.clone());
    c.send(&Message::Stdin(b"stty size\n".to_vec()));
    let mut acc = Vec::new();
    c.read_until(&mut acc, "50 132");
    // An attach without a size leaves the window as it is.
    drop(c);
    req.rows = None;
    req.cols = None;
    let (mut c, _) = start_session(&a, req);
    c.send(&Message::Stdin(b"stty size; echo E$((1+1))\n".to_vec()));
    let mut acc = Vec::new();
    c.read_until(&mut acc, "E2");
    assert!(String::from_utf8_lossy(&acc).contains("50 132"));
}
