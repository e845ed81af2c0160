//! Per-sequence KV bookkeeping on top of the block pool: block tables, prefix matching
//! (exact full blocks, then a copy-on-write of the longest usable partial block), slot
//! allocation, hashing of blocks as they fill, and release.

use super::block_pool::{BlockId, BlockPool};
use super::hash::{block_key, BlockHash, ROOT_HASH};
use crate::adapters::AdapterId;

/// KV state of one sequence.
#[derive(Debug, Default, Clone)]
pub struct SeqKv {
    pub blocks: Vec<BlockId>,
    /// Chained hashes of the leading full, computed blocks.
    pub hashes: Vec<BlockHash>,
}

/// What the prefix cache offers a sequence about to be admitted.
#[derive(Debug, Default, Clone)]
pub struct PrefixMatch {
    pub hit_blocks: Vec<BlockId>,
    pub hit_hashes: Vec<BlockHash>,
    /// Copy the first `n` slots of `src` into the sequence's next, fresh block.
    pub copy: Option<(BlockId, usize)>,
}

impl PrefixMatch {
    pub fn cached_tokens(&self, block_size: usize) -> usize {
        self.hit_blocks.len() * block_size + self.copy.map_or(0, |(_, n)| n)
    }
}

/// A copy-on-write this step: copy `len` leading slots of block `src` into block `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: BlockId,
    pub dst: BlockId,
    pub len: usize,
}

#[derive(Debug)]
pub struct KvManager {
    pub pool: BlockPool,
    block_size: usize,
    prefix_cache: bool,
}

impl KvManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_cache: bool) -> Self {
        Self::with_pool(BlockPool::new(num_blocks), block_size, prefix_cache)
    }

    pub fn with_pool(pool: BlockPool, block_size: usize, prefix_cache: bool) -> Self {
        Self {
            pool,
            block_size,
            prefix_cache,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Longest reusable prefix of `tokens`, leaving at least the last token to compute
    /// (its logits are needed). `adapter` is (adapter, activation start) or `None` for a
    /// sequence that runs as the base model.
    pub fn match_prefix(&self, tokens: &[u32], adapter: Option<(AdapterId, usize)>) -> PrefixMatch {
        let mut m = PrefixMatch::default();
        if !self.prefix_cache || tokens.len() < 2 {
            return m;
        }
        let bs = self.block_size;
        let limit = tokens.len() - 1;
        let mut parent = ROOT_HASH;
        let mut b = 0;
        while (b + 1) * bs <= limit {
            let chunk = &tokens[b * bs..(b + 1) * bs];
            let key = block_key(b, bs, adapter);
            let h = super::hash::hash_block(parent, key, chunk);
            match self.pool.lookup_full(h, parent, key, chunk) {
                Some(id) => {
                    m.hit_blocks.push(id);
                    m.hit_hashes.push(h);
                    parent = h;
                    b += 1;
                }
                None => break,
            }
        }
        // Partial reuse inside the first missing block, capped so the last token is computed.
        let start = b * bs;
        let cap = (limit - start).min(bs);
        if cap > 0 {
            let key = block_key(b, bs, adapter);
            // Base KV is valid up to the activation start inside a straddling block.
            let base_cap = match (key, adapter) {
                (Some(_), Some((_, s))) if s > start => (s - start).min(cap),
                _ => 0,
            };
            m.copy =
                self.pool
                    .best_partial(parent, key, cap, base_cap, &tokens[start..start + cap]);
        }
        m
    }

    /// Free blocks that admitting with `m` and allocating room for `total` tokens needs.
    pub fn blocks_needed(&self, seq: &SeqKv, m: Option<&PrefixMatch>, total: usize) -> usize {
        let have = seq.blocks.len() + m.map_or(0, |m| m.hit_blocks.len());
        let new = self.blocks_for(total).saturating_sub(have);
        // Hits and the copy source that sit on the free list leave it when acquired.
        let taken_from_free = m.map_or(0, |m| {
            let src = m.copy.map(|(s, _)| s);
            m.hit_blocks
                .iter()
                .copied()
                .chain(src)
                .filter(|&id| self.pool.ref_cnt(id) == 0)
                .count()
        });
        new + taken_from_free
    }

    pub fn can_allocate(&self, seq: &SeqKv, m: Option<&PrefixMatch>, total: usize) -> bool {
        self.blocks_needed(seq, m, total) <= self.pool.kv_available()
    }

    /// Take the prefix match: acquire hit blocks, and for a partial match pin the source
    /// (released by the caller once the copy has run) and allocate the destination.
    /// Call only after `can_allocate` said yes.
    pub fn adopt_prefix(&mut self, seq: &mut SeqKv, m: &PrefixMatch) -> Option<BlockCopy> {
        debug_assert!(seq.blocks.is_empty());
        for (&id, &h) in m.hit_blocks.iter().zip(&m.hit_hashes) {
            self.pool.acquire(id);
            seq.blocks.push(id);
            seq.hashes.push(h);
        }
        let (src, len) = m.copy?;
        self.pool.acquire(src);
        let dst = self.pool.alloc().expect("checked by can_allocate");
        seq.blocks.push(dst);
        Some(BlockCopy { src, dst, len })
    }

    /// Grow the table to cover `total` tokens. Call only after `can_allocate` said yes.
    pub fn allocate(&mut self, seq: &mut SeqKv, total: usize) {
        while seq.blocks.len() < self.blocks_for(total) {
            let id = self.pool.alloc().expect("checked by can_allocate");
            seq.blocks.push(id);
        }
    }

    /// Hash and publish every block that became full now that `computed` tokens have KV.
    pub fn on_computed(
        &mut self,
        seq: &mut SeqKv,
        tokens: &[u32],
        computed: usize,
        adapter: Option<(AdapterId, usize)>,
    ) {
        if !self.prefix_cache {
            return;
        }
        let bs = self.block_size;
        while (seq.hashes.len() + 1) * bs <= computed {
            let b = seq.hashes.len();
            let parent = seq.hashes.last().copied().unwrap_or(ROOT_HASH);
            let key = block_key(b, bs, adapter);
            let h =
                self.pool
                    .register_full(seq.blocks[b], parent, key, &tokens[b * bs..(b + 1) * bs]);
            seq.hashes.push(h);
        }
    }

    /// Release a sequence's blocks, keeping the computed head of its last partial block
    /// findable. Blocks are released tail first so that, among equally old cached blocks,
    /// the ends of sequences are evicted before the shared prefixes.
    pub fn free(
        &mut self,
        seq: &mut SeqKv,
        tokens: &[u32],
        computed: usize,
        adapter: Option<(AdapterId, usize)>,
    ) {
        let bs = self.block_size;
        let b = computed / bs;
        if self.prefix_cache
            && !computed.is_multiple_of(bs)
            && b < seq.blocks.len()
            && b == seq.hashes.len()
        {
            let id = seq.blocks[b];
            if self.pool.ref_cnt(id) == 1 {
                let parent = seq.hashes.last().copied().unwrap_or(ROOT_HASH);
                let key = block_key(b, bs, adapter);
                self.pool
                    .register_partial(id, parent, key, &tokens[b * bs..computed]);
            }
        }
        for &id in seq.blocks.iter().rev() {
            self.pool.release(id);
        }
        seq.blocks.clear();
        seq.hashes.clear();
    }

    /// Release the blocks past the first `computed` tokens (allocated for a step that was
    /// cancelled; they hold no hash, so they simply return to the free list).
    pub fn truncate(&mut self, seq: &mut SeqKv, computed: usize) {
        let keep = self.blocks_for(computed);
        while seq.blocks.len() > keep {
            let id = seq.blocks.pop().expect("len > keep");
            self.pool.release(id);
        }
    }

    pub fn release_block(&mut self, id: BlockId) {
        self.pool.release(id);
    }

    pub fn reset_prefix_cache(&mut self) {
        self.pool.clear_cache();
    }
}
