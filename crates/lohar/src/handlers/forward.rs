//! The forward channel: FWD_REQ dials 127.0.0.1:port (or [::1]:port) inside
//! the guest, then the connection becomes a raw byte relay in both
//! directions.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use bhatti_proto::{io_phrase, FwdRequest, FwdResponse, Message};

use super::HandlerError;
use crate::server::Agent;
use crate::stream::Stream;
use crate::wire;

const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const RELAY_BUF: usize = 64 * 1024;

/// FWD_REQ. A failed dial is a FWD_RESP with status "error", not an ERROR.
/// A forwarded connection counts as activity: someone uses the sandbox.
pub fn handle(agent: &Agent, conn: &Stream, req: FwdRequest) -> Result<(), HandlerError> {
    agent.activity.touch();
    let target = match dial_loopback(req.port) {
        Ok(t) => t,
        Err(e) => {
            wire::send(conn, &Message::FwdResp(FwdResponse::error(e)))?;
            return Ok(());
        }
    };
    let _ = target.set_nodelay(true);
    wire::send(conn, &Message::FwdResp(FwdResponse::ok()))?;
    relay(conn, target)?;
    Ok(())
}

/// Dials `port` on IPv4 loopback, then on IPv6 loopback: a server bound
/// to `localhost` may listen on `::1` only (the guest resolves `localhost`
/// to `::1` first), and the port list shows both families.
fn dial_loopback(port: u16) -> Result<TcpStream, String> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let e4 = match TcpStream::connect_timeout(&v4, DIAL_TIMEOUT) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&v6, DIAL_TIMEOUT).map_err(|e6| {
        format!(
            "dial {v4}: {}; dial {v6}: {}",
            io_phrase(&e4),
            io_phrase(&e6)
        )
    })
}

/// Copies both ways until both directions end; an end of stream on one
/// side becomes a half-close on the other.
fn relay(client: &Stream, target: TcpStream) -> io::Result<()> {
    let client_in = client.try_clone()?;
    let target_out = target.try_clone()?;
    let up = std::thread::Builder::new()
        .name("fwd-up".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            let res = copy(&mut &client_in, &mut &target_out);
            match res {
                Ok(()) => {
                    let _ = target_out.shutdown(Shutdown::Write);
                }
                // A broken side tears down both, so the other copy ends too.
                Err(_) => {
                    let _ = target_out.shutdown(Shutdown::Both);
                    let _ = client_in.shutdown(Shutdown::Both);
                }
            }
        })?;
    match copy(&mut &target, &mut { client }) {
        Ok(()) => {
            let _ = client.shutdown(Shutdown::Write);
        }
        Err(_) => {
            let _ = target.shutdown(Shutdown::Both);
            let _ = client.shutdown(Shutdown::Both);
        }
    }
    let _ = up.join();
    Ok(())
}

fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}
