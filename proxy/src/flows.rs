//! The UDP flow table: bounded, least-recently-used eviction, idle expiry. No sockets here:
//! it takes `now` and hands back what to close, so it is tested without the kernel.
//!
//! Every datagram, in either direction, moves its flow to the back of the recency order, so the
//! front is always the flow idle the longest: expiry pops from the front while the front is
//! older than the timeout, and eviction at the cap pops the front too.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use lru::LruCache;

/// A flow's number, stable for its life (used as the epoll token of its socket).
pub type FlowId = u64;

#[derive(Debug)]
struct Entry<V> {
    id: FlowId,
    last: Instant,
    value: V,
}

/// Flows keyed by `K`, each holding a `V` (its socket).
#[derive(Debug)]
pub struct FlowTable<K: Hash + Eq + Clone, V> {
    flows: LruCache<K, Entry<V>>,
    keys: HashMap<FlowId, K>,
    next_id: FlowId,
    cap: usize,
    timeout: Duration,
}

impl<K: Hash + Eq + Clone, V> FlowTable<K, V> {
    /// A table holding at most `cap` flows (at least 1), each closed after `timeout` idle.
    pub fn new(cap: usize, timeout: Duration) -> Self {
        FlowTable {
            // Unbounded: the cap is enforced by `insert`, and nothing is allocated up front.
            flows: LruCache::unbounded(),
            keys: HashMap::new(),
            next_id: 0,
            cap: cap.max(1),
            timeout,
        }
    }

    /// Flows held.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// No flows held.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The flow for `key`, marked active at `now`.
    pub fn touch(&mut self, key: &K, now: Instant) -> Option<(FlowId, &mut V)> {
        let e = self.flows.get_mut(key)?;
        e.last = now;
        Some((e.id, &mut e.value))
    }

    /// The flow numbered `id`, marked active at `now`.
    pub fn touch_id(&mut self, id: FlowId, now: Instant) -> Option<(&K, &mut V)> {
        let key = self.keys.get(&id)?;
        let e = self.flows.get_mut(key)?;
        e.last = now;
        Some((key, &mut e.value))
    }

    /// Adds a flow (the key must not be present). When the table is full, the least recently
    /// active flow is evicted first and returned.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> (FlowId, Option<(K, V)>) {
        let evicted = if self.flows.len() >= self.cap {
            self.pop_front()
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        self.keys.insert(id, key.clone());
        let old = self.flows.push(
            key,
            Entry {
                id,
                last: now,
                value,
            },
        );
        debug_assert!(old.is_none(), "insert of a key already present");
        (id, evicted)
    }

    /// Removes and returns every flow idle for the timeout or longer at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, V)> {
        let mut out = Vec::new();
        while let Some((_, e)) = self.flows.peek_lru() {
            if now.saturating_duration_since(e.last) < self.timeout {
                break;
            }
            out.extend(self.pop_front());
        }
        out
    }

    /// When the next flow would expire, if any.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.flows.peek_lru().map(|(_, e)| e.last + self.timeout)
    }

    /// Removes every flow.
    pub fn drain(&mut self) -> Vec<(K, V)> {
        let mut out = Vec::new();
        while let Some(f) = self.pop_front() {
            out.push(f);
        }
        out
    }

    fn pop_front(&mut self) -> Option<(K, V)> {
        let (k, e) = self.flows.pop_lru()?;
        self.keys.remove(&e.id);
        Some((k, e.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(90);

    #[test]
    fn insert_touch_and_evict_least_recent() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(2, T);
        let (a, ev) = t.insert("a", 1, t0);
        assert!(ev.is_none());
        t.insert("b", 2, t0);
        // "a" is touched, so "b" is now the least recently active.
        assert_eq!(t.touch(&"a", t0).map(|(id, v)| (id, *v)), Some((a, 1)));
        let (_, ev) = t.insert("c", 3, t0);
        assert_eq!(ev, Some(("b", 2)));
        assert_eq!(t.len(), 2);
        assert!(t.touch(&"b", t0).is_none());
        assert_eq!(t.touch_id(a, t0).map(|(k, v)| (*k, *v)), Some(("a", 1)));
    }

    #[test]
    fn expiry_counts_activity_either_way() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(10, T);
        let (a, _) = t.insert("a", (), t0);
        t.insert("b", (), t0);
        assert_eq!(t.next_expiry(), Some(t0 + T));
        // Traffic on "a" (say, a reply found through its id) keeps it alive.
        t.touch_id(a, t0 + Duration::from_secs(60));
        let gone = t.expire(t0 + T);
        assert_eq!(gone.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(t.next_expiry(), Some(t0 + Duration::from_secs(60) + T));
        assert!(t.expire(t0 + Duration::from_secs(149)).is_empty());
        assert_eq!(t.expire(t0 + Duration::from_secs(150)).len(), 1);
        assert!(t.is_empty());
        assert!(t.touch_id(a, t0).is_none(), "ids die with their flow");
        assert_eq!(t.next_expiry(), None);
    }

    #[test]
    fn never_exceeds_cap_and_ids_stay_consistent() {
        // A small model check: random operations against the invariant that every id maps to
        // a live key and the table never exceeds its cap.
        let t0 = Instant::now();
        let mut t = FlowTable::new(7, Duration::from_secs(5));
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut live: HashMap<u32, FlowId> = HashMap::new();
        for step in 0..20_000u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let key = (seed % 23) as u32;
            let now = t0 + Duration::from_millis(step * 3);
            if t.touch(&key, now).is_none() {
                let (id, ev) = t.insert(key, key, now);
                if let Some((k, v)) = ev {
                    assert_eq!(k, v);
                    live.remove(&k);
                }
                live.insert(key, id);
            }
            for (k, _) in t.expire(now) {
                live.remove(&k);
            }
            assert!(t.len() <= 7);
            assert_eq!(t.len(), live.len());
            for (k, id) in &live {
                assert_eq!(t.keys.get(id), Some(k));
            }
        }
        assert_eq!(t.drain().len(), live.len());
    }
}
