//! The relay status: the accepting side's answer to a relay header.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::envelope::{self, Kind};
use super::{MAX_STATUS_LEN, MAX_STATUS_MESSAGE, ProtoError};

const WHAT: &str = "relay status";
const KIND: Kind = Kind {
    what: WHAT,
    max: MAX_STATUS_LEN,
    tags: RelayStatus::TAGS,
};

/// Whether the accepting side reached the target, sent before any payload byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayStatus {
    /// Tag 0: connected (TCP) or flow set up (UDP); payload follows.
    Ok,
    /// Tag 1: the target refused the connection (reset the client).
    Refused,
    /// Tag 2: policy forbids this target (e.g. the port is not a current listener).
    Forbidden,
    /// Tag 3: no route to the target.
    Unreachable,
    /// Tag 4: connecting to the target timed out.
    Timeout,
    /// Tag 5: any other failure, with an optional human-readable message (at most
    /// [`MAX_STATUS_MESSAGE`] bytes).
    Error(Option<String>),
}

impl RelayStatus {
    /// How many statuses this version knows.
    pub const TAGS: u32 = 6;

    /// An [`RelayStatus::Error`] whose message is cut to [`MAX_STATUS_MESSAGE`] bytes.
    pub fn error(message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_STATUS_MESSAGE {
            let mut end = MAX_STATUS_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        RelayStatus::Error(Some(message))
    }

    /// The status that describes a failed connect.
    pub fn from_connect_error(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {
                RelayStatus::Refused
            }
            io::ErrorKind::PermissionDenied => RelayStatus::Forbidden,
            io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::AddrNotAvailable => RelayStatus::Unreachable,
            io::ErrorKind::TimedOut => RelayStatus::Timeout,
            _ => RelayStatus::error(e.to_string()),
        }
    }

    /// Whether the relay goes ahead.
    pub fn is_ok(&self) -> bool {
        matches!(self, RelayStatus::Ok)
    }

    /// The error the opener hands to its client's side for a failed status (`None` for `Ok`).
    pub fn to_io_error(&self) -> Option<io::Error> {
        let (kind, text) = match self {
            RelayStatus::Ok => return None,
            RelayStatus::Refused => (io::ErrorKind::ConnectionRefused, "refused by the target"),
            RelayStatus::Forbidden => (io::ErrorKind::PermissionDenied, "forbidden by the peer"),
            RelayStatus::Unreachable => (io::ErrorKind::HostUnreachable, "target unreachable"),
            RelayStatus::Timeout => (io::ErrorKind::TimedOut, "connect to the target timed out"),
            RelayStatus::Error(message) => {
                let text = message.as_deref().unwrap_or("peer failed to relay");
                return Some(io::Error::other(format!("relay failed: {text}")));
            }
        };
        Some(io::Error::new(kind, text))
    }
}

/// Appends the encoded status to `out`.
pub fn encode_status(status: &RelayStatus, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    envelope::encode(KIND, status, out)
}

/// Decodes a status from the front of `buf`: `Ok(None)` if more bytes are needed.
pub fn decode_status(buf: &[u8]) -> Result<Option<(RelayStatus, usize)>, ProtoError> {
    envelope::decode(KIND, buf)
}

/// Writes a status and flushes.
pub async fn write_status<W>(w: &mut W, status: &RelayStatus) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    envelope::write(KIND, w, status).await
}

/// Reads exactly one status under `timeout`; not one payload byte after it is consumed.
pub async fn read_status<R>(r: &mut R, timeout: Duration) -> Result<RelayStatus, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    tokio::time::timeout(timeout, envelope::read(KIND, r))
        .await
        .map_err(|_| ProtoError::Timeout {
            what: WHAT,
            after: timeout,
        })??
        .ok_or(ProtoError::Closed { what: WHAT })
}

/// Reads one status without an `async fn`, for a caller that polls other things meanwhile (the
/// opener's relay, which sends payload before the status: see "Relay streams and the status"
/// in [`crate::proto`]). Like [`read_status`], it reads exactly the envelope: first its length
/// and the body's first byte (every status body has at least its tag, so an `Ok` takes one
/// read), then the rest of the body if there is more; not one payload byte after it.
#[derive(Debug, Default)]
pub struct StatusReader {
    buf: Vec<u8>,
    got: usize,
}

/// The shortest status envelope: the length and a one-byte body.
const SHORTEST: usize = envelope::LEN_BYTES + 1;

impl StatusReader {
    /// A reader at the start of the status.
    pub fn new() -> Self {
        StatusReader {
            buf: vec![0u8; SHORTEST],
            got: 0,
        }
    }

    /// Reads on from `r`; `Ready` with the status, or with an error (the stream ended before
    /// or inside the status: [`ProtoError::Closed`], [`ProtoError::Truncated`]; an oversize or
    /// malformed status; an I/O error).
    pub fn poll_read<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> Poll<Result<RelayStatus, ProtoError>>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        if self.buf.len() < SHORTEST {
            self.buf.resize(SHORTEST, 0);
        }
        loop {
            if self.got == self.buf.len() {
                match decode_status(&self.buf)? {
                    Some((status, _)) => return Poll::Ready(Ok(status)),
                    None => {
                        // The length (checked against the limit by the decoder) says more.
                        let len = self
                            .buf
                            .first_chunk::<{ envelope::LEN_BYTES }>()
                            .map_or(0, |l| u32::from_be_bytes(*l));
                        let total = usize::try_from(len)
                            .map_or(usize::MAX, |l| l.saturating_add(envelope::LEN_BYTES));
                        if total <= self.buf.len() {
                            return Poll::Ready(Err(ProtoError::Truncated { what: WHAT }));
                        }
                        self.buf.resize(total, 0);
                    }
                }
            }
            let Some(free) = self.buf.get_mut(self.got..) else {
                return Poll::Ready(Err(ProtoError::Truncated { what: WHAT }));
            };
            let mut rb = ReadBuf::new(free);
            ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))
                .map_err(|e| ProtoError::io(WHAT, e))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Err(if self.got == 0 {
                    ProtoError::Closed { what: WHAT }
                } else {
                    ProtoError::Truncated { what: WHAT }
                }));
            }
            self.got += n;
        }
    }
}
