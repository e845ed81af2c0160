//! Chained block hashes. A block's identity is its parent's hash, its token ids and its
//! adapter key, so equal hashes mean equal KV contents (DESIGN.md section 5).

use crate::adapters::AdapterId;
use xxhash_rust::xxh3::Xxh3;

/// 128-bit: collisions are out of reach, and hits are verified against stored content anyway.
pub type BlockHash = u128;

/// Parent hash of a sequence's first block.
pub const ROOT_HASH: BlockHash = 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834;

/// What a block's KV depends on besides its tokens: `None` when it lies wholly before the
/// activation start (base weights, shareable by every request on the same prefix), else the
/// adapter and the activation start (adapted tokens depend on both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdapterKey {
    pub adapter: AdapterId,
    pub start: u32,
}

/// Adapter key of block `block` for a sequence whose adapter applies from token `start`
/// (`None` = the whole sequence runs as the base model).
pub fn block_key(
    block: usize,
    block_size: usize,
    adapter: Option<(AdapterId, usize)>,
) -> Option<AdapterKey> {
    let (adapter, start) = adapter?;
    if (block + 1) * block_size <= start {
        None
    } else {
        Some(AdapterKey {
            adapter,
            start: start as u32,
        })
    }
}

pub fn hash_block(parent: BlockHash, key: Option<AdapterKey>, tokens: &[u32]) -> BlockHash {
    let mut h = Xxh3::new();
    h.update(&parent.to_le_bytes());
    match key {
        None => h.update(&[0u8]),
        Some(k) => {
            h.update(&[1u8]);
            h.update(&k.adapter.to_le_bytes());
            h.update(&k.start.to_le_bytes());
        }
    }
    h.update(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.digest128()
}

/// Chained base-key hashes (truncated to 64 bits) of the full blocks of `tokens`, as the
/// cache stores them for computation with base weights: a router holding a replica's
/// [`BlockPool::base_hashes`](super::block_pool::BlockPool::base_hashes) counts how many
/// leading blocks of a request that replica has cached.
pub fn base_prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = ROOT_HASH;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|chunk| {
            parent = hash_block(parent, None, chunk);
            parent as u64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_none_only_wholly_before_start() {
        let a = Some((7, 20));
        assert_eq!(block_key(0, 16, a), None);
        assert_eq!(
            block_key(1, 16, a),
            Some(AdapterKey {
                adapter: 7,
                start: 20
            })
        );
        assert_eq!(block_key(1, 10, a), None); // [10, 20) ends at the start
        assert_eq!(
            block_key(2, 10, a),
            Some(AdapterKey {
                adapter: 7,
                start: 20
            })
        );
        assert_eq!(block_key(5, 16, None), None);
        // Plain LoRA: start 0, every block adapted.
        assert!(block_key(0, 16, Some((1, 0))).is_some());
    }

    #[test]
    fn hash_separates_parent_key_and_tokens() {
        let k = Some(AdapterKey {
            adapter: 1,
            start: 3,
        });
        let base = hash_block(ROOT_HASH, None, &[1, 2, 3]);
        assert_ne!(base, hash_block(ROOT_HASH, k, &[1, 2, 3]));
        assert_ne!(base, hash_block(base, None, &[1, 2, 3]));
        assert_ne!(base, hash_block(ROOT_HASH, None, &[1, 2, 4]));
        assert_ne!(
            hash_block(
                ROOT_HASH,
                Some(AdapterKey {
                    adapter: 1,
                    start: 4
                }),
                &[1, 2, 3]
            ),
            hash_block(ROOT_HASH, k, &[1, 2, 3])
        );
        assert_eq!(base, hash_block(ROOT_HASH, None, &[1, 2, 3]));
    }
}
