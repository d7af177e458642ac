//! The stream preface and header.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::envelope::{self, Kind};
use super::{MAGIC, MAX_HEADER_LEN, PROTOCOL_VERSION, ProtoError};

/// Bytes in the preface: the magic, then the version as `u16` big-endian.
pub const PREFACE_LEN: usize = 6;

const WHAT: &str = "stream header";
const KIND: Kind = Kind {
    what: WHAT,
    max: MAX_HEADER_LEN,
    tags: StreamKind::TAGS,
};

/// The header that follows the preface on every link stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// What the stream carries (encoded first, so that an unknown kind is reported as such).
    pub kind: StreamKind,
    /// Whether the payload phase is raw bytes or [framed](super::Framed).
    pub mode: StreamMode,
}

/// What a link stream carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamKind {
    /// Tag 0: the control stream (no status; both sides send [`Hello`](super::Hello) first).
    Control,
    /// Tag 1: one relayed TCP connection.
    TcpRelay(RelayTarget),
    /// Tag 2: one UDP flow as a stream of its own (`len: u16 BE ‖ bytes` per datagram). Only
    /// decoded: this version carries UDP on the [`Datagrams`](StreamKind::Datagrams) channel
    /// and answers this kind with [`RelayStatus::Error`](super::RelayStatus).
    UdpFlow(RelayTarget),
    /// Tag 3: the answer to a [`DialBack`](super::DialBack) request; the opener writes a
    /// [`RelayStatus`](super::RelayStatus) right after the header.
    DialBack(DialBackId),
    /// Tag 4: the session's datagram channel ([channel frames](super::channel)), opened by
    /// the forwarder once both sides list [`caps::UDP_CHANNEL`](super::caps::UDP_CHANNEL);
    /// always `Raw` (its frames delimit themselves), no status.
    Datagrams,
}

impl StreamKind {
    /// How many kinds this version knows: a header tag at or above it is
    /// [`ProtoError::UnknownType`].
    pub const TAGS: u32 = 5;
}

/// Where a relayed connection or flow goes, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayTarget {
    /// The address to connect to, as seen by the side that accepts the stream (e.g. the guest
    /// listener `127.0.0.1:8000` or `[::1]:8000`). Its family is the family to use; an
    /// unspecified address (`0.0.0.0`, `::`) means that family's loopback.
    pub target: SocketAddr,
    /// The original client's address on the opening side (for logs and policy).
    pub client: SocketAddr,
}

/// The id of a [`DialBack`](super::DialBack) request, echoed in the stream that answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DialBackId(pub u64);

/// Whether a stream's payload phase is raw or framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamMode {
    /// Tag 0: the payload is the bytes themselves; the transport carries half-close and reset.
    Raw,
    /// Tag 1: the payload is data / end / reset [frames](super::framed).
    Framed,
}

impl StreamMode {
    /// The mode for a transport stream, from what it carries (`Stream::carries_half_close`,
    /// `Stream::carries_reset`, `Stream::eof_is_deliberate` in [`crate::transport`]): raw only
    /// if the transport carries half-close and reset and its EOF can only come from the peer
    /// ending the direction (QUIC), framed otherwise (tcp, unix, vsock, hybrid vsock), so that a
    /// reset always arrives as a reset and a peer that died never passes for one that finished.
    pub fn for_transport(
        carries_half_close: bool,
        carries_reset: bool,
        eof_is_deliberate: bool,
    ) -> Self {
        if carries_half_close && carries_reset && eof_is_deliberate {
            StreamMode::Raw
        } else {
            StreamMode::Framed
        }
    }
}

/// The preface: magic and protocol version.
pub fn preface() -> [u8; PREFACE_LEN] {
    let v = PROTOCOL_VERSION.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1]]
}

/// Checks a preface, naming both versions if they differ.
pub fn check_preface(preface: &[u8; PREFACE_LEN]) -> Result<(), ProtoError> {
    let [m0, m1, m2, m3, v0, v1] = *preface;
    let got = [m0, m1, m2, m3];
    if got != MAGIC {
        return Err(ProtoError::BadMagic {
            got,
            expected: MAGIC,
        });
    }
    let theirs = u16::from_be_bytes([v0, v1]);
    if theirs != PROTOCOL_VERSION {
        return Err(ProtoError::UnsupportedVersion {
            theirs,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// Appends preface and header to `out`.
pub fn encode_header(header: &StreamHeader, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    out.extend_from_slice(&preface());
    envelope::encode(KIND, header, out)
}

/// Decodes preface and header from the front of `buf`: `Ok(None)` if more bytes are needed,
/// else the header and how many bytes it took (the bytes after it are payload).
pub fn decode_header(buf: &[u8]) -> Result<Option<(StreamHeader, usize)>, ProtoError> {
    let Some(preface) = buf.first_chunk::<PREFACE_LEN>() else {
        // Reject a wrong magic as soon as four bytes are there.
        if let Some(magic) = buf.first_chunk::<4>()
            && *magic != MAGIC
        {
            return Err(ProtoError::BadMagic {
                got: *magic,
                expected: MAGIC,
            });
        }
        return Ok(None);
    };
    check_preface(preface)?;
    let rest = buf.get(PREFACE_LEN..).unwrap_or_default();
    Ok(envelope::decode(KIND, rest)?.map(|(h, used)| (h, PREFACE_LEN + used)))
}

/// Writes preface and header in one write, then flushes.
pub async fn write_header<W>(w: &mut W, header: &StreamHeader) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut out = Vec::with_capacity(64);
    encode_header(header, &mut out)?;
    envelope::write_all(w, &out, WHAT).await
}

/// Reads preface and header, exactly: not one byte of the payload that follows is consumed.
///
/// Fails with [`ProtoError::Timeout`] if the whole header has not arrived within `timeout`, and
/// with [`ProtoError::Closed`] if the peer closes the stream without sending a byte.
pub async fn read_header<R>(r: &mut R, timeout: Duration) -> Result<StreamHeader, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let read = async {
        // Preface and length prefix in one read where they arrived together (they are written
        // together), checked as soon as enough of them is there; then exactly the body.
        let mut head = [0u8; PREFACE_LEN + envelope::LEN_BYTES];
        let mut got = 0;
        while got < head.len() {
            let Some(dst) = head.get_mut(got..) else {
                break;
            };
            let n = r.read(dst).await.map_err(|e| ProtoError::io(WHAT, e))?;
            if n == 0 {
                return Err(if got == 0 {
                    ProtoError::Closed { what: WHAT }
                } else {
                    ProtoError::Truncated { what: WHAT }
                });
            }
            got += n;
            if let Some(seen) = head.get(..got.min(PREFACE_LEN))
                && let Err(e) = decode_header(seen)
            {
                return Err(e);
            }
        }
        let (preface, len) = head.split_at(PREFACE_LEN);
        let preface: &[u8; PREFACE_LEN] = preface
            .try_into()
            .map_err(|_| ProtoError::Truncated { what: WHAT })?;
        check_preface(preface)?;
        let len: [u8; envelope::LEN_BYTES] = len
            .try_into()
            .map_err(|_| ProtoError::Truncated { what: WHAT })?;
        envelope::read_body(KIND, len, r).await
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ProtoError::Timeout {
            what: WHAT,
            after: timeout,
        })?
}
