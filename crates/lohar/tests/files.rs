//! File read, write, stat and ls over the real protocol.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bhatti_proto::frame::{FrameType, MAX_PAYLOAD_LEN};
use bhatti_proto::{
    FileInfo, FileLsRequest, FileReadRequest, FileStatRequest, FileWriteRequest, Message,
    MAX_LS_ENTRIES,
};
use common::{Agent, Conn};

/// (size reported, mode reported, bytes received) of a successful read.
fn read(a: &Agent, req: FileReadRequest) -> (u64, String, Vec<u8>) {
    let mut c = a.connect();
    c.send(&Message::FileReadReq(req));
    let Message::FileReadResp(resp) = c.recv_msg() else {
        panic!("expected FILE_READ_RESP")
    };
    let mut data = Vec::new();
    loop {
        let f = c.recv();
        match f.kind {
            FrameType::Stdout => {
                assert!(f.payload.len() <= MAX_PAYLOAD_LEN);
                data.extend_from_slice(&f.payload);
            }
            FrameType::Exit => {
                assert_eq!(f.payload, 0i32.to_be_bytes());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    (resp.size, resp.mode, data)
}

fn read_path(a: &Agent, p: &Path) -> Vec<u8> {
    read(
        a,
        FileReadRequest {
            path: p.to_str().unwrap().into(),
            ..Default::default()
        },
    )
    .2
}

fn window(
    a: &Agent,
    p: &Path,
    offset: Option<u64>,
    limit: Option<u64>,
    max_bytes: Option<u64>,
) -> String {
    let (size, _, data) = read(
        a,
        FileReadRequest {
            path: p.to_str().unwrap().into(),
            offset,
            limit,
            max_bytes,
        },
    );
    assert_eq!(
        size,
        std::fs::metadata(p).unwrap().len(),
        "total size is always reported"
    );
    String::from_utf8(data).unwrap()
}

fn start_write(a: &Agent, path: &str, mode: Option<&str>, size: i64) -> Conn {
    let mut c = a.connect();
    c.send(&Message::FileWriteReq(FileWriteRequest {
        path: path.into(),
        mode: mode.map(Into::into),
        size,
    }));
    c
}

fn write(a: &Agent, path: &str, mode: Option<&str>, data: &[u8]) -> Message {
    let mut c = start_write(a, path, mode, data.len() as i64);
    for chunk in data.chunks(MAX_PAYLOAD_LEN) {
        c.send(&Message::Stdin(chunk.to_vec()));
    }
    c.recv_msg()
}

fn ok() -> Message {
    Message::FileWriteResp(bhatti_proto::FileWriteResponse::ok())
}

fn error_of(a: &Agent, m: Message) -> String {
    let mut c = a.connect();
    c.send(&m);
    let e = c.expect_error();
    c.expect_closed();
    e
}

fn dir_entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn read_whole_empty_and_binary_files() {
    let a = Agent::start();
    let f = a.path("text");
    std::fs::write(&f, "a\nb\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (size, mode, data) = read(
        &a,
        FileReadRequest {
            path: f.to_str().unwrap().into(),
            ..Default::default()
        },
    );
    assert_eq!(
        (size, mode.as_str(), &data[..]),
        (4, "0640", &b"a\nb\n"[..])
    );

    let e = a.path("empty");
    std::fs::write(&e, "").unwrap();
    assert_eq!(
        read(
            &a,
            FileReadRequest {
                path: e.to_str().unwrap().into(),
                ..Default::default()
            }
        )
        .0,
        0
    );
    assert!(read_path(&a, &e).is_empty());

    let b = a.path("binary");
    let bin: Vec<u8> = (0..3 * 1024 * 1024 + 17u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(&b, &bin).unwrap();
    assert!(read_path(&a, &b) == bin);
    // Relative paths resolve against the agent's cwd.
    std::fs::write(a.work().join("rel.txt"), "rel").unwrap();
    assert_eq!(
        read(
            &a,
            FileReadRequest {
                path: "rel.txt".into(),
                ..Default::default()
            }
        )
        .2,
        b"rel"
    );
}

#[test]
fn offset_limit_and_max_bytes() {
    let a = Agent::start();
    let f = a.path("lines");
    std::fs::write(&f, "l1\nl2\nl3\nl4\nl5").unwrap();
    assert_eq!(window(&a, &f, None, None, None), "l1\nl2\nl3\nl4\nl5");
    assert_eq!(window(&a, &f, Some(1), None, None), "l1\nl2\nl3\nl4\nl5");
    assert_eq!(window(&a, &f, Some(2), None, None), "l2\nl3\nl4\nl5");
    assert_eq!(window(&a, &f, Some(1), Some(2), None), "l1\nl2\n");
    assert_eq!(window(&a, &f, Some(4), Some(10), None), "l4\nl5");
    assert_eq!(window(&a, &f, Some(3), Some(1), None), "l3\n");
    assert_eq!(
        window(&a, &f, None, Some(2), Some(4)),
        "l1\nl",
        "bytes end first"
    );
    assert_eq!(
        window(&a, &f, Some(2), Some(1), Some(100)),
        "l2\n",
        "lines end first"
    );
    assert_eq!(window(&a, &f, Some(3), None, Some(5)), "l3\nl4");
    assert_eq!(window(&a, &f, None, None, Some(1)), "l");
    assert_eq!(window(&a, &f, Some(6), None, None), "");
    assert_eq!(window(&a, &f, Some(99), Some(3), Some(3)), "");

    // Windows that straddle 1 MiB read chunks.
    let big = a.path("big");
    let text: String = (1..=300_000).map(|i| format!("line {i}\n")).collect();
    assert!(text.len() > 2 * 1024 * 1024);
    std::fs::write(&big, &text).unwrap();
    assert_eq!(
        window(&a, &big, Some(150_000), Some(3), None),
        "line 150000\nline 150001\nline 150002\n"
    );
    assert_eq!(
        window(&a, &big, Some(299_999), None, None),
        "line 299999\nline 300000\n"
    );
    let tail = window(&a, &big, Some(100_001), None, Some(1_500_000));
    assert_eq!(tail.len(), 1_500_000);
    assert!(tail.starts_with("line 100001\n"));
}

#[test]
fn writes_zero_bytes_modes_new_dirs_and_unicode_names() {
    let a = Agent::start();
    let p = a.path("zero");
    assert_eq!(write(&a, p.to_str().unwrap(), None, b""), ok());
    assert_eq!(std::fs::read(&p).unwrap(), b"");

    let p = a.path("script.sh");
    assert_eq!(
        write(
            &a,
            p.to_str().unwrap(),
            Some("0755"),
            b"#!/bin/sh\necho hi\n"
        ),
        ok()
    );
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    assert_eq!(a.exec(&[p.to_str().unwrap()]).out(), "hi\n");
    // Rewriting without a mode keeps the existing mode.
    assert_eq!(
        write(&a, p.to_str().unwrap(), None, b"#!/bin/sh\necho again\n"),
        ok()
    );
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let p = a.path("private");
    assert_eq!(write(&a, p.to_str().unwrap(), Some("600"), b"s"), ok());
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
        0o600
    );

    let deep = a.path("new/dirs/all/the/way/file.txt");
    assert_eq!(write(&a, deep.to_str().unwrap(), None, b"deep"), ok());
    assert_eq!(std::fs::read(&deep).unwrap(), b"deep");
    assert_eq!(
        std::fs::metadata(&deep).unwrap().permissions().mode() & 0o7777,
        0o644
    );

    let uni = a.path("dïr ünï/ファイル 🚀.txt");
    assert_eq!(
        write(&a, uni.to_str().unwrap(), None, "héllo wörld".as_bytes()),
        ok()
    );
    assert_eq!(read_path(&a, &uni), "héllo wörld".as_bytes());
    let mut c = a.connect();
    c.send(&Message::FileStatReq(FileStatRequest {
        path: uni.to_str().unwrap().into(),
    }));
    let Message::FileStatResp(fi) = c.recv_msg() else {
        panic!()
    };
    assert_eq!(fi.name, "ファイル 🚀.txt");
    assert_eq!(fi.size, "héllo wörld".len() as u64);
    let mut c = a.connect();
    c.send(&Message::FileLsReq(FileLsRequest {
        path: a.path("dïr ünï").to_str().unwrap().into(),
    }));
    let Message::FileLsResp(l) = c.recv_msg() else {
        panic!()
    };
    assert_eq!(
        l.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["ファイル 🚀.txt"]
    );
}

#[test]
fn writes_fifty_mib() {
    let a = Agent::start();
    let data: Vec<u8> = (0..50 * 1024 * 1024u32)
        .map(|i| (i ^ (i >> 9)) as u8)
        .collect();
    let p = a.path("fifty");
    assert_eq!(write(&a, p.to_str().unwrap(), None, &data), ok());
    assert!(std::fs::read(&p).unwrap() == data);
    assert_eq!(
        dir_entries(a.dir.path())
            .iter()
            .filter(|n| n.contains("tmp"))
            .count(),
        0
    );
}

#[test]
fn concurrent_reader_never_sees_a_partial_file() {
    let a = Arc::new(Agent::start());
    let p = a.path("swap");
    let ones = vec![b'a'; 300_000];
    let twos = vec![b'b'; 200_000];
    std::fs::write(&p, &ones).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (a, p, done) = (a.clone(), p.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !done.load(Ordering::Relaxed) || reads < 20 {
                let (size, _, data) = read(
                    &a,
                    FileReadRequest {
                        path: p.to_str().unwrap().into(),
                        ..Default::default()
                    },
                );
                let whole_a = data.len() == 300_000 && data.iter().all(|&b| b == b'a');
                let whole_b = data.len() == 200_000 && data.iter().all(|&b| b == b'b');
                assert!(whole_a || whole_b, "partial read: {} bytes", data.len());
                assert_eq!(size as usize, data.len());
                reads += 1;
            }
            reads
        })
    };
    for i in 0..40 {
        let data = if i % 2 == 0 { &twos } else { &ones };
        assert_eq!(write(&a, p.to_str().unwrap(), None, data), ok());
    }
    done.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() >= 20);
}

#[test]
fn cut_upload_leaves_old_file_and_no_temp_file() {
    let a = Agent::start();
    let dir = a.path("cut");
    std::fs::create_dir(&dir).unwrap();
    let p = dir.join("target");
    std::fs::write(&p, "old content").unwrap();
    let mut c = start_write(&a, p.to_str().unwrap(), None, 1000);
    c.send(&Message::Stdin(vec![b'x'; 500]));
    // Wait until the agent has the temp file open, then cut the stream.
    assert!(a.wait_for(Duration::from_secs(3), || dir_entries(&dir).len() == 2));
    drop(c);
    assert!(
        a.wait_for(Duration::from_secs(3), || dir_entries(&dir) == ["target"]),
        "{:?}",
        dir_entries(&dir)
    );
    assert_eq!(std::fs::read(&p).unwrap(), b"old content");

    // Cut with an empty STDIN frame (end of stream) before `size` bytes.
    let mut c = start_write(&a, p.to_str().unwrap(), None, 10);
    c.send(&Message::Stdin(b"12345".to_vec()));
    c.send(&Message::Stdin(Vec::new()));
    assert!(c.expect_error().contains("5 of 10"));
    assert_eq!(dir_entries(&dir), ["target"]);
    assert_eq!(std::fs::read(&p).unwrap(), b"old content");

    // More bytes than announced is refused too.
    let mut c = start_write(&a, p.to_str().unwrap(), None, 3);
    c.send(&Message::Stdin(b"12345".to_vec()));
    assert!(c.expect_error().contains("longer"));
    assert_eq!(dir_entries(&dir), ["target"]);
}

#[test]
fn refusals_are_error_frames() {
    let a = Agent::start();
    let p = a.path("neg");
    let mut c = start_write(&a, p.to_str().unwrap(), None, -1);
    assert!(c.expect_error().contains("negative"));
    c.expect_closed();
    assert!(!p.exists());
    let mut c = start_write(&a, p.to_str().unwrap(), Some("99x"), 1);
    assert!(c.expect_error().contains("mode"));

    let dir = a.dir.path().to_str().unwrap().to_string();
    let missing = a.path("missing").to_str().unwrap().to_string();
    let file = a.path("a-file");
    std::fs::write(&file, "x").unwrap();
    let file = file.to_str().unwrap().to_string();
    let rd = |p: &str| {
        Message::FileReadReq(FileReadRequest {
            path: p.into(),
            ..Default::default()
        })
    };
    assert!(error_of(&a, rd(&dir)).contains("directory"));
    assert!(error_of(&a, rd(&missing)).contains("missing"));
    assert!(error_of(&a, rd("/dev/null")).contains("not a regular file"));
    assert!(error_of(
        &a,
        Message::FileStatReq(FileStatRequest {
            path: missing.clone()
        })
    )
    .contains("missing"));
    assert!(error_of(
        &a,
        Message::FileLsReq(FileLsRequest {
            path: missing.clone()
        })
    )
    .contains("missing"));
    assert!(!error_of(&a, Message::FileLsReq(FileLsRequest { path: file.clone() })).is_empty());
    let mut c = start_write(&a, &dir, None, 1);
    assert!(c.expect_error().contains("directory"));
    let mut c = a.connect();
    c.send_raw(FrameType::FileReadReq, b"{\"nopath\":1}");
    assert!(c.expect_error().contains("bad request"));
}

#[test]
fn stat_and_ls() {
    let a = Agent::start();
    let d = a.path("tree");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("b.txt"), "bbb").unwrap();
    std::fs::write(d.join("a.txt"), "a").unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink("a.txt", d.join("link")).unwrap();
    std::os::unix::fs::symlink("nowhere", d.join("dangling")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    let mut c = a.connect();
    c.send(&Message::FileStatReq(FileStatRequest {
        path: d.join("b.txt").to_str().unwrap().into(),
    }));
    let Message::FileStatResp(fi) = c.recv_msg() else {
        panic!()
    };
    assert_eq!((fi.name.as_str(), fi.size, fi.is_dir), ("b.txt", 3, false));
    assert!((fi.mtime - now).abs() < 60);
    assert_eq!(fi.mode.len(), 4);
    let mut c = a.connect();
    c.send(&Message::FileStatReq(FileStatRequest {
        path: d.to_str().unwrap().into(),
    }));
    let Message::FileStatResp(fi) = c.recv_msg() else {
        panic!()
    };
    assert!(fi.is_dir);
    assert_eq!(fi.name, "tree");

    let mut c = a.connect();
    c.send(&Message::FileLsReq(FileLsRequest {
        path: d.to_str().unwrap().into(),
    }));
    let Message::FileLsResp(l) = c.recv_msg() else {
        panic!()
    };
    let names: Vec<&str> = l.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["a.txt", "b.txt", "dangling", "link", "sub"]);
    let by = |n: &str| -> &FileInfo { l.iter().find(|f| f.name == n).unwrap() };
    assert_eq!(by("b.txt").size, 3);
    assert!(by("sub").is_dir && !by("a.txt").is_dir);
    assert_eq!(by("link").size, 1, "symlinks are followed");
}

#[test]
fn ls_is_capped() {
    let a = Agent::start();
    let d = a.path("many");
    std::fs::create_dir(&d).unwrap();
    for i in 0..MAX_LS_ENTRIES + 5 {
        std::fs::File::create(d.join(format!("f{i:05}"))).unwrap();
    }
    let mut c = a.connect();
    c.send(&Message::FileLsReq(FileLsRequest {
        path: d.to_str().unwrap().into(),
    }));
    let Message::FileLsResp(l) = c.recv_msg() else {
        panic!()
    };
    assert_eq!(l.len(), MAX_LS_ENTRIES);
}

#[test]
fn read_stops_when_the_client_goes_away() {
    let a = Agent::start();
    let p = a.path("huge");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(8 << 30).unwrap(); // 8 GiB, sparse
    let mut c = a.connect();
    c.send(&Message::FileReadReq(FileReadRequest {
        path: p.to_str().unwrap().into(),
        ..Default::default()
    }));
    let Message::FileReadResp(r) = c.recv_msg() else {
        panic!()
    };
    assert_eq!(r.size, 8 << 30);
    assert_eq!(c.recv().kind, FrameType::Stdout);
    drop(c);
    // Streaming 8 GiB would keep the agent busy for seconds; stopping at
    // once leaves it idle.
    std::thread::sleep(Duration::from_millis(200));
    let before = a.cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let used = a.cpu_ticks() - before;
    assert!(used <= 5, "agent used {used} ticks after the client left");
}
