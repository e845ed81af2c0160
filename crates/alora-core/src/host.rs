//! The host tier: adapter weights read from disk, kept in host memory under a byte budget
//! and evicted least recently used first.
//!
//! Only adapters registered from a directory belong here; adapters loaded from memory keep
//! their weights in the [`Adapter`](crate::adapters::Adapter) and are always available.
//! Entries the caller still needs (e.g. an adapter whose page-in is planned but not yet
//! done) are shielded from eviction by the `protected` predicate of [`HostCache::insert`].

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::adapters::{AdapterId, HostWeights};

struct Entry {
    weights: Arc<HostWeights>,
    /// Its key in `order`.
    tick: u64,
}

/// An LRU of adapters' host weights with a byte budget (bytes = [`HostWeights::bytes`]).
pub struct HostCache {
    budget: usize,
    bytes: usize,
    entries: FxHashMap<AdapterId, Entry>,
    /// Last use -> id; first is least recently used.
    order: BTreeMap<u64, AdapterId>,
    next_tick: u64,
}

impl HostCache {
    pub fn new(budget_bytes: usize) -> Self {
        HostCache {
            budget: budget_bytes,
            bytes: 0,
            entries: FxHashMap::default(),
            order: BTreeMap::new(),
            next_tick: 0,
        }
    }

    fn touch(&mut self, id: AdapterId) {
        let tick = self.next_tick;
        self.next_tick += 1;
        let e = self.entries.get_mut(&id).expect("touch of a cached id");
        self.order.remove(&e.tick);
        e.tick = tick;
        self.order.insert(tick, id);
    }

    /// The weights, marked most recently used.
    pub fn get(&mut self, id: AdapterId) -> Option<Arc<HostWeights>> {
        if !self.entries.contains_key(&id) {
            return None;
        }
        self.touch(id);
        Some(Arc::clone(&self.entries[&id].weights))
    }

    /// The weights, without changing the LRU order.
    pub fn peek(&self, id: AdapterId) -> Option<&Arc<HostWeights>> {
        self.entries.get(&id).map(|e| &e.weights)
    }

    pub fn contains(&self, id: AdapterId) -> bool {
        self.entries.contains_key(&id)
    }

    /// Inserts (or replaces) `id` as most recently used, then evicts least recently used
    /// entries, other than `id` and those `protected` says to keep, until the cache is
    /// within its budget. Returns the evicted ids, least recently used first. The cache
    /// stays over budget only when every entry left is `id` itself or protected.
    pub fn insert(
        &mut self,
        id: AdapterId,
        weights: Arc<HostWeights>,
        protected: impl Fn(AdapterId) -> bool,
    ) -> Vec<AdapterId> {
        self.remove(id);
        self.bytes += weights.bytes();
        let tick = self.next_tick;
        self.next_tick += 1;
        self.entries.insert(id, Entry { weights, tick });
        self.order.insert(tick, id);

        let mut evicted = Vec::new();
        if self.bytes <= self.budget {
            return evicted;
        }
        let mut over = self.bytes - self.budget;
        for &victim in self.order.values() {
            if over == 0 {
                break;
            }
            if victim == id || protected(victim) {
                continue;
            }
            over = over.saturating_sub(self.entries[&victim].weights.bytes());
            evicted.push(victim);
        }
        for &victim in &evicted {
            self.remove(victim);
        }
        evicted
    }

    /// Drops `id`, returning its weights.
    pub fn remove(&mut self, id: AdapterId) -> Option<Arc<HostWeights>> {
        let e = self.entries.remove(&id)?;
        self.order.remove(&e.tick);
        self.bytes -= e.weights.bytes();
        Some(e.weights)
    }

    /// Sum of the entries' [`HostWeights::bytes`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Cached ids, least recently used first.
    pub fn lru_order(&self) -> Vec<AdapterId> {
        self.order.values().copied().collect()
    }
}

impl std::fmt::Debug for HostCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCache")
            .field("budget", &self.budget)
            .field("bytes", &self.bytes)
            .field("lru_order", &self.lru_order())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraWeights;
    use proptest::prelude::*;

    /// Weights of exactly `floats * 4` bytes (one layer, one module, rank 1).
    fn weights(floats: usize) -> Arc<HostWeights> {
        let slot = (floats > 0).then(|| LoraWeights {
            rank: 1,
            scale: 1.0,
            a: vec![0.5; floats / 2],
            b: vec![0.25; floats - floats / 2],
        });
        Arc::new(HostWeights::new(1, vec![slot]))
    }

    #[test]
    fn lru_eviction_skips_the_new_entry_and_protected_ones() {
        let mut c = HostCache::new(100);
        assert!(c.is_empty() && c.budget() == 100);
        assert!(c.insert(1, weights(10), |_| false).is_empty()); // 40 bytes
        assert!(c.insert(2, weights(10), |_| false).is_empty());
        assert_eq!((c.bytes(), c.len()), (80, 2));
        // 1 becomes most recently used, so 2 goes first.
        assert!(c.get(1).is_some());
        assert_eq!(c.lru_order(), [2, 1]);
        assert_eq!(c.insert(3, weights(10), |_| false), [2]);
        assert_eq!((c.lru_order(), c.bytes()), (vec![1, 3], 80));
        // Protected entries stay, even over budget.
        assert_eq!(c.insert(4, weights(10), |id| id == 1), [3]);
        assert_eq!(c.lru_order(), [1, 4]);
        assert!(c.insert(5, weights(20), |_| true).is_empty());
        assert_eq!((c.bytes(), c.lru_order()), (160, vec![1, 4, 5]));
        // An entry over the whole budget is kept alone.
        assert_eq!(c.insert(6, weights(50), |_| false), [1, 4, 5]);
        assert_eq!((c.bytes(), c.lru_order()), (200, vec![6]));
        // Replacing an entry re-accounts its bytes.
        assert!(c.insert(6, weights(5), |_| false).is_empty());
        assert_eq!(c.bytes(), 20);
        assert!(c.peek(6).is_some() && c.peek(7).is_none() && c.get(7).is_none());
        assert_eq!(c.remove(6).unwrap().bytes(), 20);
        assert!(c.remove(6).is_none());
        assert_eq!((c.bytes(), c.len()), (0, 0));
        assert!(format!("{c:?}").contains("budget"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Get(u64),
        Insert(u64, usize, u8),
        Remove(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..8).prop_map(Op::Get),
            (0u64..8, 0usize..40, any::<u8>()).prop_map(|(id, f, p)| Op::Insert(id, f, p)),
            (0u64..8).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Against a reference model: a Vec of (id, bytes), least recently used first.
        #[test]
        fn matches_a_reference_lru(budget in 0usize..400, ops in proptest::collection::vec(op(), 1..80)) {
            let mut c = HostCache::new(budget);
            let mut model: Vec<(u64, usize)> = Vec::new();
            for op in ops {
                match op {
                    Op::Get(id) => {
                        let got = c.get(id);
                        let pos = model.iter().position(|e| e.0 == id);
                        prop_assert_eq!(got.as_ref().map(|w| w.bytes()), pos.map(|p| model[p].1));
                        if let Some(p) = pos {
                            let e = model.remove(p);
                            model.push(e);
                        }
                    }
                    Op::Remove(id) => {
                        let got = c.remove(id).map(|w| w.bytes());
                        let pos = model.iter().position(|e| e.0 == id);
                        prop_assert_eq!(got, pos.map(|p| model.remove(p).1));
                    }
                    Op::Insert(id, floats, mask) => {
                        // Bit `k` of the mask protects id `k`.
                        let protected = |k: u64| mask & (1 << k) != 0;
                        let evicted = c.insert(id, weights(floats), protected);
                        model.retain(|e| e.0 != id);
                        model.push((id, floats * 4));
                        let mut expect = Vec::new();
                        loop {
                            let total: usize = model.iter().map(|e| e.1).sum();
                            if total <= budget {
                                break;
                            }
                            let Some(p) = model.iter().position(|e| e.0 != id && !protected(e.0)) else {
                                break;
                            };
                            expect.push(model.remove(p).0);
                        }
                        prop_assert_eq!(&evicted, &expect);
                        prop_assert!(evicted.iter().all(|&v| v != id && !protected(v)));
                        let total: usize = model.iter().map(|e| e.1).sum();
                        prop_assert!(
                            total <= budget || model.iter().all(|e| e.0 == id || protected(e.0))
                        );
                    }
                }
                prop_assert_eq!(c.lru_order(), model.iter().map(|e| e.0).collect::<Vec<_>>());
                prop_assert_eq!(c.bytes(), model.iter().map(|e| e.1).sum::<usize>());
                prop_assert_eq!(c.len(), model.len());
                for &(id, _) in &model {
                    prop_assert!(c.contains(id));
                }
            }
        }
    }
}
