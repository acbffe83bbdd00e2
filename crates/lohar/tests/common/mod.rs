//! Starts the real lohar binary in test mode and talks to it over its Unix
//! sockets with the blocking codec of bhatti-proto.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bhatti_proto::codec::{read_frame, write_frame};
use bhatti_proto::frame::FrameType;
use bhatti_proto::{ErrorCode, ExecKill, ExecRequest, Frame, FrameError, Message, SessionInfo};

/// Every read in the tests gives up after this: a hang fails, never wedges.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Default, Clone)]
pub struct Opts {
    pub token: Option<String>,
    pub env_json: Option<String>,
    pub init: Option<String>,
}

/// A running agent; killed (with its sessions) on drop.
pub struct Agent {
    child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub fwd: PathBuf,
    /// What the harness authenticates with (a test that sends IDENTITY
    /// sets the new one, so that drop can still kill the sessions).
    pub token: Option<String>,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::with(Opts::default())
    }

    pub fn with(opts: Opts) -> Agent {
        // tmpfs when there is one: the disk of a shared build machine can
        // be slow enough at times to make timing-bound tests flaky.
        let dir = tempfile::Builder::new()
            .prefix("lohar-test")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let sock = dir.path().join("control.sock");
        let fwd = dir.path().join("forward.sock");
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lohar"));
        cmd.env("LOHAR_TEST", "1")
            .env("LOHAR_SOCK", &sock)
            .env("LOHAR_FWD_SOCK", &fwd)
            .env_remove("LOHAR_TOKEN")
            .env_remove("LOHAR_ENV")
            .env_remove("LOHAR_INIT")
            .current_dir(&work)
            .stdin(Stdio::null());
        if let Some(t) = &opts.token {
            cmd.env("LOHAR_TOKEN", t);
        }
        if let Some(e) = &opts.env_json {
            cmd.env("LOHAR_ENV", e);
        }
        if let Some(i) = &opts.init {
            cmd.env("LOHAR_INIT", i);
        }
        let child = cmd.spawn().unwrap();
        let agent = Agent {
            child,
            dir,
            sock,
            fwd,
            token: opts.token,
        };
        let start = Instant::now();
        while !(agent.sock.exists()
            && agent.fwd.exists()
            && UnixStream::connect(&agent.fwd).is_ok())
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "agent did not start listening"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        agent
    }

    /// CPU time (user + system, in clock ticks) the agent has used so far.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        // After the comm field: state is [0], utime [11], stime [12].
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// The agent's working directory (the default cwd of its children).
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A control connection, authenticated if the agent has a token.
    pub fn connect(&self) -> Conn {
        let mut c = self.connect_raw();
        if let Some(t) = &self.token {
            c.send(&Message::Auth(t.as_bytes().to_vec()));
        }
        c
    }

    /// A control connection with no AUTH sent.
    pub fn connect_raw(&self) -> Conn {
        Conn::new(UnixStream::connect(&self.sock).unwrap())
    }

    pub fn connect_fwd(&self) -> Conn {
        let mut c = Conn::new(UnixStream::connect(&self.fwd).unwrap());
        if let Some(t) = &self.token {
            c.send(&Message::Auth(t.as_bytes().to_vec()));
        }
        c
    }

    /// Runs a piped command to completion.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.exec_req(ExecRequest::command(argv.iter().copied()), &[])
    }

    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// Sends the request and `stdin` (then half-closes), collects everything.
    pub fn exec_req(&self, req: ExecRequest, stdin: &[u8]) -> Output {
        let mut c = self.connect();
        c.send(&Message::ExecReq(req));
        // Write stdin from another thread, as a real client does: the
        // agent applies backpressure, so writing everything before reading
        // could block both sides.
        let mut w = c.s.try_clone().unwrap();
        let stdin = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            for chunk in stdin.chunks(100_000) {
                if w.write_all(&Message::Stdin(chunk.to_vec()).to_bytes().unwrap())
                    .is_err()
                {
                    return;
                }
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let out = c.collect();
        writer.join().unwrap();
        out
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let mut c = self.connect();
        c.send(&Message::ExecListReq);
        match c.recv_msg() {
            Message::ExecListResp(l) => l,
            other => panic!("expected EXEC_LIST_RESP, got {other:?}"),
        }
    }

    pub fn session(&self, id: &str) -> Option<SessionInfo> {
        self.list().into_iter().find(|s| s.session_id == id)
    }

    /// Polls `cond` for up to `limit`.
    /// Pids of the agent's direct children whose command name
    /// (`/proc/PID/comm`) is `comm`: lets a test wait until a program has
    /// really started instead of sleeping.
    pub fn children_named(&self, comm: &str) -> Vec<i32> {
        let me = self.child.id().to_string();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                // stat: "pid (comm) state ppid …"; comm may hold spaces.
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                let Some((head, rest)) = stat.rsplit_once(") ") else {
                    return false;
                };
                let name = head.split_once(" (").map(|(_, n)| n);
                let ppid = rest.split_whitespace().nth(1);
                name == Some(comm) && ppid == Some(me.as_str())
            })
            .collect()
    }

    pub fn wait_for(&self, limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        cond()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Sessions outlive their clients by design: kill them before the agent.
        // Best effort, never a panic: a test may have changed the token
        // (IDENTITY), and then the agent refuses and closes.
        if let Ok(s) = UnixStream::connect(&self.sock) {
            let mut c = Conn::new(s);
            if let Some(t) = &self.token {
                let _ = c.try_send(&Message::Auth(t.as_bytes().to_vec()));
            }
            let _ = c.try_send(&Message::ExecListReq);
            if let Ok(Message::ExecListResp(list)) = c
                .try_recv()
                .ok()
                .and_then(|f| Message::decode(&f).ok())
                .ok_or(())
            {
                for s in list.into_iter().filter(|s| s.running) {
                    if let Ok(k) = UnixStream::connect(&self.sock) {
                        let mut k = Conn::new(k);
                        if let Some(t) = &self.token {
                            let _ = k.try_send(&Message::Auth(t.as_bytes().to_vec()));
                        }
                        let _ = k.try_send(&Message::ExecKill(ExecKill {
                            session_id: s.session_id,
                        }));
                        let _ = k.try_recv();
                    }
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The result of a piped exec.
#[derive(Debug, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub code: Option<i32>,
    pub error: Option<String>,
    /// The ERROR_CODE that came before the ERROR.
    pub error_code: Option<ErrorCode>,
    /// Every frame type in arrival order (STDOUT/STDERR/EXIT/ERROR).
    pub kinds: Vec<FrameType>,
    /// (stream, bytes) in arrival order.
    pub chunks: Vec<(FrameType, Vec<u8>)>,
}

impl Output {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// One client connection.
pub struct Conn {
    pub s: UnixStream,
}

impl Conn {
    pub fn new(s: UnixStream) -> Conn {
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        Conn { s }
    }

    pub fn send(&mut self, m: &Message) {
        self.s.write_all(&m.to_bytes().unwrap()).unwrap();
    }

    /// [`Conn::send`] that reports a closed peer instead of panicking.
    pub fn try_send(&mut self, m: &Message) -> std::io::Result<()> {
        self.s.write_all(&m.to_bytes().unwrap())
    }

    pub fn send_raw(&mut self, kind: FrameType, payload: &[u8]) {
        write_frame(&mut self.s, kind, payload).unwrap();
    }

    pub fn try_recv(&mut self) -> Result<Frame, FrameError> {
        read_frame(&mut self.s)
    }

    pub fn recv(&mut self) -> Frame {
        match self.try_recv() {
            Ok(f) => f,
            Err(e) => panic!("expected a frame: {e}"),
        }
    }

    pub fn recv_msg(&mut self) -> Message {
        Message::decode(&self.recv()).unwrap()
    }

    /// The next frames must be ERROR_CODE and ERROR; returns the message.
    pub fn expect_error(&mut self) -> String {
        self.expect_coded_error().1
    }

    /// The next frame must be an ERROR (its ERROR_CODE already read).
    pub fn expect_error_only(&mut self) -> String {
        match self.recv_msg() {
            Message::Error(e) => e,
            other => panic!("expected ERROR, got {other:?}"),
        }
    }

    /// The next frames must be ERROR_CODE and ERROR; returns both.
    pub fn expect_coded_error(&mut self) -> (ErrorCode, String) {
        let code = match self.recv_msg() {
            Message::ErrorCode(c) => c,
            other => panic!("expected ERROR_CODE, got {other:?}"),
        };
        match self.recv_msg() {
            Message::Error(e) => (code, e),
            other => panic!("expected ERROR after ERROR_CODE, got {other:?}"),
        }
    }

    /// The agent must close the connection (EOF, possibly after a reset).
    pub fn expect_closed(&mut self) {
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Ok(n) => panic!("expected close, got {n} more bytes"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected close, got {e}"),
        }
    }

    /// Reads exec frames until EXIT, ERROR or close.
    pub fn collect(&mut self) -> Output {
        let mut o = Output::default();
        loop {
            let f = match self.try_recv() {
                Ok(f) => f,
                Err(FrameError::Eof) => return o,
                Err(e) => panic!("reading exec output: {e}"),
            };
            o.kinds.push(f.kind);
            match f.kind {
                FrameType::Stdout => {
                    o.stdout.extend_from_slice(&f.payload);
                    o.chunks.push((f.kind, f.payload));
                }
                FrameType::Stderr => {
                    o.stderr.extend_from_slice(&f.payload);
                    o.chunks.push((f.kind, f.payload));
                }
                FrameType::Exit => {
                    o.code = Some(i32::from_be_bytes(f.payload[..4].try_into().unwrap()));
                    return o;
                }
                FrameType::Error => {
                    o.error = Some(String::from_utf8_lossy(&f.payload).into_owned());
                    return o;
                }
                FrameType::ErrorCode => match Message::decode(&f) {
                    Ok(Message::ErrorCode(c)) => o.error_code = Some(c),
                    other => panic!("bad ERROR_CODE frame: {other:?}"),
                },
                other => panic!("unexpected frame {other:?} in exec output"),
            }
        }
    }

    /// Reads STDOUT frames until `needle` has appeared in the accumulated
    /// output; returns everything read. Panics on EXIT/ERROR/timeout.
    pub fn read_until(&mut self, acc: &mut Vec<u8>, needle: &str) {
        while !String::from_utf8_lossy(acc).contains(needle) {
            let f = self.recv();
            match f.kind {
                FrameType::Stdout | FrameType::Stderr => acc.extend_from_slice(&f.payload),
                other => panic!(
                    "waiting for {needle:?}: got {other:?} ({:?}); output so far {:?}",
                    f.payload,
                    String::from_utf8_lossy(acc)
                ),
            }
        }
    }
}

/// True if the process exists and is not a zombie (kill -0 alone would
/// count an unreaped zombie as alive).
pub fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s.rsplit(')')
                .next()
                .and_then(|r| r.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}

/// Reads a pid written by a test script, waiting for the file to appear.
pub fn read_pid(path: &Path) -> i32 {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(p) = s.trim().parse() {
                return p;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "pid file {path:?} never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
