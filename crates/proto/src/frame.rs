//! The frame: a length-prefixed, typed chunk of bytes.

/// Bytes before the payload: 4 length bytes and the type byte.
pub const HEADER_LEN: usize = 5;
/// Largest allowed value of the length field (type byte + payload).
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Largest payload a single frame can carry.
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - 1;

/// Errors of reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream at a frame boundary.
    #[error("connection closed")]
    Eof,
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The length field is zero (no type byte).
    #[error("frame length is zero")]
    Empty,
    /// The frame is larger than the protocol allows.
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    /// Any other I/O failure.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

macro_rules! frame_types {
    ($( $(#[$doc:meta])* $name:ident = $byte:literal ),* $(,)?) => {
        /// Every frame type the protocol defines.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum FrameType {
            $( $(#[$doc])* $name = $byte, )*
        }

        impl FrameType {
            /// The type for a byte, or `None` for a byte the protocol does not define.
            pub fn from_byte(b: u8) -> Option<Self> {
                match b {
                    $( $byte => Some(FrameType::$name), )*
                    _ => None,
                }
            }
        }
    };
}

frame_types! {
    /// host→guest raw bytes for the child's stdin.
    Stdin = 0x01,
    /// guest→host raw stdout bytes.
    Stdout = 0x02,
    /// guest→host raw stderr bytes.
    Stderr = 0x03,
    /// host→guest rows/cols, u16 BE each.
    Resize = 0x04,
    /// guest→host exit code, i32 BE.
    Exit = 0x05,
    /// either way, a UTF-8 message.
    Error = 0x06,
    /// host→guest, kill the operation.
    Kill = 0x07,
    /// guest→host JSON `{"code"}`, sent right before the ERROR it qualifies.
    ErrorCode = 0x08,
    /// host→guest JSON ExecRequest.
    ExecReq = 0x10,
    /// host→guest token bytes.
    Auth = 0x11,
    /// host→guest JSON `{"port"}`.
    FwdReq = 0x20,
    /// guest→host JSON status.
    FwdResp = 0x21,
    /// host→guest, list sessions.
    ExecListReq = 0x30,
    /// guest→host JSON `[SessionInfo]`.
    ExecListResp = 0x31,
    /// host→guest JSON `{"session_id"}`.
    ExecKill = 0x32,
    /// guest→host JSON SessionInfo.
    SessionInfo = 0x33,
    /// host→guest, ask for activity.
    ActivityReq = 0x40,
    /// guest→host JSON ActivityInfo.
    ActivityResp = 0x41,
    /// host→guest i64 BE: the host's time in unix milliseconds, for CLOCK_REALTIME.
    SetTime = 0x42,
    /// guest→host i64 BE: the guest's time in unix milliseconds before it was set.
    SetTimeResp = 0x43,
    /// host→guest JSON file read request.
    FileReadReq = 0x50,
    /// guest→host JSON `{"size","mode"}`.
    FileReadResp = 0x51,
    /// host→guest JSON file write request.
    FileWriteReq = 0x52,
    /// guest→host JSON `{"status":"ok"}`.
    FileWriteResp = 0x53,
    /// host→guest JSON `{"path"}`.
    FileStatReq = 0x54,
    /// guest→host JSON FileInfo.
    FileStatResp = 0x55,
    /// host→guest JSON `{"path"}`.
    FileLsReq = 0x56,
    /// guest→host JSON `[FileInfo]`.
    FileLsResp = 0x57,
    /// host→guest JSON Identity: take a new identity (after a fork or a restore).
    Identity = 0x60,
    /// guest→host JSON IdentityResp.
    IdentityResp = 0x61,
}

/// A frame whose type is known, as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameType, payload: impl Into<Vec<u8>>) -> Self {
        Frame {
            kind,
            payload: payload.into(),
        }
    }

    /// The frame's bytes as they go on the wire.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FrameError> {
        let mut buf = Vec::with_capacity(HEADER_LEN + self.payload.len());
        encode_into(&mut buf, self.kind, &self.payload)?;
        Ok(buf)
    }
}

/// The header for a frame of `kind` carrying `payload_len` bytes.
pub fn header(kind: FrameType, payload_len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    let len = payload_len + 1;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let l = (len as u32).to_be_bytes();
    Ok([l[0], l[1], l[2], l[3], kind as u8])
}

/// Appends one whole frame to `buf`, so that it can go out in a single write.
pub fn encode_into(buf: &mut Vec<u8>, kind: FrameType, payload: &[u8]) -> Result<(), FrameError> {
    buf.extend_from_slice(&header(kind, payload.len())?);
    buf.extend_from_slice(payload);
    Ok(())
}

/// Checks a length field read off the wire; returns the payload length.
pub fn payload_len_of(len_field: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(len_field) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_byte_round_trips() {
        for b in 0u8..=255 {
            if let Some(t) = FrameType::from_byte(b) {
                assert_eq!(t as u8, b);
            }
        }
        assert_eq!(FrameType::from_byte(0x08), Some(FrameType::ErrorCode));
        assert_eq!(FrameType::from_byte(0x09), None);
        assert_eq!(FrameType::from_byte(0x00), None);
    }

    #[test]
    fn golden_header_bytes() {
        let f = Frame::new(FrameType::Stdout, b"hi".to_vec());
        assert_eq!(f.to_bytes().unwrap(), vec![0, 0, 0, 3, 0x02, b'h', b'i']);
        let f = Frame::new(FrameType::Kill, Vec::new());
        assert_eq!(f.to_bytes().unwrap(), vec![0, 0, 0, 1, 0x07]);
    }

    #[test]
    fn limits_at_and_past_the_edge() {
        assert!(header(FrameType::Stdout, MAX_PAYLOAD_LEN).is_ok());
        assert!(
            matches!(header(FrameType::Stdout, MAX_PAYLOAD_LEN + 1), Err(FrameError::TooLarge(n)) if n == MAX_FRAME_LEN + 1)
        );
        assert_eq!(
            payload_len_of((MAX_FRAME_LEN as u32).to_be_bytes()).unwrap(),
            MAX_PAYLOAD_LEN
        );
        assert!(matches!(
            payload_len_of((MAX_FRAME_LEN as u32 + 1).to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            payload_len_of([0, 0, 0, 0]),
            Err(FrameError::Empty)
        ));
    }
}
