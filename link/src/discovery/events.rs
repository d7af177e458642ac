//! Kernel events that say "the listener set may have just changed": what makes the watcher dump
//! at once instead of at its next poll. They carry no listener data; the dump stays the only
//! source of truth, so a lost, spurious or foreign-namespace event costs at most one dump.
//!
//! - [`Tracepoints`]: perf tracepoint events, system-wide (one per online CPU), each with a small
//!   ring buffer that is only ever emptied (the records are not read): `sock:inet_sock_set_state`
//!   filtered in the kernel to TCP transitions into `LISTEN` and from it to `CLOSE`, and
//!   `syscalls:sys_enter_bind` filtered to inet address lengths (a UDP socket is a listener from
//!   its bind on). Needs
//!   `CAP_PERFMON` (or root) and the tracepoint ids from tracefs; when tracefs is not mounted and
//!   the process may mount, it is mounted on a private temporary directory for the lookup and
//!   unmounted at once.
//! - [`DestroyGroups`]: the NETLINK_SOCK_DIAG multicast groups on which the kernel announces every
//!   socket it frees in this network namespace (`SKNLGRP_INET*_{TCP,UDP}_DESTROY`); needs no
//!   privilege. A classic BPF filter on the socket lets through only sockets without a remote
//!   port (listeners, unconnected UDP), and the watcher dumps only when the port was a listener's.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

use super::set::Protocol;

/// The tracepoints and their kernel-side filters (ftrace filter syntax): TCP (`IPPROTO_TCP`, 6)
/// state changes into `TCP_LISTEN` (10) or from it to `TCP_CLOSE` (7), and binds with the
/// address length of
/// `sockaddr_in` (16; also `sockaddr_vm`), `sockaddr_in6` (28) or `sockaddr_storage` (128).
/// Not every change out of `LISTEN`: each connection a listener accepts is born a clone of the
/// listener and leaves `LISTEN` for `SYN_RECV`, so that filter woke the watcher (and made it
/// dump) for every accepted connection of the system — under a connection storm, hundreds of
/// times a second. A listener only ever leaves `LISTEN` for `CLOSE` (close, shutdown,
/// disconnect).
/// The length filter leaves out netlink binds, which every getaddrinfo(3) does; the entry (not
/// the exit) is traced because only it has the length, and the watcher's re-check dump 2 ms
/// later sees a bind that was not complete at the first.
const TCP_LISTEN_EVENT: (&str, &str) = (
    "sock/inet_sock_set_state",
    "protocol == 6 && (newstate == 10 || (oldstate == 10 && newstate == 7))",
);
const BIND_EVENT: (&str, &str) = (
    "syscalls/sys_enter_bind",
    "addrlen == 16 || addrlen == 28 || addrlen == 128",
);

/// Where tracefs usually is (the second is the automount under debugfs).
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
const CPUS_ONLINE: &str = "/sys/devices/system/cpu/online";

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER0` (64 bytes), which every kernel accepts.
#[repr(C)]
#[derive(Debug, Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// Bit field; bit 0 is `disabled`.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}
const _: () = assert!(size_of::<PerfEventAttr>() == 64);

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const ATTR_DISABLED: u64 = 1;

/// `_IO('$', nr)` / `_IOW('$', nr, size)` in the layout of x86, Arm, RISC-V, LoongArch and s390
/// (MIPS, PowerPC and SPARC place the direction bits elsewhere; see [`Tracepoints::open`]).
const fn perf_ioc(write_size: usize, nr: u64) -> u64 {
    let dir = if write_size > 0 { 1u64 } else { 0 };
    (dir << 30) | ((write_size as u64) << 16) | ((b'$' as u64) << 8) | nr
}
const PERF_EVENT_IOC_ENABLE: u64 = perf_ioc(0, 0);
const PERF_EVENT_IOC_SET_OUTPUT: u64 = perf_ioc(0, 5);
const PERF_EVENT_IOC_SET_FILTER: u64 = perf_ioc(size_of::<*const libc::c_char>(), 6);
const GENERIC_IOCTL_LAYOUT: bool = !cfg!(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
));

/// Offsets of `data_head` and `data_tail` in `struct perf_event_mmap_page`.
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;

/// One CPU's ring buffer (a metadata page and one data page), shared by that CPU's events.
#[derive(Debug)]
struct Ring {
    fd: OwnedFd,
    map: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone (unmapped in its Drop) and only touched
// through atomics, so moving it to another thread is sound.
unsafe impl Send for Ring {}

impl Ring {
    fn map(fd: OwnedFd) -> io::Result<Self> {
        let page = page_size();
        let len = 2 * page;
        // SAFETY: a fresh shared mapping of a perf fd at a kernel-chosen address; nothing else
        // aliases it. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Self { fd, map, len })
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is DATA_HEAD or DATA_TAIL, 8-aligned and inside the first (metadata)
        // page of a live mapping that lives as long as `self`; the kernel updates these words
        // concurrently, which is what atomics are for.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    /// Empties the buffer without reading the records; true if there were any.
    fn drain(&self) -> bool {
        let head = self.word(DATA_HEAD).load(Ordering::Acquire);
        let tail = self.word(DATA_TAIL);
        let had = tail.load(Ordering::Relaxed) != head;
        tail.store(head, Ordering::Release);
        had
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `map`/`len` are exactly what mmap returned; nothing borrows the mapping any
        // more (`word` borrows end with `&self`).
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// The perf tracepoint events, one ring per online CPU.
#[derive(Debug)]
pub(crate) struct Tracepoints {
    rings: Vec<Ring>,
    /// Events whose records go to a ring of the same CPU; kept open.
    _others: Vec<OwnedFd>,
    /// Whether `sys_enter_bind` could be opened (UDP additions are seen at once).
    pub(crate) bind: bool,
}

impl Tracepoints {
    /// Opens the events on every online CPU, or says why not (the watcher then polls).
    pub(crate) fn open() -> Result<Self, String> {
        if !GENERIC_IOCTL_LAYOUT {
            return Err("perf ioctl numbers not known on this architecture".into());
        }
        let ids = tracepoint_ids(&[TCP_LISTEN_EVENT.0, BIND_EVENT.0])?;
        let listen_id = ids[0].ok_or_else(|| format!("no tracepoint {}", TCP_LISTEN_EVENT.0))?;
        let cpus = online_cpus().map_err(|e| format!("{CPUS_ONLINE}: {e}"))?;
        let mut rings = Vec::with_capacity(cpus.len());
        let mut others = Vec::new();
        let mut bind = ids[1].is_some();
        for &cpu in &cpus {
            let fd = perf_open(listen_id, cpu, TCP_LISTEN_EVENT.1).map_err(|e| {
                format!("perf_event_open({}) on CPU {cpu}: {e}", TCP_LISTEN_EVENT.0)
            })?;
            let ring = Ring::map(fd).map_err(|e| format!("mmap of a perf ring buffer: {e}"))?;
            if let (Some(id), true) = (ids[1], bind) {
                match perf_open(id, cpu, BIND_EVENT.1).and_then(|b| {
                    ioctl(
                        &b,
                        PERF_EVENT_IOC_SET_OUTPUT,
                        ring.fd.as_raw_fd() as libc::c_ulong,
                    )?;
                    Ok(b)
                }) {
                    Ok(b) => others.push(b),
                    Err(e) => {
                        tracing::info!(error = %e, "discovery: no {} events; UDP additions wait for the safety-net poll", BIND_EVENT.0);
                        bind = false;
                        others.clear();
                    }
                }
            }
            rings.push(ring);
        }
        for fd in rings.iter().map(|r| &r.fd).chain(others.iter()) {
            ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
                .map_err(|e| format!("enabling a perf event: {e}"))?;
        }
        Ok(Self {
            rings,
            _others: others,
            bind,
        })
    }

    /// The descriptors to poll for readability.
    pub(crate) fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.rings.iter().map(|r| r.fd.as_fd())
    }

    /// Empties every ring; true if any held an event.
    pub(crate) fn drain(&self) -> bool {
        self.rings.iter().fold(false, |any, r| r.drain() | any)
    }
}

fn ioctl(fd: &OwnedFd, request: u64, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: perf ioctls on a perf fd we own; `arg` is an integer or a pointer valid for the
    // call (see `perf_open`). The request type differs between libcs, hence `as _`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One tracepoint on one CPU, every event a sample and a wake-up, created disabled with `filter`.
fn perf_open(id: u64, cpu: i32, filter: &str) -> io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: size_of::<PerfEventAttr>() as u32,
        config: id,
        sample_period: 1,
        flags: ATTR_DISABLED,
        wakeup_events: 1,
        ..Default::default()
    };
    // SAFETY: perf_event_open reads `attr` (a valid, fully initialised perf_event_attr of the
    // size it says) during the call only; pid -1 with a CPU is a system-wide event.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            -1 as libc::pid_t,
            cpu,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let filter = CString::new(filter).map_err(io::Error::other)?;
    ioctl(
        &fd,
        PERF_EVENT_IOC_SET_FILTER,
        filter.as_ptr() as libc::c_ulong,
    )?;
    Ok(fd)
}

/// The ids of `events` ("group/name") from tracefs, `None` for an event this kernel lacks.
fn tracepoint_ids(events: &[&str]) -> Result<Vec<Option<u64>>, String> {
    let read = |base: &Path| {
        events
            .iter()
            .map(|e| {
                std::fs::read_to_string(base.join("events").join(e).join("id"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            })
            .collect::<Vec<_>>()
    };
    for base in TRACEFS {
        let base = Path::new(base);
        if base.join("events").is_dir() {
            return Ok(read(base));
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("tracefs is not mounted (or not readable) and mounting it needs root".into());
    }
    let dir = TempMount::tracefs()
        .map_err(|e| format!("tracefs is not mounted and mounting it failed: {e}"))?;
    Ok(read(&dir.0))
}

/// tracefs mounted on a private temporary directory, unmounted and removed on drop.
struct TempMount(PathBuf);

impl TempMount {
    fn tracefs() -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("hostnet-tracefs-{}", std::process::id()));
        std::fs::create_dir(&dir)?;
        let c = |s: &str| CString::new(s).map_err(io::Error::other);
        let target = c(dir
            .to_str()
            .ok_or_else(|| io::Error::other("temp dir is not UTF-8"))?)?;
        let fstype = c("tracefs")?;
        // SAFETY: every pointer is a NUL-terminated string alive for the call; data is NULL.
        let r = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                // Per-mount flags only: tracefs has one superblock, and a superblock flag such
                // as MS_RDONLY would reconfigure it under every other tracefs mount too.
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(Self(dir))
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: a NUL-terminated path alive for the call.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The online CPUs, from a list such as `0-3,6,8-9`.
fn online_cpus() -> io::Result<Vec<i32>> {
    parse_cpu_list(&std::fs::read_to_string(CPUS_ONLINE)?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable CPU list"))
}

pub(crate) fn parse_cpu_list(s: &str) -> Option<Vec<i32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (i32, i32) = (a.parse().ok()?, b.parse().ok()?);
        if a > b || b - a > 65536 {
            return None;
        }
        out.extend(a..=b);
    }
    (!out.is_empty()).then_some(out)
}

/// The sock_diag destroy multicast groups (`SKNLGRP_*` of `<linux/sock_diag.h>`).
const GROUP_TCP4: u32 = 1;
const GROUP_UDP4: u32 = 2;
const GROUP_TCP6: u32 = 3;
const GROUP_UDP6: u32 = 4;
/// `nlmsghdr` (16 bytes), then `inet_diag_msg`: family, state, timer, retrans, then
/// `id.idiag_sport` and `id.idiag_dport`, both big-endian.
const SPORT: usize = 16 + 4;
const DPORT: usize = 16 + 6;

/// A NETLINK_SOCK_DIAG socket subscribed to the destroy announcements of some protocols.
#[derive(Debug)]
pub(crate) struct DestroyGroups {
    sock: Socket,
    buf: Vec<u8>,
}

impl DestroyGroups {
    /// Subscribes to the destroy groups of `protocols` (both families).
    pub(crate) fn open(protocols: &[Protocol]) -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
        // Only sockets with no remote port (listeners, unconnected UDP sockets); the filter
        // sees each announcement from its netlink header on.
        let filter = [
            // ldh [DPORT]
            socket2::SockFilter::new(
                (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16,
                0,
                0,
                DPORT as u32,
            ),
            // jeq #0, accept, drop
            socket2::SockFilter::new(
                (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                0,
                1,
                0,
            ),
            socket2::SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, u32::MAX),
            socket2::SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0),
        ];
        socket2::SockRef::from(&sock).attach_filter(&filter)?;
        sock.bind_auto()?;
        for p in protocols {
            let groups = match p {
                Protocol::Tcp => [GROUP_TCP4, GROUP_TCP6],
                Protocol::Udp => [GROUP_UDP4, GROUP_UDP6],
            };
            for g in groups {
                sock.add_membership(g)?;
            }
        }
        sock.set_non_blocking(true)?;
        Ok(Self {
            sock,
            buf: Vec::with_capacity(8192),
        })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Reads every pending announcement and calls `f` with the protocol and local port of each.
    /// An overrun (`ENOBUFS`: announcements were lost) is reported as `f(None)`.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(Option<(Protocol, u16)>)) {
        loop {
            self.buf.clear();
            match self.sock.recv_from(&mut self.buf, 0) {
                Ok((_, addr)) => {
                    let groups = addr.multicast_groups();
                    let proto = if groups & (1 << (GROUP_TCP4 - 1) | 1 << (GROUP_TCP6 - 1)) != 0 {
                        Protocol::Tcp
                    } else {
                        Protocol::Udp
                    };
                    if let Some(port) = announced_port(&self.buf) {
                        f(Some((proto, port)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.raw_os_error() != Some(libc::ENOBUFS) {
                        tracing::debug!(error = %e, "discovery: reading sock_diag destroy announcements");
                    }
                    f(None);
                    return;
                }
            }
        }
    }
}

/// The local port of a destroy announcement without a remote port (what the filter lets in).
pub(crate) fn announced_port(msg: &[u8]) -> Option<u16> {
    let sport = msg.get(SPORT..SPORT + 2)?;
    let dport = msg.get(DPORT..DPORT + 2)?;
    (dport == [0, 0]).then(|| u16::from_be_bytes([sport[0], sport[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(
            parse_cpu_list("0-3,6,8-9\n"),
            Some(vec![0, 1, 2, 3, 6, 8, 9])
        );
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }

    #[test]
    fn announcement_ports() {
        let mut m = vec![0u8; 72];
        m[SPORT..SPORT + 2].copy_from_slice(&5353u16.to_be_bytes());
        assert_eq!(announced_port(&m), Some(5353));
        m[DPORT..DPORT + 2].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(announced_port(&m), None);
        assert_eq!(announced_port(&m[..20]), None);
    }

    #[test]
    fn ioctl_numbers() {
        // <linux/perf_event.h> on x86-64 and arm64.
        assert_eq!(PERF_EVENT_IOC_ENABLE, 0x2400);
        assert_eq!(PERF_EVENT_IOC_SET_OUTPUT, 0x2405);
        if size_of::<usize>() == 8 {
            assert_eq!(PERF_EVENT_IOC_SET_FILTER, 0x4008_2406);
        }
    }
}
