//! The listener-set diff, property-tested without sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hostnet_link::discovery::{Listener, ListenerSet, Protocol, diff};
use proptest::prelude::*;

fn listener() -> impl Strategy<Value = Listener> {
    (
        any::<bool>(),
        prop_oneof![
            Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Just(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ],
        1u16..8,
        prop::option::of(any::<bool>()),
        0u32..6,
    )
        .prop_map(|(tcp, addr, port, v6only, inode)| Listener {
            proto: if tcp { Protocol::Tcp } else { Protocol::Udp },
            addr,
            port,
            v6only: if addr.is_ipv6() { v6only } else { None },
            inode,
            uid: 0,
            ifindex: 0,
        })
}

fn set() -> impl Strategy<Value = ListenerSet> {
    prop::collection::vec(listener(), 0..24).prop_map(|v| v.into_iter().collect())
}

proptest! {
    #[test]
    fn applying_the_diff_to_old_gives_new(old in set(), new in set()) {
        let d = diff(&old, &new);
        let mut got = old.clone();
        got.apply(&d);
        prop_assert_eq!(&got, &new);
    }

    #[test]
    fn diff_is_minimal(old in set(), new in set()) {
        let d = diff(&old, &new);
        for l in &d.added {
            prop_assert!(new.contains(l) && !old.contains(l));
        }
        for l in &d.removed {
            prop_assert!(old.contains(l) && !new.contains(l));
        }
        let common = old.iter().filter(|l| new.contains(l)).count();
        prop_assert_eq!(old.len() - d.removed.len(), common);
        prop_assert_eq!(new.len() - d.added.len(), common);
        prop_assert_eq!(d.is_empty(), old == new);
    }

    #[test]
    fn diffs_compose(a in set(), b in set(), c in set()) {
        // Deferring an event and diffing against the last delivered set (what the watcher does
        // when its channel is full) gives the same end state as delivering every step.
        let mut stepwise = a.clone();
        stepwise.apply(&diff(&a, &b));
        stepwise.apply(&diff(&b, &c));
        let mut direct = a.clone();
        direct.apply(&diff(&a, &c));
        prop_assert_eq!(stepwise, direct);
    }
}

#[test]
fn diff_of_equal_sets_is_empty() {
    let l = Listener {
        proto: Protocol::Tcp,
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 80,
        v6only: None,
        inode: 7,
        uid: 0,
        ifindex: 0,
    };
    let s: ListenerSet = [l].into_iter().collect();
    assert!(diff(&s, &s).is_empty());
    let d = diff(&ListenerSet::new(), &s);
    assert_eq!(d.added, vec![l]);
    assert!(d.removed.is_empty());
}
