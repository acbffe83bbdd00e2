//! Property tests of the wire protocol on stable Rust (proptest): the frame
//! decoders (blocking and async) and every message decoder take arbitrary
//! bytes without panicking or allocating past the frame limit, and every
//! valid message survives encode → frame bytes → decode unchanged.
//!
//! `PROPTEST_CASES` raises the number of cases (CI runs the default 256
//! per property; `scripts/test.sh` prints the totals).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::{self, Cursor, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bhatti_proto::codec::{read_frame, write_frame};
use bhatti_proto::frame::{Frame, FrameError, FrameType, MAX_FRAME_LEN, MAX_PAYLOAD_LEN};
use bhatti_proto::*;
use proptest::prelude::*;

/// Records the largest single allocation made while armed, so a test can
/// check that no header, however large it claims to be, makes the decoder
/// allocate more than one frame.
struct PeakAlloc;

static ARMED: AtomicBool = AtomicBool::new(false);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` with its arguments unchanged;
// the bookkeeping touches only atomics and never allocates.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            PEAK.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: as for `alloc`/`dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// The largest single allocation `f` makes (other threads of this test
/// binary may add small ones; none comes near a frame).
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    let out = f();
    ARMED.store(false, Ordering::Relaxed);
    (out, PEAK.load(Ordering::Relaxed))
}

/// A reader that hands out at most `chunk` bytes per read, as a socket may.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.chunk.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

const ALL_TYPES: &[FrameType] = &[
    FrameType::Stdin,
    FrameType::Stdout,
    FrameType::Stderr,
    FrameType::Resize,
    FrameType::Exit,
    FrameType::Error,
    FrameType::Kill,
    FrameType::ErrorCode,
    FrameType::ExecReq,
    FrameType::Auth,
    FrameType::FwdReq,
    FrameType::FwdResp,
    FrameType::ExecListReq,
    FrameType::ExecListResp,
    FrameType::ExecKill,
    FrameType::SessionInfo,
    FrameType::ActivityReq,
    FrameType::ActivityResp,
    FrameType::SetTime,
    FrameType::SetTimeResp,
    FrameType::FileReadReq,
    FrameType::FileReadResp,
    FrameType::FileWriteReq,
    FrameType::FileWriteResp,
    FrameType::FileStatReq,
    FrameType::FileStatResp,
    FrameType::FileLsReq,
    FrameType::FileLsResp,
    FrameType::Identity,
    FrameType::IdentityResp,
];

#[test]
fn every_frame_type_is_listed() {
    let known = (0..=255u8).filter_map(FrameType::from_byte).count();
    assert_eq!(
        known,
        ALL_TYPES.len(),
        "a frame type is missing from ALL_TYPES"
    );
}

fn frame_type() -> impl Strategy<Value = FrameType> {
    prop::sample::select(ALL_TYPES)
}

/// Arbitrary JSON of bounded depth and size, to reach the JSON decoders'
/// paths that random bytes never do.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        prop::sample::select(vec![
            "ok",
            "error",
            "not_found",
            "busy",
            "internal",
            "0644",
            "",
            "/",
            "a",
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 32, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names of the protocol's JSON payloads, and some others.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "argv", "env", "tty", "rows", "cols", "cwd", "session_id", "max_idle_sec",
            "if_detached", "running", "exit_code", "attached", "created_at", "port", "status",
            "message", "code", "path", "offset", "limit", "max_bytes", "size", "mode", "name",
            "is_dir", "mtime", "last_activity_unix", "active_sessions", "attached_sessions",
            "hostname", "ip", "gateway", "mac", "token", "machine_id", "entropy_hex",
            "time_unix_ms", "clock_before_unix_ms",
        ])
        .prop_map(String::from),
        1 => any::<String>(),
    ]
}

fn opt<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    prop::option::of(s)
}

fn text() -> impl Strategy<Value = String> {
    any::<String>()
}

fn env_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(text(), text(), 0..4)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::NotFound,
        ErrorCode::NotADirectory,
        ErrorCode::IsADirectory,
        ErrorCode::PermissionDenied,
        ErrorCode::TooLarge,
        ErrorCode::NoSpace,
        ErrorCode::Invalid,
        ErrorCode::Busy,
        ErrorCode::Exists,
        ErrorCode::Internal,
    ])
}

fn exec_request() -> impl Strategy<Value = ExecRequest> {
    (
        prop::collection::vec(text(), 0..4),
        opt(env_map()),
        any::<bool>(),
        opt(any::<u16>()),
        opt(any::<u16>()),
        opt(text()),
        opt(text()),
        opt(any::<u64>()),
        any::<bool>(),
    )
        .prop_map(
            |(argv, env, tty, rows, cols, cwd, session_id, max_idle_sec, if_detached)| {
                ExecRequest {
                    argv,
                    env,
                    tty,
                    rows,
                    cols,
                    cwd,
                    session_id,
                    max_idle_sec,
                    if_detached,
                }
            },
        )
}

fn session_info() -> impl Strategy<Value = SessionInfo> {
    (
        text(),
        text(),
        any::<bool>(),
        any::<bool>(),
        opt(any::<i32>()),
        any::<bool>(),
        any::<i64>(),
    )
        .prop_map(
            |(session_id, argv, tty, running, exit_code, attached, created_at)| SessionInfo {
                session_id,
                argv,
                tty,
                running,
                exit_code,
                attached,
                created_at,
            },
        )
}

fn file_info() -> impl Strategy<Value = FileInfo> {
    (text(), any::<u64>(), text(), any::<bool>(), any::<i64>()).prop_map(
        |(name, size, mode, is_dir, mtime)| FileInfo {
            name,
            size,
            mode,
            is_dir,
            mtime,
        },
    )
}

fn identity() -> impl Strategy<Value = Identity> {
    (
        (text(), text(), text(), text(), text()),
        (text(), env_map(), text(), any::<i64>()),
    )
        .prop_map(
            |(
                (hostname, ip, gateway, mac, token),
                (machine_id, env, entropy_hex, time_unix_ms),
            )| {
                Identity {
                    hostname,
                    ip,
                    gateway,
                    mac,
                    token,
                    machine_id,
                    env,
                    entropy_hex,
                    time_unix_ms,
                    init: None,
                }
            },
        )
}

/// Every message of the protocol, with arbitrary contents.
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        bytes(512).prop_map(Message::Stdin),
        bytes(512).prop_map(Message::Stdout),
        bytes(512).prop_map(Message::Stderr),
        (any::<u16>(), any::<u16>()).prop_map(|(rows, cols)| Message::Resize { rows, cols }),
        any::<i32>().prop_map(Message::Exit),
        text().prop_map(Message::Error),
        Just(Message::Kill),
        error_code().prop_map(Message::ErrorCode),
        exec_request().prop_map(Message::ExecReq),
        bytes(128).prop_map(Message::Auth),
        any::<u16>().prop_map(|port| Message::FwdReq(FwdRequest { port })),
        (text(), opt(text()))
            .prop_map(|(status, message)| Message::FwdResp(FwdResponse { status, message })),
        Just(Message::ExecListReq),
        prop::collection::vec(session_info(), 0..4).prop_map(Message::ExecListResp),
        text().prop_map(|session_id| Message::ExecKill(ExecKill { session_id })),
        session_info().prop_map(Message::SessionInfo),
        Just(Message::ActivityReq),
        (any::<i64>(), any::<u32>(), any::<u32>()).prop_map(|(l, a, t)| {
            Message::ActivityResp(ActivityInfo {
                last_activity_unix: l,
                active_sessions: a,
                attached_sessions: t,
            })
        }),
        any::<i64>().prop_map(Message::SetTime),
        any::<i64>().prop_map(Message::SetTimeResp),
        (
            text(),
            opt(any::<u64>()),
            opt(any::<u64>()),
            opt(any::<u64>())
        )
            .prop_map(|(path, offset, limit, max_bytes)| Message::FileReadReq(
                FileReadRequest {
                    path,
                    offset,
                    limit,
                    max_bytes
                }
            )),
        (any::<u64>(), text())
            .prop_map(|(size, mode)| Message::FileReadResp(FileReadResponse { size, mode })),
        (text(), opt(text()), any::<i64>()).prop_map(|(path, mode, size)| {
            Message::FileWriteReq(FileWriteRequest { path, mode, size })
        }),
        text().prop_map(|status| Message::FileWriteResp(FileWriteResponse { status })),
        text().prop_map(|path| Message::FileStatReq(FileStatRequest { path })),
        file_info().prop_map(Message::FileStatResp),
        text().prop_map(|path| Message::FileLsReq(FileLsRequest { path })),
        prop::collection::vec(file_info(), 0..4).prop_map(Message::FileLsResp),
        identity().prop_map(Message::Identity),
        (text(), any::<i64>()).prop_map(|(status, clock_before_unix_ms)| {
            Message::IdentityResp(IdentityResp {
                status,
                clock_before_unix_ms,
            })
        }),
    ]
}

/// Reads frames off `wire` until it ends or fails; panics on nothing.
fn drain(r: &mut impl Read) -> (Vec<Frame>, FrameError) {
    let mut frames = Vec::new();
    loop {
        match read_frame(r) {
            Ok(f) => frames.push(f),
            Err(e) => return (frames, e),
        }
    }
}

/// A header announcing `len` bytes of type `kind`, then `body`.
fn with_header(len: u32, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(body);
    v
}

proptest! {
    /// Arbitrary bytes, read in arbitrary chunks: frames or a clean error,
    /// every frame within the limit, never a panic.
    #[test]
    fn frame_decoder_takes_arbitrary_bytes(wire in bytes(4096), chunk in 1usize..64) {
        let (frames, _end) = drain(&mut Trickle { data: &wire, chunk });
        for f in &frames {
            prop_assert!(f.payload.len() <= MAX_PAYLOAD_LEN);
        }
        // Each frame costs at least its 5-byte header.
        prop_assert!(frames.len() * 5 <= wire.len());
    }

    /// Headers claiming any length, with short bodies: the decoder never
    /// allocates more than one frame's worth, and a length past the limit
    /// is refused before anything is read or allocated for it.
    #[test]
    fn frame_decoder_allocates_within_the_limit(
        // Lengths right at and past the limit are where a weakened check
        // hides: weight them as much as the rest.
        len in prop_oneof![
            any::<u32>(),
            0u32..=(MAX_FRAME_LEN as u32 + 8),
            Just(MAX_FRAME_LEN as u32),
            Just(MAX_FRAME_LEN as u32 + 1),
            (MAX_FRAME_LEN as u32 + 1)..=(64 * MAX_FRAME_LEN as u32),
        ],
        kind in any::<u8>(),
        body in bytes(256),
    ) {
        let wire = with_header(len, kind, &body);
        let ((_, end), peak) = peak_alloc(|| drain(&mut Cursor::new(&wire[..])));
        prop_assert!(peak <= MAX_FRAME_LEN, "allocated {peak} bytes");
        if len as usize > MAX_FRAME_LEN {
            prop_assert!(matches!(end, FrameError::TooLarge(n) if n == len as usize), "{end:?}");
        }
        if len == 0 {
            prop_assert!(matches!(end, FrameError::Empty), "{end:?}");
        }
    }

    /// Every message decoder takes arbitrary payload bytes: a message or a
    /// DecodeError; a message it accepts encodes to a payload that decodes
    /// to the same message.
    #[test]
    fn message_decoders_take_arbitrary_payloads(kind in frame_type(), payload in bytes(1024)) {
        if let Ok(m) = Message::decode(&Frame::new(kind, payload)) {
            prop_assert_eq!(m.kind(), kind);
            prop_assert_eq!(Message::decode(&m.to_frame()).ok(), Some(m));
        }
    }

    /// The same with arbitrary JSON payloads, which reach further into the
    /// JSON decoders than random bytes.
    #[test]
    fn message_decoders_take_arbitrary_json(kind in frame_type(), v in json_value()) {
        let payload = serde_json::to_vec(&v).expect("json");
        if let Ok(m) = Message::decode(&Frame::new(kind, payload)) {
            prop_assert_eq!(m.kind(), kind);
            prop_assert_eq!(Message::decode(&m.to_frame()).ok(), Some(m));
        }
    }

    /// Valid messages round-trip through their wire bytes, alone and as a
    /// stream read in arbitrary chunks with unknown frame types mixed in.
    #[test]
    fn valid_messages_round_trip(
        msgs in prop::collection::vec(message(), 1..8),
        chunk in 1usize..300,
        unknown in prop::sample::select(vec![0x00u8, 0x09, 0x12, 0x7f, 0xff]),
    ) {
        let mut wire = Vec::new();
        for m in &msgs {
            let bytes = m.to_bytes().expect("small messages fit a frame");
            prop_assert_eq!(Message::decode(&read_frame(&mut Cursor::new(&bytes)).expect("frame")).ok(), Some(m.clone()));
            wire.extend_from_slice(&bytes);
            // Readers skip frame types they do not know.
            wire.extend_from_slice(&with_header(3, unknown, b"xy"));
        }
        let (frames, end) = drain(&mut Trickle { data: &wire, chunk });
        prop_assert!(matches!(end, FrameError::Eof), "{end:?}");
        let back: Vec<Message> = frames.iter().map(|f| Message::decode(f).expect("decode")).collect();
        prop_assert_eq!(back, msgs);
    }

    /// Writing a frame checks the limit: at most MAX_PAYLOAD_LEN goes out,
    /// anything larger is refused with nothing written.
    #[test]
    fn frame_writer_enforces_the_limit(extra in 0usize..4, kind in frame_type()) {
        let ok = vec![7u8; MAX_PAYLOAD_LEN - extra];
        let mut out = Vec::new();
        write_frame(&mut out, kind, &ok).expect("within the limit");
        prop_assert_eq!(out.len(), ok.len() + 5);
        let mut out = Vec::new();
        let big = vec![7u8; MAX_PAYLOAD_LEN + 1 + extra];
        prop_assert!(matches!(write_frame(&mut out, kind, &big), Err(FrameError::TooLarge(_))));
        prop_assert!(out.is_empty());
    }
}

#[cfg(feature = "tokio")]
mod async_codec {
    use super::*;
    use bhatti_proto::codec_async;

    async fn drain_async(wire: &[u8]) -> (Vec<Frame>, FrameError) {
        let mut r = wire;
        let mut frames = Vec::new();
        loop {
            match codec_async::read_frame(&mut r).await {
                Ok(f) => frames.push(f),
                Err(e) => return (frames, e),
            }
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    proptest! {
        /// The async decoder agrees with the blocking one on any input and
        /// allocates no more than a frame.
        #[test]
        fn async_decoder_matches_blocking(
            wire in prop_oneof![
                bytes(2048),
                (any::<u32>(), any::<u8>(), bytes(64)).prop_map(|(l, k, b)| with_header(l, k, &b)),
            ],
        ) {
            let rt = rt();
            let ((frames, end), peak) = peak_alloc(|| rt.block_on(drain_async(&wire)));
            prop_assert!(peak <= MAX_FRAME_LEN, "allocated {peak} bytes");
            let (want, want_end) = drain(&mut Cursor::new(&wire[..]));
            prop_assert_eq!(frames, want);
            prop_assert_eq!(format!("{end:?}"), format!("{want_end:?}"));
        }
    }
}
