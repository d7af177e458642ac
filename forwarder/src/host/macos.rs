//! The host's listeners on macOS: the `net.inet.tcp.pcblist_n` and `net.inet.udp.pcblist_n`
//! sysctls, which `netstat -an` reads too; they need no privilege and list every user's sockets.
//! This file only makes the `sysctlbyname(3)` calls; the replies are parsed by
//! [`pcblist`], which documents their layout.

use std::ffi::{CStr, c_int, c_void};
use std::io;
use std::mem::size_of;
use std::ptr;

use hostnet_link::discovery::Protocol;

use super::Scanned;
use super::pcblist::{self, ParseError};

/// How many times a list is asked for before giving up: each `ENOMEM` (the list grew past the
/// buffer between the size query and the read) costs one.
const ATTEMPTS: usize = 5;

/// The listening TCP sockets, then the bound, unconnected UDP sockets, IPv4 and IPv6 alike (one
/// list per protocol holds both families).
pub(crate) fn scan() -> io::Result<Vec<Scanned>> {
    let mut out = Vec::new();
    for (name, proto) in [
        (c"net.inet.tcp.pcblist_n", Protocol::Tcp),
        (c"net.inet.udp.pcblist_n", Protocol::Udp),
    ] {
        let reply = read_list(name)?;
        out.extend(pcblist::parse(&reply, proto).map_err(|e| invalid(name, e))?);
    }
    Ok(out)
}

/// The range macOS picks ephemeral ports from (`net.inet.ip.portrange.first` and `.last`,
/// 49152-65535 by default), or `None` when it cannot be read. The kernel counts down from
/// `first` to `last` if they are the wrong way round, so the pair is returned low to high.
pub(crate) fn ephemeral_range() -> Option<(u16, u16)> {
    let first = u16::try_from(read_int(c"net.inet.ip.portrange.first").ok()?).ok()?;
    let last = u16::try_from(read_int(c"net.inet.ip.portrange.last").ok()?).ok()?;
    Some((first.min(last), first.max(last)))
}

/// The bytes of one `pcblist_n` list: the size query, then the read into a buffer with room to
/// spare, again while the list keeps outgrowing it.
fn read_list(name: &'static CStr) -> io::Result<Vec<u8>> {
    for _ in 0..ATTEMPTS {
        let mut size: libc::size_t = 0;
        // SAFETY: `name` is NUL-terminated. A null `oldp` with a valid `oldlenp` asks for the
        // size only and writes nothing else; there is no new value (null `newp`, `newlen` 0).
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                ptr::null_mut(),
                &mut size,
                ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            return Err(failed(name, io::Error::last_os_error()));
        }
        // The kernel's estimate already has room for an eighth more PCBs than it has now; a
        // quarter more on top keeps a busy host from costing another round.
        let capacity = size.saturating_add(size / 4).max(pcblist::XINPGEN_LEN);
        let mut buf = vec![0u8; capacity];
        let mut len = buf.len();
        // SAFETY: `name` is NUL-terminated; `buf` is valid for writes of `len` bytes, and the
        // kernel writes at most `*oldlenp` bytes and sets it to the count written. No new value.
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                buf.as_mut_ptr().cast::<c_void>(),
                &mut len,
                ptr::null_mut(),
                0,
            )
        };
        if rc == 0 {
            buf.truncate(len);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOMEM) {
            return Err(failed(name, err));
        }
    }
    Err(io::Error::other(format!(
        "sysctl {}: the list kept growing, still ENOMEM after {ATTEMPTS} attempts",
        name.to_string_lossy()
    )))
}

/// An `int` sysctl.
fn read_int(name: &'static CStr) -> io::Result<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>();
    // SAFETY: `name` is NUL-terminated; `value` is valid for writes of `len` bytes (one `int`),
    // which is all the kernel writes. No new value.
    let rc = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            (&raw mut value).cast::<c_void>(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(failed(name, io::Error::last_os_error()));
    }
    if len != size_of::<c_int>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sysctl {}: {len} bytes, not an int", name.to_string_lossy()),
        ));
    }
    Ok(value)
}

/// A sysctl that failed, named, with the OS error kept as the source.
#[derive(Debug, thiserror::Error)]
#[error("sysctl {name}: {source}")]
struct CallFailed {
    name: String,
    #[source]
    source: io::Error,
}

fn failed(name: &CStr, source: io::Error) -> io::Error {
    let name = name.to_string_lossy().into_owned();
    io::Error::new(source.kind(), CallFailed { name, source })
}

/// A list that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("sysctl {name}: {source}")]
struct BadList {
    name: String,
    #[source]
    source: ParseError,
}

fn invalid(name: &CStr, source: ParseError) -> io::Error {
    let name = name.to_string_lossy().into_owned();
    io::Error::new(io::ErrorKind::InvalidData, BadList { name, source })
}

/// This host's listener source: a scan every [`super::SCAN_INTERVAL`].
pub(super) fn start() -> Result<std::sync::Arc<dyn crate::reverse::HostListeners>, super::StartError>
{
    super::poll::start_scanning(scan, ephemeral_range())
}
