"""The LoRA op behind a small interface, so the torch reference and the CUDA kernels are
interchangeable. A backend adds, for the step's active tokens only,

    y[t] += scale(a) * (x[t] @ A_pool[rows(a)]^T) @ Bt_pool[bt_rows(a)]

where `rows(a)` / `bt_rows(a)` are the pool rows of adapter `a` (rank(a) of them, not necessarily
contiguous) and tokens are grouped by adapter into segments (DESIGN.md sections 4 and 6).
Per-module differences in scale (alpha/rank patterns) are folded into the Bt rows when an
adapter is paged in, so one scale per segment suffices.

Pools are 2-D row-major views `[R, in]` / `[R, out]` with unit column stride and any row
stride: in the runtime they are overlapping strided views of the KV cache (row stride = the
engine's row granularity, smaller than a row), so a backend reads them only by row indexing,
slicing and matmuls and never materialises a whole pool.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


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
    # Optional host copies of token_idx and rows (numpy), so the torch forms' layout tests
    # need no device-to-host copy; read through `host_token_idx()` / `host_rows()`.
    token_idx_host: np.ndarray | None = None
    rows_host: np.ndarray | None = None
    # Bt rows when they differ from the A rows (the runtime's pools place them apart);
    # None: Bt row j of a segment is `rows` row j too.
    bt_rows: torch.Tensor | None = None
    bt_rows_host: np.ndarray | None = None

    @cached_property
    def bt(self) -> LoraBatch:
        """The batch as the Bt pool sees it: its `rows` are the Bt rows (itself when A and Bt
        share row ids). Layout facts (`spans`, `uniform`, gathered rows) are its own."""
        if self.bt_rows is None:
            return self
        return replace(
            self, rows=self.bt_rows, rows_host=self.bt_rows_host, bt_rows=None, bt_rows_host=None
        )

    def host_token_idx(self) -> np.ndarray:
        if self.token_idx_host is not None:
            return self.token_idx_host
        return self.token_idx.cpu().numpy()

    def host_rows(self) -> np.ndarray:
        if self.rows_host is not None:
            return self.rows_host
        return self.rows.cpu().numpy()

    @cached_property
    def cpu_segments(self) -> tuple[np.ndarray, np.ndarray]:
        """The segments as the CPU kernel reads them, built once per batch and shared by every
        layer: int64 `[n_tokens, n_rows, token_idx.., seg_start.., seg_row_start.., rows..,
        bt_rows..]` and float32 `seg_scale`."""
        rows = self.host_rows()
        bt_rows = rows if self.bt_rows is None else self.bt.host_rows()
        tok = self.host_token_idx()
        packed = np.concatenate(
            [
                np.asarray([tok.shape[0], rows.shape[0]], dtype=np.int64),
                tok.astype(np.int64, copy=False),
                np.asarray(self.seg_start_host, dtype=np.int64),
                np.asarray(self.seg_row_start_host, dtype=np.int64),
                rows.astype(np.int64, copy=False),
                bt_rows.astype(np.int64, copy=False),
            ]
        )
        return packed, np.asarray(self.seg_scale_host, dtype=np.float32)

    @cached_property
    def scratch(self) -> dict[object, object]:
        """Per-batch memo (the batch lives one step): `dense_rows` by token count, and
        whatever else a backend derives once for every layer of the step."""
        return {}

    @cached_property
    def pad_row(self) -> int:
        """The row the gathered forms read for padding (scaled by 0): the batch's first."""
        rows = self.host_rows()
        return int(rows[0]) if rows.shape[0] else 0

    @property
    def num_segments(self) -> int:
        return len(self.seg_rank_host)

    @property
    def num_active(self) -> int:
        return self.seg_start_host[-1] if self.seg_start_host else 0

    @cached_property
    def token_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per active token, its adapter's pool rows padded to `max_rank` (int64
        [T_active, max_rank]) and the scale to apply per row, 0 on padding (float32, same
        shape). Built once per batch and shared by every module that uses it. Padding
        reads the batch's first row (`pad_row`), an adapter row: in the runtime's pools row
        0 may be KV data, and 0 * a non-finite value read there would not be 0."""
        # numpy: per-segment slicing of tiny arrays costs far less than in torch.
        r = self.max_rank
        rows = np.full((self.num_segments, r), self.pad_row, dtype=np.int64)
        scale = np.zeros((self.num_segments, r), dtype=np.float32)
        host_rows = self.host_rows()
        for a, (r0, rank) in enumerate(
            zip(self.seg_row_start_host[:-1], self.seg_rank_host, strict=True)
        ):
            rows[a, :rank] = host_rows[r0 : r0 + rank]
            scale[a, :rank] = self.seg_scale_host[a]
        seg_of_token = np.repeat(np.arange(self.num_segments), np.diff(self.seg_start_host))
        device = self.token_idx.device
        return (
            torch.from_numpy(rows[seg_of_token]).to(device),
            torch.from_numpy(scale[seg_of_token]).to(device),
        )

    @cached_property
    def spans(self) -> tuple[tuple[int, int, int, int, int] | None, ...]:
        """Per segment, (first token, end token, first row, row step, rank) when its tokens
        are a contiguous range and its pool rows an arithmetic progression with a positive
        step (then the per-segment form works on views, `pool[r0 : r0 + step * rank : step]`,
        with no gathers or scatters), else None. In the runtime's pools an adapter held in
        consecutive units has each module's rows step by the row width / granularity. Empty
        segments are (0, 0, 0, 1, 0)."""
        tok = self.host_token_idx()
        rows = self.host_rows()
        out: list[tuple[int, int, int, int, int] | None] = []
        for a in range(self.num_segments):
            t0, t1 = self.seg_start_host[a], self.seg_start_host[a + 1]
            r0, r1 = self.seg_row_start_host[a], self.seg_row_start_host[a + 1]
            if t0 == t1:
                out.append((0, 0, 0, 1, 0))
                continue
            ts = _progression(tok[t0:t1])
            rs = _progression(rows[r0:r1]) if r1 > r0 else (0, 1)
            if ts is None or ts[1] != 1 or rs is None:
                out.append(None)
            else:
                out.append((ts[0], ts[0] + t1 - t0, rs[0], rs[1], r1 - r0))
        return tuple(out)

    def dense_rows(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_rows` laid out over all `num_tokens` tokens of the step in token order;
        inactive tokens get `pad_row` with scale 0, so they receive an exact zero delta."""
        key = ("dense_rows", num_tokens)
        if key not in self.scratch:
            rows, scale = self.token_rows
            dense = torch.full(
                (num_tokens, self.max_rank), self.pad_row, dtype=torch.int64, device=rows.device
            )
            dense_scale = torch.zeros((num_tokens, self.max_rank), device=rows.device)
            dense[self.token_idx] = rows
            dense_scale[self.token_idx] = scale
            self.scratch[key] = (dense, dense_scale)
        return self.scratch[key]  # type: ignore[return-value]

    @cached_property
    def uniform(self) -> tuple[int, int, bool, int, int] | None:
        """(first row, rank, tokens are 0..n-1, row step, segment stride) when segment a holds
        exactly one token and its rows are lo + a * stride + step * (0 .. rank - 1), stride
        nonzero and of either sign: then A/Bt
        rows are one strided [n, rank, dim] view of the pool and both products are a `bmm`
        over it, with no row gather (a decode step of n requests on n same-shaped adapters
        held in runs of units loaded in order). Else None."""
        n = self.num_segments
        if n == 0 or self.max_seg_tokens != 1 or self.num_active != n:
            return None
        rank = self.seg_rank_host[0]
        rstarts = np.asarray(self.seg_row_start_host, dtype=np.int64)
        if rank == 0 or any(r != rank for r in self.seg_rank_host):
            return None
        if not bool((np.diff(rstarts) == rank).all()):
            return None
        rows = self.host_rows()[: n * rank].astype(np.int64).reshape(n, rank)
        within = _progression(rows[0])
        if within is None:
            return None
        step = within[1]
        if not bool((np.diff(rows, axis=1) == step).all()):
            return None
        # Segments may step downwards (adapters paged in one after another take runs from
        # the top of the unit space): a negative stride, read as the reversed segments.
        across = np.diff(rows[:, 0])
        if n > 1 and (across[0] == 0 or not bool((across == across[0]).all())):
            return None
        stride = int(across[0]) if n > 1 else rank * step
        tok = self.host_token_idx()
        return int(rows[0, 0]), rank, bool((tok == np.arange(n)).all()), step, stride


def _segment_view(
    pool: torch.Tensor, n: int, uniform: tuple[int, int, bool, int, int]
) -> torch.Tensor:
    """[n, rank, dim] view of a pool [R, dim] (any row stride): segment a's rows lo +
    a * stride + step * j. Read-only: its windows may overlap in a strided pool."""
    lo, rank, _, step, stride = uniform
    rs, cs = pool.stride()
    return pool.as_strided(
        (n, rank, pool.shape[1]), (stride * rs, step * rs, cs), pool.storage_offset() + lo * rs
    )


def _upwards(uniform: tuple[int, int, bool, int, int], n: int) -> tuple[int, int, bool, int, int]:
    """A uniform layout whose segments step downwards, seen from its last segment upwards."""
    lo, rank, _, step, stride = uniform
    return lo + (n - 1) * stride, rank, False, step, -stride


def _progression(values: np.ndarray) -> tuple[int, int] | None:
    """(first, step) of a non-empty arithmetic progression with a positive step (a single
    element has step 1), else None."""
    first = int(values[0])
    if values.shape[0] == 1:
        return first, 1
    step = int(values[1]) - first
    if step <= 0 or not bool((np.diff(values) == step).all()):
        return None
    return first, step


class LoraBackend(Protocol):
    """Adds the LoRA delta of a batch in place.

    Optional, looked up with getattr by the LoRA hooks: `bind(a_pool, bt_pool, batch)`, a
    call `(y, x) -> bool` with every argument but the linear's output and input prepared
    once (False: not done, y untouched; `cpu_backend.CpuBackend.bind`), and `fuse_groups`
    (one shrink per layer for modules that read the same input; `kernels.CudaBackend`)."""

    name: str

    def add_lora(
        self,
        y: torch.Tensor,  # [T, out], model dtype, updated in place
        x: torch.Tensor,  # [T, in], model dtype
        a_pool: torch.Tensor,  # [R, in]
        bt_pool: torch.Tensor,  # [R, out]
        batch: LoraBatch,
    ) -> None: ...


_DISPATCH_S = 8e-6  # one small torch op on the CPU
_BANDWIDTH = 20e9  # bytes/s the gathers sustain, mostly from cache


class TorchBackend:
    """Reference backend in plain torch: the CPU path and the oracle for the CUDA kernels;
    accumulates in float32 (float64 inputs stay float64).

    Forms, chosen per batch by estimated op count. Per segment, one pair of matmuls that
    reads the adapter's rows once; when the segment's tokens and rows are contiguous ranges
    (one sequence's activated tokens; pages handed out in order) it runs on views, two ops
    in all. Small batches (decode, short
    invocations) would pay the per-op overhead once per segment, so they instead gather each
    token's rows (padded to the largest rank, padding scaled by zero) and run one batched
    matmul pair for the whole batch; `gather_limit` bounds the bytes gathered per call
    (tokens x rank x (in + out) x element size), so prefill chunks never take this form. When at
    least half the step's tokens are active, the gather covers every token in token order
    (inactive ones scaled by zero), which drops the index_select/index_add pair and adds
    the delta in the second matmul: on small CPU batches the op count is the cost.
    """

    name = "torch"

    def __init__(self, gather_limit: int = 32 << 20) -> None:
        self.gather_limit = gather_limit

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
        uniform, bt_uniform = batch.uniform, batch.bt.uniform
        if (
            uniform is not None
            and bt_uniform is not None
            and (uniform[4] < 0) == (bt_uniform[4] < 0)
            and x.dtype == y.dtype == a_pool.dtype == bt_pool.dtype == acc
        ):
            self._uniform(y, x, a_pool, bt_pool, batch, uniform, bt_uniform)
            return
        num_tokens = x.shape[0]
        # Cost model for choosing a form (CPU): each op costs a dispatch, and the gathered
        # forms move their rows about three times (gather copy, product temporary, reduce)
        # where the per-segment form reads each row once. Calibrated so that decode with
        # 16 rank-16 adapters takes the gathered form at hidden 512 and the per-segment
        # form at hidden 2048, the faster one on each (measured 0.82x vs 0.71x of base, and
        # 0.94x vs 1.01x).
        width = (x.shape[1] + y.shape[1]) * a_pool.element_size()
        dense = 2 * batch.num_active >= num_tokens
        gathered_rows = (num_tokens if dense else batch.num_active) * batch.max_rank
        spans = [
            (sp, bsp) if sp is not None and bsp is not None else None
            for sp, bsp in zip(batch.spans, batch.bt.spans, strict=True)
        ]
        per_segment = sum(2 if sp is not None else 7 for sp in spans) * _DISPATCH_S + (
            sum(batch.seg_rank_host) * width / _BANDWIDTH
        )
        gathered = 5 * _DISPATCH_S + 3 * gathered_rows * width / _BANDWIDTH
        if gathered < per_segment and gathered_rows * width <= self.gather_limit:
            if dense:
                self._dense(y, x, a_pool, bt_pool, batch, acc)
            else:
                self._gathered(y, x, a_pool, bt_pool, batch, acc)
            return
        starts, rstarts = batch.seg_start_host, batch.seg_row_start_host
        bt_all = batch.bt.rows
        for a, pair in enumerate(spans):
            t0, t1 = starts[a], starts[a + 1]
            if t0 == t1 or batch.seg_rank_host[a] == 0:
                continue
            scale = batch.seg_scale_host[a]
            if pair is not None:
                (s0, s1, r0, step, rank), (_, _, b0, bstep, _) = pair
                sl = slice(r0, r0 + step * (rank - 1) + 1, step)
                bsl = slice(b0, b0 + bstep * (rank - 1) + 1, bstep)
                v = x[s0:s1].to(acc) @ a_pool[sl].to(acc).t()
                if y.dtype == acc:
                    y[s0:s1].addmm_(v, bt_pool[bsl].to(acc), alpha=scale)
                else:
                    y[s0:s1] += ((v @ bt_pool[bsl].to(acc)) * scale).to(y.dtype)
                continue
            tok = batch.token_idx[t0:t1]
            rows = batch.rows[rstarts[a] : rstarts[a + 1]].long()
            bt_rows = bt_all[rstarts[a] : rstarts[a + 1]].long()
            xa = x.index_select(0, tok).to(acc)
            v = xa @ a_pool.index_select(0, rows).to(acc).t()
            delta = (v @ bt_pool.index_select(0, bt_rows).to(acc)) * scale
            y.index_add_(0, tok, delta.to(y.dtype))

    @staticmethod
    def _uniform(
        y: torch.Tensor,
        x: torch.Tensor,
        a_pool: torch.Tensor,
        bt_pool: torch.Tensor,
        batch: LoraBatch,
        uniform: tuple[int, int, bool, int, int],
        bt_uniform: tuple[int, int, bool, int, int],
    ) -> None:
        """One token per segment, rows laid out segment after segment: a batched mat-vec
        over pool views reads each row once and copies none (about 2x the gathered form
        for 16 rank-16 adapters at hidden 512-2048, measured)."""
        n = batch.num_segments
        tok, scale, identity = batch.token_idx, batch.seg_scale, uniform[2]
        if uniform[4] < 0:  # segments step downwards: take them in reverse, upwards
            uniform, bt_uniform = _upwards(uniform, n), _upwards(bt_uniform, n)
            tok, scale, identity = tok.flip(0), scale.flip(0), False
        a = _segment_view(a_pool, n, uniform)
        bt = _segment_view(bt_pool, n, bt_uniform)
        xs = x[:n] if identity else x.index_select(0, tok)
        # Row-vector times transposed rows: 4-5x faster on the CPU than a @ x as columns.
        v = torch.bmm(xs[:, None, :], a.transpose(1, 2))  # [n, 1, rank]
        v.mul_(scale.to(v.dtype)[:, None, None])
        if identity and y.is_contiguous():
            y[:n].view(n, 1, -1).baddbmm_(v, bt)  # expand straight into y, no temporary
        else:
            delta = torch.bmm(v, bt)[:, 0]  # [n, out]
            y.index_add_(0, tok, delta)

    @staticmethod
    def _dense(
        y: torch.Tensor,
        x: torch.Tensor,
        a_pool: torch.Tensor,
        bt_pool: torch.Tensor,
        batch: LoraBatch,
        acc: torch.dtype,
    ) -> None:
        rows, scale = batch.dense_rows(x.shape[0])
        bt_rows, _ = batch.bt.dense_rows(x.shape[0])
        y += _gathered_delta(x, a_pool, bt_pool, rows, bt_rows, scale, acc).to(y.dtype)

    @staticmethod
    def _gathered(
        y: torch.Tensor,
        x: torch.Tensor,
        a_pool: torch.Tensor,
        bt_pool: torch.Tensor,
        batch: LoraBatch,
        acc: torch.dtype,
    ) -> None:
        rows, scale = batch.token_rows
        bt_rows, _ = batch.bt.token_rows
        tok = batch.token_idx
        delta = _gathered_delta(x.index_select(0, tok), a_pool, bt_pool, rows, bt_rows, scale, acc)
        y.index_add_(0, tok, delta.to(y.dtype))


def _gathered_delta(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    bt_pool: torch.Tensor,
    rows: torch.Tensor,
    bt_rows: torch.Tensor,
    scale: torch.Tensor,
    acc: torch.dtype,
) -> torch.Tensor:
    """delta[t] = sum_j scale[t, j] * (x[t] . A[rows[t, j]]) * Bt[bt_rows[t, j]], in `acc`.

    Shrink is a gather plus multiply-sum (a batched mat-vec, which `bmm` handles poorly on
    CPU); expand is `embedding_bag` with per-sample weights, which sums the scaled rows
    without materialising them, on a contiguous pool of the accumulation dtype. Other pools
    expand through a gather and `bmm`: half precision since `embedding_bag` would need
    half-precision weights, and strided views (the runtime's pools inside the KV cache)
    since `embedding_bag` copies a non-contiguous weight whole (measured: `contiguous` +
    `clone` of the entire view, 0.17 s per call on a 300 MB view)."""
    n, r = rows.shape
    flat = rows.reshape(-1)
    a = a_pool.index_select(0, flat).view(n, r, -1).to(acc)
    v = (a * x.to(acc)[:, None, :]).sum(-1).mul_(scale.to(acc))
    if bt_pool.dtype == acc and bt_pool.is_contiguous():
        return F.embedding_bag(bt_rows, bt_pool, per_sample_weights=v, mode="sum")
    bt = bt_pool.index_select(0, bt_rows.reshape(-1)).view(n, r, -1).to(acc)
    return torch.bmm(v[:, None, :], bt)[:, 0]
