//! The control session: Hello, the guest listener set (snapshot, then changes), resyncs,
//! heartbeats, the host listener set for the reverse direction, and dial-back requests.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hostnet_link::proto::{
    self, ControlError, ControlMessage, ErrorCode, Heartbeat, Hello, PayloadStream, ProtoError,
    Resync, Role, Side, StreamMode, caps,
};
use hostnet_link::transport::Stream;
use tokio::io::{AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::reverse::{self, Reverse};
use crate::shared::{SessionSlot, Shared, lock};

/// How long a new session waits for the one it replaces to tear down.
const REPLACE_WAIT: Duration = Duration::from_secs(2);
/// How long the final clean close (shutdown / END) may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Dial-back requests queued for the control stream.
const DIAL_BACK_QUEUE: usize = 256;

type Inbound = Result<Option<ControlMessage>, ProtoError>;
type Writer = WriteHalf<PayloadStream<Stream>>;

/// Runs one control session to its end; a session already running is replaced.
pub(crate) async fn run(shared: Arc<Shared>, stream: Stream, mode: StreamMode, peer: String) {
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    shared.counters.sessions.fetch_add(1, Ordering::Relaxed);
    let cancel = shared.root.child_token();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let old = lock(&shared.session).replace(SessionSlot {
        id,
        cancel: cancel.clone(),
        done: done_rx,
    });
    let span = tracing::info_span!("control", session = id, %peer);
    async {
        if let Some(old) = old {
            tracing::info!(
                old = old.id,
                "a new control stream replaces the running session"
            );
            old.cancel.cancel();
            let _ = tokio::time::timeout(REPLACE_WAIT, old.done).await;
        }
        session(&shared, stream, mode, &cancel).await;
        cancel.cancel();
        let mut slot = lock(&shared.session);
        if slot.as_ref().is_some_and(|s| s.id == id) {
            slot.take();
        }
    }
    .instrument(span)
    .await;
    drop(done_tx);
}

/// Writes one message, bounded by the heartbeat timeout (a peer that stops reading is gone).
async fn send<W: AsyncWrite + Unpin>(w: &mut W, msg: &ControlMessage) -> bool {
    match tokio::time::timeout(proto::HEARTBEAT_TIMEOUT, proto::write_control(w, msg)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "writing to the control stream failed");
            false
        }
        Err(_) => {
            tracing::warn!(timeout = ?proto::HEARTBEAT_TIMEOUT, "control stream write stalled");
            false
        }
    }
}

async fn fatal(w: &mut Writer, code: ErrorCode, message: impl Into<String>) {
    let message = message.into();
    tracing::warn!(?code, %message, "closing the control session");
    let msg = ControlMessage::Error(ControlError {
        code,
        fatal: true,
        message,
    });
    send(w, &msg).await;
}

async fn complain(w: &mut Writer, message: impl Into<String>) -> bool {
    let message = message.into();
    tracing::warn!(%message, "unexpected control message");
    let msg = ControlMessage::Error(ControlError {
        code: ErrorCode::Protocol,
        fatal: false,
        message,
    });
    send(w, &msg).await
}

/// Sends `MirrorState`s (only ever non-empty when the forwarder takes them).
async fn send_states(w: &mut Writer, states: Vec<proto::MirrorState>) -> bool {
    for state in states {
        if !send(w, &ControlMessage::MirrorState(state)).await {
            return false;
        }
    }
    true
}

fn is_protocol_violation(e: &ProtoError) -> bool {
    matches!(
        e,
        ProtoError::UnknownType { .. }
            | ProtoError::Malformed { .. }
            | ProtoError::Invalid { .. }
            | ProtoError::TrailingBytes { .. }
            | ProtoError::TooLarge { .. }
    )
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the two `Hello`s agreed on.
struct Agreed {
    /// The forwarder takes the host listener set and answers dial-backs.
    reverse: bool,
    /// The forwarder takes `MirrorState`s.
    states: bool,
    /// The forwarder speaks the datagram channel.
    udp: bool,
}

/// Sends this side's `Hello` and checks the forwarder's (first message, right role, a common
/// revision). `None` (after telling the forwarder why, where it should know) ends the session.
async fn handshake(wr: &mut Writer, inbox: &mut mpsc::Receiver<Inbound>) -> Option<Agreed> {
    let hello = ControlMessage::Hello(Hello {
        revision: proto::CONTROL_REVISION,
        role: Role::Agent,
        capabilities: vec![
            caps::UDP_CHANNEL.into(),
            caps::REVERSE.into(),
            caps::DIAL_BACK.into(),
            caps::MIRROR_STATE.into(),
        ],
        auth: None,
    });
    if !send(wr, &hello).await {
        return None;
    }
    let theirs = match tokio::time::timeout(proto::HELLO_TIMEOUT, inbox.recv()).await {
        Ok(Some(Ok(Some(ControlMessage::Hello(h))))) => h,
        Ok(Some(Ok(Some(other)))) => {
            let why = format!("expected Hello first, got {other:?}");
            fatal(wr, ErrorCode::Protocol, why).await;
            return None;
        }
        Ok(Some(Ok(None)) | None) => {
            tracing::info!("forwarder closed the control stream before its Hello");
            return None;
        }
        Ok(Some(Err(e))) => {
            if is_protocol_violation(&e) {
                fatal(wr, ErrorCode::Protocol, e.to_string()).await;
            } else {
                tracing::warn!(error = %e, "control stream failed before Hello");
            }
            return None;
        }
        Err(_) => {
            let why = "no Hello within the Hello timeout";
            fatal(wr, ErrorCode::Protocol, why).await;
            return None;
        }
    };
    if theirs.role != Role::Forwarder {
        let why = format!("peer role is {:?}, not Forwarder", theirs.role);
        fatal(wr, ErrorCode::Protocol, why).await;
        return None;
    }
    let revision = theirs.revision.min(proto::CONTROL_REVISION);
    if revision < 1 {
        let why = format!(
            "no common control revision (peer speaks {})",
            theirs.revision
        );
        fatal(wr, ErrorCode::Version, why).await;
        return None;
    }
    let reverse = theirs.has(caps::REVERSE) && theirs.has(caps::DIAL_BACK);
    let agreed = Agreed {
        reverse,
        // Mirror states go only to a forwarder that said it takes them.
        states: reverse && theirs.has(caps::MIRROR_STATE),
        udp: theirs.has(caps::UDP_CHANNEL),
    };
    if !agreed.udp && theirs.has("udp") {
        tracing::warn!(
            "the forwarder is older: it carries UDP as a stream per flow, which this agent no longer speaks; no UDP in either direction (upgrade the forwarder)"
        );
    }
    tracing::info!(revision, capabilities = ?theirs.capabilities, reverse = agreed.reverse, mirror_states = agreed.states, udp = agreed.udp, "control session up");
    Some(agreed)
}

/// Whether the session goes on after a message or an event.
enum Step {
    Continue,
    /// End the session; `clean` when this side chose to (replaced, stopping).
    Stop {
        clean: bool,
    },
}

impl From<bool> for Step {
    /// `true` (a write went out) continues; `false` (the stream failed) stops.
    fn from(ok: bool) -> Self {
        if ok {
            Step::Continue
        } else {
            Step::Stop { clean: false }
        }
    }
}

/// A session past its handshake: what it reported, its reverse mirrors, its writer.
struct Running<'a> {
    shared: &'a Arc<Shared>,
    wr: Writer,
    agreed: Agreed,
    /// The guest listener set as last reported.
    mine: proto::ListenerSet,
    reverse: Reverse,
}

impl Running<'_> {
    /// A message from the forwarder (or the end of its stream).
    async fn on_inbound(&mut self, m: Option<Inbound>) -> Step {
        let msg = match m {
            None | Some(Ok(None)) => {
                tracing::info!("forwarder closed the control stream");
                return Step::Stop { clean: false };
            }
            Some(Err(e)) => {
                if is_protocol_violation(&e) {
                    fatal(&mut self.wr, ErrorCode::Protocol, e.to_string()).await;
                } else {
                    tracing::error!(error = %e, "control stream broke");
                }
                return Step::Stop { clean: false };
            }
            Some(Ok(Some(msg))) => msg,
        };
        let reverse_on = self.agreed.reverse;
        match msg {
            ControlMessage::Heartbeat(_) => Step::Continue,
            ControlMessage::Hello(_) => {
                fatal(&mut self.wr, ErrorCode::Protocol, "a second Hello").await;
                Step::Stop { clean: false }
            }
            ControlMessage::Snapshot(s) if s.side == Side::Host => {
                if !reverse_on {
                    return Step::Continue;
                }
                let states = self.reverse.host_snapshot(&s);
                send_states(&mut self.wr, states).await.into()
            }
            ControlMessage::Changes(c) if c.side == Side::Host => {
                if !reverse_on {
                    return Step::Continue;
                }
                match self.reverse.host_changes(&c) {
                    Err(gap) => {
                        tracing::info!(%gap, "asking for a fresh host snapshot");
                        let resync = ControlMessage::Resync(Resync { side: Side::Host });
                        send(&mut self.wr, &resync).await.into()
                    }
                    Ok(states) => send_states(&mut self.wr, states).await.into(),
                }
            }
            ControlMessage::Resync(Resync { side: Side::Guest }) => {
                tracing::debug!("forwarder asked for a fresh guest snapshot");
                let snapshot = ControlMessage::Snapshot(self.mine.snapshot(Side::Guest));
                send(&mut self.wr, &snapshot).await.into()
            }
            ControlMessage::Error(e) if e.fatal => {
                tracing::warn!(code = ?e.code, message = %e.message, "forwarder reported a fatal error");
                Step::Stop { clean: false }
            }
            ControlMessage::Error(e) => {
                tracing::warn!(code = ?e.code, message = %e.message, "forwarder reported an error");
                Step::Continue
            }
            other => {
                let why = format!("the agent does not take {other:?}");
                complain(&mut self.wr, why).await.into()
            }
        }
    }

    /// Discovery saw a change: report it, and move the reverse mirrors out of the way of
    /// ports the guest now serves itself.
    async fn on_guest_change(&mut self) -> Step {
        let Some(changes) = self.mine.update(Side::Guest, self.shared.report()) else {
            return Step::Continue;
        };
        tracing::info!(seq = changes.seq, added = ?changes.added, removed = ?changes.removed, "guest listeners changed");
        if !send(&mut self.wr, &ControlMessage::Changes(changes)).await {
            return Step::Stop { clean: false };
        }
        let states = self.reverse.set_guest(self.mine.listeners());
        send_states(&mut self.wr, states).await.into()
    }
}

/// Reads the control stream in a task of its own (reads are not cancel-safe, so they arrive
/// whole); the reader stops when the returned handle drops.
fn spawn_reader(
    mut rd: tokio::io::ReadHalf<PayloadStream<Stream>>,
) -> (AbortOnDropHandle<()>, mpsc::Receiver<Inbound>) {
    let (in_tx, inbox) = mpsc::channel::<Inbound>(16);
    let reader = tokio::spawn(async move {
        loop {
            let r = proto::read_control(&mut rd).await;
            let more = matches!(r, Ok(Some(_)));
            if in_tx.send(r).await.is_err() || !more {
                break;
            }
        }
    });
    (AbortOnDropHandle::new(reader), inbox)
}

async fn session(
    shared: &Arc<Shared>,
    stream: Stream,
    mode: StreamMode,
    cancel: &CancellationToken,
) {
    let (rd, mut wr) = tokio::io::split(PayloadStream::new(stream, mode));
    let (_reader, mut inbox) = spawn_reader(rd);
    let Some(agreed) = handshake(&mut wr, &mut inbox).await else {
        return;
    };

    let mut guest_rx = shared.guest.clone();
    guest_rx.borrow_and_update();
    let mut mine = proto::ListenerSet::new();
    mine.update(Side::Guest, shared.report());
    let snapshot = ControlMessage::Snapshot(mine.snapshot(Side::Guest));
    if !send(&mut wr, &snapshot).await {
        return;
    }
    let (dial_tx, mut dial_rx) = mpsc::channel(DIAL_BACK_QUEUE);
    let (state_tx, mut state_rx) = mpsc::channel(reverse::STATE_QUEUE);
    let mut reverse = Reverse::new(
        shared.clone(),
        cancel.clone(),
        dial_tx,
        agreed.states.then_some(state_tx),
        agreed.udp,
    );
    // No host listeners yet: no mirrors, nothing to report.
    let _ = reverse.set_guest(mine.listeners());
    let mut s = Running {
        shared,
        wr,
        agreed,
        mine,
        reverse,
    };

    let mut last_rx = Instant::now();
    let mut heartbeat = tokio::time::interval(proto::HEARTBEAT_INTERVAL);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counter = 0u64;
    let clean = loop {
        let step = tokio::select! {
            m = inbox.recv() => {
                last_rx = Instant::now();
                s.on_inbound(m).await
            }
            () = tokio::time::sleep_until(last_rx + proto::HEARTBEAT_TIMEOUT) => {
                tracing::warn!(timeout = ?proto::HEARTBEAT_TIMEOUT, "no message from the forwarder; closing the control session");
                Step::Stop { clean: false }
            }
            _ = heartbeat.tick() => {
                counter += 1;
                let hb = ControlMessage::Heartbeat(Heartbeat { counter, unix_millis: unix_millis() });
                send(&mut s.wr, &hb).await.into()
            }
            changed = guest_rx.changed() => {
                if changed.is_err() {
                    tracing::warn!("discovery feed stopped");
                    Step::Stop { clean: true }
                } else {
                    guest_rx.borrow_and_update();
                    s.on_guest_change().await
                }
            }
            Some(ev) = state_rx.recv() => match s.reverse.bind_event(ev) {
                Some(state) => {
                    tracing::debug!(?state, "reverse mirror state to the forwarder");
                    send(&mut s.wr, &ControlMessage::MirrorState(state)).await.into()
                }
                None => Step::Continue,
            },
            Some(req) = dial_rx.recv() => send(&mut s.wr, &ControlMessage::DialBack(req)).await.into(),
            () = cancel.cancelled() => {
                tracing::info!("control session stopping (replaced, or the agent is stopping)");
                Step::Stop { clean: true }
            }
        };
        if let Step::Stop { clean } = step {
            break clean;
        }
    };
    let Running {
        mut wr, reverse, ..
    } = s;
    drop(reverse);
    // A clean close is a half-close at a message boundary (END in framed mode).
    let _ = tokio::time::timeout(CLOSE_GRACE, wr.shutdown()).await;
    tracing::debug!(replaced_or_stopped = clean, "control stream shut down");
    tracing::info!("control session closed");
}
