//! A control-stream conversation over a real unix socket pair, in both payload modes: header,
//! Hello both ways, snapshot, changes, a gap and its resync, dial-back, heartbeat, close.

use std::collections::BTreeSet;
use std::time::Duration;

use hostnet_link::proto::{
    self, CONTROL_REVISION, Changes, ControlMessage, DialBack, DialBackId, Heartbeat, Hello,
    Listener, ListenerSet, PayloadStream, Proto, Resync, Role, Side, StreamHeader, StreamKind,
    StreamMode, caps,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

fn hello(role: Role) -> ControlMessage {
    ControlMessage::Hello(Hello {
        revision: CONTROL_REVISION,
        role,
        capabilities: vec![
            caps::UDP_CHANNEL.into(),
            caps::DIAL_BACK.into(),
            "future-thing".into(),
        ],
        auth: None,
    })
}

fn tcp(port: u16) -> Listener {
    Listener {
        proto: Proto::Tcp,
        addr: "0.0.0.0".parse().unwrap(),
        port,
        v6only: false,
    }
}

async fn conversation(mode: StreamMode) {
    let (fwd, agent) = socket_pair().await;
    let timeout = Duration::from_secs(5);

    let agent_task = tokio::spawn(async move {
        let mut agent = agent;
        let header = proto::read_header(&mut agent, proto::HEADER_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(header.kind, StreamKind::Control);
        let mut s = PayloadStream::new(agent, header.mode);
        let Some(ControlMessage::Hello(h)) = proto::read_control(&mut s).await.unwrap() else {
            panic!("first message must be Hello")
        };
        assert_eq!(h.role, Role::Forwarder);
        assert!(h.has(caps::DIAL_BACK));
        proto::write_control(&mut s, &hello(Role::Agent))
            .await
            .unwrap();

        let mut mine = ListenerSet::new();
        mine.update(Side::Guest, [tcp(80), tcp(443)].into_iter().collect());
        let snapshot = mine.snapshot(Side::Guest);
        proto::write_control(&mut s, &ControlMessage::Snapshot(snapshot))
            .await
            .unwrap();
        let c = mine
            .update(Side::Guest, [tcp(80), tcp(8080)].into_iter().collect())
            .unwrap();
        // Pretend this message was lost: send the next one only.
        let next = mine
            .update(Side::Guest, [tcp(8080)].into_iter().collect())
            .unwrap();
        assert_eq!(next.seq, c.seq + 1);
        proto::write_control(&mut s, &ControlMessage::Changes(next))
            .await
            .unwrap();
        // The forwarder asks for a resync.
        let msg = proto::read_control(&mut s).await.unwrap().unwrap();
        assert_eq!(msg, ControlMessage::Resync(Resync { side: Side::Guest }));
        proto::write_control(
            &mut s,
            &ControlMessage::Snapshot(mine.snapshot(Side::Guest)),
        )
        .await
        .unwrap();
        proto::write_control(
            &mut s,
            &ControlMessage::DialBack(DialBack {
                id: DialBackId(1),
                proto: Proto::Tcp,
                target: "127.0.0.1:5432".parse().unwrap(),
                client: "127.0.0.1:40000".parse().unwrap(),
            }),
        )
        .await
        .unwrap();
        proto::write_control(
            &mut s,
            &ControlMessage::Heartbeat(Heartbeat {
                counter: 1,
                unix_millis: 0,
            }),
        )
        .await
        .unwrap();
        // Close cleanly (END in framed mode): the forwarder sees the end between messages.
        s.shutdown().await.unwrap();
        drop(s);
    });

    let mut fwd = fwd;
    proto::write_header(
        &mut fwd,
        &StreamHeader {
            kind: StreamKind::Control,
            mode,
        },
    )
    .await
    .unwrap();
    let mut s = PayloadStream::new(fwd, mode);
    proto::write_control(&mut s, &hello(Role::Forwarder))
        .await
        .unwrap();
    let first = tokio::time::timeout(timeout, proto::read_control(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        first,
        Some(ControlMessage::Hello(Hello {
            role: Role::Agent,
            ..
        }))
    ));

    let mut guest = ListenerSet::awaiting_snapshot();
    let mut dial_backs = Vec::new();
    let mut heartbeats = 0;
    let mut resyncs = 0;
    while let Some(msg) = tokio::time::timeout(timeout, proto::read_control(&mut s))
        .await
        .unwrap()
        .unwrap()
    {
        match msg {
            ControlMessage::Snapshot(snap) => {
                guest.replace(&snap);
            }
            ControlMessage::Changes(
                c @ Changes {
                    side: Side::Guest, ..
                },
            ) => {
                if guest.apply(&c).is_err() {
                    resyncs += 1;
                    proto::write_control(&mut s, &ControlMessage::Resync(Resync { side: c.side }))
                        .await
                        .unwrap();
                }
            }
            ControlMessage::DialBack(d) => dial_backs.push(d.id),
            ControlMessage::Heartbeat(_) => heartbeats += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    agent_task.await.unwrap();
    assert_eq!(resyncs, 1);
    let want: BTreeSet<Listener> = [tcp(8080)].into_iter().collect();
    assert_eq!(guest.listeners(), &want);
    assert_eq!(dial_backs, vec![DialBackId(1)]);
    assert_eq!(heartbeats, 1);
}

#[tokio::test]
async fn control_conversation_raw() {
    conversation(StreamMode::Raw).await;
}

#[tokio::test]
async fn control_conversation_framed() {
    conversation(StreamMode::Framed).await;
}

#[tokio::test]
async fn framed_control_stream_ending_without_end_is_an_io_error_not_a_clean_close() {
    let (a, b) = socket_pair().await;
    let mut a = PayloadStream::new(a, StreamMode::Framed);
    let mut b = PayloadStream::new(b, StreamMode::Framed);
    proto::write_control(&mut a, &hello(Role::Agent))
        .await
        .unwrap();
    drop(a);
    assert!(proto::read_control(&mut b).await.unwrap().is_some());
    let e = proto::read_control(&mut b).await.unwrap_err();
    assert!(
        matches!(&e, proto::ProtoError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof),
        "{e:?}"
    );
    assert!(e.to_string().contains("control message"), "{e}");
}

/// Two connected sockets (TCP on loopback: a real socket pair on every host).
async fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    (a.unwrap(), b.unwrap().0)
}
