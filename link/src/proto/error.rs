//! The protocol's error type.

use std::io;
use std::time::Duration;

/// What went wrong while encoding, decoding, reading or writing a protocol item.
///
/// `what` names the item ("stream header", "relay status", "control message", "frame",
/// "datagram") so that a log line says which part of the protocol failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The stream does not start with the hostnet magic bytes.
    #[error("not a hostnet link stream: bad magic {got:02x?} (expected {expected:02x?})")]
    BadMagic {
        /// The four bytes received.
        got: [u8; 4],
        /// The magic this side expects.
        expected: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error(
        "unsupported protocol version {theirs} from the peer (this side speaks version {ours})"
    )]
    UnsupportedVersion {
        /// The version in the peer's preface.
        theirs: u16,
        /// The version this side speaks.
        ours: u16,
    },
    /// A length field exceeds its limit (on decode), or an item is too large to encode.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The item.
        what: &'static str,
        /// The length announced or required.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The item's type tag is not one this side knows (a newer peer, or garbage).
    #[error("unknown {what} type {tag}")]
    UnknownType {
        /// The item.
        what: &'static str,
        /// The tag received.
        tag: u64,
    },
    /// The body of an item could not be decoded.
    #[error("malformed {what}: {source}")]
    Malformed {
        /// The item.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: postcard::Error,
    },
    /// A frame or field breaks a rule of the protocol (e.g. an empty data frame).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The item.
        what: &'static str,
        /// The rule broken.
        reason: &'static str,
    },
    /// The body of an item decoded but bytes were left over inside its length prefix.
    #[error("malformed {what}: {count} trailing bytes after the message")]
    TrailingBytes {
        /// The item.
        what: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
    /// An item could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// The item.
        what: &'static str,
        /// The encoder's error.
        #[source]
        source: postcard::Error,
    },
    /// The peer closed the stream before the first byte of a required item.
    #[error("peer closed the stream before sending the {what}")]
    Closed {
        /// The item.
        what: &'static str,
    },
    /// The stream ended in the middle of an item.
    #[error("stream ended in the middle of the {what}")]
    Truncated {
        /// The item.
        what: &'static str,
    },
    /// The peer did not send an item in time.
    #[error("timed out after {after:?} waiting for the {what}")]
    Timeout {
        /// The item.
        what: &'static str,
        /// The time limit.
        after: Duration,
    },
    /// The underlying stream failed.
    #[error("i/o error on the {what}: {source}")]
    Io {
        /// The item being read or written.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ProtoError {
    /// Wraps an I/O error of the stream (kept as it is: a framed stream's own errors, such as
    /// "ended without an end-of-stream frame", must not read as a truncated message).
    pub(crate) fn io(what: &'static str, source: io::Error) -> Self {
        ProtoError::Io { what, source }
    }
}

impl From<ProtoError> for io::Error {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Io { source, .. } => source,
            ProtoError::Timeout { .. } => io::Error::new(io::ErrorKind::TimedOut, e),
            ProtoError::Closed { .. } | ProtoError::Truncated { .. } => {
                io::Error::new(io::ErrorKind::UnexpectedEof, e)
            }
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}
