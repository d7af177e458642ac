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

use crate::agent::{SessionSlot, Shared, lock};
use crate::reverse::{self, Reverse};

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

async fn session(
    shared: &Arc<Shared>,
    stream: Stream,
    mode: StreamMode,
    cancel: &CancellationToken,
) {
    let (mut rd, mut wr) = tokio::io::split(PayloadStream::new(stream, mode));
    let (in_tx, mut inbox) = mpsc::channel::<Inbound>(16);
    // Reads are not cancel-safe, so they run in their own task and arrive whole.
    let _reader = AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            let r = proto::read_control(&mut rd).await;
            let more = matches!(r, Ok(Some(_)));
            if in_tx.send(r).await.is_err() || !more {
                break;
            }
        }
    }));

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
    if !send(&mut wr, &hello).await {
        return;
    }
    let theirs = match tokio::time::timeout(proto::HELLO_TIMEOUT, inbox.recv()).await {
        Ok(Some(Ok(Some(ControlMessage::Hello(h))))) => h,
        Ok(Some(Ok(Some(other)))) => {
            fatal(
                &mut wr,
                ErrorCode::Protocol,
                format!("expected Hello first, got {other:?}"),
            )
            .await;
            return;
        }
        Ok(Some(Ok(None)) | None) => {
            tracing::info!("forwarder closed the control stream before its Hello");
            return;
        }
        Ok(Some(Err(e))) => {
            if is_protocol_violation(&e) {
                fatal(&mut wr, ErrorCode::Protocol, e.to_string()).await;
            } else {
                tracing::warn!(error = %e, "control stream failed before Hello");
            }
            return;
        }
        Err(_) => {
            fatal(
                &mut wr,
                ErrorCode::Protocol,
                "no Hello within the Hello timeout",
            )
            .await;
            return;
        }
    };
    if theirs.role != Role::Forwarder {
        fatal(
            &mut wr,
            ErrorCode::Protocol,
            format!("peer role is {:?}, not Forwarder", theirs.role),
        )
        .await;
        return;
    }
    let revision = theirs.revision.min(proto::CONTROL_REVISION);
    if revision < 1 {
        fatal(
            &mut wr,
            ErrorCode::Version,
            format!(
                "no common control revision (peer speaks {})",
                theirs.revision
            ),
        )
        .await;
        return;
    }
    let reverse_on = theirs.has(caps::REVERSE) && theirs.has(caps::DIAL_BACK);
    // Mirror states go only to a forwarder that said it takes them.
    let states_on = reverse_on && theirs.has(caps::MIRROR_STATE);
    let udp_on = theirs.has(caps::UDP_CHANNEL);
    if !udp_on && theirs.has("udp") {
        tracing::warn!(
            "the forwarder is older: it carries UDP as a stream per flow, which this agent no longer speaks; no UDP in either direction (upgrade the forwarder)"
        );
    }
    tracing::info!(revision, capabilities = ?theirs.capabilities, reverse = reverse_on, mirror_states = states_on, "control session up");

    let mut guest_rx = shared.guest.clone();
    guest_rx.borrow_and_update();
    let mut mine = proto::ListenerSet::new();
    mine.update(Side::Guest, shared.report());
    if !send(
        &mut wr,
        &ControlMessage::Snapshot(mine.snapshot(Side::Guest)),
    )
    .await
    {
        return;
    }
    let (dial_tx, mut dial_rx) = mpsc::channel(DIAL_BACK_QUEUE);
    let (state_tx, mut state_rx) = mpsc::channel(reverse::STATE_QUEUE);
    let mut reverse = Reverse::new(
        shared.clone(),
        cancel.clone(),
        dial_tx,
        states_on.then_some(state_tx),
        udp_on,
    );
    // No host listeners yet: no mirrors, nothing to report.
    let _ = reverse.set_guest(mine.listeners());

    let mut last_rx = Instant::now();
    let mut heartbeat = tokio::time::interval(proto::HEARTBEAT_INTERVAL);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counter = 0u64;
    let clean = loop {
        tokio::select! {
            m = inbox.recv() => {
                last_rx = Instant::now();
                let msg = match m {
                    None | Some(Ok(None)) => {
                        tracing::info!("forwarder closed the control stream");
                        break false;
                    }
                    Some(Err(e)) => {
                        if is_protocol_violation(&e) {
                            fatal(&mut wr, ErrorCode::Protocol, e.to_string()).await;
                        } else {
                            tracing::error!(error = %e, "control stream broke");
                        }
                        break false;
                    }
                    Some(Ok(Some(msg))) => msg,
                };
                let ok = match msg {
                    ControlMessage::Heartbeat(_) => true,
                    ControlMessage::Hello(_) => {
                        fatal(&mut wr, ErrorCode::Protocol, "a second Hello").await;
                        break false;
                    }
                    ControlMessage::Snapshot(s) if s.side == Side::Host => {
                        if reverse_on {
                            let states = reverse.host_snapshot(&s);
                            send_states(&mut wr, states).await
                        } else {
                            true
                        }
                    }
                    ControlMessage::Changes(c) if c.side == Side::Host => {
                        if !reverse_on {
                            true
                        } else {
                            match reverse.host_changes(&c) {
                                Err(gap) => {
                                    tracing::info!(%gap, "asking for a fresh host snapshot");
                                    send(&mut wr, &ControlMessage::Resync(Resync { side: Side::Host })).await
                                }
                                Ok(states) => send_states(&mut wr, states).await,
                            }
                        }
                    }
                    ControlMessage::Resync(Resync { side: Side::Guest }) => {
                        tracing::debug!("forwarder asked for a fresh guest snapshot");
                        send(&mut wr, &ControlMessage::Snapshot(mine.snapshot(Side::Guest))).await
                    }
                    ControlMessage::Error(e) if e.fatal => {
                        tracing::warn!(code = ?e.code, message = %e.message, "forwarder reported a fatal error");
                        break false;
                    }
                    ControlMessage::Error(e) => {
                        tracing::warn!(code = ?e.code, message = %e.message, "forwarder reported an error");
                        true
                    }
                    other => complain(&mut wr, format!("the agent does not take {other:?}")).await,
                };
                if !ok {
                    break false;
                }
            }
            () = tokio::time::sleep_until(last_rx + proto::HEARTBEAT_TIMEOUT) => {
                tracing::warn!(timeout = ?proto::HEARTBEAT_TIMEOUT, "no message from the forwarder; closing the control session");
                break false;
            }
            _ = heartbeat.tick() => {
                counter += 1;
                let hb = ControlMessage::Heartbeat(Heartbeat { counter, unix_millis: unix_millis() });
                if !send(&mut wr, &hb).await {
                    break false;
                }
            }
            changed = guest_rx.changed() => {
                if changed.is_err() {
                    tracing::warn!("discovery feed stopped");
                    break true;
                }
                guest_rx.borrow_and_update();
                if let Some(changes) = mine.update(Side::Guest, shared.report()) {
                    tracing::info!(seq = changes.seq, added = ?changes.added, removed = ?changes.removed, "guest listeners changed");
                    if !send(&mut wr, &ControlMessage::Changes(changes)).await {
                        break false;
                    }
                    let states = reverse.set_guest(mine.listeners());
                    if !send_states(&mut wr, states).await {
                        break false;
                    }
                }
            }
            Some(ev) = state_rx.recv() => {
                if let Some(state) = reverse.bind_event(ev) {
                    tracing::debug!(?state, "reverse mirror state to the forwarder");
                    if !send(&mut wr, &ControlMessage::MirrorState(state)).await {
                        break false;
                    }
                }
            }
            Some(req) = dial_rx.recv() => {
                if !send(&mut wr, &ControlMessage::DialBack(req)).await {
                    break false;
                }
            }
            () = cancel.cancelled() => {
                tracing::info!("control session stopping (replaced, or the agent is stopping)");
                break true;
            }
        }
    };
    drop(reverse);
    // A clean close is a half-close at a message boundary (END in framed mode).
    let _ = tokio::time::timeout(CLOSE_GRACE, wr.shutdown()).await;
    tracing::debug!(replaced_or_stopped = clean, "control stream shut down");
    tracing::info!("control session closed");
}
