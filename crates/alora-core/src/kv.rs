//! The paged KV cache's metadata (no tensors): block pool, per-sequence tables and the
//! prefix cache with aLoRA adapter keys (DESIGN.md section 5).

pub mod block_pool;
pub mod hash;
pub mod manager;

pub use block_pool::{BlockId, BlockPool};
pub use hash::{base_prefix_hashes, block_key, hash_block, AdapterKey, BlockHash, ROOT_HASH};
pub use manager::{BlockCopy, KvManager, PrefixMatch, SeqKv};
