//! The block pool: plain metadata per KV block, refcounts, and a free list that doubles as
//! the LRU of cached blocks (vLLM v1 style). A block with refcount 0 that holds reusable
//! content stays findable until its memory is needed; blocks without content are handed
//! out first, so cached ones live longest.

use super::hash::{hash_block, AdapterKey, BlockHash};
use rustc_hash::FxHashMap;

pub type BlockId = u32;
const NIL: u32 = u32::MAX;

/// Reusable KV content of a block: its first `tokens.len()` slots, valid for any sequence
/// whose prefix hashes to `parent` and whose adapter key at this block is `key`.
#[derive(Debug, Clone)]
pub struct Content {
    pub parent: BlockHash,
    pub key: Option<AdapterKey>,
    pub tokens: Vec<u32>,
    /// Set for full blocks only: the chained hash, the exact-lookup key.
    pub hash: Option<BlockHash>,
}

#[derive(Debug)]
struct Block {
    ref_cnt: u32,
    content: Option<Content>,
    prev: u32,
    next: u32,
    in_free: bool,
}

/// Cap on partially filled candidates kept per (parent, key): enough for fan-out, bounded.
const MAX_PARTIALS: usize = 8;

#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    num_free: usize,
    /// Exact lookup of full blocks by chained hash.
    full: FxHashMap<BlockHash, BlockId>,
    /// Every block with content, by (parent, key): candidates for partial-prefix copies.
    children: FxHashMap<(BlockHash, Option<AdapterKey>), Vec<BlockId>>,
    num_cached: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        let n = num_blocks as u32;
        let blocks = (0..n)
            .map(|i| Block {
                ref_cnt: 0,
                content: None,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
                in_free: true,
            })
            .collect();
        Self {
            blocks,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            num_free: num_blocks,
            full: FxHashMap::default(),
            children: FxHashMap::default(),
            num_cached: 0,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    /// Blocks with refcount 0 (free or cached-and-evictable).
    pub fn num_free(&self) -> usize {
        self.num_free
    }
    /// Blocks holding reusable content (in use or not).
    pub fn num_cached(&self) -> usize {
        self.num_cached
    }
    /// Chained hashes (truncated to 64 bits) of every full block cached with the base key:
    /// the compact prefix summary a router compares with [`super::hash::base_prefix_hashes`].
    pub fn base_hashes(&self) -> Vec<u64> {
        self.full
            .iter()
            .filter(|(_, &id)| {
                self.blocks[id as usize]
                    .content
                    .as_ref()
                    .is_some_and(|c| c.key.is_none())
            })
            .map(|(&h, _)| h as u64)
            .collect()
    }

    pub fn ref_cnt(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].ref_cnt
    }
    pub fn content(&self, id: BlockId) -> Option<&Content> {
        self.blocks[id as usize].content.as_ref()
    }

    /// Take the least recently used free block, evicting its cached content.
    pub fn alloc(&mut self) -> Option<BlockId> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.unlink(id);
        self.drop_content(id);
        self.blocks[id as usize].ref_cnt = 1;
        Some(id)
    }

    /// Add a reference to a block (a prefix hit or a copy source): pulls it off the free list.
    pub fn acquire(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if b.ref_cnt == 0 {
            self.unlink(id);
        }
        self.blocks[id as usize].ref_cnt += 1;
    }

    /// Drop a reference; at zero the block joins the free list: blocks with content at the
    /// MRU end, empty ones at the LRU end (reused first).
    pub fn release(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.ref_cnt > 0, "release of free block {id}");
        b.ref_cnt -= 1;
        if b.ref_cnt == 0 {
            if b.content.is_some() {
                self.push_back(id);
            } else {
                self.push_front(id);
            }
        }
    }

    /// Exact hit for a full block: same chained hash, verified against the stored content.
    pub fn lookup_full(
        &self,
        hash: BlockHash,
        parent: BlockHash,
        key: Option<AdapterKey>,
        tokens: &[u32],
    ) -> Option<BlockId> {
        let id = *self.full.get(&hash)?;
        let c = self.blocks[id as usize].content.as_ref()?;
        (c.parent == parent && c.key == key && c.tokens == tokens).then_some(id)
    }

    /// The longest usable prefix among cached blocks under `parent`: candidates keyed `key`
    /// may serve up to `cap` slots; those keyed `None` (base KV) up to `base_cap` slots.
    /// Returns (block, slots) with slots >= 1.
    pub fn best_partial(
        &self,
        parent: BlockHash,
        key: Option<AdapterKey>,
        cap: usize,
        base_cap: usize,
        tokens: &[u32],
    ) -> Option<(BlockId, usize)> {
        let mut best: Option<(BlockId, usize)> = None;
        let mut scan = |k: Option<AdapterKey>, cap: usize| {
            let Some(list) = self.children.get(&(parent, k)) else {
                return;
            };
            for &id in list {
                let c = self.blocks[id as usize].content.as_ref().expect("indexed");
                let n = c
                    .tokens
                    .iter()
                    .zip(tokens)
                    .take(cap)
                    .take_while(|(a, b)| a == b)
                    .count();
                if n > 0 && best.is_none_or(|(_, m)| n > m) {
                    best = Some((id, n));
                }
            }
        };
        scan(key, cap);
        if key.is_some() && base_cap > 0 {
            scan(None, base_cap);
        }
        best
    }

    /// Make a just-filled block findable. If an identical block is already cached (two
    /// sequences computed it at once), this one stays anonymous. Returns the block's hash.
    pub fn register_full(
        &mut self,
        id: BlockId,
        parent: BlockHash,
        key: Option<AdapterKey>,
        tokens: &[u32],
    ) -> BlockHash {
        let hash = hash_block(parent, key, tokens);
        if self.blocks[id as usize].content.is_none() && !self.full.contains_key(&hash) {
            self.full.insert(hash, id);
            self.set_content(
                id,
                Content {
                    parent,
                    key,
                    tokens: tokens.to_vec(),
                    hash: Some(hash),
                },
            );
        }
        hash
    }

    /// Keep the computed head of a sequence's last, partly filled block for later copies
    /// (the next turn of a conversation, or an aLoRA call whose activation starts inside
    /// it). Skipped when an existing candidate already covers these tokens.
    pub fn register_partial(
        &mut self,
        id: BlockId,
        parent: BlockHash,
        key: Option<AdapterKey>,
        tokens: &[u32],
    ) {
        if tokens.is_empty() || self.blocks[id as usize].content.is_some() {
            return;
        }
        let list = self
            .children
            .get(&(parent, key))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let covered = list.iter().any(|&c| {
            let ct = &self.blocks[c as usize]
                .content
                .as_ref()
                .expect("indexed")
                .tokens;
            ct.len() >= tokens.len() && ct[..tokens.len()] == *tokens
        });
        if covered {
            return;
        }
        // Bound the candidate list: forget the oldest partial (full ones stay exact-findable).
        let partials: Vec<BlockId> = list
            .iter()
            .copied()
            .filter(|&c| {
                self.blocks[c as usize]
                    .content
                    .as_ref()
                    .is_some_and(|x| x.hash.is_none())
            })
            .collect();
        if partials.len() >= MAX_PARTIALS {
            self.drop_content(partials[0]);
        }
        self.set_content(
            id,
            Content {
                parent,
                key,
                tokens: tokens.to_vec(),
                hash: None,
            },
        );
    }

    /// Forget all cached content (blocks in use keep their data, they just stop being findable).
    pub fn clear_cache(&mut self) {
        for id in 0..self.blocks.len() as u32 {
            self.drop_content(id);
        }
        // Free blocks without content belong at the LRU end; order among them is irrelevant.
    }

    fn set_content(&mut self, id: BlockId, c: Content) {
        self.children.entry((c.parent, c.key)).or_default().push(id);
        self.blocks[id as usize].content = Some(c);
        self.num_cached += 1;
    }

    fn drop_content(&mut self, id: BlockId) {
        let Some(c) = self.blocks[id as usize].content.take() else {
            return;
        };
        self.num_cached -= 1;
        if let Some(h) = c.hash {
            if self.full.get(&h) == Some(&id) {
                self.full.remove(&h);
            }
        }
        let k = (c.parent, c.key);
        if let Some(list) = self.children.get_mut(&k) {
            list.retain(|&x| x != id);
            if list.is_empty() {
                self.children.remove(&k);
            }
        }
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.in_free);
            b.in_free = false;
            (
                std::mem::replace(&mut b.prev, NIL),
                std::mem::replace(&mut b.next, NIL),
            )
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.num_free -= 1;
    }

    fn push_back(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        b.in_free = true;
        b.prev = self.tail;
        b.next = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.blocks[self.tail as usize].next = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn push_front(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        b.in_free = true;
        b.next = self.head;
        b.prev = NIL;
        if self.head == NIL {
            self.tail = id;
        } else {
            self.blocks[self.head as usize].prev = id;
        }
        self.head = id;
        self.num_free += 1;
    }

    /// Free-list order from LRU to MRU (tests and debugging).
    pub fn free_order(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut cur = self.head;
        while cur != NIL {
            out.push(cur);
            cur = self.blocks[cur as usize].next;
        }
        out
    }

    /// Internal consistency (tests): free list matches refcounts, indices match contents.
    pub fn check_consistency(&self) -> Result<(), String> {
        let order = self.free_order();
        if order.len() != self.num_free {
            return Err(format!(
                "free list has {} blocks, counter {}",
                order.len(),
                self.num_free
            ));
        }
        for &id in &order {
            if self.blocks[id as usize].ref_cnt != 0 || !self.blocks[id as usize].in_free {
                return Err(format!("block {id} on free list with refcount"));
            }
        }
        let free_count = self.blocks.iter().filter(|b| b.ref_cnt == 0).count();
        if free_count != self.num_free {
            return Err(format!(
                "{free_count} blocks at refcount 0, free list {}",
                self.num_free
            ));
        }
        let with_content = self.blocks.iter().filter(|b| b.content.is_some()).count();
        if with_content != self.num_cached {
            return Err("cached counter drifted".into());
        }
        let indexed: usize = self.children.values().map(Vec::len).sum();
        if indexed != with_content {
            return Err(format!("{indexed} indexed, {with_content} with content"));
        }
        for (h, &id) in &self.full {
            match &self.blocks[id as usize].content {
                Some(c) if c.hash == Some(*h) => {}
                _ => {
                    return Err(format!(
                        "full index points at block {id} with other content"
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::hash::ROOT_HASH;

    #[test]
    fn empty_blocks_are_reused_before_cached_ones() {
        let mut p = BlockPool::new(3);
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        p.register_full(a, ROOT_HASH, None, &[1, 2]);
        p.release(a); // cached → MRU end
        p.release(b); // empty → LRU end
        assert_eq!(p.free_order(), vec![b, 2, a]);
        assert_eq!(p.alloc(), Some(b));
        assert_eq!(p.alloc(), Some(2));
        // Evicting `a` drops its content from the index.
        assert_eq!(p.alloc(), Some(a));
        assert_eq!(p.num_cached(), 0);
        assert!(p
            .lookup_full(
                hash_block(ROOT_HASH, None, &[1, 2]),
                ROOT_HASH,
                None,
                &[1, 2]
            )
            .is_none());
        p.check_consistency().unwrap();
    }

    #[test]
    fn partial_candidates_respect_caps_and_keys() {
        let mut p = BlockPool::new(4);
        let base = p.alloc().unwrap();
        p.register_partial(base, ROOT_HASH, None, &[1, 2, 3]);
        let key = Some(AdapterKey {
            adapter: 9,
            start: 2,
        });
        assert_eq!(
            p.best_partial(ROOT_HASH, None, 4, 0, &[1, 2, 3, 4]),
            Some((base, 3))
        );
        // Adapted block straddling start 2: base content usable for the first 2 slots only.
        assert_eq!(
            p.best_partial(ROOT_HASH, key, 4, 2, &[1, 2, 3, 4]),
            Some((base, 2))
        );
        // Plain LoRA (no base cap) never sees base content.
        assert_eq!(p.best_partial(ROOT_HASH, key, 4, 0, &[1, 2, 3, 4]), None);
        // A covered partial is not registered twice.
        let other = p.alloc().unwrap();
        p.register_partial(other, ROOT_HASH, None, &[1, 2]);
        assert!(p.content(other).is_none());
        p.check_consistency().unwrap();
    }
}
