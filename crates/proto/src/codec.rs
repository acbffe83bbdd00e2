//! Blocking frame I/O over any `Read`/`Write`.

use std::io::{self, Read, Write};

use crate::frame::{self, Frame, FrameError, FrameType, HEADER_LEN};

/// Reads the next frame whose type the protocol knows; frames of unknown
/// types are read and dropped, as the protocol asks of every reader.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Frame, FrameError> {
    let mut payload = Vec::new();
    let kind = read_frame_into(r, &mut payload)?;
    Ok(Frame { kind, payload })
}

/// Like [`read_frame`], but into `buf`, which is reused across calls so a
/// long stream of frames (a 50 MiB upload) does not allocate per frame.
pub fn read_frame_into<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<FrameType, FrameError> {
    loop {
        let mut head = [0u8; HEADER_LEN];
        read_header(r, &mut head)?;
        let len = frame::payload_len_of([head[0], head[1], head[2], head[3]])?;
        match FrameType::from_byte(head[4]) {
            Some(kind) => {
                buf.clear();
                buf.resize(len, 0);
                r.read_exact(buf).map_err(truncated)?;
                return Ok(kind);
            }
            None => {
                let skipped = io::copy(&mut r.take(len as u64), &mut io::sink())?;
                if skipped != len as u64 {
                    return Err(FrameError::Truncated);
                }
            }
        }
    }
}

/// Writes one frame in a single `write_all` call, so frames from several
/// writers sharing one stream (behind a lock) never interleave.
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    kind: FrameType,
    payload: &[u8],
) -> Result<(), FrameError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    frame::encode_into(&mut buf, kind, payload)?;
    w.write_all(&buf)?;
    Ok(())
}

fn read_header<R: Read + ?Sized>(r: &mut R, head: &mut [u8; HEADER_LEN]) -> Result<(), FrameError> {
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Eof),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn truncated(e: io::Error) -> FrameError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{MAX_FRAME_LEN, MAX_PAYLOAD_LEN};
    use std::io::Cursor;

    fn bytes_of(frames: &[(FrameType, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, p) in frames {
            write_frame(&mut out, *k, p).unwrap();
        }
        out
    }

    #[test]
    fn round_trip() {
        let wire = bytes_of(&[
            (FrameType::Stdout, b"hello"),
            (FrameType::Kill, b""),
            (FrameType::Error, "é".as_bytes()),
        ]);
        let mut r = Cursor::new(wire);
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame::new(FrameType::Stdout, b"hello".to_vec())
        );
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame::new(FrameType::Kill, vec![])
        );
        assert_eq!(read_frame(&mut r).unwrap().payload, "é".as_bytes());
        assert!(matches!(read_frame(&mut r), Err(FrameError::Eof)));
    }

    #[test]
    fn partial_header_and_partial_payload_are_truncation() {
        let wire = bytes_of(&[(FrameType::Stdout, b"hello")]);
        for cut in 1..wire.len() {
            let mut r = Cursor::new(wire[..cut].to_vec());
            assert!(
                matches!(read_frame(&mut r), Err(FrameError::Truncated)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn unknown_types_are_skipped() {
        let mut wire = vec![0, 0, 0, 4, 0x7f, 1, 2, 3];
        wire.extend(bytes_of(&[(FrameType::Exit, &0i32.to_be_bytes())]));
        let f = read_frame(&mut Cursor::new(wire)).unwrap();
        assert_eq!(f.kind, FrameType::Exit);
    }

    #[test]
    fn oversize_refused_on_write_and_read() {
        let mut out = Vec::new();
        let big = vec![0u8; MAX_PAYLOAD_LEN + 1];
        assert!(matches!(
            write_frame(&mut out, FrameType::Stdout, &big),
            Err(FrameError::TooLarge(_))
        ));
        assert!(out.is_empty(), "nothing may be written for a refused frame");
        // exactly at the limit works
        write_frame(&mut out, FrameType::Stdout, &big[..MAX_PAYLOAD_LEN]).unwrap();
        assert_eq!(
            read_frame(&mut Cursor::new(out)).unwrap().payload.len(),
            MAX_PAYLOAD_LEN
        );
        // a header announcing one byte too many is refused before any allocation
        let mut wire = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        wire.push(0x02);
        assert!(matches!(
            read_frame(&mut Cursor::new(wire)),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn two_writers_thousand_frames_each_read_back_intact() {
        use std::os::unix::net::UnixStream;
        use std::sync::{Arc, Mutex};
        let (a, mut b) = UnixStream::pair().unwrap();
        let a = Arc::new(Mutex::new(a));
        let mut handles = Vec::new();
        for w in 0..2u8 {
            let a = a.clone();
            handles.push(std::thread::spawn(move || {
                for i in 0..1000u32 {
                    let mut p = vec![w; 1 + (i as usize * 37) % 5000];
                    let n = p.len().min(4);
                    p[..n].copy_from_slice(&i.to_be_bytes()[..n]);
                    let mut s = a.lock().unwrap();
                    write_frame(
                        &mut *s,
                        if w == 0 {
                            FrameType::Stdout
                        } else {
                            FrameType::Stderr
                        },
                        &p,
                    )
                    .unwrap();
                }
            }));
        }
        let reader = std::thread::spawn(move || {
            let mut next = [0u32; 2];
            for _ in 0..2000 {
                let f = read_frame(&mut b).unwrap();
                let w = if f.kind == FrameType::Stdout { 0 } else { 1 };
                let i = next[w];
                assert_eq!(f.payload.len(), 1 + (i as usize * 37) % 5000);
                if f.payload.len() >= 4 {
                    assert_eq!(&f.payload[..4], &i.to_be_bytes());
                    assert!(f.payload[4..].iter().all(|&x| x == w as u8));
                }
                next[w] += 1;
            }
            next
        });
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(reader.join().unwrap(), [1000, 1000]);
    }
}
