//! The TCP proxy: accept loop, backend connect, relay.
//!
//! One task per connection on a single-threaded runtime. The accept loop never ends on a
//! transient error: on `EMFILE`, `ENFILE`, `ENOBUFS` or `ENOMEM` it gives up a reserve descriptor,
//! accepts and resets what is queued (so clients learn at once instead of hanging), takes the
//! reserve back and backs off, until descriptors free up.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::relay;

/// Everything a connection handler needs.
#[derive(Debug)]
pub struct TcpProxy {
    /// The container address (`-container-ip:-container-port`).
    pub backend: SocketAddr,
    /// Tunables.
    pub config: Config,
}

/// Longest pause between accept attempts while descriptors are exhausted.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Most queued connections reset per exhaustion event.
const SHED_MAX: usize = 64;

/// Serves `listener` until a fatal accept error, which is returned.
pub async fn serve(listener: TcpListener, proxy: Rc<TcpProxy>) -> io::Error {
    // Accepted sockets inherit TCP_NODELAY and the keepalive settings from the listener (Linux
    // clones the listening socket), which saves five setsockopt calls per connection.
    tune(SockRef::from(&listener));
    let mut reserve = Reserve::open();
    let mut backoff = Duration::from_millis(5);
    let mut exhausted: u64 = 0;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                reserve.refill();
                let proxy = Rc::clone(&proxy);
                let span = info_span!("conn", %peer);
                tokio::task::spawn_local(handle(stream, peer, proxy).instrument(span));
            }
            Err(e) if is_exhaustion(&e) => {
                exhausted += 1;
                let shed = reserve.shed(listener.as_fd());
                if exhausted.is_power_of_two() {
                    warn!(error = %e, exhausted, shed, backoff_ms = backoff.as_millis() as u64,
                        "accept failed for lack of resources; shedding load and retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) if is_transient(&e) => debug!(error = %e, "accept: transient error"),
            Err(e) => return e,
        }
    }
}

/// The accept errors that mean "out of descriptors or memory for now": back off and retry.
pub(crate) fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accept errors that concern one connection only.
pub(crate) fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EAGAIN
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENONET
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EOPNOTSUPP
        )
    )
}

/// A descriptor held back so that, when the process runs out, one can be freed to accept and
/// reset queued connections rather than leave them waiting.
#[derive(Debug)]
pub(crate) struct Reserve(Option<OwnedFd>);

impl Reserve {
    pub(crate) fn open() -> Reserve {
        Reserve(std::fs::File::open("/dev/null").ok().map(OwnedFd::from))
    }

    /// Takes the reserve back if an earlier attempt could not.
    pub(crate) fn refill(&mut self) {
        if self.0.is_none() {
            *self = Reserve::open();
        }
    }

    /// Frees the reserve, accepts and resets up to [`SHED_MAX`] queued connections, and takes
    /// the reserve back. Returns how many were reset. (On an SCTP listener the reset is an ABORT
    /// of the association: `SO_LINGER` 0 works the same there.)
    pub(crate) fn shed(&mut self, listener: BorrowedFd<'_>) -> usize {
        self.0 = None;
        let mut shed = 0;
        while shed < SHED_MAX {
            let accepted = nix::sys::socket::accept4(
                listener.as_raw_fd(),
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            );
            match accepted {
                Ok(fd) => {
                    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                    let _ = SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                    shed += 1;
                }
                Err(_) => break,
            }
        }
        *self = Reserve::open();
        shed
    }
}

/// Options on both legs, as docker-proxy (Go) sets them: no Nagle, keepalive 15 s / 15 s / 9.
fn tune(sock: SockRef<'_>) {
    let _ = sock.set_tcp_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(15))
        .with_retries(9);
    let _ = sock.set_tcp_keepalive(&ka);
}

async fn connect(backend: SocketAddr) -> io::Result<TcpStream> {
    let sock = if backend.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    tune(SockRef::from(&sock));
    sock.connect(backend).await
}

async fn handle(client: TcpStream, peer: SocketAddr, proxy: Rc<TcpProxy>) {
    let backend = match tokio::time::timeout(proxy.config.connect_timeout, connect(proxy.backend))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(backend = %proxy.backend, error = %e,
                "Can't forward traffic to backend tcp/{}: {e}; resetting the client", proxy.backend);
            relay::reset(client);
            return;
        }
        Err(_) => {
            info!(backend = %proxy.backend, timeout_ms = proxy.config.connect_timeout.as_millis() as u64,
                "Can't forward traffic to backend tcp/{}: connect timed out; resetting the client", proxy.backend);
            relay::reset(client);
            return;
        }
    };
    if proxy.config.proxy_protocol
        && let Err(e) = send_proxy_header(&client, &backend, peer).await
    {
        info!(error = %e, "cannot send the PROXY protocol header; resetting both sides");
        relay::reset(client);
        relay::reset(backend);
        return;
    }
    let outcome = relay::relay(&client, &backend).await;
    match outcome.error {
        None => {
            debug!(up = outcome.up, down = outcome.down, "connection closed");
        }
        Some((side, e)) => {
            debug!(up = outcome.up, down = outcome.down, ?side, error = %e,
                "connection ended in error; resetting both sides");
            relay::reset(client);
            relay::reset(backend);
        }
    }
}

/// Writes a PROXY protocol v2 header naming the client and the address it connected to.
async fn send_proxy_header(
    client: &TcpStream,
    backend: &TcpStream,
    peer: SocketAddr,
) -> io::Result<()> {
    let local = client.local_addr()?;
    let (src, dst) = unmap_pair(peer, local);
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()?;
    let mut off = 0;
    while off < header.len() {
        backend.writable().await?;
        match backend.try_write(&header[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An IPv4 client on a dual-stack socket appears v4-mapped; the header names it as IPv4.
fn unmap_pair(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let unmap = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    };
    let (s, d) = (unmap(src), unmap(dst));
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        (src, dst)
    }
}
