//! The host's listeners on Windows: the IP Helper API's owner-pid tables (`GetExtendedTcpTable`
//! with `TCP_TABLE_OWNER_PID_LISTENER`, `GetExtendedUdpTable` with `UDP_TABLE_OWNER_PID`), for
//! `AF_INET` and `AF_INET6`. This file only makes the calls; the tables are parsed by
//! [`iphlp`](super::iphlp), which documents their layouts.

use std::ffi::c_void;
use std::io;
use std::mem::{align_of, offset_of, size_of, size_of_val};
use std::ptr;

use windows_sys::Win32::Foundation::{
    ERROR_INSUFFICIENT_BUFFER, ERROR_NOT_SUPPORTED, FALSE, NO_ERROR, WIN32_ERROR,
};
use windows_sys::Win32::NetworkManagement::IpHelper::{
    GetExtendedTcpTable, GetExtendedUdpTable, MIB_TCP_STATE_LISTEN, MIB_TCP6ROW_OWNER_PID,
    MIB_TCP6TABLE_OWNER_PID, MIB_TCPROW_OWNER_PID, MIB_TCPTABLE_OWNER_PID, MIB_UDP6ROW_OWNER_PID,
    MIB_UDP6TABLE_OWNER_PID, MIB_UDPROW_OWNER_PID, MIB_UDPTABLE_OWNER_PID,
    TCP_TABLE_OWNER_PID_LISTENER, UDP_TABLE_OWNER_PID,
};
use windows_sys::Win32::Networking::WinSock::{AF_INET, AF_INET6, WSAEAFNOSUPPORT};

use super::Scanned;
use super::iphlp::{self, ParseError};

// The parser's layouts are those of the SDK, as windows-sys spells them.
const _: () = {
    assert!(size_of::<MIB_TCPROW_OWNER_PID>() == iphlp::TCP4_ROW_LEN);
    assert!(size_of::<MIB_TCP6ROW_OWNER_PID>() == iphlp::TCP6_ROW_LEN);
    assert!(size_of::<MIB_UDPROW_OWNER_PID>() == iphlp::UDP4_ROW_LEN);
    assert!(size_of::<MIB_UDP6ROW_OWNER_PID>() == iphlp::UDP6_ROW_LEN);
    assert!(align_of::<MIB_TCPROW_OWNER_PID>() == 4);
    assert!(align_of::<MIB_TCP6ROW_OWNER_PID>() == 4);
    assert!(align_of::<MIB_UDPROW_OWNER_PID>() == 4);
    assert!(align_of::<MIB_UDP6ROW_OWNER_PID>() == 4);
    assert!(offset_of!(MIB_TCPTABLE_OWNER_PID, table) == iphlp::COUNT_LEN);
    assert!(offset_of!(MIB_TCP6TABLE_OWNER_PID, table) == iphlp::COUNT_LEN);
    assert!(offset_of!(MIB_UDPTABLE_OWNER_PID, table) == iphlp::COUNT_LEN);
    assert!(offset_of!(MIB_UDP6TABLE_OWNER_PID, table) == iphlp::COUNT_LEN);
    assert!(offset_of!(MIB_TCPROW_OWNER_PID, dwLocalAddr) == 4);
    assert!(offset_of!(MIB_TCPROW_OWNER_PID, dwLocalPort) == 8);
    assert!(offset_of!(MIB_TCPROW_OWNER_PID, dwOwningPid) == 20);
    assert!(offset_of!(MIB_TCP6ROW_OWNER_PID, dwLocalPort) == 20);
    assert!(offset_of!(MIB_TCP6ROW_OWNER_PID, dwState) == 48);
    assert!(offset_of!(MIB_TCP6ROW_OWNER_PID, dwOwningPid) == 52);
    assert!(offset_of!(MIB_UDPROW_OWNER_PID, dwLocalPort) == 4);
    assert!(offset_of!(MIB_UDPROW_OWNER_PID, dwOwningPid) == 8);
    assert!(offset_of!(MIB_UDP6ROW_OWNER_PID, dwLocalPort) == 20);
    assert!(offset_of!(MIB_UDP6ROW_OWNER_PID, dwOwningPid) == 24);
    assert!(MIB_TCP_STATE_LISTEN as u32 == iphlp::MIB_TCP_STATE_LISTEN);
};

/// How many times a table is asked for before giving up: each `ERROR_INSUFFICIENT_BUFFER`
/// (the table grew between the size query and the fill) costs one.
const ATTEMPTS: usize = 5;

/// `STATUS_UNSUCCESSFUL`, which `GetExtended{Tcp,Udp}Table` have been seen to return (psutil
/// met it) instead of `ERROR_INSUFFICIENT_BUFFER` when the table grew under the call; treated
/// the same way, by asking for the size again.
const STATUS_UNSUCCESSFUL: WIN32_ERROR = 0xC000_0001;

/// `WSAEAFNOSUPPORT` ("address family not supported") as the `u32` the calls return; with
/// `ERROR_NOT_SUPPORTED`, what a family the host lacks is answered with.
const WSAEAFNOSUPPORT_U32: WIN32_ERROR = WSAEAFNOSUPPORT as WIN32_ERROR;

/// The listening TCP sockets and the bound UDP sockets, IPv4 then IPv6. A family the host does
/// not have is skipped.
pub(crate) fn scan() -> io::Result<Vec<Scanned>> {
    let mut out = Vec::new();
    for (call, family, parse) in [
        (Call::Tcp, AF_INET, iphlp::parse_tcp4 as Parser),
        (Call::Udp, AF_INET, iphlp::parse_udp4),
        (Call::Tcp, AF_INET6, iphlp::parse_tcp6),
        (Call::Udp, AF_INET6, iphlp::parse_udp6),
    ] {
        let name = call.name(family);
        if let Some(table) = fetch(call, u32::from(family), name)? {
            let rows = parse(&table).map_err(|e| invalid(name, e))?;
            out.extend(rows);
        }
    }
    Ok(out)
}

/// The range Windows picks ephemeral ports from: the default dynamic range since Vista,
/// 49152-65535. `netsh int ipv4 set dynamicport` can move it, but no documented IP Helper or
/// Winsock call reads the setting back, so the default is assumed.
pub(crate) fn ephemeral_range() -> Option<(u16, u16)> {
    Some((49152, 65535))
}

type Parser = fn(&[u8]) -> Result<Vec<Scanned>, ParseError>;

#[derive(Debug, Clone, Copy)]
enum Call {
    Tcp,
    Udp,
}

impl Call {
    fn name(self, family: u16) -> &'static str {
        match (self, family == AF_INET6) {
            (Call::Tcp, false) => "GetExtendedTcpTable(AF_INET, TCP_TABLE_OWNER_PID_LISTENER)",
            (Call::Tcp, true) => "GetExtendedTcpTable(AF_INET6, TCP_TABLE_OWNER_PID_LISTENER)",
            (Call::Udp, false) => "GetExtendedUdpTable(AF_INET, UDP_TABLE_OWNER_PID)",
            (Call::Udp, true) => "GetExtendedUdpTable(AF_INET6, UDP_TABLE_OWNER_PID)",
        }
    }

    /// One call, filling `buf` (an empty `buf` makes it a size query): the call's code and the
    /// size it reported (on `ERROR_INSUFFICIENT_BUFFER`, the bytes the table needs).
    fn invoke(self, family: u32, buf: &mut [u64]) -> (WIN32_ERROR, u32) {
        // Telling the call less than `buf` holds is always safe (a table of 4 GiB is not).
        let mut size = u32::try_from(size_of_val(buf)).unwrap_or(u32::MAX);
        let table = if buf.is_empty() {
            ptr::null_mut()
        } else {
            buf.as_mut_ptr().cast::<c_void>()
        };
        let code = match self {
            // SAFETY: `table` is null with `size` 0 (a size query: the call writes only `size`)
            // or points to `buf`, writable for at least `size` bytes and 8-aligned (the rows
            // need 4); `size` is a live `u32` for the call to update. The class and family are
            // values the call documents; `Reserved` is 0 as required.
            Self::Tcp => unsafe {
                GetExtendedTcpTable(
                    table,
                    &mut size,
                    FALSE,
                    family,
                    TCP_TABLE_OWNER_PID_LISTENER,
                    0,
                )
            },
            // SAFETY: as for the TCP call.
            Self::Udp => unsafe {
                GetExtendedUdpTable(table, &mut size, FALSE, family, UDP_TABLE_OWNER_PID, 0)
            },
        };
        (code, size)
    }
}

/// The bytes of one table, or `None` when the host lacks the address family: the usual size
/// query, then the fill, growing the buffer while the table keeps growing under us.
fn fetch(call: Call, family: u32, name: &'static str) -> io::Result<Option<Vec<u8>>> {
    // `u64` words keep the buffer aligned for the table.
    let mut words: Vec<u64> = Vec::new();
    for _ in 0..ATTEMPTS {
        match call.invoke(family, &mut words) {
            (NO_ERROR, _) if !words.is_empty() => {
                // The whole buffer: the parser reads `dwNumEntries` and ignores what follows
                // the rows (the call does not promise to update the size on success).
                return Ok(Some(words.iter().flat_map(|w| w.to_ne_bytes()).collect()));
            }
            // A size query cannot succeed (a table has at least its count), but if one ever
            // does, ask again with a buffer.
            (NO_ERROR, _) => words = vec![0; 1],
            (ERROR_INSUFFICIENT_BUFFER, need) => {
                // A quarter more than the call asked for, so that a table growing by a few rows
                // before the next call does not cost another round.
                let need = usize::try_from(need).unwrap_or(usize::MAX);
                let want = need.saturating_add(need / 4).max(iphlp::COUNT_LEN);
                words = vec![0; want.div_ceil(size_of::<u64>())];
            }
            (STATUS_UNSUCCESSFUL, _) => words = Vec::new(),
            (ERROR_NOT_SUPPORTED | WSAEAFNOSUPPORT_U32, _) => return Ok(None),
            (err, _) => return Err(failed(name, err)),
        }
    }
    Err(io::Error::other(format!(
        "{name}: the table kept growing, still no room after {ATTEMPTS} attempts"
    )))
}

/// A call that failed, named, with the OS error kept as the source.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
struct CallFailed {
    call: &'static str,
    #[source]
    source: io::Error,
}

fn failed(call: &'static str, err: WIN32_ERROR) -> io::Error {
    // On Windows `from_raw_os_error` takes `GetLastError` codes, which these are; the bits are
    // kept as they are (an NTSTATUS-like code reads as a negative number).
    let source = io::Error::from_raw_os_error(i32::from_ne_bytes(err.to_ne_bytes()));
    io::Error::new(source.kind(), CallFailed { call, source })
}

/// A table that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
struct BadTable {
    call: &'static str,
    #[source]
    source: ParseError,
}

fn invalid(call: &'static str, source: ParseError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, BadTable { call, source })
}

/// This host's listener source: a scan every [`super::SCAN_INTERVAL`].
pub(super) fn start() -> Result<std::sync::Arc<dyn crate::reverse::HostListeners>, super::StartError>
{
    super::poll::start_scanning(scan, ephemeral_range())
}
