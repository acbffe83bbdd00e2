//! One connection type for both transports: TCP in a VM, Unix sockets in
//! test mode. Handlers see only [`Stream`], so their code is the same in
//! both modes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// An accepted connection.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

macro_rules! both {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Stream::Unix($s) => $e,
            Stream::Tcp($s) => $e,
        }
    };
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_read_timeout(d))
    }

    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_write_timeout(d))
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        both!(self, s => s.set_nonblocking(on))
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        both!(self, s => s.shutdown(how))
    }

    /// Ends the connection so that the peer reads everything we sent. On
    /// TCP, closing with unread input sends a reset, which can destroy our
    /// last frames (an ERROR, say) before the peer reads them: so half-close
    /// and drain briefly first. Unix sockets have no such problem.
    pub fn close_gracefully(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.shutdown(Shutdown::Write);
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 16 * 1024];
            for _ in 0..64 {
                match (&*s).read(&mut buf) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
        let _ = self.shutdown(Shutdown::Both);
    }

    /// TCP reports a peer's full close only once we send something (the
    /// peer answers with RST); Unix sockets report it at once as POLLHUP.
    pub fn needs_close_probe(&self) -> bool {
        matches!(self, Stream::Tcp(_))
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        both!(*self, s => (&*s).read(buf))
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        both!(*self, s => (&*s).write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        both!(self, s => s.as_fd())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        both!(self, s => s.as_raw_fd())
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// A listening socket of either transport.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => Ok(Stream::Unix(l.accept()?.0)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Frames are small and latency-bound; never wait for Nagle.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graceful_close_delivers_the_last_bytes_despite_unread_input() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let server = Stream::Tcp(l.accept().unwrap().0);
        // The client has sent more than the server will ever read.
        client.write_all(&[1u8; 100_000]).unwrap();
        (&server).write_all(b"last words").unwrap();
        server.close_gracefully();
        drop(server);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
    }
}
