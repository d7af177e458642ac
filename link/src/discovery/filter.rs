//! One snapshot: the dumps, what is a listener, and the exclusions.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use netlink_packet_sock_diag::inet::StateFlags;

use super::Error;
use super::diag::{DiagCounters, DiagRecord, DiagSocket, STATE_CLOSE, STATE_LISTEN};
use super::set::{Listener, ListenerSet, PortRange, Protocol};

const PORT_RANGE_PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const SELF_FD_PATH: &str = "/proc/self/fd";
/// The kernel's default ephemeral range, used when `ip_local_port_range` cannot be read.
const DEFAULT_EPHEMERAL: PortRange = PortRange {
    first: 32768,
    last: 60999,
};

/// What to report and what to leave out. `Options::default()` is what the agent wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Report TCP listeners (default true).
    pub tcp: bool,
    /// Report UDP listeners (default true).
    pub udp: bool,
    /// Report IPv4 sockets (default true).
    pub ipv4: bool,
    /// Report IPv6 sockets (default true).
    pub ipv6: bool,
    /// Leave out sockets whose inode is one of this process's file descriptors (default true).
    pub exclude_own_process: bool,
    /// Leave out UDP sockets on a port of the kernel's ephemeral range (default true).
    pub exclude_udp_ephemeral: bool,
    /// Leave out these (protocol, port) pairs, on every address (default empty): the ports this
    /// side mirrors for the other side (loop prevention).
    pub exclude_ports: BTreeSet<(Protocol, u16)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            tcp: true,
            udp: true,
            ipv4: true,
            ipv6: true,
            exclude_own_process: true,
            exclude_udp_ephemeral: true,
            exclude_ports: BTreeSet::new(),
        }
    }
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`, which applies to IPv6 too)
/// of the caller's network namespace.
pub fn ephemeral_port_range() -> Result<PortRange, Error> {
    let text = std::fs::read_to_string(PORT_RANGE_PATH).map_err(|source| Error::Proc {
        path: PORT_RANGE_PATH,
        source,
    })?;
    let bad = || Error::Proc {
        path: PORT_RANGE_PATH,
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected two ports, got {:?}", text.trim()),
        ),
    };
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(first)), Some(Ok(last)), None) if first <= last => Ok(PortRange { first, last }),
        _ => Err(bad()),
    }
}

/// The socket inodes of this process's open file descriptors (`/proc/self/fd/N -> socket:[INODE]`).
pub fn own_socket_inodes() -> Result<HashSet<u32>, Error> {
    let dir = std::fs::read_dir(SELF_FD_PATH).map_err(|source| Error::Proc {
        path: SELF_FD_PATH,
        source,
    })?;
    let mut out = HashSet::new();
    for entry in dir {
        // An fd closed while we walk (or the directory's own fd) fails here: not a socket of ours.
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let Some(target) = target.to_str() else {
            continue;
        };
        if let Some(ino) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok())
            .and_then(|n| u32::try_from(n).ok())
        {
            out.insert(ino);
        }
    }
    Ok(out)
}

/// Takes snapshots of the listeners of the caller's network namespace: one netlink socket, the
/// options, and a cache of which socket inodes belong to this process.
#[derive(Debug)]
pub struct Discovery {
    options: Options,
    sock: DiagSocket,
    ephemeral: PortRange,
    /// inode -> owned by this process; holds only inodes seen in the last snapshot.
    own: HashMap<u32, bool>,
    counters: Arc<DiagCounters>,
    records: Vec<DiagRecord>,
    candidates: Vec<Listener>,
}

impl Discovery {
    /// Opens the netlink socket and reads the ephemeral port range (falling back to the kernel
    /// default 32768-60999, with a warning, if it cannot be read).
    pub fn new(options: Options) -> Result<Self, Error> {
        Self::with_counters(options, Arc::default())
    }

    pub(crate) fn with_counters(
        options: Options,
        counters: Arc<DiagCounters>,
    ) -> Result<Self, Error> {
        let sock = DiagSocket::open()?;
        let ephemeral = match ephemeral_port_range() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "using the default ephemeral port range 32768-60999");
                DEFAULT_EPHEMERAL
            }
        };
        Ok(Self {
            options,
            sock,
            ephemeral,
            own: HashMap::new(),
            counters,
            records: Vec::new(),
            candidates: Vec::new(),
        })
    }

    /// The options in force.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Replaces the caller-supplied exclusion set; applies from the next snapshot on.
    pub fn set_excluded_ports(&mut self, ports: BTreeSet<(Protocol, u16)>) {
        self.options.exclude_ports = ports;
    }

    /// The ephemeral range used for the UDP exclusion.
    pub fn ephemeral_range(&self) -> PortRange {
        self.ephemeral
    }

    /// The current listeners, filtered by the options.
    pub fn snapshot(&mut self) -> Result<ListenerSet, Error> {
        self.collect()?;
        if self.options.exclude_own_process {
            let foreign = self.classify_own();
            if !foreign.is_empty() {
                // A socket of ours closed between the dump and the read of /proc/self/fd looks
                // foreign (its descriptor is gone) though it was ours: reported, it would be
                // mirrored back to where it came from (a loop). Such a socket is gone from a
                // second dump taken after the read, while a foreign one is still there, so the
                // newly seen foreign sockets are confirmed by dumping again (tens of µs).
                let first = std::mem::take(&mut self.candidates);
                self.collect()?;
                let live: HashSet<u32> = self.candidates.iter().map(|l| l.inode).collect();
                self.candidates = first
                    .into_iter()
                    .filter(|l| !foreign.contains(&l.inode) || live.contains(&l.inode))
                    .collect();
                for ino in foreign.difference(&live) {
                    self.own.remove(ino);
                }
            }
            Ok(self
                .candidates
                .iter()
                .filter(|l| !self.own.get(&l.inode).copied().unwrap_or(false))
                .copied()
                .collect())
        } else {
            Ok(self.candidates.iter().copied().collect())
        }
    }

    /// Dumps every socket the options ask for into `records` and the listeners among them into
    /// `candidates`.
    fn collect(&mut self) -> Result<(), Error> {
        self.records.clear();
        let families: &[u8] = match (self.options.ipv4, self.options.ipv6) {
            (true, true) => &[libc::AF_INET as u8, libc::AF_INET6 as u8],
            (true, false) => &[libc::AF_INET as u8],
            (false, true) => &[libc::AF_INET6 as u8],
            (false, false) => &[],
        };
        self.candidates.clear();
        for &family in families {
            if self.options.tcp {
                let start = self.records.len();
                self.dump(family, libc::IPPROTO_TCP as u8, StateFlags::LISTEN)?;
                for r in &self.records[start..] {
                    if let Some(l) = self.to_listener(Protocol::Tcp, r) {
                        self.candidates.push(l);
                    }
                }
            }
            if self.options.udp {
                let start = self.records.len();
                self.dump(family, libc::IPPROTO_UDP as u8, StateFlags::CLOSE)?;
                for r in &self.records[start..] {
                    if let Some(l) = self.to_listener(Protocol::Udp, r) {
                        self.candidates.push(l);
                    }
                }
            }
        }

        Ok(())
    }

    /// One dump into `records`. A dump that took several datagrams is done twice and the results
    /// merged: the kernel resumes a dump by position within a hash bucket, so a socket closed
    /// between two datagrams can make it skip a live one, which would be reported as a removal
    /// and an addition 50 ms later. A listener seen by either of two back-to-back dumps is live or
    /// was a moment ago (then the next poll reports it removed). Small dumps (a few hundred
    /// listeners fit one datagram) are done once.
    fn dump(&mut self, family: u8, protocol: u8, states: StateFlags) -> Result<(), Error> {
        let batches =
            self.sock
                .dump(family, protocol, states, &self.counters, &mut self.records)?;
        if batches > 1 {
            self.sock
                .dump(family, protocol, states, &self.counters, &mut self.records)?;
        }
        Ok(())
    }

    /// Fills `own` for every candidate inode, reading /proc/self/fd only if one is new, and
    /// forgets inodes no longer seen. Returns the new inodes found not to be ours.
    fn classify_own(&mut self) -> HashSet<u32> {
        let seen: HashSet<u32> = self.candidates.iter().map(|l| l.inode).collect();
        self.own.retain(|ino, _| seen.contains(ino));
        let mut foreign = HashSet::new();
        if seen.iter().all(|ino| self.own.contains_key(ino)) {
            return foreign;
        }
        match own_socket_inodes() {
            Ok(mine) => {
                for ino in seen {
                    if let std::collections::hash_map::Entry::Vacant(v) = self.own.entry(ino) {
                        let ours = mine.contains(&ino);
                        v.insert(ours);
                        if !ours {
                            foreign.insert(ino);
                        }
                    }
                }
            }
            Err(e) => {
                // Without /proc/self/fd nothing can be excluded as ours: say so once per new
                // socket (they are remembered as not ours) and report them.
                tracing::warn!(error = %e, "cannot tell this process's sockets apart");
                for ino in seen {
                    self.own.entry(ino).or_insert(false);
                }
            }
        }
        foreign
    }

    /// The listener a record describes, or `None` if it is not one or is excluded (other than as
    /// this process's own, which is decided later, in bulk).
    fn to_listener(&self, proto: Protocol, r: &DiagRecord) -> Option<Listener> {
        if r.src_port == 0 {
            return None;
        }
        match proto {
            Protocol::Tcp if r.state != STATE_LISTEN => return None,
            Protocol::Udp => {
                if r.state != STATE_CLOSE || r.dst_port != 0 || !r.dst.is_unspecified() {
                    return None;
                }
                if self.options.exclude_udp_ephemeral && self.ephemeral.contains(r.src_port) {
                    return None;
                }
            }
            Protocol::Tcp => {}
        }
        if self.options.exclude_ports.contains(&(proto, r.src_port)) {
            return None;
        }
        Some(Listener {
            proto,
            addr: r.src,
            port: r.src_port,
            v6only: match r.src {
                IpAddr::V4(_) => None,
                IpAddr::V6(_) => r.v6only,
            },
            inode: r.inode,
            uid: r.uid,
            ifindex: r.ifindex,
        })
    }

    pub(crate) fn malformed(&self) -> u64 {
        self.counters.malformed.load(Ordering::Relaxed)
    }
}
