//! Frame I/O over tokio's `AsyncRead`/`AsyncWrite` (feature `tokio`).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, Frame, FrameError, FrameType, HEADER_LEN};

/// Reads the next frame of a known type, skipping unknown ones.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Frame, FrameError> {
    loop {
        let mut head = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let n = r.read(&mut head[got..]).await?;
            if n == 0 {
                return Err(if got == 0 {
                    FrameError::Eof
                } else {
                    FrameError::Truncated
                });
            }
            got += n;
        }
        let len = frame::payload_len_of([head[0], head[1], head[2], head[3]])?;
        match FrameType::from_byte(head[4]) {
            Some(kind) => {
                // read_to_end fills spare capacity without zeroing it first.
                let mut payload = Vec::with_capacity(len);
                let got = (&mut *r).take(len as u64).read_to_end(&mut payload).await?;
                if got != len {
                    return Err(FrameError::Truncated);
                }
                return Ok(Frame { kind, payload });
            }
            None => {
                let skipped =
                    tokio::io::copy(&mut (&mut *r).take(len as u64), &mut tokio::io::sink())
                        .await?;
                if skipped != len as u64 {
                    return Err(FrameError::Truncated);
                }
            }
        }
    }
}

/// Writes one whole frame with a single `write_all`.
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    kind: FrameType,
    payload: &[u8],
) -> Result<(), FrameError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    frame::encode_into(&mut buf, kind, payload)?;
    w.write_all(&buf).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn async_round_trip_and_blocking_compatibility() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FrameType::Stdout, b"abc")
            .await
            .unwrap();
        crate::codec::write_frame(&mut wire, FrameType::Exit, &7i32.to_be_bytes()).unwrap();
        wire.extend_from_slice(&[0, 0, 0, 2, 0xee, 9]);
        write_frame(&mut wire, FrameType::Kill, b"").await.unwrap();
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r).await.unwrap().payload, b"abc");
        assert_eq!(
            read_frame(&mut r).await.unwrap().payload,
            7i32.to_be_bytes()
        );
        assert_eq!(read_frame(&mut r).await.unwrap().kind, FrameType::Kill);
        assert!(matches!(read_frame(&mut r).await, Err(FrameError::Eof)));
        let mut partial = &wire[..2];
        assert!(matches!(
            read_frame(&mut partial).await,
            Err(FrameError::Truncated)
        ));
    }
}
