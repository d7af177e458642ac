//! The replies of macOS's `net.inet.tcp.pcblist_n` and `net.inet.udp.pcblist_n` sysctls, parsed
//! from their bytes.
//!
//! This module is plain Rust on every OS: it takes the bytes `sysctlbyname(3)` returned and gives
//! [`Scanned`] rows, so it is tested (and property-tested) on Linux. The sysctl calls are made by
//! the macOS shell (`macos.rs`). These are the sysctls `netstat -an` reads; they need no
//! privilege and list every user's sockets (see [What the reply holds](#what-the-reply-holds)).
//!
//! # The reply
//!
//! ```text
//! xinpgen                              header: xig_len 24, xig_count, xig_gen, xig_sogen
//! per PCB (protocol control block, one per socket):
//!   xinpcb_n    kind XSO_INPCB   0x010 addresses, ports, inp_vflag, inp_flags, inp_gencnt
//!   xsocket_n   kind XSO_SOCKET  0x001 xso_protocol, so_uid, so_last_pid, ...
//!   xsockbuf_n  kind XSO_RCVBUF  0x002 receive buffer
//!   xsockbuf_n  kind XSO_SNDBUF  0x004 send buffer
//!   xsockstat_n kind XSO_STATS   0x008 traffic counters
//!   xtcpcb_n    kind XSO_TCPCB   0x020 (TCP only) t_state, sequence numbers, timers
//! xinpgen                              trailer: the same header, read again at the end
//! ```
//!
//! Every record but the two `xinpgen`s starts with `u32 len, u32 kind` and is followed by zero
//! padding up to a multiple of 8 bytes (`ROUNDUP64(len)`; the kernel lays a PCB's records out
//! with `ADVANCE64`). Other kinds exist (`XSO_KCREG` 0x040, `XSO_KCB` 0x080, `XSO_EVT` 0x100,
//! `XSO_UNPCB` 0x200, for other sysctls) and are skipped, as is any kind not listed.
//!
//! The `xinpgen`'s second word is `xig_count`, not a kind. netstat (`protopr`) tells the trailer
//! from a record by its length: it stops at the first `len <= sizeof(struct xinpgen)` (24);
//! every PCB record is longer than 24. Here a length of exactly 24 ends the walk and any other
//! length of 24 or less is an error. When `xig_count` is 0 the kernel writes the header alone,
//! without a trailer (`get_pcblist_n`: "We are done if there is no pcb"), so a reply that stops
//! after its header is complete only when the header announces no PCB.
//!
//! ## Layouts
//!
//! All the structures are declared under `#pragma pack(4)`: an 8-byte field is aligned to 4, not
//! 8, which puts `inp_ppcb` at 20 and `so_pcb` at 28. The offsets below are those of the XNU
//! declarations for LP64 (arm64 and x86_64 lay them out the same way); Rust mirrors of the structs
//! check them at compile time, and the sizes were also checked by compiling the XNU declarations
//! with `#pragma pack(4)` for `aarch64-macos` and `x86_64-macos` (clang, via `zig cc`).
//!
//! ```text
//! xinpgen      0 xig_len  4 xig_count  8 xig_gen  16 xig_sogen                        (24)
//! xinpcb_n     0 xi_len  4 xi_kind  8 xi_inpp  16 inp_fport  18 inp_lport  20 inp_ppcb
//!             28 inp_gencnt  36 inp_flags  40 inp_flow  44 inp_vflag  45 inp_ip_ttl
//!             46 inp_ip_p  48 inp_dependfaddr  64 inp_dependladdr  80 inp_depend4
//!             84 inp_depend6  96 inp_flowhash  100 inp_flags2                         (104)
//! xsocket_n    0 xso_len  4 xso_kind  8 xso_so  16 so_type  20 so_options  24 so_linger
//!             26 so_state  28 so_pcb  36 xso_protocol  40 xso_family  44 so_qlen
//!             46 so_incqlen  48 so_qlimit  50 so_timeo  52 so_error  56 so_pgid
//!             60 so_oobmark  64 so_uid  68 so_last_pid  72 so_e_pid  76 so_gencnt
//!             84 so_flags  88 so_flags1  92 so_usecount  96 so_retaincnt
//!            100 xso_filter_flags                                                    (104)
//! xsockbuf_n   0 xsb_len  4 xsb_kind  8 sb_cc ... 28 sb_flags  30 sb_timeo            (32)
//! xsockstat_n  0 xst_len  4 xst_kind  8 xst_tc_stats[4] (4 x u64 each)                (136)
//! xtcpcb_n     0 xt_len  4 xt_kind  8 t_segq  16 t_dupacks  20 t_timer[4]  36 t_state
//!             40 t_flags ... 200 snd_ssthresh_prev                                    (204)
//! ```
//!
//! The records have grown at their ends over the years, never in the middle: `xinpcb_n` gained
//! `inp_flowhash` in xnu-2050 and `inp_flags2` in xnu-2782 (OS X 10.10); `xsocket_n` gained
//! `so_last_pid` and `so_e_pid` in xnu-2782 (76 bytes) and `so_gencnt` .. `xso_filter_flags` in
//! xnu-8792 (macOS 13, 104 bytes). So each record is walked by its own `len` and only has to be
//! long enough for the fields read from it ([`XINPCB_N_MIN_LEN`], [`XSOCKET_N_MIN_LEN`],
//! [`XTCPCB_N_MIN_LEN`]); every macOS Rust supports (10.12 and later) has them all.
//!
//! Byte orders: every integer is in host order (little-endian on every Mac) except the ports,
//! which are `in_port_t` in network order, and the addresses, which are `in_addr` / `in6_addr`
//! in network order.
//!
//! ## Grouping records into PCBs
//!
//! netstat collects records into a bit mask until it has seen every kind of a PCB (all six for
//! TCP, five for UDP), keeping the first record of each kind. The kernel always writes a PCB's
//! `xinpcb_n` first, both for kernel sockets (`get_pcblist_n`) and for the user-space (Skywalk)
//! flows it appends (`nstat_userland_list_snapshot`). Here an `XSO_INPCB` record starts a new
//! PCB and the PCB ends at the next `XSO_INPCB` or at the trailer; as in netstat the first
//! record of each kind counts. The difference shows only when a kind is missing: the kernel
//! leaves `xsb_kind` 0 in the buffer records of a PCB that has no socket, and netstat's mask
//! would then take the next PCB's records into this one. A PCB without its `xsocket_n` (or
//! `xtcpcb_n`, for TCP) is skipped, as are records before the first `xinpcb_n`.
//!
//! As netstat does, a PCB is skipped when its `xso_protocol` is not the sysctl's protocol or
//! its `inp_gencnt` is newer than the header's `xig_gen` (a socket created while the kernel was
//! copying the list out).
//!
//! # What a PCB becomes
//!
//! - A listener: for TCP, `t_state == TCPS_LISTEN` (1, `bsd/netinet/tcp_fsm.h`) in the
//!   `xtcpcb_n`; for UDP, a bound, unconnected socket: local port not 0, foreign port 0 and
//!   foreign address unspecified. Other PCBs (connections, `TIME_WAIT`, unbound sockets) are
//!   skipped, as is any PCB with local port 0.
//! - The address family comes from `inp_vflag` (`INP_IPV4` 0x1, `INP_IPV6` 0x2), not from the
//!   socket's domain:
//!   - `INP_IPV6` and `INP_IPV4`: an `AF_INET6` socket that takes IPv4 too. XNU sets both only
//!     when `IPV6_V6ONLY` is off and the socket is bound to `::` (`tcp6_usr_bind`,
//!     `tcp6_usr_listen`, `udp6_bind`; `setsockopt(IPV6_V6ONLY, 1)` clears `INP_IPV4`). The
//!     address is the 16 bytes of `in6p_laddr` and `v6only` is `Some(false)`.
//!   - `INP_IPV6` alone: an IPv6 address, with `v6only` from `inp_flags & IN6P_IPV6_V6ONLY`
//!     (0x8000, `bsd/netinet/in_pcb.h`; the `IPV6_V6ONLY` option itself). That is `Some(true)`
//!     for `[::]` with the option set, and `Some(false)` for a socket bound to a specific IPv6
//!     address without it (which takes no IPv4 either, as on Linux).
//!   - `INP_IPV4` alone: an IPv4 address, the last 4 bytes of the `in_addr_4in6` union
//!     (`inp_laddr`, as netstat prints it), with `v6only` `None`. That is an `AF_INET` socket,
//!     or an `AF_INET6` socket bound to a v4-mapped address, which XNU turns into an IPv4 PCB
//!     (`INP_V4MAPPEDV6` 0x4 is then set as well).
//!   - Neither flag: skipped (netstat skips these too).
//! - The scope id of a link-local IPv6 address is not in the record (the kernel zeroes
//!   `inp6_ifindex`), so it is dropped, as on the other platforms.
//! - `pid` is `xsocket_n.so_last_pid`: the kernel's `last_pid`, "pid of most recent accessor".
//!   `socreate` sets it to the creating process and `so_update_last_owner_locked` moves it to
//!   whichever process last called into the socket (`bind`, `listen`, `connect`, send,
//!   receive, `poll`/`select`, a kqueue filter). It is the `pid` column of `netstat -anv`, and
//!   the one pid the record has for every socket: `so_e_pid` is the *effective* (delegated)
//!   owner, set only when a process opened the socket on another's behalf, and 0 otherwise. So
//!   for a socket shared between processes (a listener inherited over `fork`, or handed over by
//!   launchd) the pid is the last one to use it, not every holder. Sockets created inside the
//!   kernel (`sock_socket`) keep `last_pid` 0, which becomes `None`.
//!
//! # What the reply holds
//!
//! `tcp_pcblist_n` and `udp_pcblist_n` (`bsd/netinet/tcp_subr.c`, `udp_usrreq.c`) are read-only
//! sysctls with no credential check: `get_pcblist_n` copies out every PCB of the protocol's
//! table, every user's and every process's, the TCP one including `TIME_WAIT` PCBs. On kernels
//! built with Skywalk it appends the flows of user-space network stacks, with the fields it
//! has (addresses, ports, `t_state`, `so_last_pid`; `inp_gencnt` 0). A sandboxed caller may
//! still be refused the sysctl by the sandbox's policy; that is not something this parser sees.
//!
//! # Sources
//!
//! apple-oss-distributions/xnu at xnu-11417.101.15 (the fields read here have had the same
//! offsets since xnu-2782, OS X 10.10; the history of the structures was checked back to
//! xnu-1699):
//!
//! - `bsd/netinet/in_pcb.h`: `struct xinpcb_n`, `struct xinpgen`, `struct in_addr_4in6`,
//!   `INP_IPV4`, `INP_IPV6`, `INP_V4MAPPEDV6`, `IN6P_IPV6_V6ONLY`, the `#pragma pack(4)`;
//! - `bsd/sys/socketvar.h`: `struct xsocket_n`, `struct xsockbuf_n`, `struct xsockstat_n`,
//!   `XSO_*`, `last_pid`/`e_pid`;
//! - `bsd/netinet/tcp_var.h`: `struct xtcpcb_n`; `bsd/netinet/tcp_fsm.h`: `TCPS_LISTEN`;
//! - `bsd/netinet/in_pcblist.c`: `get_pcblist_n` (record order, padding, header and trailer),
//!   `inpcb_to_xinpcb_n`, `sotoxsocket_n`; `bsd/net/ntstat.c`: `nstat_userland_list_snapshot`;
//! - `bsd/netinet/tcp_usrreq.c`, `bsd/netinet6/udp6_usrreq.c`, `bsd/netinet6/ip6_output.c`:
//!   how `inp_vflag` follows `bind`, `listen` and `IPV6_V6ONLY`;
//! - `bsd/kern/uipc_socket.c`: `socreate_internal`, `so_update_last_owner_locked`.
//!
//! apple-oss-distributions/network_cmds at network_cmds-741.100.2, `netstat.tproj/inet.c`
//! (`protopr`, `ROUNDUP64`) and `main.c` (the `pid` column).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hostnet_link::discovery::Protocol;

use crate::host::Scanned;

/// `kind` of an `xsocket_n`.
pub const XSO_SOCKET: u32 = 0x001;
/// `kind` of the receive buffer's `xsockbuf_n`.
pub const XSO_RCVBUF: u32 = 0x002;
/// `kind` of the send buffer's `xsockbuf_n`.
pub const XSO_SNDBUF: u32 = 0x004;
/// `kind` of an `xsockstat_n`.
pub const XSO_STATS: u32 = 0x008;
/// `kind` of an `xinpcb_n`.
pub const XSO_INPCB: u32 = 0x010;
/// `kind` of an `xtcpcb_n`.
pub const XSO_TCPCB: u32 = 0x020;

/// `inp_vflag`: the PCB takes IPv4.
pub const INP_IPV4: u8 = 0x1;
/// `inp_vflag`: the PCB takes IPv6.
pub const INP_IPV6: u8 = 0x2;
/// `inp_vflag`: an `AF_INET6` socket bound to a v4-mapped address (an IPv4 PCB).
pub const INP_V4MAPPEDV6: u8 = 0x4;
/// `inp_flags`: `IPV6_V6ONLY` is set.
pub const IN6P_IPV6_V6ONLY: u32 = 0x8000;
/// `t_state` of a listening TCP socket.
pub const TCPS_LISTEN: i32 = 1;
/// `xso_protocol` of a TCP socket.
pub const IPPROTO_TCP: i32 = 6;
/// `xso_protocol` of a UDP socket.
pub const IPPROTO_UDP: i32 = 17;

/// Bytes of `struct xinpgen`, the header and the trailer.
pub const XINPGEN_LEN: usize = 24;
/// `xinpgen.xig_len` (`u32`).
pub const XIG_LEN: usize = 0;
/// `xinpgen.xig_count` (`u_int`): PCBs in the table when the copy began.
pub const XIG_COUNT: usize = 4;
/// `xinpgen.xig_gen` (`inp_gen_t`, `u64`): the table's generation when the copy began.
pub const XIG_GEN: usize = 8;
/// `xinpgen.xig_sogen` (`so_gen_t`, `u64`): the socket generation.
pub const XIG_SOGEN: usize = 16;

/// Every record's length (`u32`), at offset 0.
pub const REC_LEN: usize = 0;
/// Every record's kind (`u32`), at offset 4.
pub const REC_KIND: usize = 4;
/// Bytes of the `len, kind` pair that starts every record.
pub const REC_HEADER_LEN: usize = 8;

/// Bytes of `struct xinpcb_n` (since xnu-2782, OS X 10.10).
pub const XINPCB_N_LEN: usize = 104;
/// `xinpcb_n.xi_inpp` (`u64`): a hash of the PCB's address.
pub const XI_INPP: usize = 8;
/// `xinpcb_n.inp_fport` (`u_short`, network order): the foreign port.
pub const INP_FPORT: usize = 16;
/// `xinpcb_n.inp_lport` (`u_short`, network order): the local port.
pub const INP_LPORT: usize = 18;
/// `xinpcb_n.inp_ppcb` (`u64`): a hash of the protocol's PCB.
pub const INP_PPCB: usize = 20;
/// `xinpcb_n.inp_gencnt` (`inp_gen_t`, `u64`): the PCB's generation.
pub const INP_GENCNT: usize = 28;
/// `xinpcb_n.inp_flags` (`int`): `INP_*` / `IN6P_*` flags.
pub const INP_FLAGS: usize = 36;
/// `xinpcb_n.inp_flow` (`u32`).
pub const INP_FLOW: usize = 40;
/// `xinpcb_n.inp_vflag` (`u_char`): `INP_IPV4` / `INP_IPV6` / `INP_V4MAPPEDV6`.
pub const INP_VFLAG: usize = 44;
/// `xinpcb_n.inp_ip_ttl` (`u_char`).
pub const INP_IP_TTL: usize = 45;
/// `xinpcb_n.inp_ip_p` (`u_char`).
pub const INP_IP_P: usize = 46;
/// `xinpcb_n.inp_dependfaddr` (16 bytes): the foreign address, an `in6_addr` or an
/// `in_addr_4in6` with the IPv4 address in its last 4 bytes.
pub const INP_FADDR: usize = 48;
/// `xinpcb_n.inp_dependladdr` (16 bytes): the local address, laid out as `INP_FADDR`.
pub const INP_LADDR: usize = 64;
/// Where the IPv4 address sits inside an `in_addr_4in6` (after `ia46_pad32[3]`).
pub const IA46_ADDR4: usize = 12;
/// `xinpcb_n.inp_depend4` (`struct { u_char inp4_ip_tos; }`).
pub const INP_DEPEND4: usize = 80;
/// `xinpcb_n.inp_depend6` (`struct { u_int8_t; int; u_short; short; }`, 12 bytes).
pub const INP_DEPEND6: usize = 84;
/// `xinpcb_n.inp_flowhash` (`u32`).
pub const INP_FLOWHASH: usize = 96;
/// `xinpcb_n.inp_flags2` (`u32`).
pub const INP_FLAGS2: usize = 100;
/// The shortest `xinpcb_n` this parser reads: up to the end of `inp_dependladdr`.
pub const XINPCB_N_MIN_LEN: usize = INP_LADDR + 16;

/// Bytes of `struct xsocket_n` (since xnu-8792, macOS 13; 76 from xnu-2782 until then).
pub const XSOCKET_N_LEN: usize = 104;
/// `xsocket_n.xso_so` (`u64`): a hash of the socket's address.
pub const XSO_SO: usize = 8;
/// `xsocket_n.so_pcb` (`u64`): a hash of the PCB's address.
pub const SO_PCB: usize = 28;
/// `xsocket_n.xso_protocol` (`int`): `IPPROTO_TCP` / `IPPROTO_UDP` (0 for a PCB without socket).
pub const XSO_PROTOCOL: usize = 36;
/// `xsocket_n.xso_family` (`int`): `AF_INET` (2) / `AF_INET6` (30); 0 for Skywalk flows.
pub const XSO_FAMILY: usize = 40;
/// `xsocket_n.so_uid` (`uid_t`): the owner's uid.
pub const SO_UID: usize = 64;
/// `xsocket_n.so_last_pid` (`pid_t`): the process that last used the socket.
pub const SO_LAST_PID: usize = 68;
/// `xsocket_n.so_e_pid` (`pid_t`): the effective (delegating) owner, 0 when none.
pub const SO_E_PID: usize = 72;
/// The shortest `xsocket_n` this parser reads: up to the end of `so_last_pid`.
pub const XSOCKET_N_MIN_LEN: usize = SO_LAST_PID + 4;

/// Bytes of `struct xsockbuf_n`.
pub const XSOCKBUF_N_LEN: usize = 32;
/// Bytes of `struct xsockstat_n`.
pub const XSOCKSTAT_N_LEN: usize = 136;

/// Bytes of `struct xtcpcb_n`.
pub const XTCPCB_N_LEN: usize = 204;
/// `xtcpcb_n.t_state` (`int`): `TCPS_*`.
pub const T_STATE: usize = 36;
/// The shortest `xtcpcb_n` this parser reads: up to the end of `t_state`.
pub const XTCPCB_N_MIN_LEN: usize = T_STATE + 4;

/// A record's length rounded up to 8 bytes, as the kernel lays records out (`ROUNDUP64`).
pub const fn roundup64(len: usize) -> usize {
    len.next_multiple_of(8)
}

/// Rust mirrors of the XNU declarations, for the compiler to check the offsets and sizes above
/// against (the `const` block below). `packed(4)` is `#pragma pack(4)`: it caps every field's
/// alignment at 4. `u32` arrays stand for the address unions (`in6_addr` is a union of
/// `u8[16]`, `u16[8]` and `u32[4]`, so it is 16 bytes aligned to 4). Nothing reads them.
#[allow(
    dead_code,
    reason = "layout mirrors: only their sizes and field offsets are used, at compile time"
)]
mod layout {
    /// `struct xinpgen`.
    #[repr(C, packed(4))]
    pub struct Xinpgen {
        pub xig_len: u32,
        pub xig_count: u32,
        pub xig_gen: u64,
        pub xig_sogen: u64,
    }

    /// `union { struct in_addr_4in6; struct in6_addr; }`: 16 bytes, aligned to 4.
    #[repr(C)]
    pub struct InAddr4in6([u32; 4]);

    /// `xinpcb_n.inp_depend6`.
    #[repr(C, packed(4))]
    pub struct InpDepend6 {
        pub inp6_hlim: u8,
        pub inp6_cksum: i32,
        pub inp6_ifindex: u16,
        pub inp6_hops: i16,
    }

    /// `struct xinpcb_n`.
    #[repr(C, packed(4))]
    pub struct XinpcbN {
        pub xi_len: u32,
        pub xi_kind: u32,
        pub xi_inpp: u64,
        pub inp_fport: u16,
        pub inp_lport: u16,
        pub inp_ppcb: u64,
        pub inp_gencnt: u64,
        pub inp_flags: i32,
        pub inp_flow: u32,
        pub inp_vflag: u8,
        pub inp_ip_ttl: u8,
        pub inp_ip_p: u8,
        pub inp_dependfaddr: InAddr4in6,
        pub inp_dependladdr: InAddr4in6,
        pub inp_depend4: u8,
        pub inp_depend6: InpDepend6,
        pub inp_flowhash: u32,
        pub inp_flags2: u32,
    }

    /// `struct xsocket_n`.
    #[repr(C, packed(4))]
    pub struct XsocketN {
        pub xso_len: u32,
        pub xso_kind: u32,
        pub xso_so: u64,
        pub so_type: i16,
        pub so_options: u32,
        pub so_linger: i16,
        pub so_state: i16,
        pub so_pcb: u64,
        pub xso_protocol: i32,
        pub xso_family: i32,
        pub so_qlen: i16,
        pub so_incqlen: i16,
        pub so_qlimit: i16,
        pub so_timeo: i16,
        pub so_error: u16,
        pub so_pgid: i32,
        pub so_oobmark: u32,
        pub so_uid: u32,
        pub so_last_pid: i32,
        pub so_e_pid: i32,
        pub so_gencnt: u64,
        pub so_flags: u32,
        pub so_flags1: u32,
        pub so_usecount: i32,
        pub so_retaincnt: i32,
        pub xso_filter_flags: u32,
    }

    /// `struct xsockbuf_n`.
    #[repr(C, packed(4))]
    pub struct XsockbufN {
        pub xsb_len: u32,
        pub xsb_kind: u32,
        pub sb_cc: u32,
        pub sb_hiwat: u32,
        pub sb_mbcnt: u32,
        pub sb_mbmax: u32,
        pub sb_lowat: i32,
        pub sb_flags: i16,
        pub sb_timeo: i16,
    }

    /// `struct data_stats`.
    #[repr(C, packed(4))]
    pub struct DataStats {
        pub rxpackets: u64,
        pub rxbytes: u64,
        pub txpackets: u64,
        pub txbytes: u64,
    }

    /// `struct xsockstat_n` (`SO_TC_STATS_MAX` is 4).
    #[repr(C, packed(4))]
    pub struct XsockstatN {
        pub xst_len: u32,
        pub xst_kind: u32,
        pub xst_tc_stats: [DataStats; 4],
    }

    /// `struct xtcpcb_n` (`TCPT_NTIMERS_EXT` is 4; `tcp_seq` and `tcp_cc` are `u32`).
    #[repr(C, packed(4))]
    pub struct XtcpcbN {
        pub xt_len: u32,
        pub xt_kind: u32,
        pub t_segq: u64,
        pub t_dupacks: i32,
        pub t_timer: [i32; 4],
        pub t_state: i32,
        pub t_flags: u32,
        pub t_force: i32,
        pub snd_una: u32,
        pub snd_max: u32,
        pub snd_nxt: u32,
        pub snd_up: u32,
        pub snd_wl1: u32,
        pub snd_wl2: u32,
        pub iss: u32,
        pub irs: u32,
        pub rcv_nxt: u32,
        pub rcv_adv: u32,
        pub rcv_wnd: u32,
        pub rcv_up: u32,
        pub snd_wnd: u32,
        pub snd_cwnd: u32,
        pub snd_ssthresh: u32,
        pub t_maxopd: u32,
        pub t_rcvtime: u32,
        pub t_starttime: u32,
        pub t_rtttime: i32,
        pub t_rtseq: u32,
        pub t_rxtcur: i32,
        pub t_maxseg: u32,
        pub t_srtt: i32,
        pub t_rttvar: i32,
        pub t_rxtshift: i32,
        pub t_rttmin: u32,
        pub t_rttupdated: u32,
        pub max_sndwnd: u32,
        pub t_softerror: i32,
        pub t_oobflags: i8,
        pub t_iobc: i8,
        pub snd_scale: u8,
        pub rcv_scale: u8,
        pub request_r_scale: u8,
        pub requested_s_scale: u8,
        pub ts_recent: u32,
        pub ts_recent_age: u32,
        pub last_ack_sent: u32,
        pub cc_send: u32,
        pub cc_recv: u32,
        pub snd_recover: u32,
        pub snd_cwnd_prev: u32,
        pub snd_ssthresh_prev: u32,
    }
}

// The constants are the mirrors' layout. The sizes are the XNU declarations' as a C compiler
// lays them out under `#pragma pack(4)` (checked with clang for aarch64-macos and x86_64-macos).
const _: () = {
    use std::mem::{offset_of, size_of};

    use layout::*;

    assert!(size_of::<Xinpgen>() == XINPGEN_LEN);
    assert!(offset_of!(Xinpgen, xig_len) == XIG_LEN);
    assert!(offset_of!(Xinpgen, xig_count) == XIG_COUNT);
    assert!(offset_of!(Xinpgen, xig_gen) == XIG_GEN);
    assert!(offset_of!(Xinpgen, xig_sogen) == XIG_SOGEN);

    assert!(size_of::<XinpcbN>() == XINPCB_N_LEN);
    assert!(offset_of!(XinpcbN, xi_len) == REC_LEN);
    assert!(offset_of!(XinpcbN, xi_kind) == REC_KIND);
    assert!(offset_of!(XinpcbN, xi_inpp) == XI_INPP);
    assert!(offset_of!(XinpcbN, inp_fport) == INP_FPORT);
    assert!(offset_of!(XinpcbN, inp_lport) == INP_LPORT);
    assert!(offset_of!(XinpcbN, inp_ppcb) == INP_PPCB);
    assert!(offset_of!(XinpcbN, inp_gencnt) == INP_GENCNT);
    assert!(offset_of!(XinpcbN, inp_flags) == INP_FLAGS);
    assert!(offset_of!(XinpcbN, inp_flow) == INP_FLOW);
    assert!(offset_of!(XinpcbN, inp_vflag) == INP_VFLAG);
    assert!(offset_of!(XinpcbN, inp_ip_ttl) == INP_IP_TTL);
    assert!(offset_of!(XinpcbN, inp_ip_p) == INP_IP_P);
    assert!(offset_of!(XinpcbN, inp_dependfaddr) == INP_FADDR);
    assert!(offset_of!(XinpcbN, inp_dependladdr) == INP_LADDR);
    assert!(offset_of!(XinpcbN, inp_depend4) == INP_DEPEND4);
    assert!(offset_of!(XinpcbN, inp_depend6) == INP_DEPEND6);
    assert!(size_of::<InpDepend6>() == 12);
    assert!(offset_of!(XinpcbN, inp_flowhash) == INP_FLOWHASH);
    assert!(offset_of!(XinpcbN, inp_flags2) == INP_FLAGS2);

    assert!(size_of::<XsocketN>() == XSOCKET_N_LEN);
    assert!(offset_of!(XsocketN, xso_len) == REC_LEN);
    assert!(offset_of!(XsocketN, xso_kind) == REC_KIND);
    assert!(offset_of!(XsocketN, xso_so) == XSO_SO);
    assert!(offset_of!(XsocketN, so_pcb) == SO_PCB);
    assert!(offset_of!(XsocketN, xso_protocol) == XSO_PROTOCOL);
    assert!(offset_of!(XsocketN, xso_family) == XSO_FAMILY);
    assert!(offset_of!(XsocketN, so_uid) == SO_UID);
    assert!(offset_of!(XsocketN, so_last_pid) == SO_LAST_PID);
    assert!(offset_of!(XsocketN, so_e_pid) == SO_E_PID);
    // The 76-byte xsocket_n of macOS 12 and earlier ended with so_e_pid.
    assert!(offset_of!(XsocketN, so_gencnt) == 76);

    assert!(size_of::<XsockbufN>() == XSOCKBUF_N_LEN);
    assert!(offset_of!(XsockbufN, xsb_kind) == REC_KIND);
    assert!(size_of::<XsockstatN>() == XSOCKSTAT_N_LEN);
    assert!(offset_of!(XsockstatN, xst_kind) == REC_KIND);

    assert!(size_of::<XtcpcbN>() == XTCPCB_N_LEN);
    assert!(offset_of!(XtcpcbN, xt_len) == REC_LEN);
    assert!(offset_of!(XtcpcbN, xt_kind) == REC_KIND);
    assert!(offset_of!(XtcpcbN, t_state) == T_STATE);
    assert!(offset_of!(XtcpcbN, snd_ssthresh_prev) == 200);

    // Every PCB record is longer than the xinpgen, which is how the trailer is told apart.
    assert!(XINPCB_N_MIN_LEN > XINPGEN_LEN);
    assert!(XSOCKET_N_MIN_LEN > XINPGEN_LEN);
    assert!(XTCPCB_N_MIN_LEN > XINPGEN_LEN);
    assert!(XSOCKBUF_N_LEN > XINPGEN_LEN);
};

/// A reply that is not a well-formed `pcblist_n` list. Offsets count from the start of the
/// reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The reply is too short for its `xinpgen` header.
    #[error("{len} bytes is too short for the xinpgen header ({XINPGEN_LEN} bytes)")]
    NoHeader {
        /// The reply's length.
        len: usize,
    },
    /// The header's `xig_len` is not the size of an `xinpgen`.
    #[error("the xinpgen header at offset 0 says xig_len {xig_len}, not {XINPGEN_LEN}")]
    BadHeader {
        /// The header's `xig_len`.
        xig_len: u32,
    },
    /// A record's length is neither the trailer's nor that of a PCB record.
    #[error(
        "record at offset {offset}: length {len} is neither the trailing xinpgen's \
         ({XINPGEN_LEN}) nor a PCB record's (more than {XINPGEN_LEN})"
    )]
    BadLength {
        /// Where the record starts.
        offset: usize,
        /// Its `len`.
        len: u32,
    },
    /// A record (with its padding to 8 bytes) runs past the end of the reply.
    #[error("record at offset {offset}: needs {need} bytes, the reply has {have} left")]
    Truncated {
        /// Where the record starts.
        offset: usize,
        /// The bytes it takes: 8 for its `len, kind` header, else `len` rounded up to 8.
        need: usize,
        /// The bytes left from `offset`.
        have: usize,
    },
    /// A record of a kind that is read is too short for the fields read from it.
    #[error(
        "record at offset {offset}: {record} (kind {kind:#x}) of {len} bytes is shorter than \
         the {min} bytes read from it"
    )]
    ShortRecord {
        /// Where the record starts.
        offset: usize,
        /// The structure's name.
        record: &'static str,
        /// Its `kind`.
        kind: u32,
        /// Its `len`.
        len: u32,
        /// The bytes read from such a record.
        min: usize,
    },
    /// The reply stops between records without the trailing `xinpgen`, although the header
    /// announced PCBs (the kernel leaves the trailer out only for an empty table).
    #[error(
        "the reply ends at offset {offset} without its trailing xinpgen (the header announced \
         {count} PCBs)"
    )]
    NoTrailer {
        /// The reply's length.
        offset: usize,
        /// The header's `xig_count`.
        count: u32,
    },
}

/// The listeners of one `pcblist_n` reply: the sockets in `LISTEN` of
/// `net.inet.tcp.pcblist_n` (`proto` [`Protocol::Tcp`]) or the bound, unconnected sockets of
/// `net.inet.udp.pcblist_n` ([`Protocol::Udp`]), in the reply's order. Bytes after the trailer
/// are ignored.
pub fn parse(buf: &[u8], proto: Protocol) -> Result<Vec<Scanned>, ParseError> {
    let header = Header::read(buf)?;
    let mut out = Vec::new();
    let mut pcb: Option<Pcb> = None;
    let mut at = roundup64(XINPGEN_LEN);
    loop {
        if at == buf.len() {
            if header.count != 0 {
                return Err(ParseError::NoTrailer {
                    offset: at,
                    count: header.count,
                });
            }
            break;
        }
        let rec = Record::at(buf, at)?;
        if rec.is_trailer() {
            break;
        }
        match rec.kind {
            XSO_INPCB => {
                let inpcb = Inpcb::read(&rec)?;
                out.extend(
                    pcb.take()
                        .and_then(|p| p.listener(proto, header.generation)),
                );
                pcb = Some(Pcb {
                    inpcb,
                    socket: None,
                    tcpcb: None,
                });
            }
            XSO_SOCKET => {
                let socket = Xsocket::read(&rec)?;
                if let Some(p) = pcb.as_mut() {
                    p.socket.get_or_insert(socket);
                }
            }
            XSO_TCPCB => {
                let tcpcb = Xtcpcb::read(&rec)?;
                if let Some(p) = pcb.as_mut() {
                    p.tcpcb.get_or_insert(tcpcb);
                }
            }
            // XSO_RCVBUF, XSO_SNDBUF, XSO_STATS, the kind 0 of a socketless PCB's buffers, and
            // anything newer.
            _ => {}
        }
        at = rec.next;
    }
    out.extend(pcb.and_then(|p| p.listener(proto, header.generation)));
    Ok(out)
}

/// The fields of the `xinpgen` header that are used.
struct Header {
    count: u32,
    generation: u64,
}

impl Header {
    fn read(buf: &[u8]) -> Result<Self, ParseError> {
        let no_header = ParseError::NoHeader { len: buf.len() };
        let head = buf.get(..XINPGEN_LEN).ok_or(no_header)?;
        let xig_len = ne_u32(head, XIG_LEN).ok_or(no_header)?;
        if usize::try_from(xig_len) != Ok(XINPGEN_LEN) {
            return Err(ParseError::BadHeader { xig_len });
        }
        Ok(Self {
            count: ne_u32(head, XIG_COUNT).ok_or(no_header)?,
            generation: ne_u64(head, XIG_GEN).ok_or(no_header)?,
        })
    }
}

/// One record: its `len` bytes, its kind, and where the next one starts.
struct Record<'a> {
    offset: usize,
    len: u32,
    kind: u32,
    bytes: &'a [u8],
    next: usize,
}

impl<'a> Record<'a> {
    /// The record at `offset`, checked to fit in `buf` with its padding.
    fn at(buf: &'a [u8], offset: usize) -> Result<Self, ParseError> {
        let rest = buf.get(offset..).unwrap_or_default();
        let truncated = |need| ParseError::Truncated {
            offset,
            need,
            have: rest.len(),
        };
        let (len, kind) = match (ne_u32(rest, REC_LEN), ne_u32(rest, REC_KIND)) {
            (Some(len), Some(kind)) => (len, kind),
            _ => return Err(truncated(REC_HEADER_LEN)),
        };
        let len_usize = usize::try_from(len).map_err(|_| ParseError::BadLength { offset, len })?;
        if len_usize < XINPGEN_LEN {
            return Err(ParseError::BadLength { offset, len });
        }
        let need = roundup64(len_usize);
        if need > rest.len() {
            return Err(truncated(need));
        }
        Ok(Self {
            offset,
            len,
            kind,
            bytes: &rest[..len_usize],
            next: offset + need,
        })
    }

    /// Whether this is the trailing `xinpgen` (netstat: `xgn_len <= sizeof(struct xinpgen)`;
    /// shorter lengths were refused by [`Record::at`]).
    fn is_trailer(&self) -> bool {
        self.bytes.len() == XINPGEN_LEN
    }

    /// The error for a record too short for its fields.
    fn short(&self, record: &'static str, min: usize) -> ParseError {
        ParseError::ShortRecord {
            offset: self.offset,
            record,
            kind: self.kind,
            len: self.len,
            min,
        }
    }
}

/// The fields of an `xinpcb_n` that are used.
struct Inpcb {
    fport: u16,
    lport: u16,
    gencnt: u64,
    flags: u32,
    vflag: u8,
    faddr: [u8; 16],
    laddr: [u8; 16],
}

impl Inpcb {
    fn read(rec: &Record<'_>) -> Result<Self, ParseError> {
        Self::decode(rec.bytes).ok_or_else(|| rec.short("xinpcb_n", XINPCB_N_MIN_LEN))
    }

    fn decode(b: &[u8]) -> Option<Self> {
        Some(Self {
            fport: u16::from_be_bytes(array_at(b, INP_FPORT)?),
            lport: u16::from_be_bytes(array_at(b, INP_LPORT)?),
            gencnt: ne_u64(b, INP_GENCNT)?,
            flags: ne_u32(b, INP_FLAGS)?,
            vflag: *b.get(INP_VFLAG)?,
            faddr: array_at(b, INP_FADDR)?,
            laddr: array_at(b, INP_LADDR)?,
        })
    }
}

/// The fields of an `xsocket_n` that are used.
struct Xsocket {
    protocol: i32,
    last_pid: i32,
}

impl Xsocket {
    fn read(rec: &Record<'_>) -> Result<Self, ParseError> {
        Self::decode(rec.bytes).ok_or_else(|| rec.short("xsocket_n", XSOCKET_N_MIN_LEN))
    }

    fn decode(b: &[u8]) -> Option<Self> {
        Some(Self {
            protocol: i32::from_ne_bytes(array_at(b, XSO_PROTOCOL)?),
            last_pid: i32::from_ne_bytes(array_at(b, SO_LAST_PID)?),
        })
    }
}

/// The field of an `xtcpcb_n` that is used.
struct Xtcpcb {
    state: i32,
}

impl Xtcpcb {
    fn read(rec: &Record<'_>) -> Result<Self, ParseError> {
        Self::decode(rec.bytes).ok_or_else(|| rec.short("xtcpcb_n", XTCPCB_N_MIN_LEN))
    }

    fn decode(b: &[u8]) -> Option<Self> {
        Some(Self {
            state: i32::from_ne_bytes(array_at(b, T_STATE)?),
        })
    }
}

/// The records of one PCB read so far: its `xinpcb_n`, then the first `xsocket_n` and
/// `xtcpcb_n` after it.
struct Pcb {
    inpcb: Inpcb,
    socket: Option<Xsocket>,
    tcpcb: Option<Xtcpcb>,
}

impl Pcb {
    /// The PCB as a [`Scanned`] if it is a listener of `proto` (see the module docs), `None`
    /// otherwise.
    fn listener(&self, proto: Protocol, xig_gen: u64) -> Option<Scanned> {
        let inp = &self.inpcb;
        let socket = self.socket.as_ref()?;
        let ipproto = match proto {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        };
        if socket.protocol != ipproto || inp.gencnt > xig_gen || inp.lport == 0 {
            return None;
        }
        let (addr, v6only, faddr_unspecified) = if inp.vflag & INP_IPV6 != 0 {
            let v6only = inp.vflag & INP_IPV4 == 0 && inp.flags & IN6P_IPV6_V6ONLY != 0;
            let faddr = Ipv6Addr::from(inp.faddr);
            (
                IpAddr::V6(Ipv6Addr::from(inp.laddr)),
                Some(v6only),
                faddr.is_unspecified(),
            )
        } else if inp.vflag & INP_IPV4 != 0 {
            let faddr = ipv4_of(&inp.faddr);
            (
                IpAddr::V4(ipv4_of(&inp.laddr)),
                None,
                faddr.is_unspecified(),
            )
        } else {
            return None;
        };
        let listening = match proto {
            Protocol::Tcp => self.tcpcb.as_ref()?.state == TCPS_LISTEN,
            Protocol::Udp => inp.fport == 0 && faddr_unspecified,
        };
        listening.then(|| Scanned {
            proto,
            addr,
            port: inp.lport,
            v6only,
            pid: u32::try_from(socket.last_pid).ok().filter(|&pid| pid != 0),
        })
    }
}

/// The IPv4 address of an `in_addr_4in6`: its last 4 bytes (`ia46_addr4`, at [`IA46_ADDR4`]).
fn ipv4_of(addr: &[u8; 16]) -> Ipv4Addr {
    const _: () = assert!(IA46_ADDR4 + 4 == 16);
    let [.., a, b, c, d] = *addr;
    Ipv4Addr::new(a, b, c, d)
}

/// `M` bytes of `b` from `at`, or `None` past its end.
fn array_at<const M: usize>(b: &[u8], at: usize) -> Option<[u8; M]> {
    b.get(at..)?.first_chunk::<M>().copied()
}

/// The host-order `u32` at `at`.
fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    array_at(b, at).map(u32::from_ne_bytes)
}

/// The host-order `u64` at `at`.
fn ne_u64(b: &[u8], at: usize) -> Option<u64> {
    array_at(b, at).map(u64::from_ne_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    const TCPS_ESTABLISHED: i32 = 4;
    const TCPS_TIME_WAIT: i32 = 10;

    /// One PCB as the kernel would describe it; the builder lays it out byte by byte.
    #[derive(Clone)]
    struct Fixture {
        vflag: u8,
        flags: u32,
        laddr: [u8; 16],
        lport: u16,
        faddr: [u8; 16],
        fport: u16,
        gencnt: u64,
        protocol: i32,
        last_pid: i32,
        /// `t_state`, for a TCP list.
        state: Option<i32>,
    }

    impl Fixture {
        fn v4(protocol: i32, laddr: [u8; 4], lport: u16) -> Self {
            Self {
                vflag: INP_IPV4,
                flags: 0,
                laddr: in_addr_4in6(laddr),
                lport,
                faddr: [0; 16],
                fport: 0,
                gencnt: 5,
                protocol,
                last_pid: 4242,
                state: (protocol == IPPROTO_TCP).then_some(TCPS_LISTEN),
            }
        }

        fn v6(protocol: i32, laddr: Ipv6Addr, lport: u16) -> Self {
            Self {
                vflag: INP_IPV6,
                laddr: laddr.octets(),
                ..Self::v4(protocol, [0; 4], lport)
            }
        }

        fn tcp4(laddr: [u8; 4], lport: u16) -> Self {
            Self::v4(IPPROTO_TCP, laddr, lport)
        }

        fn udp4(laddr: [u8; 4], lport: u16) -> Self {
            Self::v4(IPPROTO_UDP, laddr, lport)
        }

        fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }

        /// The PCB's records, each padded to 8 bytes, in the kernel's order.
        fn records(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend(pad(self.xinpcb_n()));
            out.extend(pad(self.xsocket_n()));
            out.extend(pad(xsockbuf_n(XSO_RCVBUF)));
            out.extend(pad(xsockbuf_n(XSO_SNDBUF)));
            out.extend(pad(xsockstat_n()));
            if let Some(state) = self.state {
                out.extend(pad(xtcpcb_n(state)));
            }
            out
        }

        fn xinpcb_n(&self) -> Vec<u8> {
            let mut r = record(XINPCB_N_LEN, XSO_INPCB);
            put(&mut r, XI_INPP, &0x1122_3344_5566_7788u64.to_ne_bytes());
            put(&mut r, INP_FPORT, &self.fport.to_be_bytes());
            put(&mut r, INP_LPORT, &self.lport.to_be_bytes());
            put(&mut r, INP_PPCB, &0x99AA_BBCC_DDEE_FF00u64.to_ne_bytes());
            put(&mut r, INP_GENCNT, &self.gencnt.to_ne_bytes());
            put(&mut r, INP_FLAGS, &self.flags.to_ne_bytes());
            put(&mut r, INP_VFLAG, &[self.vflag]);
            put(&mut r, INP_IP_TTL, &[64]);
            put(&mut r, INP_IP_P, &[0]);
            put(&mut r, INP_FADDR, &self.faddr);
            put(&mut r, INP_LADDR, &self.laddr);
            put(&mut r, INP_FLOWHASH, &0xDEAD_BEEFu32.to_ne_bytes());
            r
        }

        fn xsocket_n(&self) -> Vec<u8> {
            let mut r = record(XSOCKET_N_LEN, XSO_SOCKET);
            put(&mut r, XSO_SO, &0x0102_0304_0506_0708u64.to_ne_bytes());
            put(&mut r, SO_PCB, &0x1122_3344_5566_7788u64.to_ne_bytes());
            put(&mut r, XSO_PROTOCOL, &self.protocol.to_ne_bytes());
            let family: i32 = if self.vflag & INP_IPV6 != 0 { 30 } else { 2 };
            put(&mut r, XSO_FAMILY, &family.to_ne_bytes());
            put(&mut r, SO_UID, &501u32.to_ne_bytes());
            put(&mut r, SO_LAST_PID, &self.last_pid.to_ne_bytes());
            put(&mut r, SO_E_PID, &0i32.to_ne_bytes());
            r
        }
    }

    /// A zeroed record of `len` bytes with its `len, kind` header.
    fn record(len: usize, kind: u32) -> Vec<u8> {
        let mut r = vec![0; len];
        put(&mut r, REC_LEN, &u32::try_from(len).unwrap().to_ne_bytes());
        put(&mut r, REC_KIND, &kind.to_ne_bytes());
        r
    }

    fn put(r: &mut [u8], at: usize, bytes: &[u8]) {
        r[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn pad(mut r: Vec<u8>) -> Vec<u8> {
        r.resize(roundup64(r.len()), 0);
        r
    }

    fn xsockbuf_n(kind: u32) -> Vec<u8> {
        let mut r = record(XSOCKBUF_N_LEN, kind);
        put(&mut r, 12, &131_072u32.to_ne_bytes()); // sb_hiwat
        r
    }

    fn xsockstat_n() -> Vec<u8> {
        record(XSOCKSTAT_N_LEN, XSO_STATS)
    }

    fn xtcpcb_n(state: i32) -> Vec<u8> {
        let mut r = record(XTCPCB_N_LEN, XSO_TCPCB);
        put(&mut r, T_STATE, &state.to_ne_bytes());
        r
    }

    fn in_addr_4in6(v4: [u8; 4]) -> [u8; 16] {
        let mut a = [0; 16];
        a[IA46_ADDR4..].copy_from_slice(&v4);
        a
    }

    fn xinpgen(count: u32, generation: u64) -> Vec<u8> {
        let mut r = vec![0; XINPGEN_LEN];
        put(
            &mut r,
            XIG_LEN,
            &u32::try_from(XINPGEN_LEN).unwrap().to_ne_bytes(),
        );
        put(&mut r, XIG_COUNT, &count.to_ne_bytes());
        put(&mut r, XIG_GEN, &generation.to_ne_bytes());
        put(&mut r, XIG_SOGEN, &77u64.to_ne_bytes());
        r
    }

    /// A whole reply: header, the PCBs' records, trailer (or the header alone, as the kernel
    /// writes it, when there is no PCB).
    fn reply(pcbs: &[Fixture]) -> Vec<u8> {
        let count = u32::try_from(pcbs.len()).unwrap();
        let mut out = xinpgen(count, 10);
        if pcbs.is_empty() {
            return out;
        }
        for p in pcbs {
            out.extend(p.records());
        }
        out.extend(xinpgen(count, 11));
        out
    }

    fn tcp(addr: IpAddr, port: u16, v6only: Option<bool>, pid: Option<u32>) -> Scanned {
        Scanned {
            proto: Protocol::Tcp,
            addr,
            port,
            v6only,
            pid,
        }
    }

    fn udp(addr: IpAddr, port: u16, v6only: Option<bool>, pid: Option<u32>) -> Scanned {
        Scanned {
            proto: Protocol::Udp,
            ..tcp(addr, port, v6only, pid)
        }
    }

    fn tcp_fixture() -> Vec<u8> {
        reply(&[
            Fixture::tcp4([127, 0, 0, 1], 5432),
            // An established connection: skipped.
            Fixture::tcp4([10, 0, 0, 2], 50000).with(|p| {
                p.faddr = in_addr_4in6([1, 2, 3, 4]);
                p.fport = 443;
                p.state = Some(TCPS_ESTABLISHED);
            }),
            // [::]:8080 with IPV6_V6ONLY off: dual-stack.
            Fixture::v6(IPPROTO_TCP, Ipv6Addr::UNSPECIFIED, 8080).with(|p| {
                p.vflag = INP_IPV6 | INP_IPV4;
                p.last_pid = 900;
            }),
            // [::]:8443 with IPV6_V6ONLY on.
            Fixture::v6(IPPROTO_TCP, Ipv6Addr::UNSPECIFIED, 8443).with(|p| {
                p.flags = IN6P_IPV6_V6ONLY | 0x0040; // and INP_ANONPORT, which is ignored
                p.last_pid = 901;
            }),
            // [::1]:9000 without IPV6_V6ONLY.
            Fixture::v6(IPPROTO_TCP, Ipv6Addr::LOCALHOST, 9000),
            // A TIME_WAIT PCB (the TCP list includes them): skipped.
            Fixture::tcp4([127, 0, 0, 1], 5433).with(|p| p.state = Some(TCPS_TIME_WAIT)),
            // A kernel socket (last_pid 0) listening on 0.0.0.0:88.
            Fixture::tcp4([0, 0, 0, 0], 88).with(|p| p.last_pid = 0),
        ])
    }

    #[test]
    fn tcp_keeps_listeners() {
        assert_eq!(
            parse(&tcp_fixture(), Protocol::Tcp).unwrap(),
            vec![
                tcp(Ipv4Addr::LOCALHOST.into(), 5432, None, Some(4242)),
                tcp(Ipv6Addr::UNSPECIFIED.into(), 8080, Some(false), Some(900)),
                tcp(Ipv6Addr::UNSPECIFIED.into(), 8443, Some(true), Some(901)),
                tcp(Ipv6Addr::LOCALHOST.into(), 9000, Some(false), Some(4242)),
                tcp(Ipv4Addr::UNSPECIFIED.into(), 88, None, None),
            ]
        );
    }

    #[test]
    fn udp_keeps_bound_unconnected_sockets() {
        let buf = reply(&[
            Fixture::udp4([0, 0, 0, 0], 53).with(|p| p.last_pid = 77),
            // Connected: skipped.
            Fixture::udp4([192, 168, 1, 2], 61000).with(|p| {
                p.faddr = in_addr_4in6([8, 8, 8, 8]);
                p.fport = 53;
            }),
            // Not bound (a socket that has not sent yet): skipped.
            Fixture::udp4([0, 0, 0, 0], 0),
            // Connected to a port with the address still unspecified cannot happen; a foreign
            // port alone is enough to skip.
            Fixture::udp4([127, 0, 0, 1], 7000).with(|p| p.fport = 9),
            // Connected over IPv6: skipped.
            Fixture::v6(IPPROTO_UDP, Ipv6Addr::LOCALHOST, 7001).with(|p| {
                p.faddr = Ipv6Addr::LOCALHOST.octets();
            }),
            Fixture::v6(IPPROTO_UDP, Ipv6Addr::UNSPECIFIED, 5353)
                .with(|p| p.vflag = INP_IPV6 | INP_IPV4),
            Fixture::v6(IPPROTO_UDP, Ipv6Addr::LOCALHOST, 5354)
                .with(|p| p.flags = IN6P_IPV6_V6ONLY),
        ]);
        assert_eq!(
            parse(&buf, Protocol::Udp).unwrap(),
            vec![
                udp(Ipv4Addr::UNSPECIFIED.into(), 53, None, Some(77)),
                udp(Ipv6Addr::UNSPECIFIED.into(), 5353, Some(false), Some(4242)),
                udp(Ipv6Addr::LOCALHOST.into(), 5354, Some(true), Some(4242)),
            ]
        );
    }

    /// Hex bytes, whitespace ignored.
    fn from_hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        assert_eq!(digits.len() % 2, 0, "odd number of hex digits");
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// A whole `net.inet.tcp.pcblist_n` reply with one PCB, the listener 127.0.0.1:5432 of pid
    /// 4242, written out byte by byte (little-endian, as on every Mac) from the XNU layouts,
    /// not from the builder. `#` starts a comment; the numbers in comments are offsets in the
    /// record.
    const TCP_REPLY_HEX: &str = "
        # xinpgen header: len 24, count 1, gen 42, sogen 7
        18000000 01000000 2a00000000000000 0700000000000000

        # xinpcb_n: len 104, XSO_INPCB, xi_inpp
        68000000 10000000 8877665544332211
        # 16 fport 0, lport 5432 (big-endian), 20 inp_ppcb, 28 inp_gencnt 40
        0000 1538 00ffeeddccbbaa99 2800000000000000
        # 36 inp_flags INP_ANONPORT, 40 flow, 44 vflag INP_IPV4, ttl 64, ip_p 6, padding
        40000000 00000000 01 40 06 00
        # 48 faddr
        00000000000000000000000000000000
        # 64 laddr: the in_addr_4in6 of 127.0.0.1
        000000000000000000000000 7f000001
        # 80 inp_depend4 (and padding), 84 inp_depend6, 96 flowhash, 100 flags2
        00000000 000000000000000000000000 efbeadde 00000000

        # xsocket_n: len 104, XSO_SOCKET, xso_so
        68000000 01000000 0807060504030201
        # 16 so_type SOCK_STREAM (and padding), 20 options, 24 linger, 26 state
        0100 0000 04000000 8000 0000
        # 28 so_pcb, 36 xso_protocol IPPROTO_TCP, 40 xso_family AF_INET
        8877665544332211 06000000 02000000
        # 44 qlen, incqlen, qlimit 128, timeo, error (and padding)
        0000 0000 8000 0000 0000 0000
        # 56 pgid, 60 oobmark, 64 uid 501, 68 so_last_pid 4242, 72 so_e_pid
        00000000 00000000 f5010000 92100000 00000000
        # 76 so_gencnt, 84 flags, 88 flags1, 92 usecount, 96 retaincnt, 100 filter_flags
        0100000000000000 00000000 00000000 01000000 00000000 00000000

        # xsockbuf_n: len 32, XSO_RCVBUF, sb_cc, sb_hiwat 128 KiB, ...
        20000000 02000000 00000000 00000200 0000000000000000 0000000000000000
        # xsockbuf_n: len 32, XSO_SNDBUF
        20000000 04000000 00000000 00000200 0000000000000000 0000000000000000

        # xsockstat_n: len 136, XSO_STATS, 4 x data_stats
        88000000 08000000
        00000000000000000000000000000000 00000000000000000000000000000000
        00000000000000000000000000000000 00000000000000000000000000000000
        00000000000000000000000000000000 00000000000000000000000000000000
        00000000000000000000000000000000 00000000000000000000000000000000

        # xtcpcb_n: len 204, XSO_TCPCB, t_segq, t_dupacks, 20 t_timer[4]
        cc000000 20000000 0000000000000000 00000000 00000000000000000000000000000000
        # 36 t_state TCPS_LISTEN
        01000000
        # 40 .. 204
        00000000000000000000000000000000 00000000000000000000000000000000
        00000000000000000000000000000000 00000000000000000000000000000000
        00000000000000000000000000000000 00000000000000000000000000000000
        00000000000000000000000000000000 00000000000000000000000000000000
        00000000000000000000000000000000 00000000000000000000000000000000
        00000000
        # padding to 208
        00000000

        # xinpgen trailer
        18000000 01000000 2a00000000000000 0700000000000000
    ";

    /// The bytes of [`TCP_REPLY_HEX`], comments cut.
    fn tcp_reply_bytes() -> Vec<u8> {
        let hex: String = TCP_REPLY_HEX
            .lines()
            .map(|line| line.split('#').next().unwrap_or(""))
            .collect();
        from_hex(&hex)
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn tcp_literal_reply() {
        let buf = tcp_reply_bytes();
        let pcb_len = roundup64(XINPCB_N_LEN)
            + roundup64(XSOCKET_N_LEN)
            + 2 * roundup64(XSOCKBUF_N_LEN)
            + roundup64(XSOCKSTAT_N_LEN)
            + roundup64(XTCPCB_N_LEN);
        assert_eq!(buf.len(), 2 * XINPGEN_LEN + pcb_len);
        assert_eq!(
            parse(&buf, Protocol::Tcp).unwrap(),
            vec![tcp(Ipv4Addr::LOCALHOST.into(), 5432, None, Some(4242))]
        );
        // The same bytes are no UDP listener: the socket's protocol is TCP.
        assert_eq!(parse(&buf, Protocol::Udp).unwrap(), vec![]);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn literal_reply_matches_the_builder_in_the_fields_read() {
        let literal = tcp_reply_bytes();
        let built = reply(&[Fixture::tcp4([127, 0, 0, 1], 5432)]);
        assert_eq!(literal.len(), built.len());
        let inpcb = XINPGEN_LEN;
        let socket = inpcb + roundup64(XINPCB_N_LEN);
        let tcpcb = literal.len() - XINPGEN_LEN - roundup64(XTCPCB_N_LEN);
        for (what, at, len) in [
            ("xinpcb_n header", inpcb, REC_HEADER_LEN),
            ("ports", inpcb + INP_FPORT, 4),
            ("vflag", inpcb + INP_VFLAG, 1),
            ("addresses", inpcb + INP_FADDR, 32),
            ("xsocket_n header", socket, REC_HEADER_LEN),
            ("protocol", socket + XSO_PROTOCOL, 4),
            ("last_pid", socket + SO_LAST_PID, 4),
            ("xtcpcb_n header", tcpcb, REC_HEADER_LEN),
            ("t_state", tcpcb + T_STATE, 4),
        ] {
            assert_eq!(literal[at..at + len], built[at..at + len], "{what} at {at}");
        }
    }

    #[test]
    fn empty_table_is_the_header_alone() {
        assert_eq!(parse(&xinpgen(0, 3), Protocol::Tcp).unwrap(), vec![]);
        // With a trailer, too.
        let mut buf = xinpgen(0, 3);
        buf.extend(xinpgen(0, 3));
        assert_eq!(parse(&buf, Protocol::Udp).unwrap(), vec![]);
    }

    #[test]
    fn missing_trailer_is_an_error() {
        let pcbs = [Fixture::udp4([0, 0, 0, 0], 53)];
        let full = reply(&pcbs);
        let cut = full.len() - XINPGEN_LEN;
        assert_eq!(
            parse(&full[..cut], Protocol::Udp),
            Err(ParseError::NoTrailer {
                offset: cut,
                count: 1
            })
        );
        assert_eq!(
            parse(&full[..XINPGEN_LEN], Protocol::Udp),
            Err(ParseError::NoTrailer {
                offset: XINPGEN_LEN,
                count: 1
            })
        );
    }

    #[test]
    fn bytes_after_the_trailer_are_ignored() {
        let mut buf = reply(&[Fixture::udp4([0, 0, 0, 0], 53)]);
        buf.extend([0xFF; 37]);
        assert_eq!(parse(&buf, Protocol::Udp).unwrap().len(), 1);
    }

    #[test]
    fn pcbs_newer_than_the_header_are_skipped() {
        // The header's xig_gen is 10 (see `reply`): a PCB of generation 11 was created while
        // the list was being copied out.
        let buf = reply(&[
            Fixture::tcp4([127, 0, 0, 1], 1).with(|p| p.gencnt = 11),
            Fixture::tcp4([127, 0, 0, 1], 2).with(|p| p.gencnt = 10),
            // Skywalk flows carry generation 0.
            Fixture::tcp4([127, 0, 0, 1], 3).with(|p| p.gencnt = 0),
        ]);
        let ports: Vec<u16> = parse(&buf, Protocol::Tcp)
            .unwrap()
            .iter()
            .map(|s| s.port)
            .collect();
        assert_eq!(ports, [2, 3]);
    }

    #[test]
    fn sockets_of_another_protocol_are_skipped() {
        let buf = reply(&[
            Fixture::tcp4([127, 0, 0, 1], 1).with(|p| p.protocol = IPPROTO_UDP),
            // A PCB without a socket: sotoxsocket_n leaves xso_protocol 0.
            Fixture::tcp4([127, 0, 0, 1], 2).with(|p| p.protocol = 0),
            Fixture::tcp4([127, 0, 0, 1], 3),
        ]);
        assert_eq!(
            parse(&buf, Protocol::Tcp).unwrap(),
            vec![tcp(Ipv4Addr::LOCALHOST.into(), 3, None, Some(4242))]
        );
    }

    #[test]
    fn vflag_decides_the_family() {
        let buf = reply(&[
            // An AF_INET6 socket bound to ::ffff:127.0.0.1: XNU makes it an IPv4 PCB.
            Fixture::v6(IPPROTO_UDP, Ipv6Addr::UNSPECIFIED, 1).with(|p| {
                p.vflag = INP_IPV4 | INP_V4MAPPEDV6;
                p.laddr = in_addr_4in6([127, 0, 0, 1]);
            }),
            // Neither flag: skipped.
            Fixture::udp4([127, 0, 0, 1], 2).with(|p| p.vflag = 0),
            // IPv4 bytes are read from the end of the union only.
            Fixture::udp4([127, 0, 0, 1], 3).with(|p| p.laddr[..IA46_ADDR4].fill(0xEE)),
        ]);
        assert_eq!(
            parse(&buf, Protocol::Udp).unwrap(),
            vec![
                udp(Ipv4Addr::LOCALHOST.into(), 1, None, Some(4242)),
                udp(Ipv4Addr::LOCALHOST.into(), 3, None, Some(4242)),
            ]
        );
    }

    #[test]
    fn negative_pids_are_none() {
        let buf = reply(&[Fixture::udp4([0, 0, 0, 0], 53).with(|p| p.last_pid = -1)]);
        assert_eq!(parse(&buf, Protocol::Udp).unwrap()[0].pid, None);
    }

    /// A reply announcing one PCB, made of `records` (each padded to 8 bytes) between the header
    /// and the trailer.
    fn reply_with(records: Vec<Vec<u8>>) -> Vec<u8> {
        let mut out = xinpgen(1, 10);
        for r in records {
            out.extend(pad(r));
        }
        out.extend(xinpgen(1, 10));
        out
    }

    #[test]
    fn pcbs_are_split_at_each_xinpcb_n() {
        let listener = Fixture::tcp4([127, 0, 0, 1], 5432);
        let socketless = Fixture::tcp4([127, 0, 0, 1], 1).with(|p| p.protocol = 0);
        let records = vec![
            // Orphan records before the first xinpcb_n: skipped.
            listener.xsocket_n(),
            xtcpcb_n(TCPS_LISTEN),
            // A socketless PCB as the kernel writes it: its buffers' kind is left 0.
            socketless.xinpcb_n(),
            socketless.xsocket_n(),
            record(XSOCKBUF_N_LEN, 0),
            record(XSOCKBUF_N_LEN, 0),
            xsockstat_n(),
            xtcpcb_n(TCPS_LISTEN),
            // A PCB with no xsocket_n: skipped.
            Fixture::tcp4([127, 0, 0, 1], 2).xinpcb_n(),
            xtcpcb_n(TCPS_LISTEN),
            // A PCB with no xtcpcb_n: skipped in a TCP list.
            Fixture::tcp4([127, 0, 0, 1], 3).xinpcb_n(),
            listener.xsocket_n(),
            // The listener, with an unknown kind in the middle and a second xtcpcb_n (the
            // first one counts, as in netstat).
            listener.xinpcb_n(),
            record(40, 0x400),
            listener.xsocket_n(),
            xtcpcb_n(TCPS_LISTEN),
            xtcpcb_n(TCPS_ESTABLISHED),
        ];
        assert_eq!(
            parse(&reply_with(records), Protocol::Tcp).unwrap(),
            vec![tcp(Ipv4Addr::LOCALHOST.into(), 5432, None, Some(4242))]
        );
    }

    #[test]
    fn older_shorter_records_are_read() {
        // OS X 10.10 .. macOS 12: a 76-byte xsocket_n; and an xinpcb_n cut after the local
        // address, the least this parser reads.
        let p = Fixture::udp4([127, 0, 0, 1], 53);
        let mut inpcb = p.xinpcb_n();
        inpcb.truncate(XINPCB_N_MIN_LEN);
        put(&mut inpcb, REC_LEN, &80u32.to_ne_bytes());
        let mut socket = p.xsocket_n();
        socket.truncate(76);
        put(&mut socket, REC_LEN, &76u32.to_ne_bytes());
        let buf = reply_with(vec![inpcb, socket, xsockstat_n()]);
        assert_eq!(
            parse(&buf, Protocol::Udp).unwrap(),
            vec![udp(Ipv4Addr::LOCALHOST.into(), 53, None, Some(4242))]
        );
    }

    #[test]
    fn minimum_lengths_are_exact() {
        let p = Fixture::tcp4([127, 0, 0, 1], 1);
        let inpcb = p.xinpcb_n();
        let socket = p.xsocket_n();
        let tcpcb = xtcpcb_n(TCPS_LISTEN);
        assert!(Inpcb::decode(&inpcb[..XINPCB_N_MIN_LEN]).is_some());
        assert!(Inpcb::decode(&inpcb[..XINPCB_N_MIN_LEN - 1]).is_none());
        assert!(Xsocket::decode(&socket[..XSOCKET_N_MIN_LEN]).is_some());
        assert!(Xsocket::decode(&socket[..XSOCKET_N_MIN_LEN - 1]).is_none());
        assert!(Xtcpcb::decode(&tcpcb[..XTCPCB_N_MIN_LEN]).is_some());
        assert!(Xtcpcb::decode(&tcpcb[..XTCPCB_N_MIN_LEN - 1]).is_none());
    }

    #[test]
    fn short_records_are_errors() {
        for (kind, record_name, min) in [
            (XSO_INPCB, "xinpcb_n", XINPCB_N_MIN_LEN),
            (XSO_SOCKET, "xsocket_n", XSOCKET_N_MIN_LEN),
            (XSO_TCPCB, "xtcpcb_n", XTCPCB_N_MIN_LEN),
        ] {
            let buf = reply_with(vec![record(min - 1, kind)]);
            assert_eq!(
                parse(&buf, Protocol::Tcp),
                Err(ParseError::ShortRecord {
                    offset: XINPGEN_LEN,
                    record: record_name,
                    kind,
                    len: u32::try_from(min - 1).unwrap(),
                    min,
                })
            );
        }
    }

    #[test]
    fn bad_record_lengths_are_errors() {
        for len in [0u32, 1, 4, 7, 8, 16, 23] {
            let mut r = record(32, XSO_STATS);
            put(&mut r, REC_LEN, &len.to_ne_bytes());
            let buf = reply_with(vec![r]);
            assert_eq!(
                parse(&buf, Protocol::Udp),
                Err(ParseError::BadLength {
                    offset: XINPGEN_LEN,
                    len
                }),
                "len {len}"
            );
        }
        // Longer than the reply.
        for len in [u32::MAX, 1 << 20, 4096] {
            let mut r = record(32, XSO_STATS);
            put(&mut r, REC_LEN, &len.to_ne_bytes());
            let buf = reply_with(vec![r]);
            let have = buf.len() - XINPGEN_LEN;
            assert_eq!(
                parse(&buf, Protocol::Udp),
                Err(ParseError::Truncated {
                    offset: XINPGEN_LEN,
                    need: roundup64(usize::try_from(len).unwrap()),
                    have,
                }),
                "len {len}"
            );
        }
    }

    #[test]
    fn bad_headers_are_errors() {
        for len in 0..XINPGEN_LEN {
            assert_eq!(
                parse(&vec![0; len], Protocol::Tcp),
                Err(ParseError::NoHeader { len })
            );
        }
        let mut buf = reply(&[Fixture::tcp4([127, 0, 0, 1], 1)]);
        put(&mut buf, XIG_LEN, &32u32.to_ne_bytes());
        assert_eq!(
            parse(&buf, Protocol::Tcp),
            Err(ParseError::BadHeader { xig_len: 32 })
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (full, proto) in [
            (tcp_fixture(), Protocol::Tcp),
            (reply(&[Fixture::udp4([0, 0, 0, 0], 53)]), Protocol::Udp),
        ] {
            for len in 0..full.len() {
                assert!(
                    parse(&full[..len], proto).is_err(),
                    "a prefix of {len} of {} bytes parsed",
                    full.len()
                );
            }
        }
    }

    #[test]
    fn garbage_is_an_error() {
        for buf in [
            vec![0xFF; 64],
            vec![0; 64],
            b"not a pcblist_n reply at all, no".to_vec(),
        ] {
            assert!(parse(&buf, Protocol::Tcp).is_err());
            assert!(parse(&buf, Protocol::Udp).is_err());
        }
        // A valid header then zeros: a zero-length record.
        let mut buf = xinpgen(1, 1);
        buf.extend([0; 64]);
        assert_eq!(
            parse(&buf, Protocol::Tcp),
            Err(ParseError::BadLength {
                offset: XINPGEN_LEN,
                len: 0
            })
        );
    }

    #[test]
    fn errors_say_where() {
        let mut buf = xinpgen(1, 1);
        buf.extend([0; 16]);
        assert_eq!(
            parse(&buf, Protocol::Tcp).unwrap_err().to_string(),
            "record at offset 24: length 0 is neither the trailing xinpgen's (24) nor a PCB \
             record's (more than 24)"
        );
        let buf = reply_with(vec![record(40, XSO_SOCKET)]);
        assert_eq!(
            parse(&buf, Protocol::Tcp).unwrap_err().to_string(),
            "record at offset 24: xsocket_n (kind 0x1) of 40 bytes is shorter than the 72 bytes \
             read from it"
        );
    }

    proptest! {
        /// No input panics; what parses has ports and pids that are never 0.
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..2048)) {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                if let Ok(rows) = parse(&buf, proto) {
                    prop_assert!(rows.iter().all(|s| s.port != 0 && s.pid != Some(0)));
                }
            }
        }

        /// Valid replies with some bytes overwritten: still no panic, and every result has
        /// ports and pids that are never 0 and the protocol asked for.
        #[test]
        fn damaged_replies_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
            cut in any::<prop::sample::Index>(),
        ) {
            for (mut buf, proto) in [
                (tcp_fixture(), Protocol::Tcp),
                (reply(&[Fixture::udp4([0, 0, 0, 0], 53)]), Protocol::Udp),
            ] {
                for (at, byte) in &edits {
                    let i = at.index(buf.len());
                    buf[i] = *byte;
                }
                let len = cut.index(buf.len() + 1);
                for input in [&buf[..], &buf[..len]] {
                    if let Ok(rows) = parse(input, proto) {
                        prop_assert!(rows
                            .iter()
                            .all(|s| s.port != 0 && s.pid != Some(0) && s.proto == proto));
                    }
                }
            }
        }
    }
}
