//! `StepPlan`: one forward pass as flat arrays (DESIGN.md section 4), built by the scheduler
//! and handed to Python without per-element conversion.

use crate::adapters::AdapterId;
use crate::pages::AdapterRows;
use crate::request::RequestId;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub step_id: u64,
    // Per sequence.
    pub request_ids: Vec<RequestId>,
    pub query_start: Vec<i64>,
    pub context_lens: Vec<i64>,
    /// Row-major [num_seqs, max_blocks], padded with -1.
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
    // Per token.
    pub input_ids: Vec<i64>,
    pub positions: Vec<i64>,
    pub slot_mapping: Vec<i64>,
    pub token_adapter_slot: Vec<i32>,
    // Sampling: token index and sequence index of each sample.
    pub sample_indices: Vec<i64>,
    pub sample_seqs: Vec<i64>,
    // LoRA: active tokens grouped by adapter (segments in ascending adapter id).
    pub sorted_token_idx: Vec<i64>,
    pub segment_start: Vec<i32>,
    pub segment_adapter: Vec<AdapterId>,
    /// Per (segment, module), row-major: the module's rank (0: not targeted).
    pub adapter_rank: Vec<i32>,
    /// Offsets into `adapter_rows`, per (segment, module), plus the end.
    pub adapter_row_start: Vec<i32>,
    /// A row ids (see [`crate::pages`]).
    pub adapter_rows: Vec<i32>,
    /// Bt row ids, at the same offsets as `adapter_rows`.
    pub adapter_bt_rows: Vec<i32>,
    // Work to do before the forward pass.
    pub copy_src: Vec<i64>,
    pub copy_dst: Vec<i64>,
    pub copy_len: Vec<i64>,
    pub adapter_loads: Vec<AdapterLoad>,
}

/// A page-in: write the adapter's rows where `rows` says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterLoad {
    pub id: AdapterId,
    pub rows: AdapterRows,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }
    pub fn num_seqs(&self) -> usize {
        self.request_ids.len()
    }
}
