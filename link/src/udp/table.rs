//! The flow table of one datagram channel: every flow of the session, both directions, in one
//! least-recently-used order, with the listener index of the flows this side opened.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use lru::LruCache;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::Tally;

/// A listening socket whose clients' datagrams open flows (the forwarder's mirrors of guest
/// listeners, the agent's mirrors of host listeners).
pub(super) struct ListenerEntry {
    pub sock: Arc<UdpSocket>,
    pub target: SocketAddr,
    pub tally: Option<Arc<dyn Tally>>,
}

/// Which end of the flow this side holds.
pub(super) enum End {
    /// This side opened the flow for `client` of listener `lid`: replies go out with
    /// `send_to(client)` on the listener's socket.
    Listener { lid: u32, client: SocketAddr },
    /// The peer opened it: a connected socket towards the target, read by a small task.
    Dialed {
        sock: Arc<UdpSocket>,
        reader: AbortHandle,
    },
}

pub(super) struct Flow {
    pub end: End,
    pub last: Instant,
    pub tally: Option<Arc<dyn Tally>>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        if let End::Dialed { reader, .. } = &self.end {
            reader.abort();
        }
        if let Some(t) = &self.tally {
            t.closed();
        }
    }
}

/// Where a datagram from the peer goes.
pub(super) enum Deliver {
    To(Arc<UdpSocket>, SocketAddr),
    Connected(Arc<UdpSocket>),
}

pub(super) struct Table {
    flows: LruCache<u32, Flow>,
    by_client: HashMap<(u32, SocketAddr), u32>,
    listeners: HashMap<u32, ListenerEntry>,
    next_flow: u32,
    next_listener: u32,
    /// [`AGENT_FLOW`](crate::proto::channel::AGENT_FLOW) or 0: the id bit of this side's flows.
    mine: u32,
}

impl Table {
    pub fn new(mine: u32) -> Self {
        Self {
            flows: LruCache::unbounded(),
            by_client: HashMap::new(),
            listeners: HashMap::new(),
            next_flow: 0,
            next_listener: 0,
            mine,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_mine(&self, flow: u32) -> bool {
        flow & crate::proto::channel::AGENT_FLOW == self.mine
    }

    pub fn add_listener(&mut self, entry: ListenerEntry) -> u32 {
        loop {
            self.next_listener = self.next_listener.wrapping_add(1);
            if !self.listeners.contains_key(&self.next_listener) {
                break;
            }
        }
        self.listeners.insert(self.next_listener, entry);
        self.next_listener
    }

    /// Removes a listener and its flows; returns their ids (for CLOSE frames).
    pub fn remove_listener(&mut self, lid: u32) -> Vec<u32> {
        self.listeners.remove(&lid);
        let ids: Vec<u32> = self
            .by_client
            .iter()
            .filter(|((l, _), _)| *l == lid)
            .map(|(_, id)| *id)
            .collect();
        for id in &ids {
            self.remove(*id);
        }
        ids
    }

    pub fn listener(&self, lid: u32) -> Option<&ListenerEntry> {
        self.listeners.get(&lid)
    }

    /// The flow of `client` on listener `lid`.
    pub fn flow_of(&self, lid: u32, client: SocketAddr) -> Option<u32> {
        self.by_client.get(&(lid, client)).copied()
    }

    /// A datagram of `len` bytes towards the peer on flow `id`: marks the flow used and counts
    /// it; `false` when there is no such flow.
    pub fn sent(&mut self, id: u32, now: Instant, len: usize) -> bool {
        let Some(f) = self.flows.get_mut(&id) else {
            return false;
        };
        f.last = now;
        if let Some(t) = &f.tally {
            t.sent(len);
        }
        true
    }

    /// A datagram of `len` bytes from the peer for flow `id`: marks the flow used, counts it,
    /// says where it goes. `None` when there is no such flow; `Some(None)` when its listener
    /// is gone.
    pub fn peer_datagram(&mut self, id: u32, now: Instant, len: usize) -> Option<Option<Deliver>> {
        let f = self.flows.get_mut(&id)?;
        f.last = now;
        if let Some(t) = &f.tally {
            t.received(len);
        }
        Some(match &f.end {
            End::Listener { lid, client } => self
                .listeners
                .get(lid)
                .map(|l| Deliver::To(l.sock.clone(), *client)),
            End::Dialed { sock, .. } => Some(Deliver::Connected(sock.clone())),
        })
    }

    pub fn contains(&self, id: u32) -> bool {
        self.flows.contains(&id)
    }

    /// A fresh id for a flow this side opens.
    pub fn next_id(&mut self) -> u32 {
        loop {
            self.next_flow = (self.next_flow + 1) & !crate::proto::channel::AGENT_FLOW;
            let id = self.next_flow | self.mine;
            if self.next_flow != 0 && !self.flows.contains(&id) {
                return id;
            }
        }
    }

    pub fn insert(&mut self, id: u32, flow: Flow) {
        if let End::Listener { lid, client } = &flow.end {
            self.by_client.insert((*lid, *client), id);
        }
        if let Some(t) = &flow.tally {
            t.opened();
        }
        self.flows.put(id, flow);
    }

    /// Removes the least recently used flow; its id.
    pub fn evict(&mut self) -> Option<u32> {
        let (id, _) = self.flows.peek_lru()?;
        let id = *id;
        self.remove(id);
        Some(id)
    }

    /// Removes the flows unused since `before`, oldest first; their ids.
    pub fn expire(&mut self, before: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some((id, f)) = self.flows.peek_lru() {
            if f.last > before {
                break;
            }
            let id = *id;
            self.remove(id);
            out.push(id);
        }
        out
    }

    pub fn remove(&mut self, id: u32) -> bool {
        let Some(f) = self.flows.pop(&id) else {
            return false;
        };
        if let End::Listener { lid, client } = &f.end {
            self.by_client.remove(&(*lid, *client));
        }
        true
    }

    /// Drops every flow (aborting their readers) and listener.
    pub fn clear(&mut self) {
        self.by_client.clear();
        self.flows.clear();
        self.listeners.clear();
    }
}
