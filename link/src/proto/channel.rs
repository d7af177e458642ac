//! The frames of the datagram channel: every UDP flow of a session, both ways, on one channel
//! (see the module docs of [`crate::proto`], "Datagram channel").
//!
//! ```text
//! DATA   0x01 ‖ flow: u32 BE ‖ len: u16 BE ‖ len bytes
//! OPEN   0x02 ‖ flow: u32 BE ‖ target: Addr ‖ client: Addr ‖ len: u16 BE ‖ len bytes
//! CLOSE  0x03 ‖ flow: u32 BE ‖ reason: u8
//! Addr = 0x04 ‖ 4 octets ‖ port: u16 BE  |  0x06 ‖ 16 octets ‖ port: u16 BE
//! ```
//!
//! Every header is fixed-size once its type and address families are read, so a decoder knows
//! the whole frame's length from at most [`MAX_FRAME_HEAD`] bytes, and a `u16` length holds every
//! datagram up to [`MAX_DATAGRAM`](super::MAX_DATAGRAM).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BufMut;

use super::ProtoError;

/// The frame type bytes.
pub const DATA: u8 = 0x01;
/// See [`DATA`].
pub const OPEN: u8 = 0x02;
/// See [`DATA`].
pub const CLOSE: u8 = 0x03;

/// The longest frame head (an OPEN with two IPv6 addresses, up to its length field).
pub const MAX_FRAME_HEAD: usize = 1 + 4 + 2 * ADDR_V6 + 2;
/// Bytes of a DATA frame's head.
pub const DATA_HEAD: usize = 1 + 4 + 2;
/// The longest frame: an OPEN with two IPv6 addresses and a datagram of
/// [`MAX_DATAGRAM`](super::MAX_DATAGRAM) bytes.
pub const MAX_FRAME: usize = MAX_FRAME_HEAD + super::MAX_DATAGRAM;

const ADDR_V4: usize = 1 + 4 + 2;
const ADDR_V6: usize = 1 + 16 + 2;
const WHAT: &str = "datagram channel frame";

/// The bit of a flow id that says which side opened the flow: clear for the forwarder's flows
/// (host clients towards the VM), set for the agent's (VM clients towards the host).
pub const AGENT_FLOW: u32 = 1 << 31;

/// Why a flow was closed, carried by CLOSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// 0: idle for the sender's timeout.
    Idle,
    /// 1: evicted (least recently used) to make room under the sender's flow limit.
    Evicted,
    /// 2: the target refused (ICMP port unreachable on connect or send).
    Refused,
    /// 3: policy forbids the target.
    Forbidden,
    /// 4: the target cannot be reached (no route, no socket of that family).
    Unreachable,
    /// 5: the sender knows no such flow (it closed it earlier); the opener drops the flow and
    /// opens a new one with its next datagram.
    Unknown,
    /// 6: the sender's side of the flow is gone for another reason (its listener closed, the
    /// session is ending, an error).
    Gone,
}

impl CloseReason {
    const ALL: [CloseReason; 7] = [
        Self::Idle,
        Self::Evicted,
        Self::Refused,
        Self::Forbidden,
        Self::Unreachable,
        Self::Unknown,
        Self::Gone,
    ];

    /// The wire byte.
    pub fn code(self) -> u8 {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(6) as u8
    }

    /// The reason of a wire byte.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// Whether the peer turned the flow away before it carried anything (a refusal worth a
    /// log line), rather than ending it.
    pub fn is_refusal(self) -> bool {
        matches!(self, Self::Refused | Self::Forbidden | Self::Unreachable)
    }

    /// A short name for logs and status.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Evicted => "evicted",
            Self::Refused => "refused",
            Self::Forbidden => "forbidden",
            Self::Unreachable => "unreachable",
            Self::Unknown => "unknown flow",
            Self::Gone => "gone",
        }
    }
}

/// One frame of the datagram channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A datagram of an open flow.
    Data {
        /// The flow.
        flow: u32,
        /// The datagram (may be empty).
        payload: &'a [u8],
    },
    /// The first datagram of a new flow, with where it goes and where it came from.
    Open {
        /// The flow id the opener chose (with [`AGENT_FLOW`] set if the agent opened it).
        flow: u32,
        /// Where to send it, as seen by the receiver (an unspecified address means that
        /// family's loopback).
        target: SocketAddr,
        /// The client on the opener's side.
        client: SocketAddr,
        /// The datagram (may be empty).
        payload: &'a [u8],
    },
    /// The flow is gone on the sender's side.
    Close {
        /// The flow.
        flow: u32,
        /// Why.
        reason: CloseReason,
    },
}

impl Frame<'_> {
    /// The flow the frame belongs to.
    pub fn flow(&self) -> u32 {
        match *self {
            Frame::Data { flow, .. } | Frame::Open { flow, .. } | Frame::Close { flow, .. } => flow,
        }
    }

    /// How many bytes the frame takes encoded.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Data { payload, .. } => DATA_HEAD + payload.len(),
            Frame::Open {
                target,
                client,
                payload,
                ..
            } => 1 + 4 + addr_len(target) + addr_len(client) + 2 + payload.len(),
            Frame::Close { .. } => 1 + 4 + 1,
        }
    }
}

fn addr_len(a: &SocketAddr) -> usize {
    if a.is_ipv4() { ADDR_V4 } else { ADDR_V6 }
}

fn too_large(len: usize) -> ProtoError {
    ProtoError::TooLarge {
        what: "datagram",
        len: len as u64,
        max: super::MAX_DATAGRAM as u64,
    }
}

fn put_addr<B: BufMut>(a: &SocketAddr, out: &mut B) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(4);
            out.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(6);
            out.put_slice(&ip.octets());
        }
    }
    out.put_u16(a.port());
}

/// Appends the encoded frame to `out`; fails (appending nothing) if the payload is longer than
/// [`MAX_DATAGRAM`](super::MAX_DATAGRAM).
pub fn encode_frame<B: BufMut>(frame: &Frame<'_>, out: &mut B) -> Result<(), ProtoError> {
    let payload_len = |p: &[u8]| u16::try_from(p.len()).map_err(|_| too_large(p.len()));
    match frame {
        Frame::Data { flow, payload } => {
            let len = payload_len(payload)?;
            out.put_u8(DATA);
            out.put_u32(*flow);
            out.put_u16(len);
            out.put_slice(payload);
        }
        Frame::Open {
            flow,
            target,
            client,
            payload,
        } => {
            let len = payload_len(payload)?;
            out.put_u8(OPEN);
            out.put_u32(*flow);
            put_addr(target, out);
            put_addr(client, out);
            out.put_u16(len);
            out.put_slice(payload);
        }
        Frame::Close { flow, reason } => {
            out.put_u8(CLOSE);
            out.put_u32(*flow);
            out.put_u8(reason.code());
        }
    }
    Ok(())
}

/// A cursor over a frame's bytes: `None` when they run out (more are needed).
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn addr(&mut self) -> Option<Result<SocketAddr, ProtoError>> {
        let [family] = self.array::<1>()?;
        let ip: IpAddr = match family {
            4 => Ipv4Addr::from(self.array::<4>()?).into(),
            6 => Ipv6Addr::from(self.array::<16>()?).into(),
            _ => {
                return Some(Err(ProtoError::Invalid {
                    what: WHAT,
                    reason: "address family is neither 4 nor 6",
                }));
            }
        };
        let port = u16::from_be_bytes(self.array::<2>()?);
        Some(Ok(SocketAddr::new(ip, port)))
    }

    fn payload(&mut self) -> Option<&'a [u8]> {
        let len = u16::from_be_bytes(self.array::<2>()?);
        self.take(usize::from(len))
    }
}

/// Decodes one frame from the front of `buf`: `Ok(None)` if more bytes are needed, else the
/// frame and how many bytes it took. An unknown type byte, an address family other than 4 or
/// 6, or an unknown close reason is an error: the channel is then out of step and must close.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, ProtoError> {
    let mut c = Cursor { buf, at: 0 };
    let Some([kind]) = c.array::<1>() else {
        return Ok(None);
    };
    if !matches!(kind, DATA | OPEN | CLOSE) {
        return Err(ProtoError::UnknownType {
            what: WHAT,
            tag: u64::from(kind),
        });
    }
    let Some(flow) = c.array::<4>().map(u32::from_be_bytes) else {
        return Ok(None);
    };
    let frame = match kind {
        DATA => match c.payload() {
            Some(payload) => Frame::Data { flow, payload },
            None => return Ok(None),
        },
        OPEN => {
            let target = match c.addr() {
                Some(a) => a?,
                None => return Ok(None),
            };
            let client = match c.addr() {
                Some(a) => a?,
                None => return Ok(None),
            };
            match c.payload() {
                Some(payload) => Frame::Open {
                    flow,
                    target,
                    client,
                    payload,
                },
                None => return Ok(None),
            }
        }
        _ => {
            let Some([code]) = c.array::<1>() else {
                return Ok(None);
            };
            let reason = CloseReason::from_code(code).ok_or(ProtoError::UnknownType {
                what: "close reason",
                tag: u64::from(code),
            })?;
            Frame::Close { flow, reason }
        }
    };
    Ok(Some((frame, c.at)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame<'_>) {
        let mut out = Vec::new();
        encode_frame(&f, &mut out).unwrap();
        assert_eq!(out.len(), f.encoded_len());
        let (back, used) = decode_frame(&out).unwrap().unwrap();
        assert_eq!((back, used), (f, out.len()));
        for cut in 0..out.len() {
            assert!(decode_frame(&out[..cut]).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn frames_round_trip_and_need_all_their_bytes() {
        round_trip(Frame::Data {
            flow: 7,
            payload: b"hello",
        });
        round_trip(Frame::Data {
            flow: AGENT_FLOW | 1,
            payload: b"",
        });
        round_trip(Frame::Open {
            flow: 1,
            target: "127.0.0.1:53".parse().unwrap(),
            client: "[::1]:40000".parse().unwrap(),
            payload: &[9; 1400],
        });
        for reason in CloseReason::ALL {
            round_trip(Frame::Close { flow: 3, reason });
            assert_eq!(CloseReason::from_code(reason.code()), Some(reason));
        }
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert!(decode_frame(&[0x09, 0, 0, 0, 1]).is_err());
        assert!(decode_frame(&[CLOSE, 0, 0, 0, 1, 7]).is_err());
        assert!(decode_frame(&[OPEN, 0, 0, 0, 1, 5, 0, 0]).is_err());
        let big = vec![0; super::super::MAX_DATAGRAM + 1];
        let mut out = Vec::new();
        assert!(
            encode_frame(
                &Frame::Data {
                    flow: 1,
                    payload: &big
                },
                &mut out
            )
            .is_err()
        );
        assert!(out.is_empty());
        assert_eq!(MAX_FRAME_HEAD, 45);
    }
}
