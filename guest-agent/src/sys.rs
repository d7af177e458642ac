//! The few system calls the agent makes itself: bringing `lo` up, readiness notification.

use std::io;
use std::os::fd::AsRawFd;

use socket2::{Domain, Socket, Type};

// ioctl(2)'s request parameter is `c_ulong` in glibc and `c_int` in musl (the agent is built for
// both: musl for static guest binaries); the request numbers fit either.
#[allow(clippy::unnecessary_cast, clippy::cast_possible_truncation)]
const IOCTL_GET: IoctlRequest = libc::SIOCGIFFLAGS as IoctlRequest;
#[allow(clippy::unnecessary_cast, clippy::cast_possible_truncation)]
const IOCTL_SET: IoctlRequest = libc::SIOCSIFFLAGS as IoctlRequest;
#[cfg(target_env = "musl")]
type IoctlRequest = libc::c_int;
#[cfg(not(target_env = "musl"))]
type IoctlRequest = libc::c_ulong;

/// Brings the loopback interface up (`SIOCGIFFLAGS` / `SIOCSIFFLAGS` on a socket), as a fresh
/// network namespace needs. Does nothing if it is up already.
pub fn lo_up() -> io::Result<()> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers and
    // addresses), for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `sock` is an open socket; SIOCGIFFLAGS reads `ifr_name` (NUL-terminated above)
    // and writes `ifru_flags` inside the `ifreq` we own and pass by pointer.
    if unsafe { libc::ioctl(sock.as_raw_fd(), IOCTL_GET, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the kernel initialised the `ifru_flags` member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: as above; SIOCSIFFLAGS reads `ifr_name` and `ifru_flags` from our `ifreq`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), IOCTL_SET, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Tells systemd the service is ready (`READY=1`) when `NOTIFY_SOCKET` is set.
pub fn notify_ready() {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY=1 failed");
    }
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}
