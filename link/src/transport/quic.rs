//! `quic://`: one QUIC connection carries every stream; each [`Connector::open`] is an
//! `open_bi()` on it, re-established when it is lost.
//!
//! **Welcome.** In TLS 1.3 the client finishes its handshake before the server has checked the
//! client's certificate, so a listener that refuses the host's certificate would only show up
//! as a failure of the first stream. So the listener, once it has accepted a connection, opens
//! one unidirectional stream, writes [`WELCOME`] and finishes it; the connector waits for that
//! (under the handshake timeout) before it uses the connection. A refused certificate thus
//! fails `open()` with the listener's reason ("... is not the pinned ...").
//!
//! Note: QUIC announces a stream to the peer only when its first frame is sent, so the
//! listener's `accept()` sees a stream after the opener writes its first byte. The link protocol
//! always starts with the opener's preface, so this does not show, but an opener that waits for
//! the listener to speak first would wait forever.
//!
//! [`Connector::open`]: super::Connector::open

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;

use super::endpoint::{Endpoint, HostPort};
use super::error::TransportError;
use super::tls::{self, TlsIdentity};
use super::{Stats, Stream, Timeouts, resolve};

/// What the listener writes on its welcome stream.
pub(crate) const WELCOME: &[u8] = b"hostnet/1 welcome";

/// Concurrent bidirectional streams each side allows its peer to open.
const MAX_STREAMS: u32 = 4096;
/// Keep-alive interval: a PING when nothing else was sent, so that a live connection is never
/// idle for [`IDLE_TIMEOUT`], and NAT bindings stay open.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A connection with no packet for this long is lost. This is what finds a QUIC peer that
/// vanished without a word (killed: no CONNECTION_CLOSE; its VM paused; the path gone) within
/// 6 s: the session's heartbeats (every 5 s, 15 s timeout) are slower on purpose (an idle
/// session wakes nobody more than about once a second), and unlike a stream socket a QUIC
/// connection has no EOF or reset from the peer's kernel. The price is this keep-alive's
/// traffic on an idle QUIC link (a PING and its ACK every 2 s), and three keep-alives lost in a
/// row end the connection (the forwarder reconnects).
const IDLE_TIMEOUT: Duration = Duration::from_secs(6);

/// Bytes of QUIC datagrams (the UDP channel's frames) queued to send, and received but not read
/// yet. quinn drops the oldest when the send side is full.
const DATAGRAM_BUFFER: usize = 4 * 1024 * 1024;

/// `uni_streams`: how many unidirectional streams the peer may open (the client allows the
/// listener's one welcome stream; the listener allows none).
fn transport_config(uni_streams: u32) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(uni_streams))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .datagram_send_buffer_size(DATAGRAM_BUFFER)
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).expect("6 s fits a QUIC idle timeout"),
        ));
    Arc::new(t)
}

fn tls_err(endpoint: &Endpoint) -> impl FnOnce(rustls::Error) -> TransportError + '_ {
    move |source| TransportError::Tls {
        endpoint: endpoint.clone(),
        source,
    }
}

fn no_initial_suite(endpoint: &Endpoint) -> TransportError {
    TransportError::Tls {
        endpoint: endpoint.clone(),
        source: rustls::Error::General("the crypto provider lacks TLS13_AES_128_GCM_SHA256".into()),
    }
}

/// The host side: one shared connection, opened on first use and re-opened once lost.
pub(crate) struct QuicConnector {
    endpoint: Endpoint,
    target: HostPort,
    client_config: quinn::ClientConfig,
    conn: Mutex<Option<quinn::Connection>>,
}

impl std::fmt::Debug for QuicConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicConnector")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl QuicConnector {
    pub(crate) fn new(
        endpoint: Endpoint,
        target: HostPort,
        id: &TlsIdentity,
    ) -> Result<Self, TransportError> {
        let rustls_config = tls::client_config(id).map_err(tls_err(&endpoint))?;
        let crypto =
            QuicClientConfig::try_from(rustls_config).map_err(|_| no_initial_suite(&endpoint))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(transport_config(1));
        Ok(Self {
            endpoint,
            target,
            client_config,
            conn: Mutex::new(None),
        })
    }

    async fn establish(&self) -> Result<quinn::Connection, TransportError> {
        let addr = resolve(&self.endpoint, &self.target).await?;
        let bind: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let ep = quinn::Endpoint::client(bind).map_err(|source| TransportError::Bind {
            endpoint: self.endpoint.clone(),
            source,
        })?;
        let connecting = ep
            .connect_with(self.client_config.clone(), addr, tls::SERVER_NAME)
            .map_err(|source| TransportError::QuicConnect {
                endpoint: self.endpoint.clone(),
                source,
            })?;
        let conn = connecting
            .await
            .map_err(|source| TransportError::QuicConnection {
                endpoint: self.endpoint.clone(),
                source,
            })?;
        self.await_welcome(&conn).await?;
        tracing::info!(endpoint = %self.endpoint, peer = %addr, "QUIC connection established");
        Ok(conn)
    }

    /// Waits for the listener's welcome stream (see the module docs).
    async fn await_welcome(&self, conn: &quinn::Connection) -> Result<(), TransportError> {
        let lost = |source| TransportError::QuicConnection {
            endpoint: self.endpoint.clone(),
            source,
        };
        let mut recv = conn.accept_uni().await.map_err(lost)?;
        let got = match recv.read_to_end(WELCOME.len()).await {
            Ok(got) => got,
            Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e))) => {
                return Err(lost(e));
            }
            Err(e) => {
                return Err(TransportError::Handshake {
                    endpoint: self.endpoint.clone(),
                    stage: "QUIC welcome".into(),
                    source: std::io::Error::other(e),
                });
            }
        };
        if got != WELCOME {
            return Err(TransportError::BadReply {
                endpoint: self.endpoint.clone(),
                stage: "QUIC welcome".into(),
                reply: got.escape_ascii().to_string(),
                expected: "\"hostnet/1 welcome\"",
            });
        }
        Ok(())
    }

    /// The shared connection: the current one if it is alive, else a new one.
    pub(crate) async fn connection(
        &self,
        timeouts: &Timeouts,
    ) -> Result<quinn::Connection, TransportError> {
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
            tracing::info!(endpoint = %self.endpoint, reason = ?conn.close_reason(), "QUIC connection lost; reconnecting");
        }
        *guard = None;
        let conn = tokio::time::timeout(timeouts.connect, self.establish())
            .await
            .map_err(|_| TransportError::ConnectTimeout {
                endpoint: self.endpoint.clone(),
                timeout: timeouts.connect,
            })??;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    pub(crate) async fn open(&self, timeouts: &Timeouts) -> Result<Stream, TransportError> {
        let mut retried = false;
        loop {
            let conn = self.connection(timeouts).await?;
            match tokio::time::timeout(timeouts.handshake, conn.open_bi()).await {
                Ok(Ok((send, recv))) => return Ok(Stream::quic(send, recv, &conn)),
                // The connection died since we last looked: one fresh attempt.
                Ok(Err(e)) if !retried => {
                    tracing::debug!(endpoint = %self.endpoint, error = %e, "open_bi failed; reconnecting");
                    retried = true;
                }
                Ok(Err(source)) => {
                    return Err(TransportError::QuicConnection {
                        endpoint: self.endpoint.clone(),
                        source,
                    });
                }
                Err(_) => {
                    return Err(TransportError::HandshakeTimeout {
                        endpoint: self.endpoint.clone(),
                        stage: "QUIC open_bi (the peer's stream limit is reached)".into(),
                        timeout: timeouts.handshake,
                    });
                }
            }
        }
    }

    /// Closes the shared connection (its streams fail); the next `open()` makes a new one.
    pub(crate) async fn close(&self) {
        if let Some(conn) = self.conn.lock().await.take() {
            conn.close(VarInt::from_u32(0), b"closed by the connector");
        }
    }

    pub(crate) async fn current(&self) -> Option<quinn::Connection> {
        self.conn.lock().await.clone()
    }
}

/// Builds the listening QUIC endpoint.
pub(crate) fn bind(
    endpoint: &Endpoint,
    addr: SocketAddr,
    id: &TlsIdentity,
) -> Result<quinn::Endpoint, TransportError> {
    let rustls_config = tls::server_config(id).map_err(tls_err(endpoint))?;
    let crypto =
        QuicServerConfig::try_from(rustls_config).map_err(|_| no_initial_suite(endpoint))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(transport_config(0));
    quinn::Endpoint::server(server_config, addr).map_err(|source| TransportError::Bind {
        endpoint: endpoint.clone(),
        source,
    })
}

/// Accepts connections (handshakes run concurrently, each under the handshake timeout) and
/// forwards every bidirectional stream of every authenticated connection to `tx`.
pub(crate) async fn accept_loop(
    server: quinn::Endpoint,
    endpoint: Endpoint,
    tx: mpsc::Sender<Stream>,
    stats: Arc<Stats>,
    timeouts: Timeouts,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            incoming = server.accept() => {
                let Some(incoming) = incoming else { break };
                tasks.spawn(serve_connection(
                    incoming,
                    endpoint.clone(),
                    tx.clone(),
                    stats.clone(),
                    timeouts,
                ));
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

async fn serve_connection(
    incoming: quinn::Incoming,
    endpoint: Endpoint,
    tx: mpsc::Sender<Stream>,
    stats: Arc<Stats>,
    timeouts: Timeouts,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(timeouts.handshake, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(endpoint = %endpoint, peer = %remote, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(endpoint = %endpoint, peer = %remote, timeout = ?timeouts.handshake, "QUIC handshake timed out");
            return;
        }
    };
    tracing::info!(endpoint = %endpoint, peer = %remote, "QUIC connection accepted");
    // The client grants one unidirectional stream, so this does not wait for the network.
    let welcome = async {
        let mut send = conn.open_uni().await?;
        send.write_all(WELCOME).await?;
        send.finish()?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    match tokio::time::timeout(timeouts.handshake, welcome).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(endpoint = %endpoint, peer = %remote, error = %e, "QUIC welcome failed; closing");
            return;
        }
        Err(_) => {
            tracing::warn!(endpoint = %endpoint, peer = %remote, "QUIC welcome timed out (peer grants no stream?); closing");
            return;
        }
    }
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                if tx.send(Stream::quic(send, recv, &conn)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::info!(endpoint = %endpoint, peer = %remote, reason = %e, "QUIC connection closed");
                return;
            }
        }
    }
}
