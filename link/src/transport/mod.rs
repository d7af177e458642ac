//! Link transports: one URI names each, one small API hides the differences.
//!
//! The forwarder (host side) **opens** streams with a [`Connector`]; the agent (VM side)
//! **listens** with a [`Listener`] and accepts them. Guest-originated connections travel as
//! dial-back (the agent asks on the control stream, the forwarder opens a stream), so streams are
//! only ever opened by the host side.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hostnet_link::transport::TransportError> {
//! use hostnet_link::transport::{Auth, Connector, Listener};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! // VM side
//! let mut listener = Listener::bind("unix:///run/hostnet/agent.sock".parse()?, Auth::none())?;
//! // host side
//! let connector = Connector::connect("unix:///run/hostnet/agent.sock".parse()?, Auth::none())?;
//! let mut out = connector.open().await?;
//! out.write_all(b"hello").await.ok(); // the opener speaks first (QUIC needs it)
//! out.shutdown().await.ok(); // half-close: the peer reads EOF, and can still reply
//! let mut inc = listener.accept().await?;
//! let mut got = Vec::new();
//! inc.read_to_end(&mut got).await.ok();
//! # Ok(()) }
//! ```
//!
//! | URI | connect | listen | authentication | half-close | reset |
//! |---|---|---|---|---|---|
//! | `vsock://CID:PORT`, `vsock://any:PORT` | yes | yes | listener accepts CID 2 only (configurable) | yes | no (EOF) |
//! | `hybrid-vsock:///path?port=P` | yes | no | the hypervisor socket's permissions | **no** | no |
//! | `unix:///path` | yes | yes | socket file mode 0600 | yes | no (EOF) |
//! | `tcp://HOST:PORT` | yes | yes | shared token, challenge–response ([`Auth::token_file`]) | yes | yes (RST) |
//! | `quic://HOST:PORT` | yes | yes | mutual TLS, pinned certificates ([`TlsIdentity`]) | yes (FIN) | yes (RESET/STOP) |
//! | `hvsock://VMID:PORT` (Windows) | yes | no | Hyper-V: only the host and its VMs reach the socket | yes | no (EOF) |
//!
//! # Host systems
//!
//! What exists on one host system only sits in one `sys` module per OS, chosen where it is
//! declared (the way quinn-udp lays out its platform code); everything else here is the same code
//! on every host. Linux: unix, AF_VSOCK. macOS: unix (vfkit's vsock sockets), no AF_VSOCK.
//! Windows: AF_HYPERV (`hvsock://`), no AF_UNIX (tokio offers none there). A transport the host
//! lacks is refused by [`Connector::connect`] and [`Listener::bind`] with
//! [`TransportError::Unsupported`], which names the transports that are there. `tcp://` and
//! `quic://` work everywhere.
//!
//! * **Half-close** is [`AsyncWrite::poll_shutdown`] (`shutdown().await`): `shutdown(SHUT_WR)` on
//!   sockets, `finish()` on a QUIC send stream. [`Stream::carries_half_close`] is false for
//!   hybrid vsock: vhost-device-vsock turns a host `SHUT_WR` into a full shutdown and never
//!   passes a guest `SHUT_WR` on, so the protocol's framed mode is used there.
//! * **Reset** is [`Stream::reset`]: `SO_LINGER 0` + close on TCP (the peer gets
//!   `ECONNRESET`), `reset()` + `stop()` on QUIC (the peer's read fails with
//!   `ConnectionReset`). AF_UNIX has no RST: the peer sees `ECONNRESET` only if the resetting
//!   side leaves unread data behind, otherwise a clean EOF; AF_VSOCK delivers a plain EOF too.
//!   [`Stream::carries_reset`] says which, so the protocol can signal resets itself (framed
//!   mode, or a control message) where the kernel cannot.
//! * **Dropping** a stream closes it cleanly (a FIN, a QUIC `finish`), like dropping a socket;
//!   to abort, call [`Stream::reset`].
//! * Every [`Connector::open`] is bounded by [`Timeouts`]: `connect` for the socket / QUIC
//!   connection, `handshake` for the token exchange, the hybrid vsock `CONNECT` reply and
//!   `open_bi`.
//! * A [`Listener`] runs its accept loop in a task: per-connection failures (wrong token,
//!   garbage, a slow client, a refused CID, a failed TLS handshake) are logged, counted in
//!   [`Listener::stats`] and skipped; handshakes run concurrently, so a stray client never
//!   blocks a good one. Dropping the listener stops the loop (and removes a unix socket file).

mod auth;
mod endpoint;
mod error;
mod hvsock;
mod hybrid;
mod private;
mod quic;
#[cfg_attr(target_os = "linux", path = "sys/linux.rs")]
#[cfg_attr(all(unix, not(target_os = "linux")), path = "sys/unix.rs")]
#[cfg_attr(windows, path = "sys/windows.rs")]
mod sys;
mod tls;
#[cfg(unix)]
mod unix;
#[cfg(unix)]
mod unix_io;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::splice::Splice;

pub use auth::{Auth, Token, VSOCK_HOST_CID, cid_allowed};
pub use endpoint::{Endpoint, HostPort, VsockCid, VsockEndpoint};
pub use error::TransportError;
pub use hvsock::{AF_HYPERV, BadGuid, Guid, HV_PROTOCOL_RAW, SOCKADDR_HV_LEN, sockaddr_hv};
pub use tls::{ALPN, CERT_FILE, KEY_FILE, TlsIdentity, fingerprint, keygen};
/// The mode of a `unix://` socket file.
pub const SOCKET_MODE: u32 = 0o600;

/// The application error code of a QUIC `RESET_STREAM` / `STOP_SENDING` sent by
/// [`Stream::reset`].
pub const QUIC_RESET_CODE: u32 = 1;

/// How many TCP token handshakes a listener runs at once; connections beyond wait in the backlog.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// The `tcp://` listener's backlog (the kernel caps it at `net.core.somaxconn`): room for a burst
/// of connections beyond [`MAX_PENDING_HANDSHAKES`].
const TCP_BACKLOG: u32 = 4096;
/// Accepted streams not yet taken by [`Listener::accept`].
const ACCEPT_QUEUE: usize = 64;
/// Pause after a failing `accept()` (EMFILE and friends) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Time limits of [`Connector::open`] and of a listener's per-connection handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting a socket or establishing the QUIC connection (default 10 s).
    pub connect: Duration,
    /// The transport handshake: token exchange, hybrid vsock `CONNECT` reply, QUIC `open_bi`
    /// and the QUIC handshake on the listener (default 5 s).
    pub handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(5),
        }
    }
}

/// Who is at the other end of a [`Stream`], for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Peer {
    /// A unix socket: its path, and the peer process's credentials when known.
    Unix {
        /// The socket path.
        path: PathBuf,
        /// The peer's pid (listener side, `SO_PEERCRED`).
        pid: Option<i32>,
        /// The peer's uid (listener side, `SO_PEERCRED`).
        uid: Option<u32>,
    },
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A vsock peer.
    Vsock {
        /// The peer's CID.
        cid: u32,
        /// The peer's port.
        port: u32,
    },
    /// A guest port reached through a hybrid vsock socket.
    HybridVsock {
        /// The hypervisor socket.
        path: PathBuf,
        /// The guest port.
        port: u32,
    },
    /// A Hyper-V socket to a VM's vsock port.
    Hvsock {
        /// The VM's id.
        vm: Guid,
        /// The guest's vsock port.
        port: u32,
    },
    /// A QUIC stream.
    Quic {
        /// The peer's UDP address.
        addr: SocketAddr,
        /// The QUIC stream id.
        stream: u64,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix { path, pid, uid } => {
                write!(f, "unix:{}", path.display())?;
                if let Some(pid) = pid {
                    write!(f, " pid={pid}")?;
                }
                if let Some(uid) = uid {
                    write!(f, " uid={uid}")?;
                }
                Ok(())
            }
            Peer::Tcp(addr) => write!(f, "tcp:{addr}"),
            Peer::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Peer::HybridVsock { path, port } => {
                write!(f, "hybrid-vsock:{}:{port}", path.display())
            }
            Peer::Hvsock { vm, port } => write!(f, "hvsock:{vm}:{port}"),
            Peer::Quic { addr, stream } => write!(f, "quic:{addr}#{stream}"),
        }
    }
}

struct QuicIo {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    conn: quinn::Connection,
}

enum Io {
    Unix(sys::UnixStream),
    Tcp(TcpStream),
    /// The VM socket family of this host: AF_VSOCK (Linux), AF_HYPERV (Windows).
    Vsock(sys::VmStream),
    Quic(Box<QuicIo>),
}

/// One link stream: a byte stream both ways, with half-close ([`AsyncWrite::poll_shutdown`])
/// and reset ([`Stream::reset`]). See the module docs for what each transport carries.
pub struct Stream {
    io: Io,
    peer: Peer,
    half_close: bool,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("peer", &self.peer)
            .field("half_close", &self.half_close)
            .finish_non_exhaustive()
    }
}

impl Stream {
    fn unix(io: sys::UnixStream, path: PathBuf, pid: Option<i32>, uid: Option<u32>) -> Self {
        Self {
            io: Io::Unix(io),
            peer: Peer::Unix { path, pid, uid },
            half_close: true,
        }
    }

    fn quic(send: quinn::SendStream, recv: quinn::RecvStream, conn: &quinn::Connection) -> Self {
        let peer = Peer::Quic {
            addr: conn.remote_address(),
            stream: send.id().index(),
        };
        Self {
            io: Io::Quic(Box::new(QuicIo {
                send,
                recv,
                conn: conn.clone(),
            })),
            peer,
            half_close: true,
        }
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Whether `shutdown()` reaches the peer as an EOF while the other direction keeps
    /// flowing. False for hybrid vsock: run the protocol's framed mode there.
    pub fn carries_half_close(&self) -> bool {
        self.half_close
    }

    /// Whether [`Stream::reset`] reaches the peer as an error (TCP RST, QUIC RESET_STREAM)
    /// rather than possibly a clean EOF (unix, vsock, hybrid vsock).
    pub fn carries_reset(&self) -> bool {
        matches!(self.io, Io::Tcp(_) | Io::Quic(_))
    }

    /// Whether an EOF on this stream can only mean that the peer ended the direction: true for
    /// QUIC (a stream FIN is the application's; a peer that dies leaves a lost connection),
    /// false for sockets, whose kernel closes a dead process's sockets with a FIN (or EOF) just
    /// like a deliberate close. Where false, the protocol's framed mode tells the two apart.
    pub fn eof_is_deliberate(&self) -> bool {
        matches!(self.io, Io::Quic(_))
    }

    /// Aborts the stream: the peer's next read fails with `ConnectionReset` where the
    /// transport can say so ([`Stream::carries_reset`]). TCP: `SO_LINGER 0` then close (RST).
    /// QUIC: `RESET_STREAM` and `STOP_SENDING` with [`QUIC_RESET_CODE`]. unix, vsock: close.
    pub fn reset(self) {
        match self.io {
            Io::Tcp(s) => {
                if let Err(e) = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)) {
                    tracing::debug!(peer = %self.peer, error = %e, "SO_LINGER 0 failed; closing");
                }
            }
            Io::Unix(_) | Io::Vsock(_) => {}
            Io::Quic(mut q) => {
                // Errors mean the stream is already finished/stopped on that side.
                let _ = q.send.reset(VarInt::from_u32(QUIC_RESET_CODE));
                let _ = q.recv.stop(VarInt::from_u32(QUIC_RESET_CODE));
            }
        }
    }

    /// For `tcp://` streams, whether `TCP_NODELAY` is on (both sides set it). `None` for other
    /// transports.
    pub fn tcp_nodelay(&self) -> Option<io::Result<bool>> {
        match &self.io {
            Io::Tcp(s) => Some(s.nodelay()),
            _ => None,
        }
    }

    /// For QUIC streams, the connection they belong to (e.g. to exchange datagrams with
    /// `send_datagram` / `read_datagram`).
    pub fn quic_connection(&self) -> Option<&quinn::Connection> {
        match &self.io {
            Io::Quic(q) => Some(&q.conn),
            _ => None,
        }
    }
}

use quinn::VarInt;

impl Splice for Stream {
    #[cfg(target_os = "linux")]
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        interest: tokio::io::Interest,
        op: &mut crate::splice::FdOp<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        match &mut self.io {
            Io::Unix(s) | Io::Vsock(s) => s.poll_splice(cx, interest, op),
            _ => None,
        }
    }

    #[cfg(target_os = "linux")]
    fn can_splice(&self, way: crate::splice::Way) -> bool {
        match &self.io {
            Io::Unix(s) | Io::Vsock(s) => s.can_splice(way),
            _ => false,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Vsock(s) => Pin::new(s).poll_read(cx, buf),
            Io::Quic(q) => AsyncRead::poll_read(Pin::new(&mut q.recv), cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Vsock(s) => Pin::new(s).poll_write(cx, buf),
            Io::Quic(q) => AsyncWrite::poll_write(Pin::new(&mut q.send), cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Vsock(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Quic(q) => AsyncWrite::poll_write_vectored(Pin::new(&mut q.send), cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Unix(s) => s.is_write_vectored(),
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Vsock(s) => s.is_write_vectored(),
            Io::Quic(q) => AsyncWrite::is_write_vectored(&q.send),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Vsock(s) => Pin::new(s).poll_flush(cx),
            Io::Quic(q) => AsyncWrite::poll_flush(Pin::new(&mut q.send), cx),
        }
    }

    /// Half-close: `shutdown(SHUT_WR)` on sockets, `finish()` on QUIC.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Vsock(s) => Pin::new(s).poll_shutdown(cx),
            Io::Quic(q) => AsyncWrite::poll_shutdown(Pin::new(&mut q.send), cx),
        }
    }
}

/// Resolves `host:port` to its first address.
async fn resolve(endpoint: &Endpoint, hp: &HostPort) -> Result<SocketAddr, TransportError> {
    let resolve_err = |source| TransportError::Resolve {
        endpoint: endpoint.clone(),
        source,
    };
    tokio::net::lookup_host(hp.authority())
        .await
        .map_err(resolve_err)?
        .next()
        .ok_or_else(|| resolve_err(io::Error::new(io::ErrorKind::NotFound, "no address")))
}

/// Resolves a listen address synchronously (binding happens once, at startup).
fn resolve_bind(endpoint: &Endpoint, hp: &HostPort) -> Result<SocketAddr, TransportError> {
    use std::net::ToSocketAddrs;
    let resolve_err = |source| TransportError::Resolve {
        endpoint: endpoint.clone(),
        source,
    };
    hp.authority()
        .to_socket_addrs()
        .map_err(resolve_err)?
        .next()
        .ok_or_else(|| resolve_err(io::Error::new(io::ErrorKind::NotFound, "no address")))
}

enum ConnectorKind {
    Unix(PathBuf),
    Tcp(HostPort, Token),
    Vsock { cid: u32, port: u32 },
    Hybrid { path: PathBuf, port: u32 },
    Hvsock { vm: Guid, port: u32 },
    Quic(Box<quic::QuicConnector>),
}

/// The host side: opens streams to one endpoint. Cheap to share (`Arc<Connector>`); `open`
/// takes `&self` and may run concurrently.
pub struct Connector {
    endpoint: Endpoint,
    timeouts: Timeouts,
    kind: ConnectorKind,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("endpoint", &self.endpoint)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector with the default [`Timeouts`]. Nothing is connected yet: the first
    /// [`open`](Self::open) connects. Checks the endpoint fits the connect side and the
    /// credentials it needs are present (`tcp://`: a token; `quic://`: a [`TlsIdentity`]).
    /// Call it inside a tokio runtime.
    pub fn connect(endpoint: Endpoint, auth: Auth) -> Result<Self, TransportError> {
        Self::connect_with(endpoint, auth, Timeouts::default())
    }

    /// [`Connector::connect`] with explicit timeouts.
    pub fn connect_with(
        endpoint: Endpoint,
        auth: Auth,
        timeouts: Timeouts,
    ) -> Result<Self, TransportError> {
        if let Err(e) = tokio::runtime::Handle::try_current() {
            return Err(TransportError::Connect {
                endpoint,
                source: io::Error::other(e),
            });
        }
        if let Some(reason) = sys::unsupported(&endpoint) {
            return Err(TransportError::Unsupported { endpoint, reason });
        }
        let kind = match &endpoint {
            Endpoint::Unix(path) => ConnectorKind::Unix(path.clone()),
            Endpoint::Tcp(hp) => {
                let token = auth
                    .token
                    .ok_or_else(|| TransportError::MissingCredentials {
                        endpoint: endpoint.clone(),
                        what: "a shared token (token file)",
                    })?;
                ConnectorKind::Tcp(hp.clone(), token)
            }
            Endpoint::Vsock(v) => match v.cid {
                VsockCid::Id(cid) => ConnectorKind::Vsock { cid, port: v.port },
                VsockCid::Any => {
                    return Err(TransportError::Unsupported {
                        endpoint: endpoint.clone(),
                        reason: "`any` is for listening; connect to a CID (vsock://CID:PORT)",
                    });
                }
            },
            Endpoint::HybridVsock { path, port } => ConnectorKind::Hybrid {
                path: path.clone(),
                port: *port,
            },
            Endpoint::Hvsock { vm, port } => ConnectorKind::Hvsock {
                vm: *vm,
                port: *port,
            },
            Endpoint::Quic(hp) => {
                let tls = auth
                    .tls
                    .as_ref()
                    .ok_or_else(|| TransportError::MissingCredentials {
                        endpoint: endpoint.clone(),
                        what: "a certificate, its key and the peer's pinned certificate",
                    })?;
                ConnectorKind::Quic(Box::new(quic::QuicConnector::new(
                    endpoint.clone(),
                    hp.clone(),
                    tls,
                )?))
            }
        };
        Ok(Self {
            endpoint,
            timeouts,
            kind,
        })
    }

    /// The endpoint this connector opens streams to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether the streams this connector opens carry half-close (see
    /// [`Stream::carries_half_close`]).
    pub fn carries_half_close(&self) -> bool {
        !matches!(self.kind, ConnectorKind::Hybrid { .. })
    }

    fn connect_err(&self) -> impl FnOnce(io::Error) -> TransportError + '_ {
        |source| TransportError::Connect {
            endpoint: self.endpoint.clone(),
            source,
        }
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = io::Result<T>>,
    ) -> Result<T, TransportError> {
        tokio::time::timeout(self.timeouts.connect, fut)
            .await
            .map_err(|_| TransportError::ConnectTimeout {
                endpoint: self.endpoint.clone(),
                timeout: self.timeouts.connect,
            })?
            .map_err(self.connect_err())
    }

    /// Opens a new stream: a new socket (unix, tcp, vsock, hybrid vsock) or a new
    /// bidirectional stream on the shared QUIC connection, which is (re)established as needed.
    pub async fn open(&self) -> Result<Stream, TransportError> {
        match &self.kind {
            ConnectorKind::Unix(path) => {
                let s = self.bounded(sys::unix_connect(path)).await?;
                Ok(Stream {
                    io: Io::Unix(s),
                    peer: Peer::Unix {
                        path: path.clone(),
                        pid: None,
                        uid: None,
                    },
                    half_close: true,
                })
            }
            ConnectorKind::Tcp(hp, token) => {
                let addr = resolve(&self.endpoint, hp).await?;
                let mut s = self.bounded(TcpStream::connect(addr)).await?;
                s.set_nodelay(true).map_err(self.connect_err())?;
                self.token_handshake(&mut s, token).await?;
                Ok(Stream {
                    io: Io::Tcp(s),
                    peer: Peer::Tcp(addr),
                    half_close: true,
                })
            }
            ConnectorKind::Vsock { cid, port } => {
                let s = self.bounded(sys::vsock_connect(*cid, *port)).await?;
                Ok(Stream {
                    io: Io::Vsock(s),
                    peer: Peer::Vsock {
                        cid: *cid,
                        port: *port,
                    },
                    half_close: true,
                })
            }
            ConnectorKind::Hybrid { path, port } => {
                let mut s = self.bounded(sys::unix_connect(path)).await?;
                self.hybrid_handshake(&mut s, *port).await?;
                Ok(Stream {
                    io: Io::Unix(s),
                    peer: Peer::HybridVsock {
                        path: path.clone(),
                        port: *port,
                    },
                    half_close: false,
                })
            }
            ConnectorKind::Hvsock { vm, port } => {
                let s = self.bounded(sys::hvsock_connect(vm, *port)).await?;
                Ok(Stream {
                    io: Io::Vsock(s),
                    peer: Peer::Hvsock {
                        vm: *vm,
                        port: *port,
                    },
                    half_close: true,
                })
            }
            ConnectorKind::Quic(q) => q.open(&self.timeouts).await,
        }
    }

    async fn token_handshake(
        &self,
        s: &mut TcpStream,
        token: &Token,
    ) -> Result<(), TransportError> {
        use auth::TokenFailure;
        let stage = "token handshake";
        let result = tokio::time::timeout(self.timeouts.handshake, auth::token_connect(s, token))
            .await
            .map_err(|_| TransportError::HandshakeTimeout {
                endpoint: self.endpoint.clone(),
                stage: stage.into(),
                timeout: self.timeouts.handshake,
            })?;
        result.map_err(|failure| match failure {
            TokenFailure::Io(source) => TransportError::Handshake {
                endpoint: self.endpoint.clone(),
                stage: stage.into(),
                source,
            },
            TokenFailure::BadHello(hello) => TransportError::BadReply {
                endpoint: self.endpoint.clone(),
                stage: stage.into(),
                reply: hello.escape_ascii().to_string(),
                expected: "a hostnet tcp listener's \"HNLT\\x01\" greeting",
            },
            TokenFailure::Rejected => TransportError::AuthRejected {
                endpoint: self.endpoint.clone(),
            },
            TokenFailure::BadStatus(b) => TransportError::BadReply {
                endpoint: self.endpoint.clone(),
                stage: stage.into(),
                reply: format!("status {b:#04x}"),
                expected: "status 0 (accepted) or 1 (rejected)",
            },
            TokenFailure::ListenerProofWrong => TransportError::PeerAuth {
                endpoint: self.endpoint.clone(),
                reason: "the listener does not know the token (its proof is wrong)".into(),
            },
        })
    }

    async fn hybrid_handshake(
        &self,
        s: &mut sys::UnixStream,
        port: u32,
    ) -> Result<(), TransportError> {
        use hybrid::HybridFailure;
        let stage = format!("guest port {port}: CONNECT");
        let result =
            tokio::time::timeout(self.timeouts.handshake, hybrid::connect_handshake(s, port))
                .await
                .map_err(|_| TransportError::HandshakeTimeout {
                    endpoint: self.endpoint.clone(),
                    stage: format!("{stage}: no reply (no listener on the guest port?)"),
                    timeout: self.timeouts.handshake,
                })?;
        match result {
            Ok(host_port) => {
                tracing::debug!(endpoint = %self.endpoint, host_port, "hybrid vsock connected");
                Ok(())
            }
            Err(HybridFailure::ClosedWithoutReply) => Err(TransportError::NoListener {
                endpoint: self.endpoint.clone(),
                port,
            }),
            Err(HybridFailure::Io(source)) => Err(TransportError::Handshake {
                endpoint: self.endpoint.clone(),
                stage,
                source,
            }),
            Err(HybridFailure::BadReply(reply)) => Err(TransportError::BadReply {
                endpoint: self.endpoint.clone(),
                stage,
                reply,
                expected: "OK <port>\\n",
            }),
        }
    }

    /// QUIC: closes the shared connection (its streams fail); the next [`open`](Self::open)
    /// establishes a new one. Other transports: nothing to do.
    pub async fn close_connection(&self) {
        if let ConnectorKind::Quic(q) = &self.kind {
            q.close().await;
        }
    }

    /// QUIC: the shared connection, established if needed (e.g. for datagrams). `None` for
    /// other transports.
    pub async fn quic_connection(&self) -> Result<Option<quinn::Connection>, TransportError> {
        match &self.kind {
            ConnectorKind::Quic(q) => q.connection(&self.timeouts).await.map(Some),
            _ => Ok(None),
        }
    }

    /// QUIC: the current shared connection without connecting. `None` otherwise.
    pub async fn current_quic_connection(&self) -> Option<quinn::Connection> {
        match &self.kind {
            ConnectorKind::Quic(q) => q.current().await,
            _ => None,
        }
    }
}

/// Counters of a [`Listener`].
#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    rejected: AtomicU64,
}

/// A snapshot of a listener's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListenerStats {
    /// Streams handed to (or queued for) [`Listener::accept`].
    pub accepted: u64,
    /// Connections refused: wrong or missing token, garbage, handshake timeout, a refused
    /// vsock CID, a failed QUIC/TLS handshake.
    pub rejected: u64,
}

/// Aborts the accept loop when the listener is dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The VM side: accepts authenticated streams on one endpoint.
///
/// Dropping it stops accepting, removes a unix socket file, and closes its QUIC connections at
/// once (bytes still in flight on their streams are lost): keep it for as long as streams run.
#[derive(Debug)]
pub struct Listener {
    endpoint: Endpoint,
    rx: mpsc::Receiver<Stream>,
    stats: Arc<Stats>,
    _task: AbortOnDrop,
    _file: Option<sys::SocketFile>,
}

impl Listener {
    /// Binds with the default [`Timeouts`] and starts accepting. Checks the credentials the
    /// transport needs are present (`tcp://`: a token; `quic://`: a [`TlsIdentity`]); refuses
    /// `hybrid-vsock://` (connect side only). Call it inside a tokio runtime.
    pub fn bind(endpoint: Endpoint, auth: Auth) -> Result<Self, TransportError> {
        Self::bind_with(endpoint, auth, Timeouts::default())
    }

    /// [`Listener::bind`] with explicit timeouts (the handshake timeout applies).
    pub fn bind_with(
        endpoint: Endpoint,
        auth: Auth,
        timeouts: Timeouts,
    ) -> Result<Self, TransportError> {
        if let Err(e) = tokio::runtime::Handle::try_current() {
            return Err(TransportError::Bind {
                endpoint,
                source: io::Error::other(e),
            });
        }
        if let Some(reason) = sys::unsupported(&endpoint) {
            return Err(TransportError::Unsupported { endpoint, reason });
        }
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let stats = Arc::new(Stats::default());
        let bind_err = |source| TransportError::Bind {
            endpoint: endpoint.clone(),
            source,
        };
        let (bound, task, file) = match &endpoint {
            Endpoint::Unix(path) => {
                let (listener, file) = sys::unix_bind(&endpoint, path)?;
                let task = tokio::spawn(unix_accept_loop(
                    listener,
                    endpoint.clone(),
                    path.clone(),
                    tx,
                    stats.clone(),
                ));
                (endpoint.clone(), task, Some(file))
            }
            Endpoint::Tcp(hp) => {
                let token =
                    auth.token
                        .clone()
                        .ok_or_else(|| TransportError::MissingCredentials {
                            endpoint: endpoint.clone(),
                            what: "a shared token (token file)",
                        })?;
                let addr = resolve_bind(&endpoint, hp)?;
                // Not std's bind: its backlog of 128 overflowed under a burst of streams (each
                // one a TCP connection) while MAX_PENDING_HANDSHAKES were running, and a client
                // whose handshake ACK the kernel dropped waited for SYN-ACK retransmits past
                // its handshake timeout.
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(bind_err)?;
                // Over TIME_WAIT on unix; on Windows SO_REUSEADDR would share a taken port.
                socket.set_reuseaddr(cfg!(unix)).map_err(bind_err)?;
                socket.bind(addr).map_err(bind_err)?;
                let listener = socket.listen(TCP_BACKLOG).map_err(bind_err)?;
                let local = listener.local_addr().map_err(bind_err)?;
                let bound = Endpoint::Tcp(HostPort {
                    host: hp.host.clone(),
                    port: local.port(),
                });
                let task = tokio::spawn(tcp_accept_loop(
                    listener,
                    bound.clone(),
                    token,
                    tx,
                    stats.clone(),
                    timeouts,
                ));
                (bound, task, None)
            }
            Endpoint::Vsock(v) => {
                let listener = sys::vsock_bind(v.cid, v.port).map_err(bind_err)?;
                let task = tokio::spawn(vsock_accept_loop(
                    listener,
                    endpoint.clone(),
                    auth.allowed_cids().to_vec(),
                    tx,
                    stats.clone(),
                ));
                (endpoint.clone(), task, None)
            }
            Endpoint::HybridVsock { .. } | Endpoint::Hvsock { .. } => {
                return Err(TransportError::Unsupported {
                    endpoint: endpoint.clone(),
                    reason: "hybrid vsock and hvsock are connect side only; the guest listens on vsock://any:PORT",
                });
            }
            Endpoint::Quic(hp) => {
                let tls = auth
                    .tls
                    .as_ref()
                    .ok_or_else(|| TransportError::MissingCredentials {
                        endpoint: endpoint.clone(),
                        what: "a certificate, its key and the peer's pinned certificate",
                    })?;
                let addr = resolve_bind(&endpoint, hp)?;
                let server = quic::bind(&endpoint, addr, tls)?;
                let local = server.local_addr().map_err(bind_err)?;
                let bound = Endpoint::Quic(HostPort {
                    host: hp.host.clone(),
                    port: local.port(),
                });
                let task = tokio::spawn(quic::accept_loop(
                    server,
                    bound.clone(),
                    tx,
                    stats.clone(),
                    timeouts,
                ));
                (bound, task, None)
            }
        };
        tracing::info!(endpoint = %bound, "listening");
        Ok(Self {
            endpoint: bound,
            rx,
            stats,
            _task: AbortOnDrop(task),
            _file: file,
        })
    }

    /// The next authenticated stream. Per-connection failures are logged and skipped, so this
    /// only fails if the accept loop itself is gone.
    pub async fn accept(&mut self) -> Result<Stream, TransportError> {
        self.rx
            .recv()
            .await
            .ok_or_else(|| TransportError::ListenerClosed {
                endpoint: self.endpoint.clone(),
            })
    }

    /// The bound endpoint (with the actual port when port 0 was asked for).
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Accepted and rejected connection counts.
    pub fn stats(&self) -> ListenerStats {
        ListenerStats {
            accepted: self.stats.accepted.load(Ordering::Relaxed),
            rejected: self.stats.rejected.load(Ordering::Relaxed),
        }
    }
}

async fn accept_failed(endpoint: &Endpoint, error: io::Error) {
    // ECONNABORTED and the like concern one connection; EMFILE/ENFILE/ENOBUFS would spin.
    tracing::warn!(endpoint = %endpoint, %error, "accept failed; backing off");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

async fn unix_accept_loop(
    listener: sys::UnixListener,
    endpoint: Endpoint,
    path: PathBuf,
    tx: mpsc::Sender<Stream>,
    stats: Arc<Stats>,
) {
    loop {
        match sys::unix_accept(&listener).await {
            Ok((s, pid, uid)) => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let stream = Stream::unix(s, path.clone(), pid, uid);
                tracing::debug!(endpoint = %endpoint, peer = %stream.peer, "accepted");
                if tx.send(stream).await.is_err() {
                    return;
                }
            }
            Err(e) => accept_failed(&endpoint, e).await,
        }
    }
}

async fn tcp_accept_loop(
    listener: TcpListener,
    endpoint: Endpoint,
    token: Token,
    tx: mpsc::Sender<Stream>,
    stats: Arc<Stats>,
    timeouts: Timeouts,
) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            // At the cap, stop accepting until a handshake finishes: further clients wait in the
            // kernel's backlog instead of being refused (a burst of streams is not an attack).
            accepted = listener.accept(), if handshakes.len() < MAX_PENDING_HANDSHAKES => {
                let (mut s, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_failed(&endpoint, e).await;
                        continue;
                    }
                };
                let (endpoint, token, tx, stats) =
                    (endpoint.clone(), token.clone(), tx.clone(), stats.clone());
                handshakes.spawn(async move {
                    if let Err(e) = s.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "TCP_NODELAY failed");
                    }
                    let outcome =
                        tokio::time::timeout(timeouts.handshake, auth::token_accept(&mut s, &token))
                            .await;
                    match outcome {
                        Ok(Ok(())) => {
                            stats.accepted.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(endpoint = %endpoint, %peer, "accepted");
                            let _ = tx
                                .send(Stream {
                                    io: Io::Tcp(s),
                                    peer: Peer::Tcp(peer),
                                    half_close: true,
                                })
                                .await;
                        }
                        Ok(Err(e)) => {
                            stats.rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(endpoint = %endpoint, %peer, error = %e, "token authentication failed; closing");
                            if matches!(e, auth::TokenRejection::WrongToken) {
                                let _ = tokio::time::timeout(
                                    timeouts.handshake,
                                    auth::token_reject(&mut s),
                                )
                                .await;
                            }
                        }
                        Err(_) => {
                            stats.rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(endpoint = %endpoint, %peer, timeout = ?timeouts.handshake, "token handshake timed out; closing");
                        }
                    }
                });
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
        }
    }
}

async fn vsock_accept_loop(
    listener: sys::VmListener,
    endpoint: Endpoint,
    allowed: Vec<u32>,
    tx: mpsc::Sender<Stream>,
    stats: Arc<Stats>,
) {
    loop {
        match sys::vm_accept(&listener).await {
            Ok((s, cid, port)) => {
                if !cid_allowed(cid, &allowed) {
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(endpoint = %endpoint, cid, port, ?allowed, "vsock peer CID not allowed; closing");
                    continue;
                }
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let stream = Stream {
                    io: Io::Vsock(s),
                    peer: Peer::Vsock { cid, port },
                    half_close: true,
                };
                if tx.send(stream).await.is_err() {
                    return;
                }
            }
            Err(e) => accept_failed(&endpoint, e).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_can_cross_tasks() {
        send_sync::<Connector>();
        send_sync::<Listener>();
        send_sync::<Stream>();
        send_sync::<TransportError>();
    }

    #[test]
    fn outside_a_runtime_is_an_error_not_a_panic() {
        let ep: Endpoint = "unix:///nonexistent/dir/x.sock".parse().unwrap();
        assert!(Listener::bind(ep.clone(), Auth::none()).is_err());
        assert!(Connector::connect(ep, Auth::none()).is_err());
    }

    #[tokio::test]
    async fn transports_this_host_lacks_are_refused_by_name() {
        let hv: Endpoint = "hvsock://11223344-5566-7788-99aa-bbccddeeff00:5000"
            .parse()
            .unwrap();
        // Connect side: refused at once on unix hosts (Windows would try to connect).
        if cfg!(unix) {
            let e = Connector::connect(hv.clone(), Auth::none()).unwrap_err();
            assert!(matches!(e, TransportError::Unsupported { .. }), "{e}");
            assert!(e.to_string().contains("Windows"), "{e}");
        }
        // Listen side: hvsock is connect-only everywhere.
        let e = Listener::bind(hv, Auth::none()).unwrap_err();
        assert!(matches!(e, TransportError::Unsupported { .. }), "{e}");
    }

    #[test]
    fn peers_display_for_logs() {
        let p = Peer::Unix {
            path: "/run/a.sock".into(),
            pid: Some(7),
            uid: Some(0),
        };
        assert_eq!(p.to_string(), "unix:/run/a.sock pid=7 uid=0");
        assert_eq!(Peer::Vsock { cid: 2, port: 9 }.to_string(), "vsock:2:9");
        assert_eq!(
            Peer::Tcp("127.0.0.1:5".parse().unwrap()).to_string(),
            "tcp:127.0.0.1:5"
        );
    }
}
