//! Frame helpers on top of `bhatti_proto`: an incremental decoder for the
//! non-blocking exec loop, a buffer-reusing blocking reader for bulk
//! uploads, and a reader that enforces a deadline across many reads.

use std::io::{self, Read, Write};
use std::time::Instant;

use bhatti_proto::frame::{self, FrameError, FrameType, HEADER_LEN};
use bhatti_proto::{ErrorCode, Frame, Message};

use crate::stream::Stream;

/// Writes one message as one frame.
pub fn send(mut w: &Stream, msg: &Message) -> Result<(), FrameError> {
    w.write_all(&msg.to_bytes()?)?;
    Ok(())
}

/// Writes ERROR_CODE and ERROR in one write: the code first, so a reader
/// that knows it has it when the ERROR arrives, and a reader that does not
/// skips it.
pub fn send_error(mut w: &Stream, code: ErrorCode, msg: &str) -> Result<(), FrameError> {
    let mut buf = Message::ErrorCode(code).to_bytes()?;
    buf.extend_from_slice(&Message::Error(msg.to_string()).to_bytes()?);
    w.write_all(&buf)?;
    Ok(())
}

/// Writes one raw frame.
pub fn send_raw(w: &Stream, kind: FrameType, payload: &[u8]) -> Result<(), FrameError> {
    let mut w = w;
    bhatti_proto::codec::write_frame(&mut w, kind, payload)
}

pub use bhatti_proto::codec::read_frame_into;

/// A reader that fails with `TimedOut` once `deadline` has passed, however
/// the peer spreads its bytes over time (a slow-loris cannot extend it).
pub struct DeadlineReader<'a> {
    pub stream: &'a Stream,
    pub deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut.into(),
            _ => e,
        })
    }
}

/// Parses frames out of bytes that arrive in arbitrary pieces. The buffer
/// is zeroed once and reused; it grows only for a frame that does not fit.
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameDecoder {
    pub fn new(size: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
        .with_room(size)
    }

    fn with_room(mut self, size: usize) -> Self {
        self.buf.resize(size.max(HEADER_LEN), 0);
        self
    }

    /// Bytes received but not yet returned as frames.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Makes room at the end: moves unparsed bytes to the front, and grows
    /// the buffer when a whole pending frame would not fit.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end < self.buf.len() {
            return;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.end == self.buf.len() {
            // A single frame larger than the buffer; its size was checked
            // against the protocol limit when its header was parsed, but
            // the header may not be parsed yet: grow by doubling, capped.
            let want = (self.buf.len() * 2).min(HEADER_LEN + frame::MAX_FRAME_LEN);
            self.buf.resize(want.max(self.buf.len() + 1), 0);
        }
    }

    /// One `read` call into the buffer; `Ok(0)` is end of stream.
    pub fn fill_from<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        self.make_room();
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            let avail = &self.buf[self.start..self.end];
            if avail.len() < HEADER_LEN {
                return Ok(None);
            }
            let len = frame::payload_len_of([avail[0], avail[1], avail[2], avail[3]])?;
            if avail.len() < HEADER_LEN + len {
                return Ok(None);
            }
            let kind = FrameType::from_byte(avail[4]);
            let payload = &avail[HEADER_LEN..HEADER_LEN + len];
            let frame = kind.map(|kind| Frame {
                kind,
                payload: payload.to_vec(),
            });
            self.start += HEADER_LEN + len;
            if let Some(f) = frame {
                return Ok(Some(f));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn wire(frames: &[(FrameType, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, p) in frames {
            bhatti_proto::codec::write_frame(&mut out, *k, p).unwrap();
        }
        out
    }

    #[test]
    fn decoder_handles_byte_by_byte_input_and_skips_unknown() {
        let mut bytes = wire(&[(FrameType::Stdin, b"abc")]);
        bytes.extend([0, 0, 0, 2, 0x7e, 9]);
        bytes.extend(wire(&[(FrameType::Kill, b""), (FrameType::Stdin, b"")]));
        let mut d = FrameDecoder::new(4);
        let mut got = Vec::new();
        for b in bytes {
            d.fill_from(&mut Cursor::new(vec![b])).unwrap();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].payload, b"abc");
        assert_eq!(got[1].kind, FrameType::Kill);
        assert!(got[2].payload.is_empty());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn decoder_grows_for_big_frames_and_reuses_its_buffer() {
        let big = vec![7u8; 300_000];
        let bytes = wire(&[(FrameType::Stdin, &big), (FrameType::Stdin, b"x")]);
        let mut d = FrameDecoder::new(1000);
        let mut r = Cursor::new(bytes);
        let mut got = Vec::new();
        while d.fill_from(&mut r).unwrap() > 0 {
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f.payload);
            }
        }
        assert_eq!(got, vec![big, b"x".to_vec()]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn decoder_refuses_oversized_length() {
        let mut d = FrameDecoder::new(16);
        d.fill_from(&mut Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1]))
            .unwrap();
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn read_into_reuses_buffer() {
        let bytes = wire(&[(FrameType::Stdin, b"hello"), (FrameType::Stdin, b"x")]);
        let mut r = Cursor::new(bytes);
        let mut buf = Vec::new();
        assert_eq!(read_frame_into(&mut r, &mut buf).unwrap(), FrameType::Stdin);
        assert_eq!(buf, b"hello");
        read_frame_into(&mut r, &mut buf).unwrap();
        assert_eq!(buf, b"x");
        assert!(matches!(
            read_frame_into(&mut r, &mut buf),
            Err(FrameError::Eof)
        ));
    }
}
