//! The hostnet link wire protocol, version 1.
//!
//! This is the complete specification: a peer written from it alone interoperates with
//! `hostnet-forwarder` and `hostnet-agent`. The code in this module is the reference
//! implementation; the pure decoders ([`decode_header`], [`decode_status`], [`decode_control`],
//! [`decode_frame_head`], [`channel::decode_frame`]) are fuzzed in `fuzz/`.
//!
//! # Roles and streams
//!
//! The **forwarder** (on the host) and the **agent** (in the VM) talk over a *transport*
//! (vsock, hybrid vsock, unix, tcp or QUIC; see [`crate::transport`]) that gives them
//! independent, reliable, ordered byte streams. Every stream is opened by one side (the
//! *opener*) and accepted by the other (the *acceptor*), and carries one thing:
//!
//! * one long-lived **control** stream, opened by the forwarder;
//! * one **TCP relay** stream per relayed TCP connection;
//! * one **datagram channel** carrying every UDP flow of the session (below);
//! * one **dial-back** stream per guest-originated connection to a host service, opened by the
//!   forwarder at the agent's request (so the user configures one address only).
//!
//! In version 1 the forwarder opens every stream and the agent accepts them (the agent gets
//! streams towards the host through dial-back). The rules below are written for "opener" and
//! "acceptor" so that they hold if a later version lets the agent open streams too.
//!
//! # Encoding conventions
//!
//! Fixed-size integers in prefaces, length prefixes and frame heads are **big-endian**.
//! Message bodies are encoded with [postcard](https://postcard.jamesmunns.com/wire-format)
//! 1.x, which means:
//!
//! | type | encoding |
//! |---|---|
//! | `u8` | one byte |
//! | `u16`, `u32`, `u64` | unsigned LEB128 varint (7 bits a byte, low group first, high bit = more; at most 3, 5, 10 bytes; shortest form when encoding; a value out of the type's range is malformed) |
//! | `bool` | one byte, `0` or `1` (anything else is malformed) |
//! | `Option<T>` | `0`, or `1` then `T` |
//! | `Vec<T>`, `String`, bytes | varint count, then the elements (a string is UTF-8) |
//! | struct | its fields in order, no names, no padding |
//! | enum | varint variant tag (listed with each type below), then the variant's fields |
//! | `IpAddr` | enum: tag `0` then 4 octets (`V4`), or tag `1` then 16 octets (`V6`) |
//! | `SocketAddr` | enum: tag `0` then 4 octets (`V4`), or tag `1` then 16 octets (`V6`); then the port as a varint. IPv6 flow info and scope id are not carried |
//!
//! # Envelope
//!
//! The stream header, the relay status and every control message travel in an **envelope**:
//! `length: u32 BE ‖ body` where `body` is exactly `length` bytes holding exactly one
//! postcard-encoded message. A length above the message's limit is an error *before* any byte
//! of the body is read or allocated; bytes left over inside the body after the message are an
//! error ([`ProtoError::TrailingBytes`]). A body whose leading enum tag is unknown is
//! [`ProtoError::UnknownType`]. Readers read exactly the envelope and nothing after it, so the
//! payload that follows on the same stream is never consumed.
//!
//! Limits:
//!
//! | item | limit |
//! |---|---|
//! | stream header body | [`MAX_HEADER_LEN`] = 16 KiB |
//! | relay status body | [`MAX_STATUS_LEN`] = 4 KiB (error message ≤ [`MAX_STATUS_MESSAGE`] = 1 KiB) |
//! | control message body | [`MAX_CONTROL_LEN`] = 4 MiB (≥ 190,000 listeners in one snapshot) |
//! | `MirrorState` reason, host addresses | [`MAX_MIRROR_REASON`] = 256 bytes, [`MAX_MIRROR_HOSTS`] = 64 |
//! | data frame payload | [`MAX_FRAME_DATA`] = 256 KiB (a receiver streams the payload; it need not buffer a whole frame) |
//! | datagram | [`MAX_DATAGRAM`] = 65,535 bytes |
//!
//! # Stream preface and header
//!
//! The opener starts every stream with the **preface**, 6 bytes: the magic [`MAGIC`] =
//! `"HNLK"` (`48 4e 4c 4b`) then the protocol version `u16` BE ([`PROTOCOL_VERSION`] = `1`),
//! immediately followed by the **header** in an envelope:
//!
//! ```text
//! StreamHeader { kind: StreamKind, mode: StreamMode }
//! StreamKind  = 0 Control
//!             | 1 TcpRelay(RelayTarget)
//!             | 2 UdpFlow(RelayTarget)          (older peers only; see "Datagram channel")
//!             | 3 DialBack(DialBackId)          DialBackId = u64
//!             | 4 Datagrams
//! RelayTarget { target: SocketAddr, client: SocketAddr }
//! StreamMode  = 0 Raw | 1 Framed
//! ```
//!
//! `target` is the address to connect to *as seen by the acceptor* (e.g. the guest listener
//! `127.0.0.1:8000`; an unspecified address means that family's loopback); `client` is the
//! original client on the opener's side. The acceptor reads the header under a timeout
//! ([`HEADER_TIMEOUT`], 10 s) and closes the stream on any error: wrong magic
//! ([`ProtoError::BadMagic`]), other version ([`ProtoError::UnsupportedVersion`], naming both;
//! a version change means an incompatible wire format, there is no negotiation at this level),
//! oversize length, unknown kind, malformed body, timeout.
//!
//! # Relay streams and the status
//!
//! On a `TcpRelay` stream the acceptor connects to `target`, then answers with a **status** in
//! an envelope, before any payload byte (an older peer's `UdpFlow` stream is answered `Error`):
//!
//! ```text
//! RelayStatus = 0 Ok | 1 Refused | 2 Forbidden | 3 Unreachable | 4 Timeout
//!             | 5 Error(Option<String>)
//! ```
//!
//! The acceptor bounds its connect by [`CONNECT_TIMEOUT`] (5 s) and answers `Timeout` when it
//! expires; the opener waits for the status under [`STATUS_TIMEOUT`] (10 s). On `Ok` both sides
//! enter the payload phase. On anything else the acceptor closes the stream, and the opener fails its
//! client accordingly (a TCP client gets a reset for `Refused`, like a closed port would give
//! it). The acceptor answers `Forbidden` when policy forbids the target (the agent dials only
//! VM-loopback ports that are currently listening).
//!
//! **Payload before the status.** The opener need not wait for the status before it sends: it
//! may enter the payload phase in its sending direction right after the header, so that a new
//! connection's first bytes travel behind the header instead of a round trip later, and read
//! the status as the first thing of its receiving direction. The acceptor reads exactly the
//! header and nothing past it, so those bytes wait in the stream while it connects; after
//! `Ok` they are the first payload it reads. On any other status the acceptor closes the stream
//! without reading them: **the bytes are discarded, and the opener resets its client** (its
//! writes may fail before it has read the status, e.g. with `EPIPE`; the status, when it can
//! still be read, says why). If no status comes within [`STATUS_TIMEOUT`] (or the stream ends
//! or fails before it), the opener resets its client and *resets* the stream (RESET frame or
//! the transport's reset), never just closes it: payload may already be on its way, and a clean
//! end could pass for the end of the client's data. An acceptor therefore never sees a
//! difference between an opener that waited and one that did not, except that the payload may
//! already be there when it answers. The forwarder sends early on every `TcpRelay` stream; a
//! peer written before this rule (which waited) interoperates unchanged.
//!
//! A `DialBack` stream is the other way round: the agent sent a [`DialBack`] control message
//! with a fresh id; the forwarder connects to the host service, then opens a stream with header
//! `DialBack(id)` and immediately writes the status of its own connect (then, on `Ok`, the
//! payload phase starts; the agent writes no status). The agent matches the id with its pending
//! request; an unknown id gets the stream closed. A request not answered within
//! [`STATUS_TIMEOUT`] is dropped by the agent (its client is reset); a late stream for it is
//! closed.
//!
//! Relay stream state machine (`TcpRelay`):
//!
//! ```text
//! opener:   write preface+header ─┬─► payload out (may start at once, before the status)
//!                                  └─► await status (STATUS_TIMEOUT) ─┬─ Ok ──► payload in
//!                                                                     └─ else ► close, reset client
//!           (no status in time, or the stream fails first ─► reset the stream, reset client)
//! acceptor: read preface+header (HEADER_TIMEOUT), exactly ─► connect target (CONNECT_TIMEOUT)
//!           ─► write status ─┬─ Ok ──► payload (early payload from the opener read first)
//!                            └─ else ► close (early payload discarded unread)
//! payload:  each direction OPEN ─(half-close)─► ENDED; both ENDED ─► close the stream;
//!           a reset in either direction ─► both sides reset their client and close
//! any error before the payload (bad preface, timeout, malformed) ─► close the stream
//! ```
//!
//! # Payload phase: raw or framed
//!
//! After the header (and the status, on relay and dial-back streams) the stream carries
//! payload in the header's [`StreamMode`], in both directions:
//!
//! * **Raw**: the bytes themselves. Half-close is the transport's shutdown(write) and a reset
//!   is the transport's reset (TCP RST through `SO_LINGER` 0; QUIC `RESET_STREAM`/`STOP_SENDING`).
//!   Raw streams can be spliced whole.
//! * **Framed**: a sequence of frames that carry half-close and reset themselves:
//!
//!   ```text
//!   0x01 ‖ len: u32 BE ‖ len bytes    DATA   1 ≤ len ≤ MAX_FRAME_DATA, else an error
//!   0x02                              END    the sender writes no more (half-close)
//!   0x03                              RESET  the sender aborts the stream, both directions
//!   ```
//!
//!   Any other type byte is an error. After END, a sender sends nothing but possibly RESET. A
//!   receiver treats END as EOF of that direction and keeps sending its own data; RESET as a
//!   reset of its client connection (stop both directions, close the stream); the transport
//!   stream ending without END or RESET, or a malformed frame, like a reset. When both ENDs
//!   have been sent and received, each side closes its transport stream. See [`Framed`].
//!   Nothing on the wire says how a frame was made: relays on Linux splice the payload of
//!   large data frames between the transport and the local socket (a head written, then
//!   the payload moved through a pipe; see [`crate::splice`]), and copy the rest.
//!
//! The opener chooses the mode and writes it in the header; the acceptor uses the mode it reads
//! (it may refuse a raw stream on a transport it knows cannot half-close, with status `Error`).
//! The rule ([`StreamMode::for_transport`]) is: **raw where the transport carries half-close
//! and reset and its EOF can only mean that the peer ended the direction, framed everywhere
//! else**, because every relay must turn a reset into a reset, and a peer that died must never
//! pass for one that finished (a truncated transfer would look complete):
//!
//! | transport | half-close | reset | EOF only when the peer ends the direction | mode |
//! |---|---|---|---|---|
//! | `tcp://` | yes | yes (RST) | no: a killed process's sockets are closed by the kernel with a FIN when nothing was left unread | framed |
//! | `quic://` | yes (FIN) | yes (RESET_STREAM / STOP_SENDING) | yes: a stream FIN is sent by the application only; a dead peer is a lost connection | raw |
//! | `unix://` | yes | no: the peer sees EOF (or `ECONNRESET` only if data was left unread) | no | framed |
//! | `vsock://` (AF_VSOCK between kernels) | yes | no: a close is a full shutdown, the peer sees EOF | no | framed |
//! | `hybrid-vsock://` | no: a host shutdown(write) reaches the guest as a full shutdown, a guest shutdown(write) never reaches the host (measured with vhost-device-vsock) | no | no | framed |
//!
//! (`tcp://` ran raw until the agent-kill scenario ran over it: a client streaming through a
//! killed agent saw a clean EOF. In framed mode a stream that ends without END is an error, and
//! the relay resets.)
//!
//! An opener may still choose raw on unix or vsock (e.g. to splice) if it accepts that a reset
//! then reaches the other side as EOF followed by a failed write; the acceptor follows the
//! header either way.
//!
//! So on the VM transports half-close and reset always travel **in-band**: the forwarder picks
//! framed for `hybrid-vsock://` (vhost-device-vsock turns a host `shutdown(SHUT_WR)` into a full
//! shutdown towards the guest and never passes a guest `SHUT_WR` to the host, and has no reset)
//! and for `vsock://` (AF_VSOCK between kernels does carry `SHUT_WR` as a `VSOCK_OP_SHUTDOWN`
//! with the SEND flag, but a close is indistinguishable from an abort, so resets still need the
//! RESET frame). The agent follows the header, so it runs framed on its `vsock://any:PORT`
//! listener whatever the host side is. Over the hypervisor the transport stream is closed only
//! after both ENDs (or a RESET) have crossed, so the backend's full shutdown never cuts a
//! direction short. The real-VM test (`tests/tests/vm.rs`: QEMU, vhost-device-vsock, the agent
//! in the guest) checks half-close, resets and 64 MiB both ways over this path.
//!
//! **Connection caps.** Every relayed TCP connection and dial-back is one transport
//! connection, plus one for the control stream and one for the datagram channel (UDP flows,
//! however many, take none of their own). Firecracker and Cloud Hypervisor allow 1023
//! connections per vsock device; at the cap the hypervisor turns the host's `CONNECT` away by
//! closing its unix connection without a reply, as for a port nobody listens on. The
//! forwarder then gets [`TransportError::NoListener`](crate::transport::TransportError) at once
//! (or `HandshakeTimeout` after [`Timeouts::handshake`](crate::transport::Timeouts), 5 s, from
//! a backend that never answers: nothing waits longer) and counts it in `link_open_failed`
//! (`hostnet-forwarder status`): a host TCP client is reset (warning logged), and a dial-back
//! is abandoned, so the agent
//! resets its guest client when no stream has come within [`STATUS_TIMEOUT`]. Established
//! relays and the control stream are untouched, and the next connection succeeds once one has
//! closed. To refuse before the hypervisor does, run the forwarder with
//! `--max-streams 1000` (its own limit, counted in `streams_refused`; the default, 8192, is
//! above the cap). Multiplexing streams over fewer connections is a later protocol step.
//!
//! # Datagram channel
//!
//! UDP does not get a stream per flow: every UDP flow of a session, in both directions, rides
//! one **datagram channel**. Once both `Hello`s list [`caps::UDP_CHANNEL`], the forwarder opens
//! one stream with header `{Datagrams, Raw}` (no status; the agent closes any other mode, and
//! a second channel replaces the first). Both sides then write **channel frames** on it
//! ([`channel`]; big-endian):
//!
//! ```text
//! DATA   0x01 ‖ flow: u32 ‖ len: u16 ‖ len bytes
//! OPEN   0x02 ‖ flow: u32 ‖ target: Addr ‖ client: Addr ‖ len: u16 ‖ len bytes
//! CLOSE  0x03 ‖ flow: u32 ‖ reason: u8
//! Addr   = 0x04 ‖ 4 octets ‖ port: u16  |  0x06 ‖ 16 octets ‖ port: u16
//! reason = 0 Idle | 1 Evicted | 2 Refused | 3 Forbidden | 4 Unreachable | 5 Unknown | 6 Gone
//! ```
//!
//! * A **flow** is one client of a listening socket on one side (a host client of a mirrored
//!   guest listener, or a VM client of a mirrored host listener). Its side (the *opener*)
//!   picks the id: the forwarder's flows have bit 31 clear, the agent's have it set
//!   ([`channel::AGENT_FLOW`]); 0 and `0x8000_0000` are never used. The opener sends the
//!   client's first datagram as OPEN, with `target` (as in [`RelayTarget`]: the address the
//!   receiver sends to, an unspecified address meaning that family's loopback) and `client`;
//!   later datagrams as DATA. Nothing waits: there is no answer to an OPEN.
//! * The receiver of an OPEN (the *dialer*) checks `target` against its policy (the agent:
//!   a VM-loopback port listening now; the forwarder: a reported host listener that the
//!   reverse rules allow), makes a UDP socket on that family's loopback connected to it,
//!   sends the datagram, and sends the target's replies back as DATA of the same flow. A
//!   target it turns away is answered with CLOSE (`Forbidden`, `Unreachable`; `Refused` also
//!   when ICMP port unreachable comes back on the socket later), which the opener counts and
//!   logs. An OPEN for a flow the dialer has is a DATA; an OPEN with the dialer's own id bit
//!   is ignored (counted).
//! * A **CLOSE** ends a flow on the receiver's side. Either side closes a flow idle for its
//!   own timeout (`Idle`), the least recently used flow when its flow limit is reached
//!   (`Evicted`), a flow whose listener closed (`Gone`), and answers DATA for an id of the
//!   peer's that it does not know with `Unknown` (it closed the flow while the datagram was
//!   on its way: the datagram is lost, the opener forgets the flow and opens it afresh with
//!   the client's next datagram). DATA for an unknown id of one's own is dropped. Since every
//!   close is told, the two sides' limits and timeouts never disagree into refusals: a flow
//!   one side dropped is reopened, not refused.
//! * Frames of different flows interleave freely; each frame is written whole. A sender never
//!   blocks on the channel: when it cannot take a frame now (its queue towards the peer holds
//!   1 MiB, about 100 ms of small datagrams at full speed), the datagram is dropped and
//!   counted, as a congested network would drop it, rather than delivered late.
//!   A malformed frame (unknown type, unknown address family or close reason) ends the
//!   channel; the stream ending ends every flow.
//! * On `quic://` each frame other than CLOSE goes as one QUIC datagram (RFC 9221, exactly one
//!   frame per datagram; a datagram with a bad or partial frame is dropped and counted) when it
//!   fits the connection's current datagram size, otherwise on the channel stream, whole. So
//!   every datagram up to [`MAX_DATAGRAM`] is delivered whole on every transport; QUIC
//!   datagrams may be lost or reordered like the UDP they carry, CLOSE never is.
//!
//! Limits: a datagram is at most [`MAX_DATAGRAM`] (65,535) bytes (its `u16` length cannot say
//! more); a frame at most [`channel::MAX_FRAME`] bytes; a receiver needs no more than
//! [`channel::MAX_FRAME_HEAD`] (45) bytes to know a frame's length.
//!
//! **Old peers.** Until this channel, each flow was a `UdpFlow` stream (tag 2, capability
//! `udp`). Neither side lists `udp` any more: an older forwarder then mirrors no UDP listener
//! (TCP goes on), and a `UdpFlow` stream that arrives anyway is answered
//! `Error("UDP flow streams are not supported ...")`; a newer forwarder facing an older agent
//! (no [`caps::UDP_CHANNEL`]) mirrors no UDP listener and says so in a warning. Upgrade both
//! halves together for UDP.
//!
//! # Control stream
//!
//! The control stream carries control messages in envelopes, both ways, in the payload phase
//! (raw or framed like any other stream; it never half-closes, so the mode only matters for its
//! final close). Messages:
//!
//! ```text
//! ControlMessage = 0 Hello { revision: u16, role: Role, capabilities: Vec<String>,
//!                            auth: Option<Vec<u8>> }
//!                | 1 Snapshot { side: Side, seq: u64, listeners: Vec<Listener> }
//!                | 2 Changes  { side: Side, seq: u64, added: Vec<Listener>,
//!                               removed: Vec<Listener> }
//!                | 3 Resync   { side: Side }
//!                | 4 DialBack { id: u64, proto: Proto, target: SocketAddr, client: SocketAddr }
//!                | 5 Heartbeat { counter: u64, unix_millis: u64 }
//!                | 6 Error    { code: ErrorCode, fatal: bool, message: String }
//!                | 7 MirrorState { proto: Proto, port: u16, bind: IpAddr, hosts: Vec<IpAddr>,
//!                                  state: BindState, reason: Option<String> }
//! Role      = 0 Forwarder | 1 Agent
//! Side      = 0 Guest (the agent's listeners) | 1 Host (the forwarder's listeners)
//! Proto     = 0 Tcp | 1 Udp
//! Listener  = { proto: Proto, addr: IpAddr, port: u16, v6only: bool }
//! ErrorCode = 0 Protocol | 1 Version | 2 Auth | 3 Internal
//! BindState = 0 Active | 1 Conflict | 2 Retrying | 3 Closed
//! ```
//!
//! State machine (each side; "close" means close the control stream, which tears down every
//! listener mirrored for the peer and every stream that depended on it; the forwarder then
//! reconnects with back-off and everything resynchronises from snapshots). A side closes
//! cleanly by half-closing the stream (shutdown; END in framed mode) at a message boundary;
//! the stream ending any other way (inside a message, without END, a reset) is logged as an
//! error, with the same teardown:
//!
//! 1. **Hello.** The forwarder opens the stream, writes the preface, the header
//!    `{Control, mode}` and its `Hello`. The agent reads the header, then writes its own
//!    `Hello`. Each side must receive the peer's `Hello` as its first message within
//!    [`HELLO_TIMEOUT`] (10 s), else closes. A side checks `role` (the peer must be the other
//!    role) and `auth` where the transport authenticates in-band (the proof's format is the
//!    transport's, see [`crate::transport`]; `None` otherwise), and answers a failure with
//!    `Error{Auth or Protocol, fatal}` then closes. The session's revision is the minimum of
//!    both `revision`s ([`CONTROL_REVISION`] = 1 is the only one so far); a side that cannot
//!    speak it sends `Error{Version, fatal}` and closes. Optional features are used only if
//!    both sides list the capability ([`caps`]); unknown capability names are ignored.
//! 2. **Snapshots.** Right after `Hello` the agent sends `Snapshot{Guest}` of its listeners;
//!    if both sides have [`caps::REVERSE`], the forwarder sends `Snapshot{Host}` of its own.
//!    Neither side reports a socket it created itself to mirror the other side's listeners, nor
//!    a port it is mirroring for the other side (loop prevention).
//!    A receiver replaces its view of that side with the snapshot ([`ListenerSet::replace`]),
//!    and opens or closes its mirrors for the difference.
//! 3. **Running.** The owner of a listener set sends `Changes` whenever it changes: `seq` is
//!    exactly one more than the previous `Snapshot`/`Changes` of that side
//!    ([`ListenerSet::update`]). A receiver applies changes in order ([`ListenerSet::apply`]);
//!    a `seq` that is not the next one (or `Changes` before any `Snapshot`) is a **gap**: the
//!    receiver ignores that message and sends `Resync{side}`, and the owner answers with a
//!    fresh `Snapshot` (whose `seq` continues its counter). A `Snapshot` may also be sent at
//!    any time unprompted. Adding a listener already present, or removing one absent, is a
//!    no-op. Listeners are compared on all four fields.
//! 4. **Dial-back** (both sides have [`caps::DIAL_BACK`]): the agent sends `DialBack` with an
//!    id unique among its pending requests; the forwarder answers with a `DialBack` stream
//!    (above), never on the control stream.
//! 5. **Mirror states** (the forwarder listed [`caps::MIRROR_STATE`] and both sides have
//!    [`caps::REVERSE`]; the agent lists it too): the agent sends `MirrorState` for each
//!    reverse mirror (one socket on the VM's loopback: `bind` is `127.0.0.1` or `::1`, at
//!    `port`) whenever its bind result changes: `Active` once bound, `Conflict` while the
//!    address is taken in the VM (`EADDRINUSE`, or a port that needs a right the agent lacks),
//!    `Retrying` for any other bind error (both are retried with back-off, 200 ms doubling to
//!    5 s), with a `reason` of at most [`MAX_MIRROR_REASON`] (256) bytes; `hosts` lists the
//!    reported host listener addresses the mirror serves, as the forwarder named them (at most
//!    [`MAX_MIRROR_HOSTS`] = 64), and the agent sends the state again when that list changes.
//!    When the mirror goes away (its host listeners were removed, or the guest now reports
//!    that port itself) it sends `Closed` if it had sent a state for it. Mirrors are made
//!    afresh for each session, so after the forwarder's `Snapshot{Host}` the states of the
//!    new session follow as the binds complete; the forwarder forgets all states when the
//!    session ends. The forwarder keys a state by (`proto`, `port`, `bind`) and shows it in
//!    `status` against each host listener in `hosts` (an entry with no state stays
//!    `reported`, as with an agent that does not send them). A reason longer than the limit
//!    or too many `hosts` is [`ProtoError::Invalid`] on decode (a protocol error); a
//!    forwarder that did not list the capability treats the message as unexpected.
//! 6. **Heartbeats.** Each side sends `Heartbeat` every [`HEARTBEAT_INTERVAL`] (5 s), with
//!    `counter` incremented each time; a side that receives no message at all for
//!    [`HEARTBEAT_TIMEOUT`] (15 s) closes. Heartbeats only find a peer that is there but silent
//!    (a stopped process, a paused VM, a path that drops everything) on a stream transport; a
//!    peer that exits, or whose VM stops, is seen at once as the end of its streams (EOF or
//!    reset), and on QUIC, where a vanished peer sends nothing, the connection's idle timeout
//!    (6 s, see [`crate::transport`]) ends it first. The interval is long so that an idle
//!    session wakes each side about once a second (a laptop on battery); it was 1 s / 3 s.
//! 7. **Errors.** `Error{fatal: false}` is logged; `Error{fatal: true}` is followed by close.
//!    Receiving a second `Hello`, a message with an unknown tag ([`ProtoError::UnknownType`]),
//!    or a malformed message is a protocol error: the receiver sends `Error{Protocol, fatal}`
//!    and closes.
//!
//! **Forward compatibility.** The preface version changes only for an incompatible change of
//! the stream format. New control messages, new fields and new stream kinds come with a new
//! control revision or a capability, and a peer sends them only when the `Hello` exchange says
//! the other side knows them; so an unknown tag is always a protocol error, never silently
//! skipped. New fields are added as new messages or new enum variants, never appended to
//! existing structs (postcard bodies are not self-describing).
//!
//! # Module map
//!
//! * [`header`]: preface and [`StreamHeader`]; [`read_header`] / [`write_header`].
//! * [`status`]: [`RelayStatus`]; [`read_status`] / [`write_status`].
//! * [`control`]: [`ControlMessage`] and its parts; [`read_control`] / [`write_control`];
//!   [`ListenerSet`] and [`diff`], the pure listener-set state.
//! * [`framed`]: [`Framed`], the framed-mode adaptor, [`PayloadStream`] (raw or framed, as
//!   the header says), and [`decode_frame_head`].
//! * [`channel`]: the frames of the datagram channel (the channel itself is
//!   [`crate::udp`]).

use std::time::Duration;

pub mod channel;
pub mod control;
mod envelope;
mod error;
pub mod framed;
pub mod header;
pub mod status;

pub use control::{
    BindState, Changes, ControlError, ControlMessage, Delta, DialBack, ErrorCode, Gap, Heartbeat,
    Hello, Listener, ListenerSet, MirrorState, Proto, Resync, Role, Side, Snapshot, decode_control,
    diff, encode_control, read_control, write_control,
};
pub use error::ProtoError;
pub use framed::{FrameHead, Framed, PayloadStream, decode_frame_head};
pub use header::{
    DialBackId, RelayTarget, StreamHeader, StreamKind, StreamMode, decode_header, encode_header,
    read_header, write_header,
};
pub use status::{
    RelayStatus, StatusReader, decode_status, encode_status, read_status, write_status,
};

/// The first four bytes of every link stream.
pub const MAGIC: [u8; 4] = *b"HNLK";
/// The version in the preface; a peer with another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;
/// The control revision this side speaks (sent in [`Hello::revision`]).
pub const CONTROL_REVISION: u16 = 1;

/// Limit on a stream header's body.
pub const MAX_HEADER_LEN: u32 = 16 * 1024;
/// Limit on a relay status's body.
pub const MAX_STATUS_LEN: u32 = 4 * 1024;
/// Limit on the message of [`RelayStatus::Error`] (the encoder cuts longer ones).
pub const MAX_STATUS_MESSAGE: usize = 1024;
/// Limit on a control message's body.
pub const MAX_CONTROL_LEN: u32 = 4 * 1024 * 1024;
/// Limit on the reason of a [`MirrorState`] (the agent cuts longer ones with
/// [`MirrorState::cut_reason`]).
pub const MAX_MIRROR_REASON: usize = 256;
/// Limit on the host addresses of a [`MirrorState`].
pub const MAX_MIRROR_HOSTS: usize = 64;
/// Limit on a data frame's payload in framed mode.
pub const MAX_FRAME_DATA: u32 = 256 * 1024;
/// Limit on a datagram of a UDP flow (the `u16` length of a channel frame).
pub const MAX_DATAGRAM: usize = 65_535;

/// How long an acceptor waits for the whole preface and header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an opener waits for the relay status (and the agent for a dial-back stream).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an acceptor (or the forwarder serving a dial-back) tries to connect to the target
/// before answering [`RelayStatus::Timeout`]; less than [`STATUS_TIMEOUT`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long each side waits for the peer's `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often each side sends a heartbeat on the control stream.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Silence on the control stream after which a side closes it.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);

/// Capability names for [`Hello::capabilities`].
pub mod caps {
    /// UDP flows on the session's datagram channel (a `Datagrams` stream).
    pub const UDP_CHANNEL: &str = "udp-channel";
    /// The forwarder's listeners are mirrored into the VM (`Snapshot{Host}`).
    pub const REVERSE: &str = "reverse";
    /// The agent may send `DialBack` requests.
    pub const DIAL_BACK: &str = "dial-back";
    /// The agent reports the bind results of its reverse mirrors (`MirrorState`); it sends
    /// them only to a forwarder that listed this (and [`REVERSE`]).
    pub const MIRROR_STATE: &str = "mirror-state";
}
