//! Typed messages: one variant per frame type, with decoded payloads.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::activity::ActivityInfo;
use crate::error::{ErrorCode, ErrorCodeInfo};
use crate::exec::{ExecKill, ExecRequest, SessionInfo};
use crate::forward::{FwdRequest, FwdResponse};
use crate::frame::{Frame, FrameError, FrameType};
use crate::fs::{
    FileInfo, FileLsRequest, FileReadRequest, FileReadResponse, FileStatRequest, FileWriteRequest,
    FileWriteResponse,
};
use crate::identity::{Identity, IdentityResp};

/// A frame whose payload could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid {kind:?} payload: {source}")]
    Json {
        kind: FrameType,
        source: serde_json::Error,
    },
    #[error("{kind:?} payload must be {expected} bytes, got {got}")]
    Length {
        kind: FrameType,
        expected: usize,
        got: usize,
    },
    #[error("ERROR payload is not UTF-8")]
    Utf8,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Stdin(Vec<u8>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Resize {
        rows: u16,
        cols: u16,
    },
    Exit(i32),
    Error(String),
    Kill,
    /// The machine code of the ERROR frame that follows.
    ErrorCode(ErrorCode),
    ExecReq(ExecRequest),
    Auth(Vec<u8>),
    FwdReq(FwdRequest),
    FwdResp(FwdResponse),
    ExecListReq,
    ExecListResp(Vec<SessionInfo>),
    ExecKill(ExecKill),
    SessionInfo(SessionInfo),
    ActivityReq,
    ActivityResp(ActivityInfo),
    /// The host's wall clock, unix milliseconds; the agent sets CLOCK_REALTIME to it.
    SetTime(i64),
    /// The guest's wall clock before SET_TIME took effect, unix milliseconds
    /// (how far it lagged).
    SetTimeResp(i64),
    FileReadReq(FileReadRequest),
    FileReadResp(FileReadResponse),
    FileWriteReq(FileWriteRequest),
    FileWriteResp(FileWriteResponse),
    FileStatReq(FileStatRequest),
    FileStatResp(FileInfo),
    FileLsReq(FileLsRequest),
    FileLsResp(Vec<FileInfo>),
    Identity(Identity),
    IdentityResp(IdentityResp),
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, numbers, string maps) cannot fail.
    serde_json::to_vec(v).expect("protocol payloads always serialize")
}

fn from_json<T: DeserializeOwned>(kind: FrameType, p: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(p).map_err(|source| DecodeError::Json { kind, source })
}

fn exact<const N: usize>(kind: FrameType, p: &[u8]) -> Result<[u8; N], DecodeError> {
    p.try_into().map_err(|_| DecodeError::Length {
        kind,
        expected: N,
        got: p.len(),
    })
}

impl Message {
    /// The frame type this message travels in.
    pub fn kind(&self) -> FrameType {
        use Message::*;
        match self {
            Stdin(_) => FrameType::Stdin,
            Stdout(_) => FrameType::Stdout,
            Stderr(_) => FrameType::Stderr,
            Resize { .. } => FrameType::Resize,
            Exit(_) => FrameType::Exit,
            Error(_) => FrameType::Error,
            Kill => FrameType::Kill,
            ErrorCode(_) => FrameType::ErrorCode,
            ExecReq(_) => FrameType::ExecReq,
            Auth(_) => FrameType::Auth,
            FwdReq(_) => FrameType::FwdReq,
            FwdResp(_) => FrameType::FwdResp,
            ExecListReq => FrameType::ExecListReq,
            ExecListResp(_) => FrameType::ExecListResp,
            ExecKill(_) => FrameType::ExecKill,
            SessionInfo(_) => FrameType::SessionInfo,
            ActivityReq => FrameType::ActivityReq,
            ActivityResp(_) => FrameType::ActivityResp,
            SetTime(_) => FrameType::SetTime,
            SetTimeResp(_) => FrameType::SetTimeResp,
            FileReadReq(_) => FrameType::FileReadReq,
            FileReadResp(_) => FrameType::FileReadResp,
            FileWriteReq(_) => FrameType::FileWriteReq,
            FileWriteResp(_) => FrameType::FileWriteResp,
            FileStatReq(_) => FrameType::FileStatReq,
            FileStatResp(_) => FrameType::FileStatResp,
            FileLsReq(_) => FrameType::FileLsReq,
            FileLsResp(_) => FrameType::FileLsResp,
            Identity(_) => FrameType::Identity,
            IdentityResp(_) => FrameType::IdentityResp,
        }
    }

    /// The payload bytes of this message.
    pub fn payload(&self) -> Vec<u8> {
        use Message::*;
        match self {
            Stdin(b) | Stdout(b) | Stderr(b) | Auth(b) => b.clone(),
            Resize { rows, cols } => {
                let (r, c) = (rows.to_be_bytes(), cols.to_be_bytes());
                vec![r[0], r[1], c[0], c[1]]
            }
            Exit(code) => code.to_be_bytes().to_vec(),
            SetTime(ms) | SetTimeResp(ms) => ms.to_be_bytes().to_vec(),
            Error(msg) => msg.as_bytes().to_vec(),
            Kill | ExecListReq | ActivityReq => Vec::new(),
            ErrorCode(code) => json(&ErrorCodeInfo { code: *code }),
            ExecReq(v) => json(v),
            FwdReq(v) => json(v),
            FwdResp(v) => json(v),
            ExecListResp(v) => json(v),
            ExecKill(v) => json(v),
            SessionInfo(v) => json(v),
            ActivityResp(v) => json(v),
            FileReadReq(v) => json(v),
            FileReadResp(v) => json(v),
            FileWriteReq(v) => json(v),
            FileWriteResp(v) => json(v),
            FileStatReq(v) => json(v),
            FileStatResp(v) => json(v),
            FileLsReq(v) => json(v),
            FileLsResp(v) => json(v),
            Identity(v) => json(v),
            IdentityResp(v) => json(v),
        }
    }

    /// This message as a frame.
    pub fn to_frame(&self) -> Frame {
        Frame {
            kind: self.kind(),
            payload: self.payload(),
        }
    }

    /// The wire bytes of this message (header included).
    pub fn to_bytes(&self) -> Result<Vec<u8>, FrameError> {
        self.to_frame().to_bytes()
    }

    /// Decodes a frame's payload into its typed message.
    pub fn decode(frame: &Frame) -> Result<Message, DecodeError> {
        let p = &frame.payload[..];
        let k = frame.kind;
        Ok(match k {
            FrameType::Stdin => Message::Stdin(p.to_vec()),
            FrameType::Stdout => Message::Stdout(p.to_vec()),
            FrameType::Stderr => Message::Stderr(p.to_vec()),
            FrameType::Resize => {
                let b: [u8; 4] = exact(k, p)?;
                Message::Resize {
                    rows: u16::from_be_bytes([b[0], b[1]]),
                    cols: u16::from_be_bytes([b[2], b[3]]),
                }
            }
            FrameType::Exit => Message::Exit(i32::from_be_bytes(exact(k, p)?)),
            FrameType::Error => {
                Message::Error(String::from_utf8(p.to_vec()).map_err(|_| DecodeError::Utf8)?)
            }
            FrameType::Kill => Message::Kill,
            FrameType::ErrorCode => Message::ErrorCode(from_json::<ErrorCodeInfo>(k, p)?.code),
            FrameType::ExecReq => Message::ExecReq(from_json(k, p)?),
            FrameType::Auth => Message::Auth(p.to_vec()),
            FrameType::FwdReq => Message::FwdReq(from_json(k, p)?),
            FrameType::FwdResp => Message::FwdResp(from_json(k, p)?),
            FrameType::ExecListReq => Message::ExecListReq,
            FrameType::ExecListResp => Message::ExecListResp(from_json(k, p)?),
            FrameType::ExecKill => Message::ExecKill(from_json(k, p)?),
            FrameType::SessionInfo => Message::SessionInfo(from_json(k, p)?),
            FrameType::ActivityReq => Message::ActivityReq,
            FrameType::ActivityResp => Message::ActivityResp(from_json(k, p)?),
            FrameType::SetTime => Message::SetTime(i64::from_be_bytes(exact(k, p)?)),
            FrameType::SetTimeResp => Message::SetTimeResp(i64::from_be_bytes(exact(k, p)?)),
            FrameType::FileReadReq => Message::FileReadReq(from_json(k, p)?),
            FrameType::FileReadResp => Message::FileReadResp(from_json(k, p)?),
            FrameType::FileWriteReq => Message::FileWriteReq(from_json(k, p)?),
            FrameType::FileWriteResp => Message::FileWriteResp(from_json(k, p)?),
            FrameType::FileStatReq => Message::FileStatReq(from_json(k, p)?),
            FrameType::FileStatResp => Message::FileStatResp(from_json(k, p)?),
            FrameType::FileLsReq => Message::FileLsReq(from_json(k, p)?),
            FrameType::FileLsResp => Message::FileLsResp(from_json(k, p)?),
            FrameType::Identity => Message::Identity(from_json(k, p)?),
            FrameType::IdentityResp => Message::IdentityResp(from_json(k, p)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(m: Message) {
        let back = Message::decode(&m.to_frame()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn resize_and_exit_edge_values() {
        for (rows, cols) in [(0, 0), (65535, 65535), (0, 65535), (24, 80)] {
            round(Message::Resize { rows, cols });
        }
        for code in [0, 1, 127, 137, -1, i32::MIN, i32::MAX] {
            round(Message::Exit(code));
        }
        assert_eq!(
            Message::Resize {
                rows: 65535,
                cols: 1
            }
            .payload(),
            vec![0xff, 0xff, 0, 1]
        );
        assert_eq!(Message::Exit(-1).payload(), vec![0xff; 4]);
        let short = Frame::new(FrameType::Resize, vec![0, 24, 0]);
        assert!(matches!(
            Message::decode(&short),
            Err(DecodeError::Length {
                expected: 4,
                got: 3,
                ..
            })
        ));
        let long = Frame::new(FrameType::Exit, vec![0; 5]);
        assert!(Message::decode(&long).is_err());
    }

    #[test]
    fn identity_golden_bytes() {
        let id = Identity {
            hostname: "b".into(),
            ip: "10.0.0.7/24".into(),
            gateway: "10.0.0.1".into(),
            mac: "52:54:00:0a:00:07".into(),
            token: "t".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            env: [("K".to_string(), "v".to_string())].into(),
            entropy_hex: "00ff".into(),
            time_unix_ms: 5,
            init: None,
        };
        let want = br#"{"hostname":"b","ip":"10.0.0.7/24","gateway":"10.0.0.1","mac":"52:54:00:0a:00:07","token":"t","machine_id":"0123456789abcdef0123456789abcdef","env":{"K":"v"},"entropy_hex":"00ff","time_unix_ms":5}"#;
        let mut bytes = (want.len() as u32 + 1).to_be_bytes().to_vec();
        bytes.push(0x60);
        bytes.extend_from_slice(want);
        assert_eq!(Message::Identity(id.clone()).to_bytes().unwrap(), bytes);
        round(Message::Identity(id));
        let resp = IdentityResp {
            status: "ok".into(),
            clock_before_unix_ms: -1,
        };
        assert_eq!(
            Message::IdentityResp(resp.clone()).to_bytes().unwrap(),
            [
                &[0u8, 0, 0, 42, 0x61][..],
                br#"{"status":"ok","clock_before_unix_ms":-1}"#
            ]
            .concat()
        );
        round(Message::IdentityResp(resp));
        // A missing field is an error, not a default identity.
        let partial = Frame::new(FrameType::Identity, br#"{"hostname":"b"}"#.to_vec());
        assert!(Message::decode(&partial).is_err());
    }

    #[test]
    fn set_time_golden_bytes() {
        // 2026-11-29T00:00:00.123Z
        let ms: i64 = 1_795_910_400_123;
        assert_eq!(
            Message::SetTime(ms).to_bytes().unwrap(),
            vec![0, 0, 0, 9, 0x42, 0, 0, 0x01, 0xa2, 0x24, 0x99, 0xf8, 0x7b]
        );
        assert_eq!(
            Message::SetTimeResp(-1).to_bytes().unwrap(),
            vec![0, 0, 0, 9, 0x43, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        for v in [0, 1, -1, i64::MIN, i64::MAX, ms] {
            round(Message::SetTime(v));
            round(Message::SetTimeResp(v));
        }
        let short = Frame::new(FrameType::SetTime, vec![0; 7]);
        assert!(matches!(
            Message::decode(&short),
            Err(DecodeError::Length {
                expected: 8,
                got: 7,
                ..
            })
        ));
    }

    #[test]
    fn golden_json_field_names() {
        let req = ExecRequest {
            argv: vec!["sh".into()],
            tty: true,
            rows: Some(30),
            cols: Some(100),
            session_id: Some("s1".into()),
            max_idle_sec: Some(5),
            if_detached: true,
            cwd: Some("/w".into()),
            env: Some([("A".to_string(), "1".to_string())].into()),
        };
        assert_eq!(
            String::from_utf8(Message::ExecReq(req).payload()).unwrap(),
            r#"{"argv":["sh"],"env":{"A":"1"},"tty":true,"rows":30,"cols":100,"cwd":"/w","session_id":"s1","max_idle_sec":5,"if_detached":true}"#
        );
        let info = SessionInfo {
            session_id: "init".into(),
            argv: "sh -c x".into(),
            tty: true,
            running: false,
            exit_code: Some(3),
            attached: false,
            created_at: 1700000000,
        };
        assert_eq!(
            String::from_utf8(Message::SessionInfo(info).payload()).unwrap(),
            r#"{"session_id":"init","argv":"sh -c x","tty":true,"running":false,"exit_code":3,"attached":false,"created_at":1700000000}"#
        );
        let fi = FileInfo {
            name: "a".into(),
            size: 3,
            mode: "0644".into(),
            is_dir: false,
            mtime: 5,
        };
        assert_eq!(
            String::from_utf8(Message::FileStatResp(fi).payload()).unwrap(),
            r#"{"name":"a","size":3,"mode":"0644","is_dir":false,"mtime":5}"#
        );
        let a = ActivityInfo {
            last_activity_unix: 9,
            active_sessions: 1,
            attached_sessions: 0,
        };
        assert_eq!(
            String::from_utf8(Message::ActivityResp(a).payload()).unwrap(),
            r#"{"last_activity_unix":9,"active_sessions":1,"attached_sessions":0}"#
        );
        assert_eq!(
            Message::FwdResp(FwdResponse::ok()).payload(),
            br#"{"status":"ok"}"#
        );
        assert_eq!(
            Message::FwdResp(FwdResponse::error("refused")).payload(),
            br#"{"status":"error","message":"refused"}"#
        );
        assert_eq!(
            Message::FileWriteResp(FileWriteResponse::ok()).payload(),
            br#"{"status":"ok"}"#
        );
    }

    #[test]
    fn golden_error_code_frame() {
        assert_eq!(
            Message::ErrorCode(ErrorCode::NotADirectory)
                .to_bytes()
                .unwrap(),
            [&[0, 0, 0, 27, 0x08][..], br#"{"code":"not_a_directory"}"#].concat()
        );
        assert_eq!(
            Message::ErrorCode(ErrorCode::NoSpace).payload(),
            br#"{"code":"no_space"}"#
        );
        // A newer agent's code this build does not know is still an error.
        let f = Frame::new(FrameType::ErrorCode, br#"{"code":"new_kind"}"#.to_vec());
        assert_eq!(
            Message::decode(&f).unwrap(),
            Message::ErrorCode(ErrorCode::Internal)
        );
    }

    #[test]
    fn minimal_json_from_other_implementations_decodes() {
        let f = Frame::new(
            FrameType::ExecReq,
            br#"{"argv":["true"],"tty":false,"env":null}"#.to_vec(),
        );
        assert_eq!(
            Message::decode(&f).unwrap(),
            Message::ExecReq(ExecRequest::command(["true"]))
        );
        let f = Frame::new(
            FrameType::FileReadReq,
            br#"{"path":"/x","offset":2}"#.to_vec(),
        );
        assert!(matches!(
            Message::decode(&f).unwrap(),
            Message::FileReadReq(FileReadRequest {
                offset: Some(2),
                limit: None,
                ..
            })
        ));
        let bad = Frame::new(FrameType::ExecReq, b"{not json".to_vec());
        assert!(matches!(
            Message::decode(&bad),
            Err(DecodeError::Json { .. })
        ));
    }

    #[test]
    fn every_message_round_trips() {
        round(Message::Stdin(vec![0, 255]));
        round(Message::Stdout(vec![]));
        round(Message::Stderr(b"e".to_vec()));
        round(Message::Error("boom".into()));
        round(Message::Kill);
        round(Message::ErrorCode(ErrorCode::NotFound));
        round(Message::Auth(b"tok".to_vec()));
        round(Message::FwdReq(FwdRequest { port: 65535 }));
        round(Message::ExecListReq);
        round(Message::ExecListResp(vec![]));
        round(Message::ExecKill(ExecKill {
            session_id: "x".into(),
        }));
        round(Message::ActivityReq);
        round(Message::FileReadResp(FileReadResponse {
            size: 1 << 40,
            mode: "0600".into(),
        }));
        round(Message::FileWriteReq(FileWriteRequest {
            path: "/p".into(),
            mode: Some("0755".into()),
            size: -1,
        }));
        round(Message::FileStatReq(FileStatRequest { path: "/".into() }));
        round(Message::FileLsReq(FileLsRequest { path: "/".into() }));
        round(Message::FileLsResp(vec![]));
    }
}
