//! The tables of the Windows IP Helper API (`GetExtendedTcpTable` / `GetExtendedUdpTable`,
//! iphlpapi.dll), parsed from their bytes.
//!
//! This module is plain Rust on every OS: it takes the buffer the API filled and returns
//! [`Scanned`] rows, so it is tested (and fuzzed by a property test) on Linux. The calls
//! themselves are made by the Windows shell (`windows.rs`).
//!
//! # The tables
//!
//! Each table is a `DWORD dwNumEntries` followed by `dwNumEntries` rows. Every row field is a
//! `DWORD` or a byte array, so a row has an alignment of 4 and the row array starts right after
//! the count, at offset 4, with no padding between rows (Microsoft's remarks say a table *may*
//! pad between the count and the rows; with 4-byte rows there is nothing to pad). The Windows
//! shell asserts these sizes and offsets against the `windows-sys` definitions at compile time.
//!
//! | table (`ulAf`, class) | row | bytes |
//! | --- | --- | --- |
//! | `MIB_TCPTABLE_OWNER_PID` (`AF_INET`, `TCP_TABLE_OWNER_PID_*`) | `MIB_TCPROW_OWNER_PID` | 24 |
//! | `MIB_TCP6TABLE_OWNER_PID` (`AF_INET6`, `TCP_TABLE_OWNER_PID_*`) | `MIB_TCP6ROW_OWNER_PID` | 56 |
//! | `MIB_UDPTABLE_OWNER_PID` (`AF_INET`, `UDP_TABLE_OWNER_PID`) | `MIB_UDPROW_OWNER_PID` | 12 |
//! | `MIB_UDP6TABLE_OWNER_PID` (`AF_INET6`, `UDP_TABLE_OWNER_PID`) | `MIB_UDP6ROW_OWNER_PID` | 28 |
//!
//! Row layouts (byte offsets):
//!
//! ```text
//! MIB_TCPROW_OWNER_PID   0 dwState  4 dwLocalAddr  8 dwLocalPort  12 dwRemoteAddr
//!                       16 dwRemotePort  20 dwOwningPid                          (24)
//! MIB_TCP6ROW_OWNER_PID  0 ucLocalAddr[16]  16 dwLocalScopeId  20 dwLocalPort
//!                       24 ucRemoteAddr[16]  40 dwRemoteScopeId  44 dwRemotePort
//!                       48 dwState  52 dwOwningPid                               (56)
//! MIB_UDPROW_OWNER_PID   0 dwLocalAddr  4 dwLocalPort  8 dwOwningPid             (12)
//! MIB_UDP6ROW_OWNER_PID  0 ucLocalAddr[16]  16 dwLocalScopeId  20 dwLocalPort
//!                       24 dwOwningPid                                           (28)
//! ```
//!
//! # Byte orders
//!
//! - `dwNumEntries`, `dwState` and `dwOwningPid` are host-order `DWORD`s: little-endian, on
//!   every Windows target.
//! - `dwLocalAddr` is the IPv4 address in network byte order, so its four bytes in memory are
//!   the address's octets in order; `ucLocalAddr` is the 16 bytes of the IPv6 address, also in
//!   network order.
//! - `dwLocalPort` holds the port in network byte order in its low 16 bits (what `ntohs` of the
//!   `DWORD` truncated to `u_short` gives): the first two bytes in memory, big-endian. The upper
//!   16 bits are not part of the port and are ignored.
//! - `dwState` of a TCP row is a `MIB_TCP_STATE`; only [`MIB_TCP_STATE_LISTEN`] (2) rows are kept
//!   (the shell asks for `TCP_TABLE_OWNER_PID_LISTENER`, the filter here holds for any class).
//!
//! Sources: Microsoft's reference pages for the four row and table structures, for
//! `GetExtendedTcpTable` and `GetExtendedUdpTable` and for `MIB_TCP_STATE`; the `windows-sys`
//! 0.61 definitions (`Win32::NetworkManagement::IpHelper`), which have the same fields in the
//! same order with `u32` for `DWORD` and `[u8; 16]` for the addresses.
//!
//! # What a row becomes
//!
//! - The scope id of an IPv6 row is dropped: [`Scanned`] holds an [`IpAddr`], and the forwarder
//!   mirrors loopback and wildcard listeners, which have none.
//! - `dwOwningPid` 0 means "not known" (Microsoft: "the information for this endpoint is
//!   unavailable"; Wine reports the Linux host's sockets with pid 0) and becomes `None`.
//! - A row with local port 0 is skipped ([`Scanned::port`] is never 0).
//! - `v6only`: see [`parse_tcp6`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hostnet_link::discovery::Protocol;

use super::Scanned;

/// `MIB_TCP_STATE_LISTEN`: a TCP row in `LISTEN`.
pub const MIB_TCP_STATE_LISTEN: u32 = 2;

/// Bytes of `dwNumEntries`, and the offset of the first row.
pub const COUNT_LEN: usize = 4;
/// Bytes of a `MIB_TCPROW_OWNER_PID`.
pub const TCP4_ROW_LEN: usize = 24;
/// Bytes of a `MIB_TCP6ROW_OWNER_PID`.
pub const TCP6_ROW_LEN: usize = 56;
/// Bytes of a `MIB_UDPROW_OWNER_PID`.
pub const UDP4_ROW_LEN: usize = 12;
/// Bytes of a `MIB_UDP6ROW_OWNER_PID`.
pub const UDP6_ROW_LEN: usize = 28;

/// Which of the four tables a buffer was parsed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `MIB_TCPTABLE_OWNER_PID`.
    Tcp4,
    /// `MIB_TCP6TABLE_OWNER_PID`.
    Tcp6,
    /// `MIB_UDPTABLE_OWNER_PID`.
    Udp4,
    /// `MIB_UDP6TABLE_OWNER_PID`.
    Udp6,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::Tcp4 => "MIB_TCPTABLE_OWNER_PID",
            Table::Tcp6 => "MIB_TCP6TABLE_OWNER_PID",
            Table::Udp4 => "MIB_UDPTABLE_OWNER_PID",
            Table::Udp6 => "MIB_UDP6TABLE_OWNER_PID",
        })
    }
}

/// A buffer that does not hold the table it should.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The buffer is too short for `dwNumEntries`.
    #[error("{table}: {len} bytes is too short for dwNumEntries")]
    NoCount {
        /// The table expected.
        table: Table,
        /// The buffer's length.
        len: usize,
    },
    /// `dwNumEntries` rows do not fit in the buffer (or their size overflows).
    #[error("{table}: dwNumEntries {count} rows of {row_len} bytes do not fit in {len} bytes")]
    Truncated {
        /// The table expected.
        table: Table,
        /// `dwNumEntries`.
        count: u32,
        /// The size of one row.
        row_len: usize,
        /// The buffer's length.
        len: usize,
    },
}

/// The rows of a listening-TCP IPv4 table (`MIB_TCPTABLE_OWNER_PID`); rows not in `LISTEN` are
/// skipped.
pub fn parse_tcp4(buf: &[u8]) -> Result<Vec<Scanned>, ParseError> {
    Ok(rows::<TCP4_ROW_LEN>(Table::Tcp4, buf)?
        .filter(|row| le_u32(row, 0) == MIB_TCP_STATE_LISTEN)
        .filter_map(|row| {
            scanned(
                Protocol::Tcp,
                IpAddr::V4(ipv4_at(row, 4)),
                port_at(row, 8),
                None,
                le_u32(row, 20),
            )
        })
        .collect())
}

/// The rows of a listening-TCP IPv6 table (`MIB_TCP6TABLE_OWNER_PID`); rows not in `LISTEN` are
/// skipped.
///
/// Every row gets `v6only: Some(true)`. The tables do not carry `IPV6_V6ONLY`, and they do not
/// need to: Windows reports sockets per family, and a dual-stack socket (`IPV6_V6ONLY` off)
/// bound to `[::]:P` shows up both here, as `[::]:P`, and in the IPv4 table, as `0.0.0.0:P`.
/// So each IPv6 row stands for the IPv6 side only and the IPv4 side arrives through its own
/// row; calling the row dual-stack (`Some(false)`) would claim the IPv4 side twice.
pub fn parse_tcp6(buf: &[u8]) -> Result<Vec<Scanned>, ParseError> {
    Ok(rows::<TCP6_ROW_LEN>(Table::Tcp6, buf)?
        .filter(|row| le_u32(row, 48) == MIB_TCP_STATE_LISTEN)
        .filter_map(|row| {
            scanned(
                Protocol::Tcp,
                IpAddr::V6(ipv6_at(row, 0)),
                port_at(row, 20),
                Some(true),
                le_u32(row, 52),
            )
        })
        .collect())
}

/// The rows of an IPv4 UDP table (`MIB_UDPTABLE_OWNER_PID`).
pub fn parse_udp4(buf: &[u8]) -> Result<Vec<Scanned>, ParseError> {
    Ok(rows::<UDP4_ROW_LEN>(Table::Udp4, buf)?
        .filter_map(|row| {
            scanned(
                Protocol::Udp,
                IpAddr::V4(ipv4_at(row, 0)),
                port_at(row, 4),
                None,
                le_u32(row, 8),
            )
        })
        .collect())
}

/// The rows of an IPv6 UDP table (`MIB_UDP6TABLE_OWNER_PID`), with `v6only: Some(true)` for
/// the reason given at [`parse_tcp6`].
pub fn parse_udp6(buf: &[u8]) -> Result<Vec<Scanned>, ParseError> {
    Ok(rows::<UDP6_ROW_LEN>(Table::Udp6, buf)?
        .filter_map(|row| {
            scanned(
                Protocol::Udp,
                IpAddr::V6(ipv6_at(row, 0)),
                port_at(row, 20),
                Some(true),
                le_u32(row, 24),
            )
        })
        .collect())
}

/// The `dwNumEntries` rows of `buf`, each `ROW` bytes, after checking that they fit. Bytes past
/// the last row are ignored (the shell hands over its whole buffer, which may be larger).
fn rows<const ROW: usize>(
    table: Table,
    buf: &[u8],
) -> Result<impl Iterator<Item = &[u8; ROW]>, ParseError> {
    let len = buf.len();
    let (count, body) = match buf.split_first_chunk::<COUNT_LEN>() {
        Some((count, body)) => (u32::from_le_bytes(*count), body),
        None => return Err(ParseError::NoCount { table, len }),
    };
    let truncated = ParseError::Truncated {
        table,
        count,
        row_len: ROW,
        len,
    };
    let need = usize::try_from(count)
        .ok()
        .and_then(|n| n.checked_mul(ROW))
        .ok_or(truncated)?;
    let body = body.get(..need).ok_or(truncated)?;
    // `chunks_exact` yields slices of exactly ROW bytes, so the conversion never fails.
    Ok(body
        .chunks_exact(ROW)
        .filter_map(|row| <&[u8; ROW]>::try_from(row).ok()))
}

/// A [`Scanned`], or `None` for a row without a port.
fn scanned(
    proto: Protocol,
    addr: IpAddr,
    port: u16,
    v6only: Option<bool>,
    pid: u32,
) -> Option<Scanned> {
    (port != 0).then_some(Scanned {
        proto,
        addr,
        port,
        v6only,
        pid: (pid != 0).then_some(pid),
    })
}

/// The little-endian `DWORD` at `at`.
fn le_u32<const N: usize>(row: &[u8; N], at: usize) -> u32 {
    u32::from_le_bytes(array_at(row, at))
}

/// The port of a `dw*Port` field at `at`: network order, in the `DWORD`'s low 16 bits.
fn port_at<const N: usize>(row: &[u8; N], at: usize) -> u16 {
    let [hi, lo, _, _] = array_at::<N, 4>(row, at);
    u16::from_be_bytes([hi, lo])
}

/// The IPv4 address of a `dwLocalAddr` field at `at` (network order).
fn ipv4_at<const N: usize>(row: &[u8; N], at: usize) -> Ipv4Addr {
    Ipv4Addr::from(array_at::<N, 4>(row, at))
}

/// The IPv6 address of a `ucLocalAddr[16]` field at `at` (network order).
fn ipv6_at<const N: usize>(row: &[u8; N], at: usize) -> Ipv6Addr {
    Ipv6Addr::from(array_at::<N, 16>(row, at))
}

/// `M` bytes of `row` from `at`. Every offset passed in is a constant of the row layouts above,
/// inside the row; the tests cover each.
fn array_at<const N: usize, const M: usize>(row: &[u8; N], at: usize) -> [u8; M] {
    let mut out = [0; M];
    out.copy_from_slice(&row[at..at + M]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    const ESTABLISHED: u32 = 5;

    fn count(n: u32) -> Vec<u8> {
        n.to_le_bytes().to_vec()
    }

    /// A `dw*Port` field: the port big-endian in the first two bytes, junk in the upper half
    /// (which the parser must ignore).
    fn port(p: u16) -> [u8; 4] {
        let [hi, lo] = p.to_be_bytes();
        [hi, lo, 0xAA, 0x55]
    }

    fn tcp4_row(
        state: u32,
        local: [u8; 4],
        lport: u16,
        remote: [u8; 4],
        rport: u16,
        pid: u32,
    ) -> Vec<u8> {
        let mut row = Vec::new();
        row.extend_from_slice(&state.to_le_bytes()); // 0 dwState
        row.extend_from_slice(&local); // 4 dwLocalAddr
        row.extend_from_slice(&port(lport)); // 8 dwLocalPort
        row.extend_from_slice(&remote); // 12 dwRemoteAddr
        row.extend_from_slice(&port(rport)); // 16 dwRemotePort
        row.extend_from_slice(&pid.to_le_bytes()); // 20 dwOwningPid
        assert_eq!(row.len(), TCP4_ROW_LEN);
        row
    }

    fn tcp6_row(state: u32, local: Ipv6Addr, lport: u16, pid: u32) -> Vec<u8> {
        let mut row = Vec::new();
        row.extend_from_slice(&local.octets()); // 0 ucLocalAddr
        row.extend_from_slice(&7u32.to_le_bytes()); // 16 dwLocalScopeId
        row.extend_from_slice(&port(lport)); // 20 dwLocalPort
        row.extend_from_slice(&[0xEE; 16]); // 24 ucRemoteAddr (meaningless in LISTEN)
        row.extend_from_slice(&9u32.to_le_bytes()); // 40 dwRemoteScopeId
        row.extend_from_slice(&port(443)); // 44 dwRemotePort
        row.extend_from_slice(&state.to_le_bytes()); // 48 dwState
        row.extend_from_slice(&pid.to_le_bytes()); // 52 dwOwningPid
        assert_eq!(row.len(), TCP6_ROW_LEN);
        row
    }

    fn udp4_row(local: [u8; 4], lport: u16, pid: u32) -> Vec<u8> {
        let mut row = Vec::new();
        row.extend_from_slice(&local); // 0 dwLocalAddr
        row.extend_from_slice(&port(lport)); // 4 dwLocalPort
        row.extend_from_slice(&pid.to_le_bytes()); // 8 dwOwningPid
        assert_eq!(row.len(), UDP4_ROW_LEN);
        row
    }

    fn udp6_row(local: Ipv6Addr, lport: u16, pid: u32) -> Vec<u8> {
        let mut row = Vec::new();
        row.extend_from_slice(&local.octets()); // 0 ucLocalAddr
        row.extend_from_slice(&0u32.to_le_bytes()); // 16 dwLocalScopeId
        row.extend_from_slice(&port(lport)); // 20 dwLocalPort
        row.extend_from_slice(&pid.to_le_bytes()); // 24 dwOwningPid
        assert_eq!(row.len(), UDP6_ROW_LEN);
        row
    }

    fn table(rows: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = count(u32::try_from(rows.len()).unwrap());
        for r in rows {
            buf.extend_from_slice(r);
        }
        buf
    }

    fn tcp4_fixture() -> Vec<u8> {
        table(&[
            tcp4_row(MIB_TCP_STATE_LISTEN, [127, 0, 0, 1], 5432, [0; 4], 0, 4242),
            tcp4_row(ESTABLISHED, [10, 0, 0, 2], 50000, [1, 2, 3, 4], 443, 77),
            tcp4_row(MIB_TCP_STATE_LISTEN, [0, 0, 0, 0], 135, [0; 4], 0, 0),
        ])
    }

    #[test]
    fn tcp4_keeps_listeners_skips_established() {
        let got = parse_tcp4(&tcp4_fixture()).unwrap();
        assert_eq!(
            got,
            vec![
                Scanned {
                    proto: Protocol::Tcp,
                    addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port: 5432,
                    v6only: None,
                    pid: Some(4242),
                },
                Scanned {
                    proto: Protocol::Tcp,
                    addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    port: 135,
                    v6only: None,
                    pid: None,
                },
            ]
        );
    }

    #[test]
    fn tcp4_exact_bytes() {
        // The 127.0.0.1:5432 listener of pid 4242, spelled out byte by byte.
        let buf = [
            1, 0, 0, 0, // dwNumEntries = 1
            2, 0, 0, 0, // dwState = MIB_TCP_STATE_LISTEN
            127, 0, 0, 1, // dwLocalAddr
            0x15, 0x38, 0, 0, // dwLocalPort = htons(5432)
            0, 0, 0, 0, // dwRemoteAddr
            0, 0, 0, 0, // dwRemotePort
            0x92, 0x10, 0, 0, // dwOwningPid = 4242
        ];
        assert_eq!(
            parse_tcp4(&buf).unwrap(),
            vec![Scanned {
                proto: Protocol::Tcp,
                addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 5432,
                v6only: None,
                pid: Some(4242),
            }]
        );
    }

    #[test]
    fn tcp6_listener() {
        let buf = table(&[
            tcp6_row(MIB_TCP_STATE_LISTEN, Ipv6Addr::LOCALHOST, 8080, 900),
            tcp6_row(ESTABLISHED, Ipv6Addr::LOCALHOST, 8080, 900),
        ]);
        assert_eq!(
            parse_tcp6(&buf).unwrap(),
            vec![Scanned {
                proto: Protocol::Tcp,
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                port: 8080,
                v6only: Some(true),
                pid: Some(900),
            }]
        );
    }

    #[test]
    fn udp4_and_udp6() {
        let v4 = table(&[udp4_row([0, 0, 0, 0], 53, 1200)]);
        assert_eq!(
            parse_udp4(&v4).unwrap(),
            vec![Scanned {
                proto: Protocol::Udp,
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port: 53,
                v6only: None,
                pid: Some(1200),
            }]
        );
        let v6 = table(&[udp6_row(Ipv6Addr::UNSPECIFIED, 5353, 0)]);
        assert_eq!(
            parse_udp6(&v6).unwrap(),
            vec![Scanned {
                proto: Protocol::Udp,
                addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                port: 5353,
                v6only: Some(true),
                pid: None,
            }]
        );
    }

    #[test]
    fn port_zero_rows_are_skipped() {
        let buf = table(&[udp4_row([127, 0, 0, 1], 0, 5)]);
        assert_eq!(parse_udp4(&buf).unwrap(), vec![]);
    }

    #[test]
    fn empty_tables_and_trailing_bytes() {
        assert_eq!(parse_tcp4(&count(0)).unwrap(), vec![]);
        assert_eq!(parse_udp6(&count(0)).unwrap(), vec![]);
        // The shell passes its whole (over-allocated) buffer: bytes past the rows are ignored.
        let mut buf = table(&[udp4_row([0, 0, 0, 0], 53, 1)]);
        buf.extend_from_slice(&[0xFF; 13]);
        assert_eq!(parse_udp4(&buf).unwrap().len(), 1);
    }

    #[test]
    fn short_buffers_are_errors() {
        for len in 0..COUNT_LEN {
            assert_eq!(
                parse_tcp6(&vec![0; len]),
                Err(ParseError::NoCount {
                    table: Table::Tcp6,
                    len
                })
            );
        }
        let full = tcp4_fixture();
        for len in COUNT_LEN..full.len() {
            assert_eq!(
                parse_tcp4(&full[..len]),
                Err(ParseError::Truncated {
                    table: Table::Tcp4,
                    count: 3,
                    row_len: TCP4_ROW_LEN,
                    len
                }),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn absurd_counts_are_errors() {
        // One 28-byte row follows the count: even 3 rows of the smallest table (12 bytes each)
        // do not fit, and the large counts overflow on a 32-bit `usize`.
        for n in [u32::MAX, u32::MAX / 2, 1 << 28, 3] {
            let mut buf = count(n);
            buf.extend_from_slice(&udp6_row(Ipv6Addr::LOCALHOST, 1, 1));
            assert!(parse_udp6(&buf).is_err(), "count {n}");
            assert!(parse_tcp6(&buf).is_err(), "count {n}");
            assert!(parse_tcp4(&buf).is_err(), "count {n}");
            assert!(parse_udp4(&buf).is_err(), "count {n}");
        }
    }

    #[test]
    fn errors_name_the_table() {
        let err = parse_udp4(&count(9)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MIB_UDPTABLE_OWNER_PID: dwNumEntries 9 rows of 12 bytes do not fit in 4 bytes"
        );
    }

    proptest! {
        /// No input panics; a parse that succeeds returns at most `dwNumEntries` rows, none with
        /// port 0 or pid `Some(0)`.
        #[test]
        fn no_input_panics(buf in proptest::collection::vec(any::<u8>(), 0..300), small_count in 0u32..8) {
            let mut counted = small_count.to_le_bytes().to_vec();
            counted.extend_from_slice(&buf);
            for input in [&buf[..], &counted[..]] {
                for parse in [parse_tcp4, parse_tcp6, parse_udp4, parse_udp6] {
                    if let Ok(rows) = parse(input) {
                        let n = u32::from_le_bytes(input[..4].try_into().unwrap());
                        prop_assert!(rows.len() <= usize::try_from(n).unwrap());
                        prop_assert!(rows.iter().all(|s| s.port != 0 && s.pid != Some(0)));
                    }
                }
            }
        }
    }
}
