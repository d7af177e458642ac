//! The UDP proxy: one task, one front socket, one connected socket per flow.
//!
//! A flow is keyed by the client's address and the local address the client sent to (a wildcard
//! front socket learns it from `IP_PKTINFO` / `IPV6_PKTINFO`), so one client talking to two host
//! addresses makes two flows, and each reply leaves from the address its client targeted. Each
//! flow has a connected socket towards the container, so the container tells clients apart by
//! source port, as with docker-proxy. The flow sockets sit in one epoll set owned by this task:
//! no task or thread per flow, and a wake-up costs only the flows that are ready.
//!
//! The front socket is read in batches with recvmmsg(2). A datagram larger than the receive
//! slot (`HOSTNET_PROXY_UDP_MAX_DATAGRAM`) is counted and dropped, never forwarded cut. A send
//! that would block is dropped and counted rather than stalling every other flow.
//! `ECONNREFUSED` on a flow socket (a queued ICMP error from a container port that is not
//! listening yet) does not end the flow: the datagram is sent once more, and the next datagram
//! goes through as soon as the container listens.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::rc::Rc;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recv, recvmmsg,
    sendmsg,
};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::flows::{FlowId, FlowTable};

/// Datagrams read per recvmmsg(2).
const BATCH: usize = 32;
/// Replies read from one flow socket per wake-up before the others get a turn.
const FLOW_BUDGET: usize = 64;
/// Socket buffers asked for on the front socket, so bursts are queued rather than lost.
const FRONT_BUFFER: usize = 4 << 20;

/// A flow's identity: who sent, and to which of our addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The local address the client's datagram was sent to.
    pub local: IpAddr,
}

#[derive(Debug)]
struct Flow {
    sock: UdpSocket,
    /// Interface the client's datagram came in on (used for link-local IPv6 replies only).
    ifindex: u32,
}

/// What happened, for the log and the tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Datagrams sent to the container.
    pub to_backend: u64,
    /// Datagrams sent back to clients.
    pub to_client: u64,
    /// Flows opened.
    pub flows_opened: u64,
    /// Flows evicted at the cap.
    pub flows_evicted: u64,
    /// Flows closed after their idle timeout.
    pub flows_expired: u64,
    /// Datagrams larger than the receive slot, dropped.
    pub truncated: u64,
    /// Datagrams dropped because a send would block or failed.
    pub dropped: u64,
}

/// A front socket with its epoll set of flow sockets.
#[derive(Debug)]
struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// The UDP proxy's state.
#[derive(Debug)]
pub struct UdpProxy {
    front: tokio::net::UdpSocket,
    front_v6: bool,
    /// The front socket's own address: the flow's local address when no packet info came.
    front_ip: IpAddr,
    backend: SocketAddr,
    flows: FlowTable<FlowKey, Flow>,
    epoll: Rc<AsyncFd<EpollFd>>,
    slot: usize,
    bufs: Vec<u8>,
    reply: Vec<u8>,
    /// Counters since start.
    pub counters: Counters,
}

impl UdpProxy {
    /// Wraps a bound front socket (non-blocking, packet info on). Needs a tokio runtime.
    pub fn new(front: UdpSocket, backend: SocketAddr, config: &Config) -> io::Result<UdpProxy> {
        let front_ip = front.local_addr()?.ip();
        let front_v6 = front_ip.is_ipv6();
        let sock = SockRef::from(&front);
        // As root (dockerd's proxies are) the force variant passes net.core.rmem_max.
        if sock.set_recv_buffer_size(FRONT_BUFFER).is_ok() {
            let _ = nix::sys::socket::setsockopt(
                &front,
                nix::sys::socket::sockopt::RcvBufForce,
                &FRONT_BUFFER,
            );
        }
        let _ = sock.set_send_buffer_size(FRONT_BUFFER);
        let _ = nix::sys::socket::setsockopt(
            &front,
            nix::sys::socket::sockopt::SndBufForce,
            &FRONT_BUFFER,
        );
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        // One spare byte per slot: a datagram that fills the slot exactly is whole; the kernel
        // flags anything longer with MSG_TRUNC.
        let slot = config.udp_max_datagram;
        Ok(UdpProxy {
            front: tokio::net::UdpSocket::from_std(front)?,
            front_v6,
            front_ip,
            backend,
            flows: FlowTable::new(config.udp_max_flows, config.udp_timeout),
            // SAFETY: the epoll descriptor is owned by `EpollFd`, which the AsyncFd owns: it stays
            // open and the same for the AsyncFd's whole life.
            epoll: Rc::new(
                unsafe { AsyncFd::register_with_interest(EpollFd(epoll), Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)?,
            ),
            slot,
            // Zeroed allocations come from untouched pages: memory is only used once traffic
            // of that size arrives.
            bufs: vec![0; slot * BATCH],
            reply: vec![0; slot],
            counters: Counters::default(),
        })
    }

    /// Serves until a fatal error on the front socket, which is returned.
    pub async fn serve(&mut self) -> io::Error {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(
            BATCH,
            Some(nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo)),
        );
        let mut meta: Vec<Meta> = Vec::with_capacity(BATCH);
        let epoll = Rc::clone(&self.epoll);
        loop {
            let expiry = self.flows.next_expiry();
            tokio::select! {
                r = self.front.readable() => {
                    if let Err(e) = r {
                        return e;
                    }
                    if let Err(e) = self.relay_client_datagrams(&mut headers, &mut meta) {
                        return e;
                    }
                }
                guard = epoll.readable() => {
                    match guard {
                        Ok(mut guard) => {
                            if self.relay_backend_replies() {
                                guard.clear_ready();
                            }
                        }
                        Err(e) => return e,
                    }
                }
                () = sleep_until(expiry) => self.expire(),
            }
        }
    }

    /// Reads every datagram queued on the front socket and forwards it.
    fn relay_client_datagrams(
        &mut self,
        headers: &mut MultiHeaders<SockaddrStorage>,
        meta: &mut Vec<Meta>,
    ) -> io::Result<()> {
        loop {
            meta.clear();
            let fd = self.front.as_raw_fd();
            let slot = self.slot;
            let bufs = &mut self.bufs;
            let res = self.front.try_io(Interest::READABLE, || {
                // On the stack: no allocation per batch. `bufs` holds exactly BATCH slots.
                let mut chunks = bufs.chunks_mut(slot);
                let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                    std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
                let results = recvmmsg(fd, headers, iovs.iter_mut(), MsgFlags::empty(), None)
                    .map_err(io::Error::from)?;
                for m in results {
                    meta.push(Meta::from_recv(&m));
                }
                Ok(())
            });
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors reported on the front socket concern one client; not fatal.
                Err(e) if is_per_peer(&e) => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            let front_ip = self.front_ip;
            let mut i = 0;
            while i < meta.len() {
                let m = &meta[i];
                if m.truncated {
                    self.counters.truncated += 1;
                    if self.counters.truncated.is_power_of_two() {
                        warn!(client = ?m.client, max = slot, total = self.counters.truncated,
                            "datagram larger than HOSTNET_PROXY_UDP_MAX_DATAGRAM dropped");
                    }
                    i += 1;
                    continue;
                }
                let Some(client) = m.client else {
                    i += 1;
                    continue;
                };
                let key = FlowKey {
                    client,
                    local: m.local.unwrap_or(front_ip),
                };
                // Consecutive datagrams of one flow go out in one sendmmsg(2).
                let mut run = [IoSlice::new(&[]); BATCH];
                let mut len = 0;
                for (j, n) in meta[i..].iter().enumerate() {
                    if n.truncated
                        || n.client != Some(client)
                        || n.local.unwrap_or(front_ip) != key.local
                    {
                        break;
                    }
                    let off = (i + j) * slot;
                    run[len] = IoSlice::new(&self.bufs[off..off + n.len]);
                    len += 1;
                }
                let ifindex = m.ifindex;
                i += len;
                let (sent, err) = match self.flows.touch(&key, now) {
                    Some((_, flow)) => send_run(&flow.sock, &run[..len]),
                    None => match open_flow(self.backend) {
                        Ok(sock) => {
                            let r = send_run(&sock, &run[..len]);
                            self.add_flow(key, Flow { sock, ifindex }, now);
                            r
                        }
                        Err(e) => {
                            warn!(client = %client, error = %e,
                                "cannot open a flow to the container; datagrams dropped");
                            (0, Some(e))
                        }
                    },
                };
                self.counters.to_backend += sent as u64;
                if let Some(e) = err {
                    self.counters.dropped += (len - sent) as u64;
                    debug!(client = %client, backend = %self.backend, error = %e, dropped = len - sent,
                        "Can't proxy a datagram to udp/{}: {e}", self.backend);
                }
            }
            if meta.len() < BATCH {
                // Probably drained; the next call sees EAGAIN and clears the readiness. (Clearing
                // it here would be unsafe: recvmmsg also stops early on an error it stashes.)
                return Ok(());
            }
        }
    }

    fn add_flow(&mut self, key: FlowKey, flow: Flow, now: Instant) {
        let raw = flow.sock.as_raw_fd();
        let (id, evicted) = self.flows.insert(key, flow, now);
        self.counters.flows_opened += 1;
        if let Some((old, f)) = evicted {
            self.counters.flows_evicted += 1;
            debug!(client = %old.client, "flow evicted at the cap (HOSTNET_PROXY_UDP_MAX_FLOWS)");
            self.forget(&f);
        }
        // SAFETY: `raw` is the flow socket just moved into the table, which keeps it open until
        // `forget` removes it from the epoll set.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        if let Err(e) = self
            .epoll
            .get_ref()
            .0
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, id))
        {
            warn!(error = %e, "cannot watch a flow socket; its replies will be lost");
        }
    }

    fn forget(&self, flow: &Flow) {
        let _ = self.epoll.get_ref().0.delete(flow.sock.as_fd());
    }

    /// Reads replies from the ready flow sockets. Returns true when no flow was ready.
    fn relay_backend_replies(&mut self) -> bool {
        let mut events = [EpollEvent::empty(); BATCH];
        let n = match self.epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(Errno::EINTR) => return false,
            Err(e) => {
                warn!(error = %e, "epoll_wait on flow sockets failed");
                return true;
            }
        };
        let now = Instant::now();
        for ev in &events[..n] {
            let Some((key, flow)) = self.flows.touch_id(ev.data() as FlowId, now) else {
                continue;
            };
            let key = *key;
            for _ in 0..FLOW_BUDGET {
                let len = match recv(flow.sock.as_raw_fd(), &mut self.reply, MsgFlags::MSG_TRUNC) {
                    Ok(len) => len,
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    // A queued ICMP error from the container side: the flow lives on.
                    Err(Errno::ECONNREFUSED) => continue,
                    Err(e) => {
                        debug!(client = %key.client, error = %e, "reading a reply failed");
                        break;
                    }
                };
                if len > self.reply.len() {
                    self.counters.truncated += 1;
                    continue;
                }
                match send_to_client(
                    self.front.as_raw_fd(),
                    self.front_v6,
                    &key,
                    flow.ifindex,
                    &self.reply[..len],
                ) {
                    Ok(()) => self.counters.to_client += 1,
                    Err(e) => {
                        self.counters.dropped += 1;
                        debug!(client = %key.client, error = %e, "reply to the client dropped");
                    }
                }
            }
        }
        n == 0
    }

    fn expire(&mut self) {
        for (key, flow) in self.flows.expire(Instant::now()) {
            self.counters.flows_expired += 1;
            debug!(client = %key.client, "flow idle past HOSTNET_PROXY_UDP_TIMEOUT; closed");
            self.forget(&flow);
        }
    }

    /// Flows held now.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Logs the counters (at exit or on demand).
    pub fn log_counters(&self) {
        info!(counters = ?self.counters, flows = self.flows.len(), "udp proxy counters");
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// What one received datagram said about itself.
#[derive(Debug)]
struct Meta {
    client: Option<SocketAddr>,
    local: Option<IpAddr>,
    ifindex: u32,
    len: usize,
    truncated: bool,
}

impl Meta {
    fn from_recv(m: &nix::sys::socket::RecvMsg<'_, '_, SockaddrStorage>) -> Meta {
        let mut local = None;
        let mut ifindex = 0;
        if let Ok(cmsgs) = m.cmsgs() {
            for c in cmsgs {
                match c {
                    ControlMessageOwned::Ipv4PacketInfo(pi) => {
                        local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr))));
                        ifindex = u32::try_from(pi.ipi_ifindex).unwrap_or(0);
                    }
                    ControlMessageOwned::Ipv6PacketInfo(pi) => {
                        local = Some(IpAddr::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr)));
                        ifindex = pi.ipi6_ifindex;
                    }
                    _ => {}
                }
            }
        }
        Meta {
            client: m.address.as_ref().and_then(to_socket_addr),
            local,
            ifindex,
            len: m.bytes,
            truncated: m.flags.contains(MsgFlags::MSG_TRUNC),
        }
    }
}

fn to_socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Errors a datagram socket reports for one peer (queued ICMP), not for the socket.
fn is_per_peer(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENETDOWN
                | libc::EMSGSIZE
        )
    )
}

/// A socket connected to the container, bound to an ephemeral port of the right family.
fn open_flow(backend: SocketAddr) -> io::Result<UdpSocket> {
    let sock = Socket::new(
        Domain::for_address(backend),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    sock.connect(&backend.into())?;
    Ok(sock.into())
}

/// Sends datagrams on a flow socket with sendmmsg(2); returns how many went out and, if not
/// all, the error that stopped the rest. A refusal left over from an earlier ICMP error is
/// consumed by the failed call, so the send is tried once more (as docker-proxy >= 29.5 does).
fn send_run(sock: &UdpSocket, datagrams: &[IoSlice<'_>]) -> (usize, Option<io::Error>) {
    // SAFETY: mmsghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (h, d) in hdrs.iter_mut().zip(datagrams) {
        // IoSlice is ABI-compatible with iovec on Unix; the kernel only reads it.
        h.msg_hdr.msg_iov = std::ptr::from_ref(d).cast_mut().cast::<libc::iovec>();
        h.msg_hdr.msg_iovlen = 1;
    }
    let count = datagrams.len().min(BATCH);
    let mut sent = 0;
    let mut retried = false;
    while sent < count {
        let rest = u32::try_from(count - sent).unwrap_or(0);
        // SAFETY: `hdrs[sent..]` holds at least `rest` initialised headers whose iovecs point
        // into `datagrams`, which outlives the call; the socket is a valid open descriptor.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                hdrs[sent..].as_mut_ptr(),
                rest,
                libc::MSG_DONTWAIT as _,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            sent += n;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::ECONNREFUSED) if !retried => retried = true,
            _ => return (sent, Some(e)),
        }
    }
    (sent, None)
}

/// Sends a reply from the address the client targeted.
fn send_to_client(
    front: RawFd,
    front_v6: bool,
    key: &FlowKey,
    ifindex: u32,
    data: &[u8],
) -> io::Result<()> {
    let iov = [IoSlice::new(data)];
    let dst = SockaddrStorage::from(key.client);
    let send = |cmsgs: &[ControlMessage<'_>]| {
        sendmsg(front, &iov, cmsgs, MsgFlags::MSG_DONTWAIT, Some(&dst))
            .map(|_| ())
            .map_err(io::Error::from)
    };
    match (front_v6, key.local) {
        (_, ip) if ip.is_unspecified() => send(&[]),
        (false, IpAddr::V4(v4)) => {
            let pi = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(v4).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            send(&[ControlMessage::Ipv4PacketInfo(&pi)])
        }
        (true, ip) => {
            let v6 = match ip {
                IpAddr::V6(v6) => v6,
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            };
            // A link-local source needs its interface; any other leaves routing to the kernel.
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            let pi = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                ipi6_ifindex: if link_local { ifindex } else { 0 },
            };
            send(&[ControlMessage::Ipv6PacketInfo(&pi)])
        }
        (false, IpAddr::V6(_)) => send(&[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn flow_keys_tell_local_addresses_apart() {
        let client: SocketAddr = "127.0.0.9:5000".parse().unwrap();
        let a = FlowKey {
            client,
            local: "127.0.0.2".parse().unwrap(),
        };
        let b = FlowKey {
            client,
            local: "127.0.0.3".parse().unwrap(),
        };
        let mut m = HashMap::new();
        m.insert(a, 1);
        m.insert(b, 2);
        assert_eq!(m.len(), 2);
    }
}
