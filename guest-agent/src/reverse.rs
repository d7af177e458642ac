//! The reverse direction: the host's listeners mirrored on the VM's loopback. Each accepted
//! TCP connection becomes a `DialBack` request on the control stream; the forwarder answers
//! with a `DialBack(id)` stream that arrives through the transport listener. A UDP mirror's
//! clients become flows on the session's datagram channel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hostnet_link::discovery::Protocol;
use hostnet_link::proto::{
    self, BindState, Changes, DialBack, DialBackId, Gap, MirrorState, PayloadStream, Proto,
    Snapshot,
};
use hostnet_link::transport::Stream;
use hostnet_link::udp;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::policy::{self, MirrorKey};
use crate::relay;
use crate::shared::{DialBackTx, PendingGuard, Shared, lock};

/// First and longest pause between attempts to bind a port that is taken in the VM.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Bind results queued from the mirror tasks to the control session.
pub(crate) const STATE_QUEUE: usize = 256;

/// A mirror task's bind result, for the session to pass on as a `MirrorState`.
#[derive(Debug)]
pub(crate) struct BindEvent {
    key: MirrorKey,
    /// Which incarnation of the mirror at `key` (a late event of a replaced one is ignored).
    generation: u64,
    state: BindState,
    reason: Option<String>,
}

pub(crate) type StateTx = mpsc::Sender<BindEvent>;

/// What the mirror tasks of one control session share.
struct Ctx {
    shared: Arc<Shared>,
    /// The session's token: connections and flows stop (reset) when the session ends.
    cancel: CancellationToken,
    dial_tx: DialBackTx,
    /// Where bind results go; `None` when the forwarder does not take `MirrorState`.
    state_tx: Option<StateTx>,
    /// Whether the forwarder speaks the datagram channel (else host UDP listeners are not
    /// mirrored).
    udp: bool,
}

struct Mirror {
    target: SocketAddr,
    /// The reported host listener addresses this mirror serves.
    hosts: Vec<IpAddr>,
    generation: u64,
    /// The last bind result sent to the forwarder.
    sent: Option<(BindState, Option<String>)>,
    _task: AbortOnDropHandle<()>,
}

/// The reverse mirrors of one control session; dropping it closes them all.
pub(crate) struct Reverse {
    ctx: Arc<Ctx>,
    host: proto::ListenerSet,
    guest: BTreeSet<(Proto, u16)>,
    mirrors: HashMap<MirrorKey, Mirror>,
    skipped: BTreeSet<proto::Listener>,
    generation: u64,
}

impl Reverse {
    /// `state_tx`: where the mirror tasks report their bind results (see
    /// [`Reverse::bind_event`]); `None` if the forwarder does not take them.
    pub fn new(
        shared: Arc<Shared>,
        cancel: CancellationToken,
        dial_tx: DialBackTx,
        state_tx: Option<StateTx>,
        udp: bool,
    ) -> Self {
        Self {
            ctx: Arc::new(Ctx {
                shared,
                cancel,
                dial_tx,
                state_tx,
                udp,
            }),
            host: proto::ListenerSet::awaiting_snapshot(),
            guest: BTreeSet::new(),
            mirrors: HashMap::new(),
            skipped: BTreeSet::new(),
            generation: 0,
        }
    }

    /// A `Snapshot{Host}`; returns the `MirrorState`s to send.
    pub fn host_snapshot(&mut self, s: &Snapshot) -> Vec<MirrorState> {
        self.host.replace(s);
        tracing::info!(
            seq = s.seq,
            listeners = s.listeners.len(),
            "host listener snapshot"
        );
        self.reconcile()
    }

    /// A `Changes{Host}`; a gap leaves everything as it was (the caller asks for a resync).
    /// Returns the `MirrorState`s to send.
    pub fn host_changes(&mut self, c: &Changes) -> Result<Vec<MirrorState>, Gap> {
        let d = self.host.apply(c)?;
        tracing::info!(seq = c.seq, added = ?d.added, removed = ?d.removed, "host listeners changed");
        Ok(self.reconcile())
    }

    /// The set the agent reports: host listeners on those ports are not mirrored. Returns the
    /// `MirrorState`s to send.
    pub fn set_guest(&mut self, reported: &BTreeSet<proto::Listener>) -> Vec<MirrorState> {
        let ports: BTreeSet<(Proto, u16)> = reported.iter().map(|l| (l.proto, l.port)).collect();
        if ports == self.guest {
            return Vec::new();
        }
        self.guest = ports;
        self.reconcile()
    }

    /// A mirror task's bind result: the `MirrorState` to send, if it is news for a current
    /// mirror.
    pub fn bind_event(&mut self, ev: BindEvent) -> Option<MirrorState> {
        let m = self
            .mirrors
            .get_mut(&ev.key)
            .filter(|m| m.generation == ev.generation)?;
        let now = (ev.state, ev.reason);
        if m.sent.as_ref() == Some(&now) {
            return None;
        }
        m.sent = Some(now.clone());
        Some(mirror_state(&ev.key, m.hosts.clone(), now.0, now.1))
    }

    fn reconcile(&mut self) -> Vec<MirrorState> {
        let (mut want, skipped) = policy::reverse_mirrors(self.host.listeners(), &self.guest);
        if !self.ctx.udp {
            want.retain(|k, _| k.proto != Proto::Udp);
        }
        let skipped: BTreeSet<_> = skipped.into_iter().collect();
        for l in skipped.difference(&self.skipped) {
            tracing::info!(listener = ?l, "host listener not mirrored: the guest reports that port itself");
        }
        self.skipped = skipped;
        // The host listener addresses behind each wanted mirror.
        let mut hosts: BTreeMap<MirrorKey, Vec<IpAddr>> = BTreeMap::new();
        for l in self.host.listeners() {
            for bind in policy::mirror_binds(l) {
                let key = MirrorKey {
                    proto: l.proto,
                    bind,
                };
                if want.contains_key(&key) {
                    let h = hosts.entry(key).or_default();
                    if !h.contains(&l.addr) {
                        h.push(l.addr);
                    }
                }
            }
        }
        for (key, h) in &mut hosts {
            if h.len() > proto::MAX_MIRROR_HOSTS {
                tracing::warn!(bind = %key.bind, proto = ?key.proto, hosts = h.len(), max = proto::MAX_MIRROR_HOSTS, "too many host listeners behind one mirror; its state names the first ones only");
                h.truncate(proto::MAX_MIRROR_HOSTS);
            }
        }
        let mut out = Vec::new();
        self.mirrors.retain(|key, m| {
            let keep = want.get(key) == Some(&m.target);
            if !keep {
                tracing::info!(bind = %key.bind, proto = ?key.proto, host = %m.target, "reverse mirror removed");
                if m.sent.is_some() {
                    out.push(mirror_state(key, m.hosts.clone(), BindState::Closed, None));
                }
            }
            keep
        });
        for (key, m) in &mut self.mirrors {
            let h = hosts.remove(key).unwrap_or_default();
            if h != m.hosts {
                m.hosts = h;
                if let Some((state, reason)) = &m.sent {
                    out.push(mirror_state(key, m.hosts.clone(), *state, reason.clone()));
                }
            }
        }
        for (key, target) in want {
            if self.mirrors.contains_key(&key) {
                continue;
            }
            self.generation += 1;
            let generation = self.generation;
            let ctx = self.ctx.clone();
            let span =
                tracing::info_span!("mirror", proto = ?key.proto, bind = %key.bind, host = %target);
            let task = match key.proto {
                Proto::Tcp => {
                    tokio::spawn(tcp_mirror(ctx, key, generation, target).instrument(span))
                }
                Proto::Udp => {
                    tokio::spawn(udp_mirror(ctx, key, generation, target).instrument(span))
                }
            };
            self.mirrors.insert(
                key,
                Mirror {
                    target,
                    hosts: hosts.remove(&key).unwrap_or_default(),
                    generation,
                    sent: None,
                    _task: AbortOnDropHandle::new(task),
                },
            );
        }
        out
    }
}

fn mirror_state(
    key: &MirrorKey,
    hosts: Vec<IpAddr>,
    state: BindState,
    reason: Option<String>,
) -> MirrorState {
    MirrorState {
        proto: key.proto,
        port: key.bind.port(),
        bind: key.bind.ip(),
        hosts,
        state,
        reason,
    }
}

/// The state a failed bind puts a mirror in, with its reason (cut to the protocol's limit).
fn failed_state(e: &io::Error, port: u16) -> (BindState, String) {
    let (state, reason) = match e.raw_os_error() {
        Some(libc::EADDRINUSE) => (BindState::Conflict, "address in use in the VM".to_owned()),
        Some(libc::EACCES | libc::EPERM) if port < 1024 => (
            BindState::Conflict,
            "permission denied in the VM (port < 1024)".to_owned(),
        ),
        Some(libc::EACCES | libc::EPERM) => (
            BindState::Conflict,
            "permission denied in the VM".to_owned(),
        ),
        _ => (BindState::Retrying, format!("cannot bind in the VM: {e}")),
    };
    (state, MirrorState::cut_reason(reason))
}

/// Reports a bind result to the session (if the forwarder takes them). Waits for room rather
/// than dropping: results are rare (one per change of the bind's outcome).
async fn report(
    ctx: &Ctx,
    key: MirrorKey,
    generation: u64,
    state: BindState,
    reason: Option<String>,
) {
    if let Some(tx) = &ctx.state_tx {
        let ev = BindEvent {
            key,
            generation,
            state,
            reason,
        };
        if tx.send(ev).await.is_err() {
            tracing::debug!("control session gone; mirror state not sent");
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Lets the port be taken again while old connections sit in TIME_WAIT; a LISTEN socket on
    // the port still makes bind fail.
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Best effort: a smaller buffer only means earlier drops under a burst.
    let _ = s.set_recv_buffer_size(udp::LISTENER_RECV_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Binds, retrying with back-off while the port is taken in the VM (logged once per cause);
/// reports each change of the outcome to the forwarder.
async fn bind_retry<T>(
    ctx: &Ctx,
    key: MirrorKey,
    generation: u64,
    mut bind: impl FnMut() -> io::Result<T>,
) -> T {
    let mut backoff = RETRY_FIRST;
    let mut last: Option<io::ErrorKind> = None;
    let mut reported: Option<(BindState, String)> = None;
    loop {
        match bind() {
            Ok(t) => {
                report(ctx, key, generation, BindState::Active, None).await;
                return t;
            }
            Err(e) => {
                let now = failed_state(&e, key.bind.port());
                if reported.as_ref() != Some(&now) {
                    report(ctx, key, generation, now.0, Some(now.1.clone())).await;
                    reported = Some(now);
                }
                if last != Some(e.kind()) {
                    if e.kind() == io::ErrorKind::AddrInUse {
                        tracing::info!("port in use in the VM; not mirrored until it frees");
                    } else {
                        tracing::warn!(error = %e, "cannot bind the reverse mirror; retrying");
                    }
                    last = Some(e.kind());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// A reverse mirror's socket with the guard that keeps its port out of the reported set. Fields
/// drop in order: the socket is closed before the port may be reported again, so a discovery poll
/// can never see a mirror that is no longer excluded (which would loop it back to the host).
struct Held<T> {
    io: T,
    _guard: crate::shared::MirrorGuard,
}

impl<T> std::ops::Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.io
    }
}

async fn tcp_mirror(ctx: Arc<Ctx>, key: MirrorKey, generation: u64, target: SocketAddr) {
    let listener = Held {
        io: bind_retry(&ctx, key, generation, || bind_tcp(key.bind)).await,
        _guard: ctx.shared.mirror_guard(Protocol::Tcp, key.bind.port()),
    };
    tracing::info!("mirroring host listener");
    loop {
        match listener.accept().await {
            Ok((conn, client)) => {
                let span = tracing::info_span!("reverse-tcp", %client, host = %target);
                tokio::spawn(tcp_conn(ctx.clone(), conn, target, client).instrument(span));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn tcp_conn(ctx: Arc<Ctx>, conn: TcpStream, target: SocketAddr, client: SocketAddr) {
    let Ok(_permit) = ctx.shared.streams.clone().try_acquire_owned() else {
        ctx.shared
            .counters
            .streams_full
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            max = ctx.shared.config.max_streams,
            "too many streams; resetting the guest client"
        );
        relay::reset_tcp(conn);
        return;
    };
    match dial_back(&ctx, Proto::Tcp, target, client).await {
        Some(link) => {
            let _ = conn.set_nodelay(true);
            relay::relay_tcp(link, conn, &ctx.cancel).await;
        }
        None => relay::reset_tcp(conn),
    }
}

/// Asks the forwarder for a stream to `target` and waits for it and its status.
async fn dial_back(
    ctx: &Ctx,
    proto: Proto,
    target: SocketAddr,
    client: SocketAddr,
) -> Option<PayloadStream<Stream>> {
    let shared = &ctx.shared;
    let id = shared.next_dial_back.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    lock(&shared.pending).insert(id, tx);
    let _pending = PendingGuard {
        shared: shared.clone(),
        id,
    };
    shared.counters.dial_backs.fetch_add(1, Ordering::Relaxed);
    let request = DialBack {
        id: DialBackId(id),
        proto,
        target,
        client,
    };
    let fail = |why: &str| {
        shared
            .counters
            .dial_back_failed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(id, reason = why, "dial-back failed");
        None
    };
    let wait = async {
        if ctx.dial_tx.send(request).await.is_err() {
            return Err("the control session is gone".to_owned());
        }
        let (mut stream, mode) = rx
            .await
            .map_err(|_| "the control session is gone".to_owned())?;
        let status = proto::read_status(&mut stream, proto::STATUS_TIMEOUT)
            .await
            .map_err(|e| format!("no status on the dial-back stream: {e}"))?;
        if !status.is_ok() {
            return Err(format!("forwarder answered {status:?}"));
        }
        Ok(PayloadStream::new(stream, mode))
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(proto::STATUS_TIMEOUT, wait) => r,
        () = ctx.cancel.cancelled() => return fail("the control session ended"),
    };
    match outcome {
        Ok(Ok(link)) => {
            tracing::debug!(id, "dial-back stream up");
            Some(link)
        }
        Ok(Err(why)) => fail(&why),
        Err(_) => fail("no dial-back stream in time"),
    }
}

/// A host UDP listener mirrored on the VM's loopback: each VM client's datagrams go to the
/// forwarder on the session's datagram channel (a flow per client), the host service's replies
/// come back from this socket.
async fn udp_mirror(ctx: Arc<Ctx>, key: MirrorKey, generation: u64, target: SocketAddr) {
    let sock = Held {
        io: Arc::new(bind_retry(&ctx, key, generation, || bind_udp(key.bind)).await),
        _guard: ctx.shared.mirror_guard(Protocol::Udp, key.bind.port()),
    };
    tracing::info!("mirroring host listener");
    let mut channels = ctx.shared.channel.subscribe();
    loop {
        // Registered with the current channel; dropped (its flows closed) before the socket.
        let listener = channels
            .borrow_and_update()
            .as_ref()
            .map(|c| c.listener(sock.io.clone(), target, None));
        let pump = async {
            match &listener {
                Some(l) => l.pump(&sock.io).await,
                // No channel (yet): datagrams are read and dropped, counted.
                None => drop_all(&ctx, &sock.io).await,
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = pump => {}
            changed = channels.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

/// Reads and drops a mirror's datagrams while there is no datagram channel, counting them.
async fn drop_all(ctx: &Ctx, sock: &UdpSocket) {
    let mut buf = [0u8; 64];
    while let Ok((_, client)) = sock.recv_from(&mut buf).await {
        ctx.shared
            .udp
            .datagrams_dropped
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%client, "no datagram channel yet; datagram dropped");
    }
}
