"""The LoRA op behind a small interface, so the torch reference and the CUDA kernels are
interchangeable. A backend adds, for the step's active tokens only,

    y[t] += scale(a) * (x[t] @ A_pool[rows(a)]^T) @ Bt_pool[rows(a)]

where `rows(a)` are the pool rows of adapter `a` (rank(a) of them, not necessarily
contiguous) and tokens are grouped by adapter into segments (DESIGN.md sections 4 and 6).
Per-module differences in scale (alpha/rank patterns) are folded into the Bt rows when an
adapter is paged in, so one scale per segment suffices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class LoraBatch:
    """The step's active tokens grouped by adapter; tensors live on the model's device."""

    token_idx: torch.Tensor  # int64 [T_active]: indices into the step's token axis
    seg_start: torch.Tensor  # int32 [A + 1]: offsets into token_idx
    seg_rank: torch.Tensor  # int32 [A]
    seg_row_start: torch.Tensor  # int32 [A + 1]: offsets into rows
    rows: torch.Tensor  # int32 [sum rank]: pool rows of each segment's adapter
    seg_scale: torch.Tensor  # float32 [A]
    # Host-side facts, so launches need no device-to-host sync.
    seg_start_host: tuple[int, ...]
    seg_rank_host: tuple[int, ...]
    seg_row_start_host: tuple[int, ...]
    seg_scale_host: tuple[float, ...]
    max_rank: int
    max_seg_tokens: int

    @property
    def num_segments(self) -> int:
        return len(self.seg_rank_host)

    @property
    def num_active(self) -> int:
        return self.seg_start_host[-1] if self.seg_start_host else 0


class LoraBackend(Protocol):
    """Adds the LoRA delta of a batch in place."""

    name: str

    def add_lora(
        self,
        y: torch.Tensor,  # [T, out], model dtype, updated in place
        x: torch.Tensor,  # [T, in], model dtype
        a_pool: torch.Tensor,  # [R, in]
        bt_pool: torch.Tensor,  # [R, out]
        batch: LoraBatch,
    ) -> None: ...


class TorchBackend:
    """Reference backend: plain torch ops per segment. The CPU path and the oracle for
    the CUDA kernels; accumulates in float32 (float64 inputs stay float64)."""

    name = "torch"

    def add_lora(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        a_pool: torch.Tensor,
        bt_pool: torch.Tensor,
        batch: LoraBatch,
    ) -> None:
        if batch.num_active == 0:
            return
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        starts, rstarts = batch.seg_start_host, batch.seg_row_start_host
        for a in range(batch.num_segments):
            t0, t1 = starts[a], starts[a + 1]
            if t0 == t1 or batch.seg_rank_host[a] == 0:
                continue
            tok = batch.token_idx[t0:t1]
            rows = batch.rows[rstarts[a] : rstarts[a + 1]].long()
            xa = x.index_select(0, tok).to(acc)
            v = xa @ a_pool.index_select(0, rows).to(acc).t()
            delta = (v @ bt_pool.index_select(0, rows).to(acc)) * batch.seg_scale_host[a]
            y.index_add_(0, tok, delta.to(y.dtype))
