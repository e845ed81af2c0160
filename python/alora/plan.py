"""The engine's `StepPlan` split into typed sub-plans, one per consumer: the pre-work
(adapter page-ins and KV prefix copies), the attention plan and the LoRA plan. The arrays are
the core's numpy views (no copies); field names are the core's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alora import _core


@dataclass(frozen=True)
class AdapterLoad:
    """A page-in: write the adapter's rows; module m's at `rows[row_start[m]:row_start[m+1]]`
    (row ids in the unit arena, see `kv_cache.PagedKVCache`)."""

    adapter_id: int
    row_start: np.ndarray  # int32 [num_modules + 1]
    rows: np.ndarray  # int32 [sum of module ranks]: A row ids
    bt_rows: np.ndarray  # int32, same offsets: Bt row ids
    weights: _core.AdapterWeights  # the host copy to write from


@dataclass(frozen=True)
class PreWork:
    """What must be written before the forward pass reads it."""

    adapter_loads: list[AdapterLoad]
    copy_src: np.ndarray  # int64 [C] source block of a prefix copy-on-write
    copy_dst: np.ndarray  # int64 [C] destination block
    copy_len: np.ndarray  # int64 [C] leading token slots to copy


@dataclass(frozen=True)
class AttentionPlan:
    positions: np.ndarray  # int64 [T]
    query_start: np.ndarray  # int64 [S + 1]
    context_lens: np.ndarray  # int64 [S] tokens in the KV after this step
    block_tables: np.ndarray  # int32 [S, max_blocks], padded with -1
    slot_mapping: np.ndarray  # int64 [T]


@dataclass(frozen=True)
class LoraPlan:
    sorted_token_idx: np.ndarray  # int64 [T_active] token indices grouped by adapter
    segment_start: np.ndarray  # int32 [A + 1] offsets into sorted_token_idx
    segment_adapter: np.ndarray  # uint64 [A] adapter id of each segment
    adapter_rank: np.ndarray  # int32 [A * M] rank per (segment, module); 0: not targeted
    adapter_row_start: np.ndarray  # int32 [A * M + 1] offsets into adapter_rows
    adapter_rows: np.ndarray  # int32 A row ids, per (segment, module)
    adapter_bt_rows: np.ndarray  # int32 Bt row ids, same offsets

    @property
    def adapter_ids(self) -> list[int]:
        return [int(a) for a in self.segment_adapter]


@dataclass(frozen=True)
class StepWork:
    """One forward pass: tokens, what to sample, and the three sub-plans."""

    step_id: int
    request_ids: np.ndarray  # uint64 [S]
    input_ids: np.ndarray  # int64 [T]
    sample_indices: np.ndarray  # int64 [N] token index whose logits are sampled
    sample_seqs: np.ndarray  # int64 [N] index into request_ids of each sample
    pre: PreWork
    attention: AttentionPlan
    lora: LoraPlan

    @property
    def sampled_request_ids(self) -> list[int]:
        return [int(self.request_ids[s]) for s in self.sample_seqs]

    @classmethod
    def from_core(cls, p: _core.StepPlan) -> StepWork:
        return cls(
            step_id=p.step_id,
            request_ids=p.request_ids,
            input_ids=p.input_ids,
            sample_indices=p.sample_indices,
            sample_seqs=p.sample_seqs,
            pre=PreWork(
                adapter_loads=[
                    AdapterLoad(int(a), row_start, rows, bt_rows, weights)
                    for a, row_start, rows, bt_rows, weights in p.adapter_loads
                ],
                copy_src=p.copy_src,
                copy_dst=p.copy_dst,
                copy_len=p.copy_len,
            ),
            attention=AttentionPlan(
                positions=p.positions,
                query_start=p.query_start,
                context_lens=p.context_lens,
                block_tables=p.block_tables,
                slot_mapping=p.slot_mapping,
            ),
            lora=LoraPlan(
                sorted_token_idx=p.sorted_token_idx,
                segment_start=p.segment_start,
                segment_adapter=p.segment_adapter,
                adapter_rank=p.adapter_rank,
                adapter_row_start=p.adapter_row_start,
                adapter_rows=p.adapter_rows,
                adapter_bt_rows=p.adapter_bt_rows,
            ),
        )
