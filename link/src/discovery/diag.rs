//! The netlink sock_diag dump: one request per (protocol, family), the kernel filters by state.
//!
//! Framing and message layouts come from `netlink-packet-core` / `netlink-packet-sock-diag`; this
//! module only walks a received datagram message by message, so that one malformed message is
//! skipped (logged, counted) instead of failing the dump.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

use super::Error;

/// `TCP_LISTEN` in the kernel's socket state numbering.
pub(crate) const STATE_LISTEN: u8 = 10;
/// `TCP_CLOSE`: what an unconnected UDP socket reports (a connected one reports `ESTABLISHED`).
pub(crate) const STATE_CLOSE: u8 = 7;

/// Receive buffer for one recv(2): the kernel sizes a dump batch from the largest buffer the
/// reader has offered, so a large one means fewer batches (and fewer syscalls) per dump.
const RECV_BUF: usize = 64 * 1024;
/// A dump never waits longer than this for the kernel (it answers at once; this is a backstop).
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// One socket of a dump, as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiagRecord {
    pub state: u8,
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub ifindex: u32,
    pub uid: u32,
    pub inode: u32,
    pub v6only: Option<bool>,
}

/// Counters of a [`DiagSocket`], shared with whoever reports them.
#[derive(Debug, Default)]
pub(crate) struct DiagCounters {
    pub dumps: AtomicU64,
    pub malformed: AtomicU64,
    pub interrupted: AtomicU64,
}

/// What one received datagram told us.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Batch {
    /// More messages follow in the next datagram.
    More,
    /// `NLMSG_DONE` seen: the dump is complete.
    Done,
}

/// A NETLINK_SOCK_DIAG socket that runs dumps, one at a time.
#[derive(Debug)]
pub(crate) struct DiagSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl DiagSocket {
    pub(crate) fn open() -> Result<Self, Error> {
        let mut sock = Socket::new(NETLINK_SOCK_DIAG).map_err(Error::NetlinkOpen)?;
        sock.bind_auto().map_err(Error::NetlinkOpen)?;
        sock.connect(&NlAddr::new(0, 0))
            .map_err(Error::NetlinkOpen)?;
        // (`TimeVal::new` would name `time_t`, deprecated on musl targets.)
        let tv = <nix::sys::time::TimeVal as nix::sys::time::TimeValLike>::microseconds(
            i64::try_from(RECV_TIMEOUT.as_micros()).unwrap_or(i64::MAX),
        );
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(|e| Error::NetlinkOpen(e.into()))?;
        Ok(Self {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Dumps the sockets of `protocol` (`IPPROTO_TCP`/`IPPROTO_UDP`) and `family`
    /// (`AF_INET`/`AF_INET6`) whose state is in `states`, appending them to `out`. Returns how
    /// many datagrams carrying sockets the answer took.
    pub(crate) fn dump(
        &mut self,
        family: u8,
        protocol: u8,
        states: StateFlags,
        counters: &DiagCounters,
        out: &mut Vec<DiagRecord>,
    ) -> Result<usize, Error> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol,
                // INET_DIAG_SKV6ONLY needs no extension bit: the kernel adds it to every
                // AF_INET6 socket in LISTEN or CLOSE. No other extension is wanted.
                extensions: ExtensionFlags::empty(),
                states,
                socket_id: if family == libc::AF_INET6 as u8 {
                    SocketId::new_v6()
                } else {
                    SocketId::new_v4()
                },
            })
            .into(),
        );
        msg.finalize();
        let mut req = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut req);
        self.sock.send(&req, 0).map_err(Error::NetlinkIo)?;
        counters.dumps.fetch_add(1, Ordering::Relaxed);

        // Datagrams that carried sockets (NLMSG_DONE may come alone in the last one).
        let mut batches = 0;
        loop {
            self.buf.clear();
            let n = self.sock.recv(&mut self.buf, 0).map_err(Error::NetlinkIo)?;
            if n > self.buf.len() {
                // Truncated datagram (cannot happen with a 64 KiB buffer and 32 KiB batches):
                // its tail is lost, count it and go on with what we have.
                counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(len = n, "sock_diag: truncated netlink datagram");
            }
            let before = out.len();
            let batch = parse_datagram(&self.buf, seq, counters, out)?;
            if out.len() > before {
                batches += 1;
            }
            match batch {
                Batch::More => continue,
                Batch::Done => return Ok(batches),
            }
        }
    }
}

/// Walks one received datagram. Messages of another sequence number (left over from an earlier,
/// failed dump) are ignored; a malformed message is skipped with a log line and a count; a
/// malformed length stops the walk of this datagram (nothing after it can be framed).
pub(crate) fn parse_datagram(
    buf: &[u8],
    seq: u32,
    counters: &DiagCounters,
    out: &mut Vec<DiagRecord>,
) -> Result<Batch, Error> {
    let mut off = 0usize;
    while off < buf.len() {
        let rest = &buf[off..];
        let len = match NetlinkBuffer::new_checked(rest) {
            Ok(b) => b.length() as usize,
            Err(e) => {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, offset = off, "sock_diag: unframable netlink message, rest of datagram skipped");
                return Ok(Batch::More);
            }
        };
        // Messages are 4-byte aligned; new_checked guarantees 16 <= len <= rest.len().
        let next = off + ((len + 3) & !3);
        let this = &rest[..len];
        off = next;
        let msg = match NetlinkMessage::<SockDiagMessage>::deserialize(this) {
            Ok(m) => m,
            Err(e) => {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "sock_diag: malformed message skipped");
                continue;
            }
        };
        if msg.header.sequence_number != seq {
            tracing::debug!(
                got = msg.header.sequence_number,
                want = seq,
                "sock_diag: stale message ignored"
            );
            continue;
        }
        if msg.header.flags & NLM_F_DUMP_INTR != 0 {
            counters.interrupted.fetch_add(1, Ordering::Relaxed);
        }
        match msg.payload {
            NetlinkPayload::Done(_) => return Ok(Batch::Done),
            NetlinkPayload::Error(e) => {
                return match e.code {
                    // An ACK (code 0) is not expected for a dump; take it as the end.
                    None => Ok(Batch::Done),
                    Some(code) => Err(Error::Kernel(std::io::Error::from_raw_os_error(
                        -code.get(),
                    ))),
                };
            }
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                let h = &r.header;
                let mut v6only = None;
                for nla in &r.nlas {
                    if let Nla::SkV6Only(v) = nla {
                        v6only = Some(*v);
                    }
                }
                out.push(DiagRecord {
                    state: h.state,
                    src: h.socket_id.source_address,
                    src_port: h.socket_id.source_port,
                    dst: h.socket_id.destination_address,
                    dst_port: h.socket_id.destination_port,
                    ifindex: h.socket_id.interface_id,
                    uid: h.uid,
                    inode: h.inode,
                    v6only,
                });
            }
            other => {
                tracing::debug!(
                    kind = other.message_type(),
                    "sock_diag: unexpected message ignored"
                );
            }
        }
    }
    Ok(Batch::More)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> DiagCounters {
        DiagCounters::default()
    }

    #[test]
    fn garbage_never_panics_and_is_counted() {
        let c = counters();
        let mut out = Vec::new();
        // Too short to frame.
        assert_eq!(
            parse_datagram(&[1, 2, 3], 1, &c, &mut out).unwrap(),
            Batch::More
        );
        // A length field larger than the datagram.
        let mut m = vec![0u8; 20];
        m[0..4].copy_from_slice(&200u32.to_ne_bytes());
        assert_eq!(parse_datagram(&m, 1, &c, &mut out).unwrap(), Batch::More);
        // A well-framed SOCK_DIAG_BY_FAMILY message with a truncated body.
        let mut m = vec![0u8; 24];
        m[0..4].copy_from_slice(&24u32.to_ne_bytes());
        m[4..6].copy_from_slice(&20u16.to_ne_bytes());
        m[8..12].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(parse_datagram(&m, 1, &c, &mut out).unwrap(), Batch::More);
        assert!(out.is_empty());
        assert_eq!(c.malformed.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let c = counters();
        let mut out = Vec::new();
        let mut x: u32 = 0x1234_5678;
        let mut byte = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        };
        for len in 0..3000usize {
            let mut buf: Vec<u8> = (0..len % 300).map(|_| byte()).collect();
            // Every other datagram is well framed (right length, SOCK_DIAG_BY_FAMILY or
            // NLMSG_DONE/ERROR, our sequence number) so the body parsers see random bytes too.
            if len % 2 == 0 && buf.len() >= 16 {
                let n = buf.len() as u32;
                buf[0..4].copy_from_slice(&n.to_ne_bytes());
                let ty: u16 = [20, 3, 2][len % 3];
                buf[4..6].copy_from_slice(&ty.to_ne_bytes());
                buf[8..12].copy_from_slice(&0u32.to_ne_bytes());
            }
            let _ = parse_datagram(&buf, 0, &c, &mut out);
        }
    }

    #[test]
    fn error_message_is_a_kernel_error_and_stale_seq_is_ignored() {
        let c = counters();
        let mut out = Vec::new();
        let mut m = vec![0u8; 36];
        m[0..4].copy_from_slice(&36u32.to_ne_bytes());
        m[4..6].copy_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        m[8..12].copy_from_slice(&5u32.to_ne_bytes());
        m[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert!(matches!(
            parse_datagram(&m, 5, &c, &mut out),
            Err(Error::Kernel(e)) if e.raw_os_error() == Some(libc::EPERM)
        ));
        // The same message under another sequence number belongs to an older dump.
        assert_eq!(parse_datagram(&m, 6, &c, &mut out).unwrap(), Batch::More);
        assert_eq!(c.malformed.load(Ordering::Relaxed), 0);
    }
}
