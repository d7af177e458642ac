//! The reverse direction: the host's listeners mirrored on the VM's loopback. Each accepted
//! connection (or new UDP client) becomes a `DialBack` request on the control stream; the
//! forwarder answers with a `DialBack(id)` stream that arrives through the transport listener.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hostnet_link::discovery::Protocol;
use hostnet_link::proto::{
    self, Changes, DialBack, DialBackId, Gap, PayloadStream, Proto, Snapshot,
};
use hostnet_link::transport::Stream;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::agent::{DialBackTx, PendingGuard, Shared, lock};
use crate::policy::{self, MirrorKey};
use crate::relay::{self, UdpSide};

/// First and longest pause between attempts to bind a port that is taken in the VM.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Datagrams queued per reverse UDP flow (while its dial-back is pending, or the link is slow);
/// more are dropped.
const FLOW_QUEUE: usize = 256;

/// What the mirror tasks of one control session share.
struct Ctx {
    shared: Arc<Shared>,
    /// The session's token: connections and flows stop (reset) when the session ends.
    cancel: CancellationToken,
    dial_tx: DialBackTx,
}

struct Mirror {
    target: SocketAddr,
    _task: AbortOnDropHandle<()>,
}

/// The reverse mirrors of one control session; dropping it closes them all.
pub(crate) struct Reverse {
    ctx: Arc<Ctx>,
    host: proto::ListenerSet,
    guest: BTreeSet<(Proto, u16)>,
    mirrors: HashMap<MirrorKey, Mirror>,
    skipped: BTreeSet<proto::Listener>,
}

impl Reverse {
    pub fn new(shared: Arc<Shared>, cancel: CancellationToken, dial_tx: DialBackTx) -> Self {
        Self {
            ctx: Arc::new(Ctx {
                shared,
                cancel,
                dial_tx,
            }),
            host: proto::ListenerSet::awaiting_snapshot(),
            guest: BTreeSet::new(),
            mirrors: HashMap::new(),
            skipped: BTreeSet::new(),
        }
    }

    /// A `Snapshot{Host}`.
    pub fn host_snapshot(&mut self, s: &Snapshot) {
        self.host.replace(s);
        tracing::info!(
            seq = s.seq,
            listeners = s.listeners.len(),
            "host listener snapshot"
        );
        self.reconcile();
    }

    /// A `Changes{Host}`; a gap leaves everything as it was (the caller asks for a resync).
    pub fn host_changes(&mut self, c: &Changes) -> Result<(), Gap> {
        let d = self.host.apply(c)?;
        tracing::info!(seq = c.seq, added = ?d.added, removed = ?d.removed, "host listeners changed");
        self.reconcile();
        Ok(())
    }

    /// The set the agent reports: host listeners on those ports are not mirrored.
    pub fn set_guest(&mut self, reported: &BTreeSet<proto::Listener>) {
        let ports: BTreeSet<(Proto, u16)> = reported.iter().map(|l| (l.proto, l.port)).collect();
        if ports != self.guest {
            self.guest = ports;
            self.reconcile();
        }
    }

    fn reconcile(&mut self) {
        let (want, skipped) = policy::reverse_mirrors(self.host.listeners(), &self.guest);
        let skipped: BTreeSet<_> = skipped.into_iter().collect();
        for l in skipped.difference(&self.skipped) {
            tracing::info!(listener = ?l, "host listener not mirrored: the guest reports that port itself");
        }
        self.skipped = skipped;
        self.mirrors.retain(|key, m| {
            let keep = want.get(key) == Some(&m.target);
            if !keep {
                tracing::info!(bind = %key.bind, proto = ?key.proto, host = %m.target, "reverse mirror removed");
            }
            keep
        });
        for (key, target) in want {
            if self.mirrors.contains_key(&key) {
                continue;
            }
            let ctx = self.ctx.clone();
            let span =
                tracing::info_span!("mirror", proto = ?key.proto, bind = %key.bind, host = %target);
            let task = match key.proto {
                Proto::Tcp => tokio::spawn(tcp_mirror(ctx, key, target).instrument(span)),
                Proto::Udp => tokio::spawn(udp_mirror(ctx, key, target).instrument(span)),
            };
            self.mirrors.insert(
                key,
                Mirror {
                    target,
                    _task: AbortOnDropHandle::new(task),
                },
            );
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
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Binds, retrying with back-off while the port is taken in the VM (logged once per cause).
async fn bind_retry<T>(mut bind: impl FnMut() -> io::Result<T>) -> T {
    let mut backoff = RETRY_FIRST;
    let mut last: Option<io::ErrorKind> = None;
    loop {
        match bind() {
            Ok(t) => return t,
            Err(e) => {
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
    _guard: crate::agent::MirrorGuard,
}

impl<T> std::ops::Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.io
    }
}

async fn tcp_mirror(ctx: Arc<Ctx>, key: MirrorKey, target: SocketAddr) {
    let listener = Held {
        io: bind_retry(|| bind_tcp(key.bind)).await,
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

async fn udp_mirror(ctx: Arc<Ctx>, key: MirrorKey, target: SocketAddr) {
    // Flows hold the socket too: the guard lives exactly as long as the socket.
    let sock = Arc::new(Held {
        io: bind_retry(|| bind_udp(key.bind)).await,
        _guard: ctx.shared.mirror_guard(Protocol::Udp, key.bind.port()),
    });
    tracing::info!("mirroring host listener");
    let mut flows: HashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut generation = 0u64;
    let mut buf = vec![0u8; proto::MAX_DATAGRAM];
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (n, client) = match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "UDP receive failed");
                        continue;
                    }
                };
                let datagram = buf.get(..n).unwrap_or_default().to_vec();
                if let Some((_, tx)) = flows.get(&client) {
                    if tx.try_send(datagram).is_err() {
                        tracing::debug!(%client, "reverse UDP flow queue full; datagram dropped");
                    }
                    continue;
                }
                let Ok(permit) = ctx.shared.udp_flows.clone().try_acquire_owned() else {
                    ctx.shared.counters.udp_flows_full.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%client, max = ctx.shared.config.max_udp_flows, "too many UDP flows; datagram dropped");
                    continue;
                };
                generation += 1;
                let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                let _ = tx.try_send(datagram);
                flows.insert(client, (generation, tx));
                let (ctx, sock, done) = (ctx.clone(), sock.clone(), done_tx.clone());
                let g = generation;
                let span = tracing::info_span!("reverse-udp", %client, host = %target);
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(link) = dial_back(&ctx, Proto::Udp, target, client).await {
                        let side = UdpSide::Shared { sock: &sock, client, rx };
                        relay::relay_datagrams(link, side, ctx.shared.config.udp_timeout, &ctx.cancel).await;
                    }
                    let _ = done.send((client, g));
                }.instrument(span));
            }
            Some((client, g)) = done_rx.recv() => {
                if flows.get(&client).is_some_and(|(x, _)| *x == g) {
                    flows.remove(&client);
                }
            }
        }
    }
}
