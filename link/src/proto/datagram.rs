//! The datagram codec of UDP flow streams: each datagram is `len: u16 BE ‖ len bytes`.
//!
//! A `u16` holds every size up to [`MAX_DATAGRAM`] (65,535), so every
//! length prefix is valid and an empty datagram (length 0) is a datagram like any other.

use tokio::io::{AsyncRead, AsyncWrite};

use super::envelope;
use super::{MAX_DATAGRAM, ProtoError};

/// Bytes in a datagram's length prefix.
pub const DATAGRAM_LEN_BYTES: usize = 2;

const WHAT: &str = "datagram";

/// Appends `len ‖ payload` to `out`; fails if `payload` is longer than [`MAX_DATAGRAM`].
pub fn encode_datagram(payload: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let len = u16::try_from(payload.len()).map_err(|_| ProtoError::TooLarge {
        what: WHAT,
        len: payload.len() as u64,
        max: MAX_DATAGRAM as u64,
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Decodes one datagram from the front of `buf`: `None` if more bytes are needed, else the
/// payload and how many bytes the datagram took.
pub fn decode_datagram(buf: &[u8]) -> Option<(&[u8], usize)> {
    let len = usize::from(u16::from_be_bytes(
        *buf.first_chunk::<DATAGRAM_LEN_BYTES>()?,
    ));
    let end = DATAGRAM_LEN_BYTES + len;
    Some((buf.get(DATAGRAM_LEN_BYTES..end)?, end))
}

/// Writes one datagram in a single write, then flushes.
pub async fn write_datagram<W>(w: &mut W, payload: &[u8]) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut out = Vec::with_capacity(DATAGRAM_LEN_BYTES + payload.len());
    encode_datagram(payload, &mut out)?;
    envelope::write_all(w, &out, WHAT).await
}

/// Reads exactly one datagram into `buf` (replacing its contents). `Ok(false)` when the stream
/// ended cleanly between datagrams. Wrap `r` in a `BufReader` to save syscalls.
pub async fn read_datagram<R>(r: &mut R, buf: &mut Vec<u8>) -> Result<bool, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut len = [0u8; DATAGRAM_LEN_BYTES];
    if !envelope::read_exact_or_eof(r, &mut len, WHAT).await? {
        return Ok(false);
    }
    buf.clear();
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    envelope::read_exact(r, buf, WHAT).await?;
    Ok(true)
}
