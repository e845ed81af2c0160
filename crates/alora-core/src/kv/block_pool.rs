//! The device's unit pool: plain metadata per unit, where a unit is one KV block or a
//! piece of an adapter's storage (see [`crate::pages`]). One allocator and one recency order
//! for both kinds: free units without content are handed out first; after them, whichever
//! is least recently used of a cached KV block (refcount 0, content kept findable until its
//! memory is needed, vLLM v1 style) and an unpinned resident adapter is evicted. Optional
//! caps bound the units each kind may hold (two caps summing to the pool give the classic
//! two fixed budgets).

use super::hash::{hash_block, AdapterKey, BlockHash};
use crate::error::{Error, Result};
use crate::pages::{AdapterId, Residency, ResidentAdapters};
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

/// Which list a unit is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    /// Referenced by sequences (refcount > 0), or held by an adapter.
    Out,
    /// Free, no content.
    Empty,
    /// Refcount 0 with content: evictable, findable.
    Cached,
}

#[derive(Debug)]
struct Block {
    ref_cnt: u32,
    content: Option<Content>,
    prev: u32,
    next: u32,
    at: Where,
    /// Clock reading when it joined the cached list.
    freed_at: u64,
    adapter: bool,
}

/// The next unit (or units) the shared LRU gives up.
enum Victim {
    Block(BlockId),
    Adapter(AdapterId),
}

/// Cap on partially filled candidates kept per (parent, key): enough for fan-out, bounded.
const MAX_PARTIALS: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
}

impl List {
    const NEW: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    empty: List,
    cached: List,
    /// Exact lookup of full blocks by chained hash.
    full: FxHashMap<BlockHash, BlockId>,
    /// Every block with content, by (parent, key): candidates for partial-prefix copies.
    children: FxHashMap<(BlockHash, Option<AdapterKey>), Vec<BlockId>>,
    num_cached: usize,
    adapters: ResidentAdapters,
    /// One clock for KV release times and adapter use: the shared LRU order.
    clock: u64,
    kv_cap: usize,
    adapter_cap: usize,
    /// Adapters evicted since the last `take_evicted` (by KV allocations or page-ins).
    evicted: Vec<AdapterId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        Self::with_caps(num_blocks, None, None)
    }

    /// A pool of `num_blocks` units; KV may hold at most `kv_cap` of them (referenced or
    /// cached) and adapters at most `adapter_cap`; `None` means no cap.
    pub fn with_caps(num_blocks: usize, kv_cap: Option<usize>, adapter_cap: Option<usize>) -> Self {
        let blocks = (0..num_blocks)
            .map(|_| Block {
                ref_cnt: 0,
                content: None,
                prev: NIL,
                next: NIL,
                at: Where::Out,
                freed_at: 0,
                adapter: false,
            })
            .collect();
        let mut p = Self {
            blocks,
            empty: List::NEW,
            cached: List::NEW,
            full: FxHashMap::default(),
            children: FxHashMap::default(),
            num_cached: 0,
            adapters: ResidentAdapters::default(),
            clock: 0,
            kv_cap: kv_cap.unwrap_or(num_blocks).min(num_blocks),
            adapter_cap: adapter_cap.unwrap_or(num_blocks).min(num_blocks),
            evicted: Vec::new(),
        };
        // Pushed in reverse so a fresh pool hands out 0, 1, 2, ...
        for id in (0..num_blocks as u32).rev() {
            p.push(id, Where::Empty, false);
        }
        p
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    /// Units neither referenced by a sequence nor held by an adapter (empty or cached).
    pub fn num_free(&self) -> usize {
        self.empty.len + self.cached.len
    }
    /// Free units without content.
    pub fn num_empty(&self) -> usize {
        self.empty.len
    }
    /// Blocks holding reusable content (in use or not).
    pub fn num_cached(&self) -> usize {
        self.num_cached
    }
    /// Units KV holds: referenced by sequences or cached.
    pub fn kv_held(&self) -> usize {
        self.blocks.len() - self.empty.len - self.adapters.num_units()
    }
    pub fn kv_cap(&self) -> usize {
        self.kv_cap
    }
    pub fn adapter_cap(&self) -> usize {
        self.adapter_cap
    }
    pub fn adapters(&self) -> &ResidentAdapters {
        &self.adapters
    }

    /// Blocks a KV allocation can get now: cached ones, plus (within the KV cap) empty units
    /// and units of unpinned adapters.
    pub fn kv_available(&self) -> usize {
        let room = self.kv_cap.saturating_sub(self.kv_held());
        self.cached.len + room.min(self.empty.len + self.adapters.evictable_units())
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

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Take a unit for KV: an empty one while the KV cap allows, else the least recently
    /// used of the oldest cached block and the oldest unpinned adapter (evicted whole).
    pub fn alloc(&mut self) -> Option<BlockId> {
        loop {
            let room = self.kv_held() < self.kv_cap;
            if room && self.empty.len > 0 {
                let id = self.empty.head;
                self.unlink(id);
                self.blocks[id as usize].ref_cnt = 1;
                return Some(id);
            }
            match self.lru_victim(room)? {
                Victim::Adapter(a) => self.evict_adapter_units(a),
                Victim::Block(id) => {
                    self.unlink(id);
                    self.drop_content(id);
                    self.blocks[id as usize].ref_cnt = 1;
                    return Some(id);
                }
            }
        }
    }

    /// What the shared LRU gives up next: the older of the oldest cached block and (when
    /// `adapters`) the oldest unpinned adapter.
    fn lru_victim(&self, adapters: bool) -> Option<Victim> {
        let cached = (self.cached.head != NIL).then(|| {
            (
                self.blocks[self.cached.head as usize].freed_at,
                self.cached.head,
            )
        });
        let adapter = if adapters {
            self.adapters.lru_head()
        } else {
            None
        };
        match (cached, adapter) {
            (Some((tb, _)), Some((ta, a))) if ta < tb => Some(Victim::Adapter(a)),
            (Some((_, b)), _) => Some(Victim::Block(b)),
            (None, Some((_, a))) => Some(Victim::Adapter(a)),
            (None, None) => None,
        }
    }

    /// Add a reference to a block (a prefix hit or a copy source): pulls it off the free list.
    pub fn acquire(&mut self, id: BlockId) {
        if self.blocks[id as usize].ref_cnt == 0 {
            self.unlink(id);
        }
        self.blocks[id as usize].ref_cnt += 1;
    }

    /// Drop a reference; at zero the block becomes cached (with content, most recently used)
    /// or empty (reused first).
    pub fn release(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.ref_cnt > 0, "release of free block {id}");
        b.ref_cnt -= 1;
        if b.ref_cnt == 0 {
            if b.content.is_some() {
                let t = self.tick();
                self.blocks[id as usize].freed_at = t;
                self.push(id, Where::Cached, true);
            } else {
                self.push(id, Where::Empty, false);
            }
        }
    }

    // ------------------------------------------------------------------ adapters

    /// Whether [`ensure_adapter`](Self::ensure_adapter) would succeed now.
    pub fn can_make_resident(&self, id: AdapterId, units: usize) -> bool {
        if let Some(u) = self.adapters.units(id) {
            return u.len() == units;
        }
        let pinned = self.adapters.num_units() - self.adapters.evictable_units();
        units > 0
            && pinned + units <= self.adapter_cap
            && units <= self.empty.len + self.cached.len + self.adapters.evictable_units()
    }

    /// Make adapter `id` resident in `units` units, evicting by the shared LRU (and, over
    /// the adapter cap, adapters first). Marks it most recently used. All or nothing.
    pub fn ensure_adapter(&mut self, id: AdapterId, units: usize) -> Result<Residency> {
        if let Some(u) = self.adapters.units(id) {
            if u.len() != units {
                return Err(Error::Config {
                    field: "units".into(),
                    detail: format!(
                        "adapter {id} is resident in {} units, requested {units}",
                        u.len()
                    ),
                });
            }
            self.touch_adapter(id);
            return Ok(Residency::AlreadyResident);
        }
        if !self.can_make_resident(id, units) {
            return Err(Error::Capacity(format!(
                "adapter {id} needs {units} of {} memory units (adapter cap {}); {} are free or \
                 evictable, the rest hold running requests' KV or pinned adapters",
                self.blocks.len(),
                self.adapter_cap,
                self.empty.len + self.cached.len + self.adapters.evictable_units()
            )));
        }
        let first_evicted = self.evicted.len();
        while self.adapters.num_units() + units > self.adapter_cap {
            let (_, a) = self
                .adapters
                .lru_head()
                .expect("checked by can_make_resident");
            self.evict_adapter_units(a);
        }
        while self.empty.len < units {
            match self.lru_victim(true).expect("checked by can_make_resident") {
                Victim::Adapter(a) => self.evict_adapter_units(a),
                Victim::Block(b) => {
                    self.unlink(b);
                    self.drop_content(b);
                    self.push(b, Where::Empty, false);
                }
            }
        }
        // A run of consecutive units when the empty ones hold one: then the adapter's rows
        // can lie as whole matrices (see `UnitGeometry::rows`), which the LoRA op reads as
        // strided views instead of gathering them. From the top of the id space: KV takes
        // empty units from the bottom (a fresh pool hands out 0, 1, 2, ...), so adapters and
        // KV meet only under pressure, and a sequence's blocks stay consecutive (one range
        // for attention to read in place).
        let mut ids = self.walk(self.empty);
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let taken = match highest_run(&ids, units) {
            Some(first) => (first..first + units as u32).collect(),
            None => {
                ids.truncate(units);
                ids.reverse();
                ids
            }
        };
        for &b in &taken {
            self.unlink(b);
            self.blocks[b as usize].adapter = true;
        }
        let t = self.tick();
        self.adapters.insert(id, taken.clone(), t);
        Ok(Residency::Loaded {
            units: taken,
            evicted: self.evicted[first_evicted..].to_vec(),
        })
    }

    /// An eviction by the LRU: recorded for `take_evicted` (an `evict_adapter` by the caller
    /// is not).
    fn evict_adapter_units(&mut self, id: AdapterId) {
        let was_resident = self
            .evict_adapter(id)
            .expect("only unpinned adapters are evicted");
        debug_assert!(was_resident);
        self.evicted.push(id);
    }

    /// Adapters evicted since the last call, in eviction order.
    pub fn take_evicted(&mut self) -> Vec<AdapterId> {
        std::mem::take(&mut self.evicted)
    }

    /// Drop an adapter's residency (unload, or a page-in that never ran). `Ok(false)` if it
    /// was not resident; `AdapterBusy` if pinned.
    pub fn evict_adapter(&mut self, id: AdapterId) -> Result<bool> {
        match self.adapters.remove(id)? {
            None => Ok(false),
            Some(units) => {
                // To the back of the empty list, lowest first: KV keeps taking the low units
                // it was taking (adapters live at the top, see `ensure_adapter`), and reaches
                // these in ascending order, so a sequence's blocks stay consecutive.
                let mut units = units;
                units.sort_unstable();
                for u in units {
                    self.blocks[u as usize].adapter = false;
                    self.push(u, Where::Empty, true);
                }
                Ok(true)
            }
        }
    }

    pub fn touch_adapter(&mut self, id: AdapterId) -> bool {
        let t = self.tick();
        self.adapters.touch(id, t)
    }
    pub fn pin_adapter(&mut self, id: AdapterId) -> Result<()> {
        self.adapters.pin(id)
    }
    pub fn unpin_adapter(&mut self, id: AdapterId) -> Result<()> {
        self.adapters.unpin(id)
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
        // Highest id first: cached blocks move to the front of the empty list, which then
        // hands them out in ascending order (see `evict_adapter`).
        for id in (0..self.blocks.len() as u32).rev() {
            self.drop_content(id);
        }
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
        if self.blocks[id as usize].at == Where::Cached {
            self.unlink(id);
            self.push(id, Where::Empty, false);
        }
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

    fn list(&mut self, at: Where) -> &mut List {
        match at {
            Where::Empty => &mut self.empty,
            Where::Cached => &mut self.cached,
            Where::Out => unreachable!("units out of the pool are on no list"),
        }
    }

    fn unlink(&mut self, id: BlockId) {
        let (at, prev, next) = {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.at != Where::Out);
            (
                std::mem::replace(&mut b.at, Where::Out),
                std::mem::replace(&mut b.prev, NIL),
                std::mem::replace(&mut b.next, NIL),
            )
        };
        if prev != NIL {
            self.blocks[prev as usize].next = next;
        }
        if next != NIL {
            self.blocks[next as usize].prev = prev;
        }
        let l = self.list(at);
        if prev == NIL {
            l.head = next;
        }
        if next == NIL {
            l.tail = prev;
        }
        l.len -= 1;
    }

    /// Cached blocks join at the MRU end; empty units at the front (reused first).
    fn push(&mut self, id: BlockId, at: Where, back: bool) {
        let l = *self.list(at);
        {
            let b = &mut self.blocks[id as usize];
            b.at = at;
            if back {
                b.prev = l.tail;
                b.next = NIL;
            } else {
                b.prev = NIL;
                b.next = l.head;
            }
        }
        if back {
            if l.tail != NIL {
                self.blocks[l.tail as usize].next = id;
            }
        } else if l.head != NIL {
            self.blocks[l.head as usize].prev = id;
        }
        let l = self.list(at);
        if back {
            l.tail = id;
            if l.head == NIL {
                l.head = id;
            }
        } else {
            l.head = id;
            if l.tail == NIL {
                l.tail = id;
            }
        }
        l.len += 1;
    }

    fn walk(&self, l: List) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(l.len);
        let mut cur = l.head;
        while cur != NIL {
            out.push(cur);
            cur = self.blocks[cur as usize].next;
        }
        out
    }

    /// Free units in the order KV allocation takes them when nothing else competes: empty
    /// ones first, then cached blocks from least to most recently used.
    pub fn free_order(&self) -> Vec<BlockId> {
        let mut v = self.walk(self.empty);
        v.extend(self.walk(self.cached));
        v
    }

    /// Internal consistency (tests): lists match refcounts and owners, every unit is
    /// accounted for exactly once, indices match contents.
    pub fn check_consistency(&self) -> Result<(), String> {
        let empty = self.walk(self.empty);
        let cached = self.walk(self.cached);
        if empty.len() != self.empty.len || cached.len() != self.cached.len {
            return Err("list length counters drifted".into());
        }
        for &id in &empty {
            let b = &self.blocks[id as usize];
            if b.ref_cnt != 0 || b.content.is_some() || b.adapter || b.at != Where::Empty {
                return Err(format!("block {id} on the empty list is not empty"));
            }
        }
        let mut last = 0;
        for &id in &cached {
            let b = &self.blocks[id as usize];
            if b.ref_cnt != 0 || b.content.is_none() || b.adapter || b.at != Where::Cached {
                return Err(format!("block {id} on the cached list is not cached"));
            }
            if b.freed_at < last {
                return Err("cached list out of LRU order".into());
            }
            last = b.freed_at;
        }
        let mut owner = vec![0u8; self.blocks.len()];
        for a in self.adapters.resident() {
            for &u in self.adapters.units(a).expect("resident") {
                owner[u as usize] += 1;
                if !self.blocks[u as usize].adapter {
                    return Err(format!("unit {u} of adapter {a} not marked"));
                }
            }
        }
        for (i, b) in self.blocks.iter().enumerate() {
            let on_list = b.at != Where::Out;
            let kinds = on_list as u8 + (b.ref_cnt > 0) as u8 + owner[i];
            if kinds != 1 {
                return Err(format!(
                    "unit {i}: on list {on_list}, refcount {}, adapter owners {}",
                    b.ref_cnt, owner[i]
                ));
            }
            if b.adapter && (b.content.is_some() || owner[i] != 1) {
                return Err(format!("adapter unit {i} holds KV content"));
            }
        }
        if self.adapters.num_units() > self.adapter_cap || self.kv_held() > self.kv_cap {
            return Err("a cap is exceeded".into());
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

/// The first unit of the highest run of `n` consecutive units in `desc` (unit ids in
/// descending order), if any.
fn highest_run(desc: &[BlockId], n: usize) -> Option<BlockId> {
    let mut start = 0;
    for i in 0..desc.len() {
        if i > 0 && desc[i] + 1 != desc[i - 1] {
            start = i;
        }
        if i + 1 - start == n {
            return Some(desc[i]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::hash::ROOT_HASH;

    /// Units returned to the empty list in bulk (a cache reset, an adapter eviction) come
    /// back in ascending order, and adapters live at the top of the id space, so a sequence's
    /// blocks get consecutive ids in table order (one range for attention to read in place).
    #[test]
    fn bulk_returns_are_handed_out_ascending() {
        let mut p = BlockPool::new(8);
        let ids: Vec<_> = (0..6).map(|_| p.alloc().unwrap()).collect();
        for (i, &id) in ids.iter().enumerate() {
            p.register_full(id, ROOT_HASH, None, &[i as u32]);
        }
        for &id in ids.iter().rev() {
            p.release(id);
        }
        p.clear_cache();
        let again: Vec<_> = (0..6).map(|_| p.alloc().unwrap()).collect();
        assert_eq!(again, ids);
        for &id in again.iter().rev() {
            p.release(id); // as `KvManager::release` does: the table's tail first
        }
        // Adapters take the top of the id space; KV keeps the bottom.
        match p.ensure_adapter(7, 4).unwrap() {
            Residency::Loaded { units, .. } => assert_eq!(units, vec![4, 5, 6, 7]),
            other => panic!("{other:?}"),
        }
        let held: Vec<_> = p.free_order();
        assert_eq!(held[0], 0, "KV still starts at the bottom: {held:?}");
        p.evict_adapter(7).unwrap();
        let order = p.free_order();
        let back: Vec<_> = order
            .iter()
            .copied()
            .filter(|u| !held.contains(u))
            .collect();
        let mut sorted = back.clone();
        sorted.sort_unstable();
        assert_eq!(back, sorted, "evicted units return lowest first: {order:?}");
        p.check_consistency().unwrap();
    }

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

    #[derive(Debug, Clone)]
    enum Op {
        Alloc,
        Release(usize, bool),
        Hit(usize),
        Ensure(u64),
        Pin(u64),
        Unpin(u64),
        Evict(u64),
        Touch(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => Just(Op::Alloc),
            4 => (0usize..64, any::<bool>()).prop_map(|(i, c)| Op::Release(i, c)),
            1 => (0usize..64).prop_map(Op::Hit),
            3 => (0u64..8).prop_map(Op::Ensure),
            2 => (0u64..8).prop_map(Op::Pin),
            2 => (0u64..8).prop_map(Op::Unpin),
            1 => (0u64..8).prop_map(Op::Evict),
            1 => (0u64..8).prop_map(Op::Touch),
        ]
    }

    /// Reference model of the unified LRU: what is empty, cached (with its release time),
    /// referenced, or held by which adapter (with pins and last use), on one clock.
    #[derive(Default)]
    struct Model {
        clock: u64,
        cached: Vec<(u64, BlockId)>,
        empty: Vec<BlockId>,
        adapters: std::collections::HashMap<u64, (Vec<BlockId>, usize, u64)>,
    }

    impl Model {
        fn tick(&mut self) -> u64 {
            self.clock += 1;
            self.clock
        }
        fn oldest_cached(&self) -> Option<(u64, BlockId)> {
            self.cached.iter().copied().min()
        }
        fn oldest_adapter(&self) -> Option<(u64, u64)> {
            self.adapters
                .iter()
                .filter(|(_, e)| e.1 == 0)
                .map(|(&id, e)| (e.2, id))
                .min()
        }
        fn evict(&mut self, id: u64) {
            let (units, ..) = self.adapters.remove(&id).unwrap();
            self.empty.extend(units);
        }
    }

    proptest::proptest! {
        /// Random KV and adapter traffic on one pool, with or without caps: every unit is
        /// accounted for exactly once, caps hold, and every eviction takes the least recently
        /// used of the cached blocks and unpinned adapters.
        #[test]
        fn unified_allocator_matches_reference_lru(
            n in 4usize..24,
            caps in proptest::option::of((1usize..24, 1usize..24)),
            sizes in proptest::collection::vec(1usize..4, 8),
            ops in proptest::collection::vec(op(), 1..150),
        ) {
            use proptest::prelude::*;
            let (kv_cap, ad_cap) = match caps {
                Some((k, a)) => (Some(k), Some(a)),
                None => (None, None),
            };
            let mut p = BlockPool::with_caps(n, kv_cap, ad_cap);
            let mut m = Model { empty: (0..n as u32).collect(), ..Model::default() };
            let mut held: Vec<BlockId> = Vec::new(); // referenced blocks, one entry per ref
            let mut token = 0u32;
            for op in ops {
                match op {
                    Op::Alloc => {
                        let kv_room = p.kv_held() < p.kv_cap();
                        // Expected: empty first (within the cap), else LRU of cached/adapters.
                        let mut expect_evicted = Vec::new();
                        let expect = loop {
                            if kv_room && !m.empty.is_empty() {
                                break Some(None);
                            }
                            let c = m.oldest_cached();
                            let a = if kv_room { m.oldest_adapter() } else { None };
                            match (c, a) {
                                (Some((tb, _)), Some((ta, id))) if ta < tb => {
                                    m.evict(id);
                                    expect_evicted.push(id);
                                }
                                (Some((_, b)), _) => break Some(Some(b)),
                                (None, Some((_, id))) => {
                                    m.evict(id);
                                    expect_evicted.push(id);
                                }
                                (None, None) => break None,
                            }
                        };
                        let avail = p.kv_available();
                        let got = p.alloc();
                        prop_assert_eq!(got.is_some(), avail > 0);
                        prop_assert_eq!(p.take_evicted(), expect_evicted);
                        match (expect, got) {
                            (Some(None), Some(b)) => {
                                prop_assert!(m.empty.contains(&b));
                                m.empty.retain(|&x| x != b);
                            }
                            (Some(Some(want)), Some(b)) => {
                                prop_assert_eq!(want, b);
                                m.cached.retain(|&(_, x)| x != b);
                            }
                            (None, None) => {}
                            (e, g) => prop_assert!(false, "expected {:?}, got {:?}", e, g),
                        }
                        if let Some(b) = got {
                            held.push(b);
                        }
                    }
                    Op::Release(i, content) => {
                        if held.is_empty() {
                            continue;
                        }
                        let b = held.swap_remove(i % held.len());
                        let last = !held.contains(&b);
                        if content && last && p.content(b).is_none() {
                            token += 1;
                            p.register_full(b, 0, None, &[token]);
                        }
                        p.release(b);
                        if last {
                            if p.content(b).is_some() {
                                let t = m.tick();
                                m.cached.push((t, b));
                            } else {
                                m.empty.push(b);
                            }
                        }
                    }
                    Op::Hit(i) => {
                        if let Some(&(_, b)) = m.cached.get(i % m.cached.len().max(1)) {
                            p.acquire(b);
                            m.cached.retain(|&(_, x)| x != b);
                            held.push(b);
                        }
                    }
                    Op::Ensure(id) => {
                        let units = sizes[id as usize];
                        let can = p.can_make_resident(id, units);
                        match m.adapters.get(&id).map(|e| e.0.len()) {
                            Some(u) => {
                                prop_assert_eq!(can, u == units);
                                prop_assert_eq!(p.ensure_adapter(id, units).unwrap(), Residency::AlreadyResident);
                                let t = m.tick();
                                m.adapters.get_mut(&id).unwrap().2 = t;
                            }
                            None => {
                                let r = p.ensure_adapter(id, units);
                                prop_assert_eq!(r.is_ok(), can);
                                if let Ok(Residency::Loaded { units: got, evicted }) = r {
                                    let cap = p.adapter_cap();
                                    let mut expect = Vec::new();
                                    let total = |m: &Model| m.adapters.values().map(|e| e.0.len()).sum::<usize>();
                                    while total(&m) + units > cap {
                                        let (_, a) = m.oldest_adapter().unwrap();
                                        m.evict(a);
                                        expect.push(a);
                                    }
                                    while m.empty.len() < units {
                                        match (m.oldest_cached(), m.oldest_adapter()) {
                                            (Some((tb, _)), Some((ta, a))) if ta < tb => { m.evict(a); expect.push(a); }
                                            (Some((_, b)), _) => { m.cached.retain(|&(_, x)| x != b); m.empty.push(b); }
                                            (None, Some((_, a))) => { m.evict(a); expect.push(a); }
                                            (None, None) => prop_assert!(false, "model ran dry"),
                                        }
                                    }
                                    prop_assert_eq!(&evicted, &expect);
                                    prop_assert_eq!(p.take_evicted(), expect);
                                    for &u in &got {
                                        prop_assert!(m.empty.contains(&u));
                                    }
                                    m.empty.retain(|u| !got.contains(u));
                                    let t = m.tick();
                                    m.adapters.insert(id, (got, 0, t));
                                }
                            }
                        }
                    }
                    Op::Pin(id) => {
                        let r = p.pin_adapter(id);
                        prop_assert_eq!(r.is_ok(), m.adapters.contains_key(&id));
                        if let Some(e) = m.adapters.get_mut(&id) { e.1 += 1; }
                    }
                    Op::Unpin(id) => {
                        let ok = m.adapters.get(&id).is_some_and(|e| e.1 > 0);
                        prop_assert_eq!(p.unpin_adapter(id).is_ok(), ok);
                        if ok { m.adapters.get_mut(&id).unwrap().1 -= 1; }
                    }
                    Op::Evict(id) => {
                        match m.adapters.get(&id).map(|e| e.1) {
                            Some(0) => { prop_assert!(p.evict_adapter(id).unwrap()); m.evict(id); }
                            Some(_) => prop_assert!(p.evict_adapter(id).is_err()),
                            None => prop_assert!(!p.evict_adapter(id).unwrap()),
                        }
                    }
                    Op::Touch(id) => {
                        let t = m.tick();
                        prop_assert_eq!(p.touch_adapter(id), m.adapters.contains_key(&id));
                        if let Some(e) = m.adapters.get_mut(&id) { e.2 = t; }
                    }
                }
                p.check_consistency().map_err(proptest::test_runner::TestCaseError::fail)?;
                // Every unit accounted for exactly once, in the model too.
                let ad: usize = m.adapters.values().map(|e| e.0.len()).sum();
                let mut refs = held.clone();
                refs.sort_unstable();
                refs.dedup();
                prop_assert_eq!(m.empty.len() + m.cached.len() + ad + refs.len(), n);
                prop_assert_eq!(p.num_empty(), m.empty.len());
                prop_assert_eq!(p.num_free(), m.empty.len() + m.cached.len());
                prop_assert_eq!(p.adapters().num_units(), ad);
            }
        }
    }
}
