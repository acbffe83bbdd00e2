//! A quick latency/throughput check of the agent in test mode, with the
//! goals of the issue as thresholds. Not part of the normal run (timing on a
//! shared 2-core machine is noisy); run it in release:
//!
//! ```text
//! cargo test --release -p lohar --test bench -- --ignored --nocapture
//! ```

mod common;

use std::time::{Duration, Instant};

use bhatti_proto::frame::FrameType;
use bhatti_proto::{ExecRequest, FileReadRequest, Message};
use common::{Agent, Opts};

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(n: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..n / 10 {
        f();
    }
    p50((0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect())
}

fn exec_true(a: &Agent) {
    let mut c = a.connect();
    c.send(&Message::ExecReq(ExecRequest::command(["true"])));
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.collect().code, Some(0));
}

fn read_all(a: &Agent, path: &str) -> usize {
    let mut c = a.connect();
    c.send(&Message::FileReadReq(FileReadRequest {
        path: path.into(),
        ..Default::default()
    }));
    let _ = c.recv();
    let mut n = 0;
    loop {
        let f = c.recv();
        match f.kind {
            FrameType::Stdout => n += f.payload.len(),
            _ => return n,
        }
    }
}

#[test]
#[ignore]
fn bench_agent() {
    let a = Agent::with(Opts {
        token: Some("bench-token-0123456789abcdef".into()),
        ..Default::default()
    });
    let n = 2000;
    let floor = time(n, || {
        assert!(std::process::Command::new("true")
            .status()
            .unwrap()
            .success())
    });
    println!("fork+exec+wait true (floor)  p50 {floor:?}");
    let act = time(n, || {
        let mut c = a.connect();
        c.send(&Message::ActivityReq);
        assert!(matches!(c.recv_msg(), Message::ActivityResp(_)));
    });
    println!("ACTIVITY round trip          p50 {act:?}");
    let cpu0 = a.cpu_ticks();
    let ex = time(n, || exec_true(&a));
    let per = (a.cpu_ticks() - cpu0) as f64 * 10_000.0 / (n + n / 10) as f64;
    println!("agent CPU per exec           {per:.0} µs");
    println!(
        "exec true                    p50 {ex:?}  ({:.2}x floor)",
        ex.as_secs_f64() / floor.as_secs_f64()
    );

    let small = a.path("small");
    std::fs::write(&small, vec![b'x'; 1024]).unwrap();
    let small = small.to_str().unwrap().to_string();
    let r1 = time(n, || assert_eq!(read_all(&a, &small), 1024));
    println!("read 1 KiB                   p50 {r1:?}");

    let big = a.path("mib");
    std::fs::write(&big, vec![7u8; 1 << 20]).unwrap();
    let big = big.to_str().unwrap().to_string();
    let rm = time(n / 4, || assert_eq!(read_all(&a, &big), 1 << 20));
    println!(
        "read 1 MiB                   p50 {rm:?}  ({:.2} GB/s)",
        (1 << 20) as f64 / rm.as_secs_f64() / 1e9
    );

    let per = 300;
    let t = Instant::now();
    let hs: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                (0..per).for_each(|_| {
                    assert!(std::process::Command::new("true")
                        .status()
                        .unwrap()
                        .success())
                })
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    let floor_rate = (10 * per) as f64 / t.elapsed().as_secs_f64();
    println!("floor x10 concurrent         {floor_rate:.0}/s");

    let a = std::sync::Arc::new(a);
    let t = Instant::now();
    let hs: Vec<_> = (0..10)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || (0..per).for_each(|_| exec_true(&a)))
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    let rate = (10 * per) as f64 / t.elapsed().as_secs_f64();
    println!("exec true x10 concurrent     {rate:.0}/s");
}
