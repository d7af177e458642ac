//! Credentials ([`Auth`]) and the `tcp://` token handshake.
//!
//! # The token handshake (`tcp://`)
//!
//! Both sides hold the same secret token (a file; surrounding whitespace is trimmed; empty is
//! refused). Every TCP connection runs this exchange before any stream byte, under the
//! handshake timeout; each message has a fixed size, so neither side ever reads past it:
//!
//! ```text
//! listener -> client   37 bytes   "HNLT" 0x01 nonce_l[32]                 (getrandom)
//! client   -> listener 64 bytes   nonce_c[32] HMAC-SHA256(token, CLIENT_CTX || nonce_l || nonce_c)
//! listener -> client   33 bytes   0x00 HMAC-SHA256(token, SERVER_CTX || nonce_l || nonce_c)
//!                 or    1 byte    0x01   (rejected; the listener then closes)
//! ```
//!
//! `CLIENT_CTX` is `"hostnet-link tcp v1 client"` and `SERVER_CTX` `"hostnet-link tcp v1 server"`.
//! The listener checks the client's MAC and the client the listener's, both in constant time
//! (`hmac`'s `verify_slice`): each side proves it holds the token, and neither MAC can be
//! replayed (fresh nonces from both sides). The token is not an encryption key: `tcp://` is
//! for tests and trusted networks; use `quic://` across untrusted ones.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::TransportError;
use super::tls::TlsIdentity;

/// The host's vsock CID, the only peer a `vsock://any:PORT` listener accepts by default.
pub const VSOCK_HOST_CID: u32 = 2;

/// Whether a connection from `peer_cid` may be accepted, given the allowed CIDs
/// (by default only the host, CID 2).
pub fn cid_allowed(peer_cid: u32, allowed: &[u32]) -> bool {
    allowed.contains(&peer_cid)
}

/// A shared secret for `tcp://`. Its `Debug` does not show it.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes, redacted>)", self.0.len())
    }
}

/// The credentials of one side: what each transport needs to authenticate its peer.
///
/// * `unix://`: none (the socket file is mode 0600: only this user and root can connect).
/// * `tcp://`: a shared token ([`Auth::token_file`]), required on both sides.
/// * `quic://`: this side's certificate and key and the peer's pinned certificate
///   ([`Auth::tls`], [`TlsIdentity`]), required on both sides.
/// * `vsock://any:PORT` (listen side): the peer CIDs allowed, [`VSOCK_HOST_CID`] unless
///   [`Auth::allow_cids`] says otherwise.
/// * `hybrid-vsock://`: none (the hypervisor's unix socket is the boundary).
#[derive(Clone, Debug, Default)]
pub struct Auth {
    pub(crate) token: Option<Token>,
    pub(crate) tls: Option<Arc<TlsIdentity>>,
    pub(crate) allowed_cids: Option<Vec<u32>>,
}

impl Auth {
    /// No credentials: enough for `unix://`, `hybrid-vsock://` and `vsock://`.
    pub fn none() -> Self {
        Self::default()
    }

    /// The `tcp://` token, read from a file. Leading and trailing whitespace is ignored; a
    /// missing, unreadable or empty file is an error.
    pub fn token_file(path: impl AsRef<Path>) -> Result<Self, TransportError> {
        Self::none().with_token_file(path)
    }

    /// Adds the `tcp://` token from a file (see [`Auth::token_file`]).
    pub fn with_token_file(mut self, path: impl AsRef<Path>) -> Result<Self, TransportError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TransportError::CredentialFile {
            what: "token file",
            path: path.to_owned(),
            source,
        })?;
        if let Ok(meta) = std::fs::metadata(path) {
            if super::private::readable_by_others(&meta) {
                tracing::warn!(path = %path.display(), "token file is readable by group or others");
            }
        }
        let token = trim_ascii(&bytes);
        if token.is_empty() {
            return Err(TransportError::BadCredential {
                what: "token file",
                path: path.to_owned(),
                reason: "the token is empty".into(),
            });
        }
        self.token = Some(Token(token.into()));
        Ok(self)
    }

    /// The `tcp://` token given directly (e.g. from an environment variable). Surrounding
    /// whitespace is ignored; an empty token is an error.
    pub fn token(token: &[u8]) -> Result<Self, TransportError> {
        let token = trim_ascii(token);
        if token.is_empty() {
            return Err(TransportError::BadCredential {
                what: "token",
                path: "<given directly>".into(),
                reason: "the token is empty".into(),
            });
        }
        Ok(Self {
            token: Some(Token(token.into())),
            ..Self::default()
        })
    }

    /// The `quic://` identity: this side's certificate and key and the peer's pinned
    /// certificate.
    pub fn tls(identity: TlsIdentity) -> Self {
        Self::none().with_tls(identity)
    }

    /// Adds the `quic://` identity.
    pub fn with_tls(mut self, identity: TlsIdentity) -> Self {
        self.tls = Some(Arc::new(identity));
        self
    }

    /// The peer CIDs a `vsock://` listener accepts (default: only [`VSOCK_HOST_CID`]).
    pub fn allow_cids(mut self, cids: impl IntoIterator<Item = u32>) -> Self {
        self.allowed_cids = Some(cids.into_iter().collect());
        self
    }

    pub(crate) fn allowed_cids(&self) -> &[u32] {
        self.allowed_cids.as_deref().unwrap_or(&[VSOCK_HOST_CID])
    }
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

const MAGIC: &[u8; 4] = b"HNLT";
const VERSION: u8 = 1;
const CLIENT_CTX: &[u8] = b"hostnet-link tcp v1 client";
const SERVER_CTX: &[u8] = b"hostnet-link tcp v1 server";
const ACCEPTED: u8 = 0;
const REJECTED: u8 = 1;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;

fn mac(token: &Token, ctx: &[u8], nonce_l: &[u8], nonce_c: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(&token.0).expect("HMAC takes keys of any length");
    mac.update(ctx);
    mac.update(nonce_l);
    mac.update(nonce_c);
    mac
}

fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| {
        e.raw_os_error().map_or_else(
            || std::io::Error::other(e.to_string()),
            std::io::Error::from_raw_os_error,
        )
    })?;
    Ok(n)
}

/// Why a listener-side token handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenRejection {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("wrong token (MAC mismatch)")]
    WrongToken,
}

/// Listener side of the token handshake; `Ok` means the client proved the token and was told so.
pub(crate) async fn token_accept<S>(io: &mut S, token: &Token) -> Result<(), TokenRejection>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let nonce_l = nonce()?;
    let mut hello = [0u8; 5 + NONCE_LEN];
    hello[..4].copy_from_slice(MAGIC);
    hello[4] = VERSION;
    hello[5..].copy_from_slice(&nonce_l);
    io.write_all(&hello).await?;
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    io.read_exact(&mut answer).await?;
    let (nonce_c, client_mac) = answer.split_at(NONCE_LEN);
    if mac(token, CLIENT_CTX, &nonce_l, nonce_c)
        .verify_slice(client_mac)
        .is_err()
    {
        // The caller counts and logs the failure, then tells the client with
        // `token_reject` (so a test that sees the rejection also sees the count).
        return Err(TokenRejection::WrongToken);
    }
    let proof = mac(token, SERVER_CTX, &nonce_l, nonce_c)
        .finalize()
        .into_bytes();
    let mut reply = [0u8; 1 + MAC_LEN];
    reply[0] = ACCEPTED;
    reply[1..].copy_from_slice(&proof);
    io.write_all(&reply).await?;
    Ok(())
}

/// Tells a client its token was wrong (best effort); the caller then closes.
pub(crate) async fn token_reject<S: AsyncWrite + Unpin>(io: &mut S) {
    let _ = io.write_all(&[REJECTED]).await;
}

/// What went wrong on the client side of the token handshake (turned into a
/// [`TransportError`] by the caller, who knows the endpoint).
#[derive(Debug)]
pub(crate) enum TokenFailure {
    Io(std::io::Error),
    BadHello(Vec<u8>),
    Rejected,
    BadStatus(u8),
    ListenerProofWrong,
}

impl From<std::io::Error> for TokenFailure {
    fn from(e: std::io::Error) -> Self {
        TokenFailure::Io(e)
    }
}

/// Client side of the token handshake.
pub(crate) async fn token_connect<S>(io: &mut S, token: &Token) -> Result<(), TokenFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = [0u8; 5 + NONCE_LEN];
    io.read_exact(&mut hello).await?;
    if &hello[..4] != MAGIC || hello[4] != VERSION {
        return Err(TokenFailure::BadHello(hello[..5].to_vec()));
    }
    let nonce_l = &hello[5..];
    let nonce_c = nonce()?;
    let client_mac = mac(token, CLIENT_CTX, nonce_l, &nonce_c)
        .finalize()
        .into_bytes();
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    answer[..NONCE_LEN].copy_from_slice(&nonce_c);
    answer[NONCE_LEN..].copy_from_slice(&client_mac);
    io.write_all(&answer).await?;
    let mut status = [0u8; 1];
    match io.read_exact(&mut status).await {
        Ok(_) => {}
        // The listener closes right after rejecting; a close without a status byte is
        // also a rejection from the client's point of view.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(TokenFailure::Rejected);
        }
        Err(e) => return Err(e.into()),
    }
    match status[0] {
        ACCEPTED => {}
        REJECTED => return Err(TokenFailure::Rejected),
        other => return Err(TokenFailure::BadStatus(other)),
    }
    let mut proof = [0u8; MAC_LEN];
    io.read_exact(&mut proof).await?;
    mac(token, SERVER_CTX, nonce_l, &nonce_c)
        .verify_slice(&proof)
        .map_err(|_| TokenFailure::ListenerProofWrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_cids_pass() {
        assert!(cid_allowed(2, &[2]));
        assert!(!cid_allowed(3, &[2]));
        assert!(!cid_allowed(1, &[2]));
        assert!(cid_allowed(3, &[2, 3]));
        assert!(!cid_allowed(2, &[]));
    }

    fn token(s: &str) -> Token {
        Auth::token(s.as_bytes()).unwrap().token.unwrap()
    }

    #[tokio::test]
    async fn same_token_both_sides_accept() {
        let (mut a, mut b) = tokio::io::duplex(256);
        let (ta, tb) = (token("secret"), token(" secret\n"));
        let (l, c) = tokio::join!(token_accept(&mut a, &ta), token_connect(&mut b, &tb));
        l.unwrap();
        c.unwrap();
        // Nothing past the handshake was consumed: bytes written next arrive intact.
        b.write_all(b"payload").await.unwrap();
        let mut buf = [0u8; 7];
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"payload");
    }

    #[tokio::test]
    async fn wrong_token_is_rejected_on_both_sides() {
        let (mut a, mut b) = tokio::io::duplex(256);
        let (ta, tb) = (token("secret"), token("other"));
        let (l, c) = tokio::join!(
            async {
                let r = token_accept(&mut a, &ta).await;
                token_reject(&mut a).await;
                drop(a);
                r
            },
            token_connect(&mut b, &tb)
        );
        assert!(matches!(l, Err(TokenRejection::WrongToken)), "{l:?}");
        assert!(matches!(c, Err(TokenFailure::Rejected)), "{c:?}");
    }

    #[tokio::test]
    async fn garbage_hello_is_reported() {
        let (mut a, mut b) = tokio::io::duplex(256);
        a.write_all(&[b'X'; 37]).await.unwrap();
        let c = token_connect(&mut b, &token("secret")).await;
        assert!(matches!(c, Err(TokenFailure::BadHello(_))), "{c:?}");
    }

    #[test]
    fn empty_token_is_refused() {
        assert!(Auth::token(b" \n").is_err());
        assert!(format!("{:?}", token("hunter2")).contains("redacted"));
        assert!(!format!("{:?}", token("hunter2")).contains("hunter2"));
    }

    #[test]
    fn default_cids_are_host_only() {
        assert_eq!(Auth::none().allowed_cids(), &[VSOCK_HOST_CID]);
        assert_eq!(Auth::none().allow_cids([3, 4]).allowed_cids(), &[3, 4]);
    }
}
