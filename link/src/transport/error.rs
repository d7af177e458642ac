//! [`TransportError`]: what failed, on which endpoint, with the OS error kept.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::endpoint::Endpoint;

/// Everything a transport can fail with. Each variant names the endpoint (or file) and the step
/// that failed, and keeps the underlying error as its `source()`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The URI does not parse.
    #[error("invalid transport URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The endpoint cannot be used on this side (e.g. listening on `hybrid-vsock://`).
    #[error("{endpoint}: {reason}")]
    Unsupported {
        /// The endpoint.
        endpoint: Endpoint,
        /// Why.
        reason: &'static str,
    },
    /// The transport needs credentials that were not given (a token for `tcp://`, certificates
    /// for `quic://`).
    #[error("{endpoint}: {what} required (refusing to start without it)")]
    MissingCredentials {
        /// The endpoint.
        endpoint: Endpoint,
        /// What is missing.
        what: &'static str,
    },
    /// A credential file (token, certificate, key) cannot be read or written.
    #[error("{what} {}: {source}", path.display())]
    CredentialFile {
        /// Which file it is ("token file", "certificate", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A credential file has unusable content (empty token, not a certificate, ...).
    #[error("{what} {}: {reason}", path.display())]
    BadCredential {
        /// Which file it is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Resolving a host name failed or gave no address.
    #[error("{endpoint}: cannot resolve host: {source}")]
    Resolve {
        /// The endpoint.
        endpoint: Endpoint,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// Binding or listening failed.
    #[error("{endpoint}: bind failed: {source}")]
    Bind {
        /// The endpoint.
        endpoint: Endpoint,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A unix socket path is in use by a live listener (or is not a socket at all).
    #[error("{endpoint}: address in use ({reason})")]
    AddrInUse {
        /// The endpoint.
        endpoint: Endpoint,
        /// What was found at the path.
        reason: &'static str,
    },
    /// Connecting failed.
    #[error("{endpoint}: connect failed: {source}")]
    Connect {
        /// The endpoint.
        endpoint: Endpoint,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Connecting took longer than the connect timeout.
    #[error("{endpoint}: connect timed out after {timeout:?}")]
    ConnectTimeout {
        /// The endpoint.
        endpoint: Endpoint,
        /// The timeout.
        timeout: Duration,
    },
    /// The transport handshake (token challenge, `CONNECT`, QUIC stream opening) did not finish
    /// in time.
    #[error("{endpoint}: {stage}: no answer within {timeout:?}")]
    HandshakeTimeout {
        /// The endpoint.
        endpoint: Endpoint,
        /// Which step was waiting ("token handshake", "guest port 1024: CONNECT", ...).
        stage: String,
        /// The timeout.
        timeout: Duration,
    },
    /// I/O failed during the transport handshake.
    #[error("{endpoint}: {stage}: {source}")]
    Handshake {
        /// The endpoint.
        endpoint: Endpoint,
        /// Which step failed.
        stage: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer answered something this side does not understand.
    #[error("{endpoint}: {stage}: bad reply {reply:?} (expected {expected})")]
    BadReply {
        /// The endpoint.
        endpoint: Endpoint,
        /// Which step.
        stage: String,
        /// The reply, escaped and truncated.
        reply: String,
        /// What was expected.
        expected: &'static str,
    },
    /// hybrid vsock: the backend closed the connection without answering `CONNECT`, which is
    /// what it does when nothing listens on the guest port.
    #[error("{endpoint}: guest port {port}: no listener (connection closed without reply)")]
    NoListener {
        /// The endpoint.
        endpoint: Endpoint,
        /// The guest port.
        port: u32,
    },
    /// The peer rejected our credentials (wrong token).
    #[error("{endpoint}: authentication rejected by the peer (wrong token?)")]
    AuthRejected {
        /// The endpoint.
        endpoint: Endpoint,
    },
    /// The peer failed to prove it holds the credentials (the listener's token proof is wrong,
    /// or a vsock peer's CID is not allowed).
    #[error("{endpoint}: peer authentication failed: {reason}")]
    PeerAuth {
        /// The endpoint.
        endpoint: Endpoint,
        /// What failed.
        reason: String,
    },
    /// Building the TLS configuration failed (bad key, ...).
    #[error("{endpoint}: TLS configuration: {source}")]
    Tls {
        /// The endpoint.
        endpoint: Endpoint,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// Starting a QUIC connection failed before any packet was sent.
    #[error("{endpoint}: QUIC connect: {source}")]
    QuicConnect {
        /// The endpoint.
        endpoint: Endpoint,
        /// quinn's error.
        #[source]
        source: quinn::ConnectError,
    },
    /// The QUIC connection failed or was lost (a failed TLS handshake, e.g. a certificate that
    /// is not the pinned one, ends up here).
    #[error("{endpoint}: QUIC connection: {source}")]
    QuicConnection {
        /// The endpoint.
        endpoint: Endpoint,
        /// quinn's error.
        #[source]
        source: quinn::ConnectionError,
    },
    /// Generating a certificate failed.
    #[error("keygen: {0}")]
    Keygen(#[source] rcgen::Error),
    /// The listener's accept loop is gone.
    #[error("{endpoint}: listener closed")]
    ListenerClosed {
        /// The endpoint.
        endpoint: Endpoint,
    },
}

impl TransportError {
    /// True for errors a later retry may cure (the peer is not up yet, a timeout, a lost QUIC
    /// connection); false for configuration errors that will fail the same way again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. }
                | TransportError::ConnectTimeout { .. }
                | TransportError::HandshakeTimeout { .. }
                | TransportError::Handshake { .. }
                | TransportError::NoListener { .. }
                | TransportError::Resolve { .. }
                | TransportError::QuicConnection { .. }
        )
    }
}
