//! Control stream messages, and the listener-set state they carry (no I/O in the state).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use super::envelope::{self, Kind};
use super::{DialBackId, MAX_CONTROL_LEN, MAX_MIRROR_HOSTS, MAX_MIRROR_REASON, ProtoError};

const WHAT: &str = "control message";
const KIND: Kind = Kind {
    what: WHAT,
    max: MAX_CONTROL_LEN,
    tags: ControlMessage::TAGS,
};

/// One message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// Tag 0: the first message each side sends.
    Hello(Hello),
    /// Tag 1: the full listener set of one side.
    Snapshot(Snapshot),
    /// Tag 2: listeners added and removed since the previous sequence number.
    Changes(Changes),
    /// Tag 3: "send me a fresh snapshot of this side" (after a sequence gap).
    Resync(Resync),
    /// Tag 4: the agent asks the forwarder to open a stream for a guest-originated connection.
    DialBack(DialBack),
    /// Tag 5: liveness.
    Heartbeat(Heartbeat),
    /// Tag 6: the sender reports an error; if `fatal`, it closes the control stream next.
    Error(ControlError),
    /// Tag 7: the agent reports the bind result of one reverse mirror (only to a forwarder that
    /// listed [`caps::MIRROR_STATE`](super::caps::MIRROR_STATE)).
    MirrorState(MirrorState),
}

impl ControlMessage {
    /// How many message types this version knows.
    pub const TAGS: u32 = 8;

    /// Checks the per-field limits that the envelope's length limit does not cover.
    fn check(&self) -> Result<(), ProtoError> {
        match self {
            ControlMessage::MirrorState(m) => m.check(),
            _ => Ok(()),
        }
    }
}

/// Which program sent a [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Tag 0: `hostnet-forwarder`, on the host.
    Forwarder,
    /// Tag 1: `hostnet-agent`, in the VM.
    Agent,
}

/// The first control message of each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The highest control revision the sender speaks ([`CONTROL_REVISION`](super::CONTROL_REVISION)).
    pub revision: u16,
    /// Who is speaking.
    pub role: Role,
    /// Optional features the sender supports (see [`caps`](super::caps)); unknown names are
    /// ignored.
    pub capabilities: Vec<String>,
    /// Proof of a shared secret, for transports that authenticate in-band.
    pub auth: Option<Vec<u8>>,
}

impl Hello {
    /// Whether the sender announced capability `name`.
    pub fn has(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }
}

/// Whose listeners a listener message describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Side {
    /// Tag 0: listeners in the VM, sent by the agent, mirrored on the host.
    Guest,
    /// Tag 1: listeners on the host, sent by the forwarder, mirrored into the VM.
    Host,
}

/// Transport protocol of a listener or flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Proto {
    /// Tag 0.
    Tcp,
    /// Tag 1.
    Udp,
}

/// One listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Listener {
    /// TCP (in LISTEN) or UDP (bound, unconnected).
    pub proto: Proto,
    /// The bound address (unspecified for a wildcard bind).
    pub addr: IpAddr,
    /// The bound port.
    pub port: u16,
    /// For an IPv6 socket, whether it is v6-only (else it also takes IPv4); `false` for IPv4.
    pub v6only: bool,
}

/// The full listener set of one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Whose listeners.
    pub side: Side,
    /// The sender's sequence number for this state.
    pub seq: u64,
    /// Every listener, each once.
    pub listeners: Vec<Listener>,
}

/// Changes to the listener set of one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// Whose listeners.
    pub side: Side,
    /// The sequence number after these changes: exactly one more than the previous snapshot or
    /// changes of this side. Anything else is a gap: the receiver sends [`Resync`].
    pub seq: u64,
    /// Listeners that appeared.
    pub added: Vec<Listener>,
    /// Listeners that went away.
    pub removed: Vec<Listener>,
}

/// A request for a fresh [`Snapshot`] of `side`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    /// Whose listeners.
    pub side: Side,
}

/// The agent asks the forwarder to connect to a host service and open a stream for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialBack {
    /// Chosen by the agent, unique among its pending requests; echoed in the stream header.
    pub id: DialBackId,
    /// TCP connection or UDP flow.
    pub proto: Proto,
    /// The address the guest client connected to (a mirrored host listener on the VM's
    /// loopback); the forwarder dials the host's loopback of the same family at this port.
    pub target: SocketAddr,
    /// The guest client's address.
    pub client: SocketAddr,
}

/// Liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Incremented by one for each heartbeat the sender sends.
    pub counter: u64,
    /// The sender's wall clock, milliseconds since the Unix epoch (informational).
    pub unix_millis: u64,
}

/// What kind of error a [`ControlError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Tag 0: the peer broke the protocol (unknown or unexpected message, bad field).
    Protocol,
    /// Tag 1: no common revision.
    Version,
    /// Tag 2: authentication failed.
    Auth,
    /// Tag 3: the sender failed internally.
    Internal,
}

/// An error report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    /// The kind of error.
    pub code: ErrorCode,
    /// Whether the sender closes the control stream after this message.
    pub fatal: bool,
    /// Human-readable detail.
    pub message: String,
}

/// What a reverse mirror's bind came to, in a [`MirrorState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BindState {
    /// Tag 0: bound; guest clients reach the host service.
    Active,
    /// Tag 1: the address is taken in the VM (or the port needs a right the agent lacks);
    /// retried until it frees.
    Conflict,
    /// Tag 2: the bind failed for another reason; retried.
    Retrying,
    /// Tag 3: the mirror is gone (its host listener went away, or the guest now reports that
    /// port itself); the receiver forgets it.
    Closed,
}

impl BindState {
    /// The name `hostnet-forwarder status` shows.
    pub fn name(self) -> &'static str {
        match self {
            BindState::Active => "active",
            BindState::Conflict => "conflict",
            BindState::Retrying => "retrying",
            BindState::Closed => "closed",
        }
    }
}

/// The state of one reverse mirror: a socket the agent binds on the VM's loopback for host
/// listeners the forwarder reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorState {
    /// TCP or UDP.
    pub proto: Proto,
    /// The port (the same in the VM and on the host).
    pub port: u16,
    /// The VM address the agent binds: `127.0.0.1` or `::1`.
    pub bind: IpAddr,
    /// The addresses of the reported host listeners this mirror serves, as the forwarder named
    /// them in its listener messages; at most [`MAX_MIRROR_HOSTS`].
    pub hosts: Vec<IpAddr>,
    /// The bind result.
    pub state: BindState,
    /// Why, for `Conflict` and `Retrying`: at most
    /// [`MAX_MIRROR_REASON`] bytes ([`MirrorState::cut_reason`]).
    pub reason: Option<String>,
}

impl MirrorState {
    /// Cuts `reason` to [`MAX_MIRROR_REASON`] bytes (at a character
    /// boundary).
    pub fn cut_reason(reason: impl Into<String>) -> String {
        let mut reason = reason.into();
        if reason.len() > MAX_MIRROR_REASON {
            let mut end = MAX_MIRROR_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        reason
    }

    fn check(&self) -> Result<(), ProtoError> {
        if self
            .reason
            .as_ref()
            .is_some_and(|r| r.len() > MAX_MIRROR_REASON)
        {
            return Err(ProtoError::Invalid {
                what: WHAT,
                reason: "mirror state reason longer than MAX_MIRROR_REASON",
            });
        }
        if self.hosts.len() > MAX_MIRROR_HOSTS {
            return Err(ProtoError::Invalid {
                what: WHAT,
                reason: "mirror state with more than MAX_MIRROR_HOSTS host addresses",
            });
        }
        Ok(())
    }
}

/// Appends the encoded message to `out`; a message over a field limit is
/// [`ProtoError::Invalid`].
pub fn encode_control(msg: &ControlMessage, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    msg.check()?;
    envelope::encode(KIND, msg, out)
}

/// Decodes a message from the front of `buf`: `Ok(None)` if more bytes are needed; a message
/// over a field limit is [`ProtoError::Invalid`].
pub fn decode_control(buf: &[u8]) -> Result<Option<(ControlMessage, usize)>, ProtoError> {
    let decoded = envelope::decode::<ControlMessage>(KIND, buf)?;
    if let Some((msg, _)) = &decoded {
        msg.check()?;
    }
    Ok(decoded)
}

/// Writes one message and flushes.
pub async fn write_control<W>(w: &mut W, msg: &ControlMessage) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    msg.check()?;
    envelope::write(KIND, w, msg).await
}

/// Reads exactly one message; `Ok(None)` when the peer has closed the stream between messages.
///
/// No timeout here: the caller bounds the wait by the heartbeat timeout.
pub async fn read_control<R>(r: &mut R) -> Result<Option<ControlMessage>, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let msg = envelope::read::<ControlMessage, _>(KIND, r).await?;
    if let Some(m) = &msg {
        m.check()?;
    }
    Ok(msg)
}

/// The listeners in `new` and not in `old` (added), and in `old` and not in `new` (removed).
pub fn diff(old: &BTreeSet<Listener>, new: &BTreeSet<Listener>) -> Delta {
    Delta {
        added: new.difference(old).copied().collect(),
        removed: old.difference(new).copied().collect(),
    }
}

/// Listeners to open and to close.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Listeners that appeared.
    pub added: Vec<Listener>,
    /// Listeners that went away.
    pub removed: Vec<Listener>,
}

impl Delta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// A [`Changes`] message whose sequence number does not follow the receiver's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("listener changes out of sequence: expected seq {expected:?}, got {got} (resync needed)")]
pub struct Gap {
    /// The sequence number the receiver expected (`None` before the first snapshot).
    pub expected: Option<u64>,
    /// The sequence number received.
    pub got: u64,
}

/// One side's listener set with its sequence number: the sender's copy produces
/// snapshots and changes, the receiver's copy applies them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerSet {
    /// `None` on a receiver that has not had a snapshot yet.
    seq: Option<u64>,
    listeners: BTreeSet<Listener>,
}

impl ListenerSet {
    /// An empty set at sequence 0 (the sender's starting point).
    pub fn new() -> Self {
        ListenerSet {
            seq: Some(0),
            listeners: BTreeSet::new(),
        }
    }

    /// An empty set waiting for its first snapshot (the receiver's starting point).
    pub fn awaiting_snapshot() -> Self {
        ListenerSet {
            seq: None,
            listeners: BTreeSet::new(),
        }
    }

    /// The current sequence number (`None` before the first snapshot).
    pub fn seq(&self) -> Option<u64> {
        self.seq
    }

    /// The current listeners.
    pub fn listeners(&self) -> &BTreeSet<Listener> {
        &self.listeners
    }

    /// Sender: the snapshot of the current state.
    pub fn snapshot(&self, side: Side) -> Snapshot {
        Snapshot {
            side,
            seq: self.seq.unwrap_or(0),
            listeners: self.listeners.iter().copied().collect(),
        }
    }

    /// Sender: moves to `new`; returns the [`Changes`] to send, or `None` if nothing changed.
    pub fn update(&mut self, side: Side, new: BTreeSet<Listener>) -> Option<Changes> {
        let delta = diff(&self.listeners, &new);
        if delta.is_empty() {
            return None;
        }
        let seq = self.seq.unwrap_or(0).wrapping_add(1);
        self.seq = Some(seq);
        self.listeners = new;
        Some(Changes {
            side,
            seq,
            added: delta.added,
            removed: delta.removed,
        })
    }

    /// Receiver: replaces the state with `snapshot`; returns what to open and close.
    pub fn replace(&mut self, snapshot: &Snapshot) -> Delta {
        let new: BTreeSet<Listener> = snapshot.listeners.iter().copied().collect();
        let delta = diff(&self.listeners, &new);
        self.listeners = new;
        self.seq = Some(snapshot.seq);
        delta
    }

    /// Receiver: applies `changes` if its sequence number is the next one; returns what
    /// actually changed (adding a present or removing an absent listener is a no-op).
    /// On a [`Gap`] the state is left as it was and the receiver should send [`Resync`].
    pub fn apply(&mut self, changes: &Changes) -> Result<Delta, Gap> {
        let expected = self.seq.map(|s| s.wrapping_add(1));
        if expected != Some(changes.seq) {
            return Err(Gap {
                expected,
                got: changes.seq,
            });
        }
        let mut delta = Delta::default();
        for l in &changes.removed {
            if self.listeners.remove(l) {
                delta.removed.push(*l);
            }
        }
        for l in &changes.added {
            if self.listeners.insert(*l) {
                delta.added.push(*l);
            }
        }
        self.seq = Some(changes.seq);
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn tcp(port: u16) -> Listener {
        Listener {
            proto: Proto::Tcp,
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            v6only: false,
        }
    }

    fn set(ls: &[Listener]) -> BTreeSet<Listener> {
        ls.iter().copied().collect()
    }

    #[test]
    fn diff_reports_added_and_removed() {
        let d = diff(&set(&[tcp(1), tcp(2)]), &set(&[tcp(2), tcp(3)]));
        assert_eq!(d.added, vec![tcp(3)]);
        assert_eq!(d.removed, vec![tcp(1)]);
        assert!(diff(&set(&[tcp(1)]), &set(&[tcp(1)])).is_empty());
    }

    #[test]
    fn sender_and_receiver_stay_in_step() {
        let mut sender = ListenerSet::new();
        let mut receiver = ListenerSet::awaiting_snapshot();
        let early = sender.update(Side::Guest, set(&[tcp(1)])).unwrap();
        assert_eq!(early.seq, 1);
        // Changes before any snapshot are a gap.
        assert_eq!(
            receiver.apply(&early),
            Err(Gap {
                expected: None,
                got: 1
            })
        );
        let delta = receiver.replace(&sender.snapshot(Side::Guest));
        assert_eq!(delta.added, vec![tcp(1)]);
        assert_eq!(receiver.seq(), Some(1));
        assert!(sender.update(Side::Guest, set(&[tcp(1)])).is_none());
        let c2 = sender.update(Side::Guest, set(&[tcp(2)])).unwrap();
        let c3 = sender.update(Side::Guest, set(&[tcp(2), tcp(3)])).unwrap();
        // Skipping c2 is a gap and leaves the state alone.
        assert_eq!(
            receiver.apply(&c3),
            Err(Gap {
                expected: Some(2),
                got: 3
            })
        );
        assert_eq!(receiver.listeners(), &set(&[tcp(1)]));
        let d2 = receiver.apply(&c2).unwrap();
        assert_eq!((d2.added, d2.removed), (vec![tcp(2)], vec![tcp(1)]));
        receiver.apply(&c3).unwrap();
        assert_eq!(receiver.listeners(), sender.listeners());
        // A replayed message is a gap too.
        assert!(receiver.apply(&c3).is_err());
        // Resync: a fresh snapshot gives the difference only.
        let d = receiver.replace(&sender.snapshot(Side::Guest));
        assert!(d.is_empty());
    }

    fn listener() -> impl Strategy<Value = Listener> {
        (
            prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)],
            prop_oneof![
                Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                Just(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ],
            0u16..8,
            any::<bool>(),
        )
            .prop_map(|(proto, addr, port, v6only)| Listener {
                proto,
                addr,
                port,
                v6only,
            })
    }

    proptest! {
        /// Any sequence of sets, sent as changes, rebuilds the same set on the receiver; the
        /// deltas applied to the receiver's old set give its new set.
        #[test]
        fn changes_rebuild_the_set(
            sets in proptest::collection::vec(proptest::collection::btree_set(listener(), 0..12), 1..12)
        ) {
            let mut sender = ListenerSet::new();
            let mut receiver = ListenerSet::awaiting_snapshot();
            receiver.replace(&sender.snapshot(Side::Host));
            for s in sets {
                let before = receiver.listeners().clone();
                if let Some(c) = sender.update(Side::Host, s.clone()) {
                    let d = receiver.apply(&c).unwrap();
                    let mut rebuilt = before;
                    for l in &d.removed { rebuilt.remove(l); }
                    rebuilt.extend(d.added.iter().copied());
                    prop_assert_eq!(&rebuilt, &s);
                }
                prop_assert_eq!(receiver.listeners(), &s);
                prop_assert_eq!(receiver.seq(), sender.seq());
            }
        }
    }
}
