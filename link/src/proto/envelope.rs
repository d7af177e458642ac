//! The length-prefixed message envelope shared by the stream header, the relay status and the
//! control messages: a `u32` big-endian body length, then the postcard-encoded body.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ProtoError;

/// Bytes in the envelope's length prefix.
pub(crate) const LEN_BYTES: usize = 4;

/// A kind of enveloped message: its name in errors, its size limit, and how many variants its
/// top-level enum tag may take (the body starts with that tag).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kind {
    pub what: &'static str,
    pub max: u32,
    pub tags: u32,
}

/// Appends `len(body) as u32 BE ‖ body` to `out`.
pub(crate) fn encode<T: Serialize>(
    kind: Kind,
    msg: &T,
    out: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    let body = postcard::to_allocvec(msg).map_err(|source| ProtoError::Encode {
        what: kind.what,
        source,
    })?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len <= kind.max)
        .ok_or(ProtoError::TooLarge {
            what: kind.what,
            len: body.len() as u64,
            max: u64::from(kind.max),
        })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Decodes one envelope from the front of `buf`: `Ok(None)` if more bytes are needed, else the
/// message and the number of bytes it took.
pub(crate) fn decode<T: DeserializeOwned>(
    kind: Kind,
    buf: &[u8],
) -> Result<Option<(T, usize)>, ProtoError> {
    let Some(len) = buf.first_chunk::<LEN_BYTES>() else {
        return Ok(None);
    };
    let len = check_len(kind, *len)?;
    let Some(body) = buf.get(LEN_BYTES..LEN_BYTES + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(kind, body)?, LEN_BYTES + len)))
}

/// Checks a length prefix against the kind's limit.
fn check_len(kind: Kind, len: [u8; LEN_BYTES]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(len);
    if len > kind.max {
        return Err(ProtoError::TooLarge {
            what: kind.what,
            len: u64::from(len),
            max: u64::from(kind.max),
        });
    }
    usize::try_from(len).map_err(|_| ProtoError::TooLarge {
        what: kind.what,
        len: u64::from(len),
        max: u64::from(kind.max),
    })
}

/// Decodes a body that must be exactly one message.
pub(crate) fn decode_body<T: DeserializeOwned>(kind: Kind, body: &[u8]) -> Result<T, ProtoError> {
    if let Some(tag) = leading_varint(body)
        && tag >= u64::from(kind.tags)
    {
        return Err(ProtoError::UnknownType {
            what: kind.what,
            tag,
        });
    }
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|source| ProtoError::Malformed {
        what: kind.what,
        source,
    })?;
    if !rest.is_empty() {
        return Err(ProtoError::TrailingBytes {
            what: kind.what,
            count: rest.len(),
        });
    }
    Ok(msg)
}

/// The LEB128 varint at the start of `buf` (postcard's encoding of an enum tag), if complete.
fn leading_varint(buf: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for (i, byte) in buf.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Reads exactly one envelope. `Ok(None)` if the stream ends cleanly before its first byte.
pub(crate) async fn read<T, R>(kind: Kind, r: &mut R) -> Result<Option<T>, ProtoError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin + ?Sized,
{
    let mut len = [0u8; LEN_BYTES];
    if !read_exact_or_eof(r, &mut len, kind.what).await? {
        return Ok(None);
    }
    read_body(kind, len, r).await.map(Some)
}

/// Reads exactly the body of an envelope whose length prefix `len` has been read.
pub(crate) async fn read_body<T, R>(
    kind: Kind,
    len: [u8; LEN_BYTES],
    r: &mut R,
) -> Result<T, ProtoError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin + ?Sized,
{
    let len = check_len(kind, len)?;
    let mut body = vec![0u8; len];
    read_exact(r, &mut body, kind.what).await?;
    decode_body(kind, &body)
}

/// Fills `buf` exactly; `Ok(false)` if the stream ends before the first byte, a
/// [`ProtoError::Truncated`] if it ends after it.
pub(crate) async fn read_exact_or_eof<R>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<bool, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut got = 0;
    while got < buf.len() {
        let Some(dst) = buf.get_mut(got..) else { break };
        let n = r.read(dst).await.map_err(|e| ProtoError::io(what, e))?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(ProtoError::Truncated { what })
            };
        }
        got += n;
    }
    Ok(true)
}

/// Fills `buf` exactly; [`ProtoError::Truncated`] if the stream ends first.
pub(crate) async fn read_exact<R>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    if buf.is_empty() || read_exact_or_eof(r, buf, what).await? {
        Ok(())
    } else {
        Err(ProtoError::Truncated { what })
    }
}

/// Writes `bytes` in one go and flushes (a buffered or framed writer must pass them on).
pub(crate) async fn write_all<W>(
    w: &mut W,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    w.write_all(bytes)
        .await
        .map_err(|e| ProtoError::io(what, e))?;
    w.flush().await.map_err(|e| ProtoError::io(what, e))
}

/// Encodes and writes one envelope.
pub(crate) async fn write<T, W>(kind: Kind, w: &mut W, msg: &T) -> Result<(), ProtoError>
where
    T: Serialize,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut out = Vec::new();
    encode(kind, msg, &mut out)?;
    write_all(w, &out, kind.what).await
}
