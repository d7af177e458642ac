//! Wire protocol codecs: round trips, byte splits, limits, bad input, timeouts.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hostnet_link::proto::{
    self, BindState, Changes, ControlError, ControlMessage, DialBack, DialBackId, ErrorCode,
    Heartbeat, Hello, Listener, MAX_CONTROL_LEN, MAX_HEADER_LEN, MAX_MIRROR_HOSTS,
    MAX_MIRROR_REASON, MirrorState, Proto, ProtoError, RelayStatus, RelayTarget, Resync, Role,
    Side, Snapshot, StreamHeader, StreamKind, StreamMode,
};
use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

// ---------- strategies ----------

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
    ]
}

fn sockaddr() -> impl Strategy<Value = SocketAddr> {
    // Flow info and scope id are not carried on the wire.
    (ip(), any::<u16>()).prop_map(|(ip, port)| match ip {
        IpAddr::V4(_) => SocketAddr::new(ip, port),
        IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
    })
}

fn proto_() -> impl Strategy<Value = Proto> {
    prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)]
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Guest), Just(Side::Host)]
}

fn listener() -> impl Strategy<Value = Listener> {
    (proto_(), ip(), any::<u16>(), any::<bool>()).prop_map(|(proto, addr, port, v6only)| Listener {
        proto,
        addr,
        port,
        v6only,
    })
}

fn header() -> impl Strategy<Value = StreamHeader> {
    let target =
        || (sockaddr(), sockaddr()).prop_map(|(target, client)| RelayTarget { target, client });
    let kind = prop_oneof![
        Just(StreamKind::Control),
        target().prop_map(StreamKind::TcpRelay),
        target().prop_map(StreamKind::UdpFlow),
        any::<u64>().prop_map(|id| StreamKind::DialBack(DialBackId(id))),
    ];
    let mode = prop_oneof![Just(StreamMode::Raw), Just(StreamMode::Framed)];
    (kind, mode).prop_map(|(kind, mode)| StreamHeader { kind, mode })
}

fn status() -> impl Strategy<Value = RelayStatus> {
    prop_oneof![
        Just(RelayStatus::Ok),
        Just(RelayStatus::Refused),
        Just(RelayStatus::Forbidden),
        Just(RelayStatus::Unreachable),
        Just(RelayStatus::Timeout),
        proptest::option::of(".{0,200}").prop_map(RelayStatus::Error),
    ]
}

fn control() -> impl Strategy<Value = ControlMessage> {
    let listeners = || proptest::collection::vec(listener(), 0..20);
    prop_oneof![
        (
            any::<u16>(),
            prop_oneof![Just(Role::Forwarder), Just(Role::Agent)],
            proptest::collection::vec("[a-z-]{0,16}", 0..5),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        )
            .prop_map(
                |(revision, role, capabilities, auth)| ControlMessage::Hello(Hello {
                    revision,
                    role,
                    capabilities,
                    auth
                })
            ),
        (side(), any::<u64>(), listeners()).prop_map(|(side, seq, listeners)| {
            ControlMessage::Snapshot(Snapshot {
                side,
                seq,
                listeners,
            })
        }),
        (side(), any::<u64>(), listeners(), listeners()).prop_map(|(side, seq, added, removed)| {
            ControlMessage::Changes(Changes {
                side,
                seq,
                added,
                removed,
            })
        }),
        side().prop_map(|side| ControlMessage::Resync(Resync { side })),
        (any::<u64>(), proto_(), sockaddr(), sockaddr()).prop_map(|(id, proto, target, client)| {
            ControlMessage::DialBack(DialBack {
                id: DialBackId(id),
                proto,
                target,
                client,
            })
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(counter, unix_millis)| {
            ControlMessage::Heartbeat(Heartbeat {
                counter,
                unix_millis,
            })
        }),
        (
            prop_oneof![
                Just(ErrorCode::Protocol),
                Just(ErrorCode::Version),
                Just(ErrorCode::Auth),
                Just(ErrorCode::Internal)
            ],
            any::<bool>(),
            ".{0,100}"
        )
            .prop_map(
                |(code, fatal, message)| ControlMessage::Error(ControlError {
                    code,
                    fatal,
                    message
                })
            ),
        (
            proto_(),
            any::<u16>(),
            ip(),
            proptest::collection::vec(ip(), 0..4),
            prop_oneof![
                Just(BindState::Active),
                Just(BindState::Conflict),
                Just(BindState::Retrying),
                Just(BindState::Closed)
            ],
            proptest::option::of(".{0,60}"),
        )
            .prop_map(|(proto, port, bind, hosts, state, reason)| {
                ControlMessage::MirrorState(MirrorState {
                    proto,
                    port,
                    bind,
                    hosts,
                    state,
                    reason: reason.map(MirrorState::cut_reason),
                })
            }),
    ]
}

// ---------- a reader that hands out bytes in given chunk sizes ----------

/// Returns `data` in reads of the given sizes (cycled), with a `Pending` before every other
/// read, and never more than asked for.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    turn: usize,
}

impl Chunked {
    fn new(data: Vec<u8>, sizes: Vec<usize>) -> Self {
        Chunked {
            data,
            pos: 0,
            sizes,
            turn: 0,
        }
    }
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.turn += 1;
        if self.turn % 2 == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let size = self.sizes[(self.turn / 2) % self.sizes.len()].max(1);
        let n = size.min(buf.remaining()).min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn encoded_stream(h: &StreamHeader, st: &RelayStatus, msgs: &[ControlMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode_header(h, &mut out).expect("header");
    proto::encode_status(st, &mut out).expect("status");
    for m in msgs {
        proto::encode_control(m, &mut out).expect("control");
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn header_round_trip(h in header(), payload in proptest::collection::vec(any::<u8>(), 0..32)) {
        let mut buf = Vec::new();
        proto::encode_header(&h, &mut buf).unwrap();
        let header_len = buf.len();
        buf.extend_from_slice(&payload);
        let (back, used) = proto::decode_header(&buf).unwrap().unwrap();
        prop_assert_eq!(back, h);
        prop_assert_eq!(used, header_len);
        // Every strict prefix asks for more bytes.
        for cut in 0..header_len {
            prop_assert!(proto::decode_header(&buf[..cut]).unwrap().is_none());
        }
    }

    #[test]
    fn status_round_trip(s in status()) {
        let mut buf = Vec::new();
        proto::encode_status(&s, &mut buf).unwrap();
        let (back, used) = proto::decode_status(&buf).unwrap().unwrap();
        prop_assert_eq!(back, s);
        prop_assert_eq!(used, buf.len());
    }

    #[test]
    fn control_round_trip(m in control()) {
        let mut buf = Vec::new();
        proto::encode_control(&m, &mut buf).unwrap();
        let (back, used) = proto::decode_control(&buf).unwrap().unwrap();
        prop_assert_eq!(back, m);
        prop_assert_eq!(used, buf.len());
        for cut in 0..buf.len() {
            prop_assert!(proto::decode_control(&buf[..cut]).unwrap().is_none());
        }
    }

    /// Channel frames back to back decode to themselves, each needing all its bytes.
    #[test]
    fn channel_frames_round_trip(
        frames in proptest::collection::vec(
            (any::<u32>(), 0u8..3, sockaddr(), sockaddr(), proptest::collection::vec(any::<u8>(), 0..600), 0u8..7),
            1..8,
        ),
    ) {
        use proto::channel::{CloseReason, Frame};
        let frames: Vec<Frame<'_>> = frames
            .iter()
            .map(|(flow, kind, target, client, payload, reason)| match kind {
                0 => Frame::Data { flow: *flow, payload },
                1 => Frame::Open { flow: *flow, target: *target, client: *client, payload },
                _ => Frame::Close { flow: *flow, reason: CloseReason::from_code(*reason).unwrap() },
            })
            .collect();
        let mut buf = Vec::new();
        for f in &frames {
            proto::channel::encode_frame(f, &mut buf).unwrap();
        }
        let mut at = 0;
        for f in &frames {
            let (back, used) = proto::channel::decode_frame(&buf[at..]).unwrap().unwrap();
            prop_assert_eq!(&back, f);
            prop_assert!(proto::channel::decode_frame(&buf[at..at + used - 1]).unwrap().is_none());
            at += used;
        }
        prop_assert_eq!(at, buf.len());
    }

    /// A whole stream (header, status, control messages, then raw payload) read
    /// through arbitrary short reads decodes the same, and leaves the payload intact.
    #[test]
    fn arbitrary_splits_decode_identically(
        h in header(),
        st in status(),
        msgs in proptest::collection::vec(control(), 0..6),
        payload in proptest::collection::vec(any::<u8>(), 0..500),
        sizes in proptest::collection::vec(1usize..40, 1..16),
    ) {
        let mut bytes = encoded_stream(&h, &st, &msgs);
        let mut control_only = Vec::new();
        for m in &msgs {
            proto::encode_control(m, &mut control_only).unwrap();
        }
        bytes.extend_from_slice(&payload);
        rt().block_on(async {
            let mut r = Chunked::new(bytes, sizes);
            let got_h = proto::read_header(&mut r, Duration::from_secs(5)).await.unwrap();
            assert_eq!(got_h, h);
            let got_st = proto::read_status(&mut r, Duration::from_secs(5)).await.unwrap();
            assert_eq!(got_st, st);
            for m in &msgs {
                let got = proto::read_control(&mut r).await.unwrap().unwrap();
                assert_eq!(&got, m);
            }
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, payload);
        });
        // The pure decoder agrees, fed one byte more at a time.
        let mut pos = 0;
        let mut seen = Vec::new();
        let mut end = 0;
        while end <= control_only.len() {
            match proto::decode_control(&control_only[pos..end]).unwrap() {
                Some((m, used)) => { seen.push(m); pos += used; }
                None => end += 1,
            }
        }
        prop_assert_eq!(seen, msgs);
    }
}

// ---------- the header never swallows payload ----------

#[tokio::test]
async fn header_and_status_do_not_swallow_payload_on_a_socket() {
    // A TCP pair on loopback: a real socket on every host.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = tokio::join!(
        tokio::net::TcpStream::connect(l.local_addr().unwrap()),
        l.accept()
    );
    let (mut a, (mut b, _)) = (a.unwrap(), b.unwrap());
    let h = StreamHeader {
        kind: StreamKind::TcpRelay(RelayTarget {
            target: "127.0.0.1:8000".parse().unwrap(),
            client: "[::1]:51000".parse().unwrap(),
        }),
        mode: StreamMode::Raw,
    };
    let mut one_write = Vec::new();
    proto::encode_header(&h, &mut one_write).unwrap();
    proto::encode_status(&RelayStatus::Ok, &mut one_write).unwrap();
    one_write.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
    a.write_all(&one_write).await.unwrap();
    a.shutdown().await.unwrap();

    assert_eq!(
        proto::read_header(&mut b, Duration::from_secs(5))
            .await
            .unwrap(),
        h
    );
    assert_eq!(
        proto::read_status(&mut b, Duration::from_secs(5))
            .await
            .unwrap(),
        RelayStatus::Ok
    );
    let mut rest = Vec::new();
    b.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"GET / HTTP/1.0\r\n\r\n");
}

// ---------- bad input ----------

async fn header_error(bytes: &[u8]) -> ProtoError {
    let mut r = bytes;
    proto::read_header(&mut r, Duration::from_secs(5))
        .await
        .expect_err("must fail")
}

fn control_header_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode_header(
        &StreamHeader {
            kind: StreamKind::Control,
            mode: StreamMode::Raw,
        },
        &mut out,
    )
    .unwrap();
    out
}

#[tokio::test]
async fn wrong_magic_is_an_error() {
    let e = header_error(b"GET / HTTP/1.1\r\n").await;
    assert!(
        matches!(e, ProtoError::BadMagic { got, .. } if &got == b"GET "),
        "{e}"
    );
    assert!(matches!(
        proto::decode_header(b"SSH-"),
        Err(ProtoError::BadMagic { .. })
    ));
}

#[tokio::test]
async fn unknown_version_names_both_versions() {
    let mut bytes = control_header_bytes();
    bytes[4..6].copy_from_slice(&7u16.to_be_bytes());
    let e = header_error(&bytes).await;
    assert!(
        matches!(e, ProtoError::UnsupportedVersion { theirs: 7, ours: 1 }),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains('7') && text.contains('1'), "{text}");
}

#[tokio::test]
async fn unknown_header_kind_is_an_error() {
    let mut bytes = proto::header::preface().to_vec();
    bytes.extend_from_slice(&2u32.to_be_bytes());
    bytes.extend_from_slice(&[9, 0]); // kind tag 9, mode Raw
    let e = header_error(&bytes).await;
    assert!(
        matches!(
            e,
            ProtoError::UnknownType {
                what: "stream header",
                tag: 9
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn oversize_lengths_are_errors() {
    let mut bytes = proto::header::preface().to_vec();
    bytes.extend_from_slice(&(MAX_HEADER_LEN + 1).to_be_bytes());
    let e = header_error(&bytes).await;
    assert!(matches!(e, ProtoError::TooLarge { .. }), "{e:?}");
    assert!(matches!(
        proto::decode_header(&bytes),
        Err(ProtoError::TooLarge { .. })
    ));

    let huge = u32::MAX.to_be_bytes();
    let mut r = &huge[..];
    let e = proto::read_control(&mut r).await.unwrap_err();
    assert!(matches!(e, ProtoError::TooLarge { max, .. } if max == u64::from(MAX_CONTROL_LEN)));
    let mut r = &huge[..];
    let e = proto::read_status(&mut r, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, ProtoError::TooLarge { .. }));
    let mut too_big = Vec::new();
    let data = |payload| proto::channel::Frame::Data { flow: 1, payload };
    let over = vec![0; proto::MAX_DATAGRAM + 1];
    assert!(proto::channel::encode_frame(&data(&over), &mut too_big).is_err());
    assert!(proto::channel::encode_frame(&data(&over[1..]), &mut too_big).is_ok());
}

#[tokio::test]
async fn unknown_control_message_and_status_are_typed_errors() {
    let body = [42u8];
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    let mut r = &bytes[..];
    let e = proto::read_control(&mut r).await.unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::UnknownType {
                what: "control message",
                tag: 42
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("unknown control message type 42"));
    let mut r = &bytes[..];
    let e = proto::read_status(&mut r, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        ProtoError::UnknownType {
            what: "relay status",
            tag: 42
        }
    ));
    // A known tag with a broken body is malformed; leftover bytes are an error too.
    let bad_bool = [1u32.to_be_bytes().as_slice(), &[5]].concat(); // Heartbeat, truncated
    assert!(matches!(
        proto::decode_control(&bad_bool),
        Err(ProtoError::Malformed { .. })
    ));
    let mut ok = Vec::new();
    proto::encode_status(&RelayStatus::Ok, &mut ok).unwrap();
    ok[3] += 1;
    ok.push(0);
    assert!(matches!(
        proto::decode_status(&ok),
        Err(ProtoError::TrailingBytes { count: 1, .. })
    ));
}

#[tokio::test]
async fn truncated_input_is_an_error_not_a_hang() {
    let full = control_header_bytes();
    for cut in 1..full.len() {
        let e = header_error(&full[..cut]).await;
        assert!(
            matches!(e, ProtoError::Truncated { .. }),
            "cut {cut}: {e:?}"
        );
    }
    assert!(matches!(header_error(b"").await, ProtoError::Closed { .. }));
    let mut msg = Vec::new();
    proto::encode_control(
        &ControlMessage::Resync(Resync { side: Side::Host }),
        &mut msg,
    )
    .unwrap();
    let mut r = &msg[..msg.len() - 1];
    assert!(matches!(
        proto::read_control(&mut r).await,
        Err(ProtoError::Truncated { .. })
    ));
    let mut r: &[u8] = &[];
    assert!(proto::read_control(&mut r).await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn silent_peer_times_out() {
    let (_a, mut b) = tokio::io::duplex(64);
    let e = proto::read_header(&mut b, proto::HEADER_TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::Timeout {
                what: "stream header",
                ..
            }
        ),
        "{e:?}"
    );

    // A peer that stops half-way also times out.
    let (mut a, mut b) = tokio::io::duplex(64);
    a.write_all(&control_header_bytes()[..5]).await.unwrap();
    let e = proto::read_header(&mut b, proto::HEADER_TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(e, ProtoError::Timeout { .. }), "{e:?}");

    let e = proto::read_status(&mut b, proto::STATUS_TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        ProtoError::Timeout {
            what: "relay status",
            ..
        }
    ));
    drop(a);
}

#[tokio::test]
async fn mirror_state_limits_hold_on_decode_and_encode() {
    let msg = |reason: String, hosts: usize| {
        ControlMessage::MirrorState(MirrorState {
            proto: Proto::Tcp,
            port: 80,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            hosts: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED); hosts],
            state: BindState::Conflict,
            reason: Some(reason),
        })
    };
    // At the limits: fine both ways.
    let ok = msg("é".repeat(MAX_MIRROR_REASON / 2), MAX_MIRROR_HOSTS);
    let mut out = Vec::new();
    proto::encode_control(&ok, &mut out).unwrap();
    assert_eq!(proto::decode_control(&out).unwrap().unwrap().0, ok);
    // Over them: the encoder refuses, and hand-made bytes are Invalid on decode and read.
    for bad in [
        msg("x".repeat(MAX_MIRROR_REASON + 1), 1),
        msg(String::new(), MAX_MIRROR_HOSTS + 1),
    ] {
        let mut out = Vec::new();
        assert!(matches!(
            proto::encode_control(&bad, &mut out),
            Err(ProtoError::Invalid { .. })
        ));
        let body = postcard::to_allocvec(&bad).unwrap();
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        assert!(matches!(
            proto::decode_control(&bytes),
            Err(ProtoError::Invalid { .. })
        ));
        let mut r = &bytes[..];
        assert!(matches!(
            proto::read_control(&mut r).await,
            Err(ProtoError::Invalid { .. })
        ));
    }
    // The agent's helper cuts at a character boundary.
    let cut = MirrorState::cut_reason("é".repeat(MAX_MIRROR_REASON));
    assert!(cut.len() <= MAX_MIRROR_REASON && cut.len() > MAX_MIRROR_REASON - 2);
}

#[test]
fn status_helpers() {
    let long = "é".repeat(2000);
    let RelayStatus::Error(Some(m)) = RelayStatus::error(long) else {
        panic!("not an error status")
    };
    assert!(m.len() <= proto::MAX_STATUS_MESSAGE);
    let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
    assert_eq!(
        RelayStatus::from_connect_error(&refused),
        RelayStatus::Refused
    );
    assert_eq!(
        RelayStatus::Refused.to_io_error().map(|e| e.kind()),
        Some(io::ErrorKind::ConnectionRefused)
    );
    assert!(RelayStatus::Ok.to_io_error().is_none());
}

// ---------- golden bytes: the encodings the module docs describe ----------

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn golden_bytes_match_the_documented_encoding() {
    let v4: SocketAddr = "127.0.0.1:8000".parse().unwrap();
    let v6: SocketAddr = "[::1]:51000".parse().unwrap();
    let cases_header = [
        (
            "484e4c4b0001000000020000",
            StreamHeader {
                kind: StreamKind::Control,
                mode: StreamMode::Raw,
            },
        ),
        (
            "484e4c4b00010000001d01007f000001c03e0100000000000000000000000000000001b88e0301",
            StreamHeader {
                kind: StreamKind::TcpRelay(RelayTarget {
                    target: v4,
                    client: v6,
                }),
                mode: StreamMode::Framed,
            },
        ),
        (
            "484e4c4b000100000003030700",
            StreamHeader {
                kind: StreamKind::DialBack(DialBackId(7)),
                mode: StreamMode::Raw,
            },
        ),
    ];
    for (hex, h) in cases_header {
        let mut out = Vec::new();
        proto::encode_header(&h, &mut out).unwrap();
        assert_eq!(out, unhex(hex), "{h:?}");
    }
    for (hex, s) in [
        ("0000000100", RelayStatus::Ok),
        ("0000000104", RelayStatus::Timeout),
        ("000000050501026e6f", RelayStatus::Error(Some("no".into()))),
    ] {
        let mut out = Vec::new();
        proto::encode_status(&s, &mut out).unwrap();
        assert_eq!(out, unhex(hex), "{s:?}");
    }
    let listener = |proto, addr: &str, port, v6only| Listener {
        proto,
        addr: addr.parse().unwrap(),
        port,
        v6only,
    };
    for (hex, m) in [
        (
            "000000090001010103756470 00",
            ControlMessage::Hello(Hello {
                revision: 1,
                role: Role::Agent,
                capabilities: vec!["udp".into()],
                auth: None,
            }),
        ),
        (
            "00000003050100",
            ControlMessage::Heartbeat(Heartbeat {
                counter: 1,
                unix_millis: 0,
            }),
        ),
        (
            "0000000c010001010000000000005000",
            ControlMessage::Snapshot(Snapshot {
                side: Side::Guest,
                seq: 1,
                listeners: vec![listener(Proto::Tcp, "0.0.0.0", 80, false)],
            }),
        ),
        (
            "0000001a02010201010100000000000000000000000000000001903f0100",
            ControlMessage::Changes(Changes {
                side: Side::Host,
                seq: 2,
                added: vec![listener(Proto::Udp, "::1", 8080, true)],
                removed: vec![],
            }),
        ),
        (
            "000000020301",
            ControlMessage::Resync(Resync { side: Side::Host }),
        ),
        (
            "00000018 07 00 c03e 007f000001 01007f000001 01 0106696e20757365",
            ControlMessage::MirrorState(MirrorState {
                proto: Proto::Tcp,
                port: 8000,
                bind: "127.0.0.1".parse().unwrap(),
                hosts: vec!["127.0.0.1".parse().unwrap()],
                state: BindState::Conflict,
                reason: Some("in use".into()),
            }),
        ),
        (
            "00000017 07 01 35 01 00000000000000000000000000000001 00 00 00",
            ControlMessage::MirrorState(MirrorState {
                proto: Proto::Udp,
                port: 53,
                bind: "::1".parse().unwrap(),
                hosts: vec![],
                state: BindState::Active,
                reason: None,
            }),
        ),
    ] {
        let mut out = Vec::new();
        proto::encode_control(&m, &mut out).unwrap();
        assert_eq!(out, unhex(&hex.replace(' ', "")), "{m:?}");
    }
    let mut out = Vec::new();
    use proto::channel::{CloseReason, Frame};
    for f in [
        Frame::Data {
            flow: 1,
            payload: b"abc",
        },
        Frame::Open {
            flow: 0x8000_0002,
            target: "127.0.0.1:53".parse().unwrap(),
            client: "[::1]:1024".parse().unwrap(),
            payload: b"",
        },
        Frame::Close {
            flow: 3,
            reason: CloseReason::Forbidden,
        },
    ] {
        proto::channel::encode_frame(&f, &mut out).unwrap();
    }
    assert_eq!(
        out,
        unhex(
            concat!(
                "01 00000001 0003 616263",
                "02 80000002 04 7f000001 0035 06 00000000000000000000000000000001 0400 0000",
                "03 00000003 03"
            )
            .replace(' ', "")
            .as_str()
        )
    );
    let mut out = Vec::new();
    proto::FrameHead::Data(3).encode(&mut out).unwrap();
    out.extend_from_slice(b"abc");
    proto::FrameHead::End.encode(&mut out).unwrap();
    proto::FrameHead::Reset.encode(&mut out).unwrap();
    assert_eq!(out, unhex("01000000036162630203"));
}

#[test]
fn mode_follows_what_the_transport_carries() {
    // QUIC: half-close, reset, and an EOF only when the peer ends the direction
    assert_eq!(StreamMode::for_transport(true, true, true), StreamMode::Raw);
    // tcp: a killed process's FIN looks like an END
    assert_eq!(
        StreamMode::for_transport(true, true, false),
        StreamMode::Framed
    );
    // unix, vsock: half-close but no reset
    assert_eq!(
        StreamMode::for_transport(true, false, false),
        StreamMode::Framed
    );
    // hybrid vsock
    assert_eq!(
        StreamMode::for_transport(false, false, false),
        StreamMode::Framed
    );
}
