//! The control session: Hello, snapshots and changes of both sides, dial-back requests,
//! heartbeats; reconnection with back-off. See `hostnet_link::proto` for the conversation.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hostnet_link::proto::{
    self, ControlError, ControlMessage, ErrorCode, Heartbeat, Hello, ListenerSet, PayloadStream,
    Proto, ProtoError, Resync, Role, Side, StreamHeader, StreamKind, StreamMode, caps,
};
use hostnet_link::udp;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Inner;
use crate::ctx::bump;
use crate::listen;
use crate::reverse::{self, HostListeners as _};

/// First reconnect delay.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The control stream could not be opened.
    #[error("cannot open the control stream: {0}")]
    Open(#[from] hostnet_link::transport::TransportError),
    /// Reading or writing the control stream failed.
    #[error("control stream: {0}")]
    Proto(#[from] ProtoError),
    /// The agent closed the control stream.
    #[error("the agent closed the control stream")]
    Closed,
    /// No message for the heartbeat timeout.
    #[error("no message from the agent for {0:?} (heartbeat timeout)")]
    HeartbeatTimeout(Duration),
    /// The agent broke the conversation.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The agent reported a fatal error.
    #[error("the agent reported a fatal error ({code:?}): {message}")]
    Fatal {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
}

/// Runs sessions until `shutdown`, reconnecting with back-off.
pub async fn run(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut delay = RECONNECT_FIRST;
    let mut failures = 0u32;
    loop {
        let mut established = false;
        let r = session(&inner, &shutdown, &mut established).await;
        teardown(&inner).await;
        if shutdown.is_cancelled() {
            return;
        }
        if established {
            delay = RECONNECT_FIRST;
            failures = 0;
        }
        let msg = match &r {
            Ok(()) => "the agent closed the session".to_owned(),
            Err(e) => e.to_string(),
        };
        let clean = matches!(r, Ok(()) | Err(SessionError::Closed));
        if established && clean {
            tracing::info!("the agent closed the session; mirrored listeners closed; reconnecting");
        } else if established {
            tracing::warn!(error = %msg, "session lost; mirrored listeners closed; reconnecting");
        } else if failures == 0 {
            tracing::warn!(error = %msg, "cannot reach the agent; retrying with back-off");
        } else {
            tracing::debug!(error = %msg, "cannot reach the agent; retrying");
        }
        failures += 1;
        inner.session_mut(|s| {
            s.connected = false;
            s.last_error = Some(msg);
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// What every end of a session does, whatever ended it (an error, the agent, a timeout, a
/// missing Hello, shutdown): closes everything mirrored for the guest (resetting its
/// connections), forgets the reported host set, and leaves no connection-level state behind, so
/// that the next attempt starts from a fresh connection.
///
/// The last part matters on QUIC: one connection carries every stream, and a peer that vanished
/// without a word (killed, its VM paused, the path gone) leaves it looking alive to quinn until
/// its idle timeout; reusing it, `open_bi` succeeds locally and the next session waits for a
/// Hello that never comes. Closing it here (a CONNECTION_CLOSE the agent sees at once if it is
/// still there) makes the next attempt a new handshake. The other transports open a fresh
/// socket (and, on tcp://, run a fresh token handshake) for every stream already.
async fn teardown(inner: &Inner) {
    inner.mirror().clear();
    inner.set_reported(BTreeSet::new());
    inner.clear_mirror_states();
    if let Some(h) = &inner.host_listeners {
        h.set_excluded_ports(BTreeSet::new());
    }
    inner.ctx.connector.close_connection().await;
}

fn hello(reverse: bool) -> ControlMessage {
    let mut capabilities = vec![caps::UDP_CHANNEL.to_owned(), caps::DIAL_BACK.to_owned()];
    if reverse {
        capabilities.push(caps::REVERSE.to_owned());
        capabilities.push(caps::MIRROR_STATE.to_owned());
    }
    ControlMessage::Hello(Hello {
        revision: proto::CONTROL_REVISION,
        role: Role::Forwarder,
        capabilities,
        auth: None,
    })
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

type Incoming = Result<Option<ControlMessage>, ProtoError>;

async fn session(
    inner: &Arc<Inner>,
    shutdown: &CancellationToken,
    established: &mut bool,
) -> Result<(), SessionError> {
    let mut stream = tokio::select! {
        r = inner.ctx.connector.open() => r?,
        () = shutdown.cancelled() => return Ok(()),
    };
    let mode = StreamMode::for_transport(
        stream.carries_half_close(),
        stream.carries_reset(),
        stream.eof_is_deliberate(),
    );
    proto::write_header(
        &mut stream,
        &StreamHeader {
            kind: StreamKind::Control,
            mode,
        },
    )
    .await?;
    let (mut rd, mut wr) = tokio::io::split(PayloadStream::new(stream, mode));
    let (in_tx, mut in_rx) = mpsc::channel::<Incoming>(64);
    let reader = tokio::spawn(async move {
        loop {
            let r = proto::read_control(&mut rd).await;
            let end = !matches!(r, Ok(Some(_)));
            if in_tx.send(r).await.is_err() || end {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let (out_tx, mut out_rx) = mpsc::channel::<ControlMessage>(256);
    let (werr_tx, mut werr_rx) = mpsc::channel::<ProtoError>(1);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if let Err(e) = proto::write_control(&mut wr, &m).await {
                let _ = werr_tx.send(e).await;
                return;
            }
        }
        // Clean close: half-close at a message boundary (END in framed mode).
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    });
    let want_reverse = inner.config.reverse && inner.host_listeners.is_some();
    let send = |m: ControlMessage| {
        // The queue is deep; a full one means the agent stopped reading: heartbeats will time out.
        let _ = out_tx.try_send(m);
    };
    send(hello(want_reverse));

    // 1. The agent's Hello.
    let first = tokio::time::timeout(proto::HELLO_TIMEOUT, in_rx.recv())
        .await
        .map_err(|_| SessionError::Protocol("no Hello from the agent in time".into()))?;
    let peer = match first {
        Some(Ok(Some(ControlMessage::Hello(h)))) => h,
        Some(Ok(Some(other))) => {
            return Err(protocol_error(&out_tx, format!("expected Hello, got {other:?}")).await);
        }
        Some(Ok(None)) | None => return Err(SessionError::Closed),
        Some(Err(e)) => return Err(e.into()),
    };
    if peer.role != Role::Agent {
        let _ = out_tx
            .send(ControlMessage::Error(ControlError {
                code: ErrorCode::Protocol,
                fatal: true,
                message: "expected the agent's Hello (role Agent)".into(),
            }))
            .await;
        return Err(SessionError::Protocol(format!(
            "the peer says it is a {:?}, not an agent",
            peer.role
        )));
    }
    let reverse = want_reverse && peer.has(caps::REVERSE);
    let udp = peer.has(caps::UDP_CHANNEL);
    if !udp && peer.has("udp") {
        tracing::warn!(
            "the agent is older: it carries UDP as a stream per flow, which this forwarder no longer speaks; UDP listeners are not mirrored (upgrade the agent)"
        );
    }
    *established = true;
    bump(&inner.ctx.counters.sessions);
    tracing::info!(guest = %inner.ctx.connector.endpoint(), ?mode, reverse, udp, revision = peer.revision.min(proto::CONTROL_REVISION), "session established");
    inner.session_mut(|s| {
        s.connected = true;
        s.reverse = reverse;
        s.last_error = None;
    });
    let session_token = shutdown.child_token();
    let _cancel_on_exit = session_token.clone().drop_guard();
    inner.mirror().reset(session_token.clone());
    let channel = if udp {
        Some(open_channel(inner, reverse).await?)
    } else {
        None
    };
    let _close_channel = ChannelGuard(&inner.ctx, channel.clone());

    // 2. Our snapshot.
    let mut host_set = ListenerSet::new();
    let mut host_rx = match (&inner.host_listeners, reverse) {
        (Some(h), true) => {
            let rx = h.subscribe();
            host_set.update(Side::Host, rx.borrow().clone());
            inner.set_reported(host_set.listeners().clone());
            send(ControlMessage::Snapshot(host_set.snapshot(Side::Host)));
            Some(rx)
        }
        _ => None,
    };

    let mut guest = ListenerSet::awaiting_snapshot();
    let mut last_rx = Instant::now();
    let mut hb = tokio::time::interval(proto::HEARTBEAT_INTERVAL);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counter = 0u64;
    loop {
        let host_changed = async {
            match host_rx.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {
                drop(out_tx);
                let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
                return Ok(());
            }
            () = tokio::time::sleep_until(last_rx + proto::HEARTBEAT_TIMEOUT) => {
                return Err(SessionError::HeartbeatTimeout(proto::HEARTBEAT_TIMEOUT));
            }
            () = async {
                match &channel {
                    Some(c) => c.closed().await,
                    None => std::future::pending().await,
                }
            } => return Err(SessionError::Protocol("the datagram channel ended".into())),
            Some(e) = werr_rx.recv() => return Err(e.into()),
            _ = hb.tick() => {
                counter += 1;
                send(ControlMessage::Heartbeat(Heartbeat { counter, unix_millis: unix_millis() }));
            }
            ok = host_changed => {
                if !ok {
                    host_rx = None;
                    continue;
                }
                let Some(rx) = host_rx.as_mut() else { continue };
                let new = rx.borrow_and_update().clone();
                if let Some(ch) = host_set.update(Side::Host, new) {
                    tracing::debug!(added = ch.added.len(), removed = ch.removed.len(), "host listeners changed");
                    inner.set_reported(host_set.listeners().clone());
                    send(ControlMessage::Changes(ch));
                }
            }
            m = in_rx.recv() => {
                let msg = match m {
                    Some(Ok(Some(msg))) => msg,
                    Some(Ok(None)) | None => return Err(SessionError::Closed),
                    Some(Err(e)) => return Err(e.into()),
                };
                last_rx = Instant::now();
                match msg {
                    ControlMessage::Heartbeat(_) => {}
                    ControlMessage::Snapshot(s) if s.side == Side::Guest => {
                        let delta = guest.replace(&s);
                        tracing::debug!(seq = s.seq, listeners = s.listeners.len(), "guest snapshot");
                        apply(inner, delta, mode, &channel, &session_token);
                    }
                    ControlMessage::Changes(c) if c.side == Side::Guest => match guest.apply(&c) {
                        Ok(delta) => apply(inner, delta, mode, &channel, &session_token),
                        Err(gap) => {
                            tracing::warn!(%gap, "asking the agent for a fresh snapshot");
                            send(ControlMessage::Resync(Resync { side: Side::Guest }));
                        }
                    },
                    ControlMessage::Resync(r) if r.side == Side::Host => {
                        if reverse {
                            send(ControlMessage::Snapshot(host_set.snapshot(Side::Host)));
                        }
                    }
                    ControlMessage::DialBack(req) => {
                        let reported = inner.reported();
                        let traffic = inner.reverse_traffic(req.proto, req.target.port());
                        tracing::debug!(id = req.id.0, proto = ?req.proto, target = %req.target, client = %req.client, "dial-back request");
                        let span = tracing::debug_span!("dial_back", id = req.id.0, target = %req.target);
                        tokio::spawn(tracing::Instrument::instrument(
                            reverse::serve_dial_back(inner.ctx.clone(), req, reported, traffic, mode, session_token.clone()),
                            span,
                        ));
                    }
                    ControlMessage::MirrorState(m) if reverse => inner.set_mirror_state(m),
                    ControlMessage::Error(e) if e.fatal => {
                        return Err(SessionError::Fatal { code: e.code, message: e.message });
                    }
                    ControlMessage::Error(e) => {
                        tracing::warn!(code = ?e.code, message = %e.message, "the agent reported an error");
                    }
                    ControlMessage::Hello(_) => {
                        return Err(protocol_error(&out_tx, "a second Hello".into()).await);
                    }
                    other => {
                        tracing::warn!(message = ?other, "unexpected control message for this side; ignored");
                    }
                }
            }
        }
    }
}

async fn protocol_error(out: &mpsc::Sender<ControlMessage>, what: String) -> SessionError {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        out.send(ControlMessage::Error(ControlError {
            code: ErrorCode::Protocol,
            fatal: true,
            message: what.clone(),
        })),
    )
    .await;
    SessionError::Protocol(what)
}

fn apply(
    inner: &Arc<Inner>,
    delta: proto::Delta,
    mode: StreamMode,
    channel: &Option<udp::Channel>,
    session: &CancellationToken,
) {
    let (ports, new) = {
        let mut m = inner.mirror();
        for l in &delta.removed {
            if m.remove(l) > 0 {
                tracing::info!(guest = %std::net::SocketAddr::new(l.addr, l.port), proto = ?l.proto, "guest listener gone; host listeners closed");
            }
        }
        let mut new = Vec::new();
        for l in delta.added {
            if l.proto == Proto::Udp && channel.is_none() {
                continue;
            }
            new.extend(m.add(l));
        }
        (m.guest_ports(), new)
    };
    if let Some(h) = &inner.host_listeners {
        h.set_excluded_ports(ports);
    }
    for b in new {
        listen::spawn(inner.ctx.clone(), b, mode, channel.clone(), session.clone());
    }
}

/// Opens the session's datagram channel: a `{Datagrams, Raw}` stream (and, on QUIC, the
/// connection's datagrams). Flows the agent opens go to reported host listeners the reverse
/// rules allow, or nowhere without the reverse direction.
async fn open_channel(inner: &Arc<Inner>, reverse: bool) -> Result<udp::Channel, SessionError> {
    let mut stream = inner.ctx.connector.open().await?;
    let header = StreamHeader {
        kind: StreamKind::Datagrams,
        mode: StreamMode::Raw,
    };
    proto::write_header(&mut stream, &header).await?;
    let dialer: Arc<dyn udp::Dialer> = if reverse {
        Arc::new(reverse::UdpDialer(Arc::downgrade(inner)))
    } else {
        Arc::new(udp::RefuseAll)
    };
    let config = udp::Config {
        side: udp::Side::Forwarder,
        max_flows: inner.ctx.max_udp_flows,
        idle: inner.ctx.udp_timeout,
        queue_bytes: udp::DEFAULT_QUEUE_BYTES,
    };
    let channel = udp::Channel::start(stream, config, dialer, inner.ctx.counters.udp.clone());
    *inner.ctx.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel.clone());
    Ok(channel)
}

/// Closes the session's channel (every flow) when the session ends.
struct ChannelGuard<'a>(&'a crate::ctx::Ctx, Option<udp::Channel>);

impl Drop for ChannelGuard<'_> {
    fn drop(&mut self) {
        if let Some(c) = &self.1 {
            c.close();
        }
        self.0
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
