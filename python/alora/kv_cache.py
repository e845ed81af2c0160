"""The device's memory units: the paged KV cache tensor, whose blocks also hold adapter rows.
The engine owns every decision about it (which unit holds what); this class only stores the
tensor and executes writes and copies.

A unit is one block id `u`, the same in every layer. It serves either as a KV block or as
adapter storage (issue 11). Adapter rows live in each layer's *flat arena*
`kv[l].reshape(-1)` (K side, then V side, `2 * S` elements): row id `c` of a module with
`in + out` features covers elements `[c * g, c * g + in + out)`, the A row first, then the Bt
row, where the granularity `g` comes from the engine (`Engine.row_granularity`). The core
places rows so that they never straddle a unit's K or V part and never overlap each other or
a KV block in use.
"""

from __future__ import annotations

import numpy as np
import torch


class PagedKVCache:
    """K and V of every layer in one tensor `[layers, 2, num_blocks * block_size, kv_heads, d]`.

    A token's K/V lives at slot `block * block_size + offset`; keeping all layers in one tensor
    makes a prefix copy-on-write one indexing op for the whole model.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # Zeros, not empty: padded gathers read unused slots under a mask, and garbage NaNs
        # there would survive the masking (0 * NaN).
        self.kv = torch.zeros(
            (num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim),
            dtype=dtype,
            device=device,
        )

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # ------------------------------------------------------------------ units and adapter rows

    @property
    def P(self) -> int:
        """Elements of one unit in one layer's K side (and again in its V side)."""
        return self.block_size * self.num_kv_heads * self.head_dim

    unit_elems = P

    @property
    def S(self) -> int:
        """Elements of one layer's K side (all units); the layer's flat arena is 2 * S long."""
        return self.num_blocks * self.P

    def num_rows(self, in_features: int, out_features: int, granularity: int) -> int:
        """R_m: row ids of a module whose rows fit wholly in a layer's flat arena."""
        self._check_geometry(in_features, out_features, granularity)
        return (2 * self.S - in_features - out_features) // granularity + 1

    def row_views(
        self, in_features: int, out_features: int, granularity: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-only strided views of every row id of one module, over all layers:
        `a_view` [L, R_m, in] and `bt_view` [L, R_m, out], row stride `granularity` and layer
        stride `2 * S`. Rows of the views overlap each other (the stride is smaller than a
        row): read them with indexing, slicing or matmuls only, never write them and never
        materialise a whole view (`.contiguous()`, `.clone()`); write with `write_rows`."""
        g = granularity
        rows = self.num_rows(in_features, out_features, g)
        kv = self.kv
        L, off = self.num_layers, kv.storage_offset()
        a_view = kv.as_strided((L, rows, in_features), (2 * self.S, g, 1), off)
        bt_view = kv.as_strided((L, rows, out_features), (2 * self.S, g, 1), off + in_features)
        return a_view, bt_view

    def write_rows(
        self,
        in_features: int,
        out_features: int,
        granularity: int,
        rows: np.ndarray | torch.Tensor,
        a_rows: torch.Tensor,
        bt_rows: torch.Tensor,
    ) -> None:
        """Write one module's rows in every layer: `rows` int32 [r] row ids, `a_rows`
        [L, r, in] and `bt_rows` [L, r, out] (any float dtype, any device; converted to the
        cache's). One indexing op over `kv.view(L, -1)` for all layers. Row ids are checked
        on the host (in range, inside one unit's K or V part, not overlapping each other)."""
        g, w = granularity, in_features + out_features
        rows_np = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
        rows_np = rows_np.astype(np.int64, copy=False).reshape(-1)
        r = int(rows_np.shape[0])
        L = self.num_layers
        if tuple(a_rows.shape) != (L, r, in_features):
            raise ValueError(f"a_rows must be [{L}, {r}, {in_features}], got {tuple(a_rows.shape)}")
        if tuple(bt_rows.shape) != (L, r, out_features):
            raise ValueError(
                f"bt_rows must be [{L}, {r}, {out_features}], got {tuple(bt_rows.shape)}"
            )
        if r == 0:
            return
        self.check_rows(in_features, out_features, g, rows_np)
        dev = self.kv.device
        src = torch.cat([a_rows.to(dev, self.kv.dtype), bt_rows.to(dev, self.kv.dtype)], dim=2)
        start = torch.from_numpy(rows_np * g).to(dev)
        idx = (start[:, None] + torch.arange(w, device=dev)[None, :]).reshape(-1)
        self.kv.view(L, -1).index_copy_(1, idx, src.reshape(L, r * w))

    def check_rows(
        self, in_features: int, out_features: int, granularity: int, rows: np.ndarray
    ) -> None:
        """ValueError unless every row id is in range, lies inside one unit's K or V part and
        overlaps no other row of `rows` (the core guarantees all three; this is a cheap host
        check before a write that would otherwise corrupt KV blocks of other units)."""
        g, w, p = granularity, in_features + out_features, self.P
        total = self.num_rows(in_features, out_features, g)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return
        if int(rows.min()) < 0 or int(rows.max()) >= total:
            raise ValueError(f"row ids out of range [0, {total}): {rows.min()}..{rows.max()}")
        start = rows * g
        if bool(((start % p) + w > p).any()):
            raise ValueError(f"a row of {w} elements at a row id straddles a unit ({p} elements)")
        ordered = np.sort(start)
        if bool((np.diff(ordered) < w).any()):
            raise ValueError("row ids overlap each other")

    def _check_geometry(self, in_features: int, out_features: int, granularity: int) -> None:
        g, w, p = granularity, in_features + out_features, self.P
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"granularity must be a positive integer, got {g!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError("in_features and out_features must be positive")
        if p % g or w % g:
            raise ValueError(f"granularity {g} must divide the unit size {p} and the row width {w}")
        if w > p:
            raise ValueError(
                f"a row of {w} elements does not fit a unit of {p} elements: raise block_size"
            )

    def key(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]

    def value(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def write(
        self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """key/value: [T, kv_heads, d] for the step's tokens, written at `slots` [T]."""
        self.kv[layer, 0].index_copy_(0, slots, key.to(self.kv.dtype))
        self.kv[layer, 1].index_copy_(0, slots, value.to(self.kv.dtype))

    def copy_prefixes(self, src: torch.Tensor, dst: torch.Tensor, lengths: torch.Tensor) -> None:
        """For each i, copy the first lengths[i] token slots of block src[i] into block dst[i],
        in every layer, K and V. All sources are gathered before any destination is written,
        so a block that is both a source and a destination is read before it changes."""
        if src.numel() == 0:
            return
        src_idx, dst_idx = prefix_slots(src, dst, lengths, self.block_size)
        if src_idx.numel() == 0:
            return
        src_idx = src_idx.to(self.kv.device)
        dst_idx = dst_idx.to(self.kv.device)
        self.kv[:, :, dst_idx] = self.kv[:, :, src_idx]


def prefix_slots(
    src: torch.Tensor, dst: torch.Tensor, lengths: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat source and destination slot indices of a batch of prefix copies."""
    lengths = lengths.to(torch.int64)
    if bool((lengths < 0).any()) or bool((lengths > block_size).any()):
        raise ValueError(f"copy lengths must lie in [0, {block_size}]")
    offsets = torch.arange(block_size, dtype=torch.int64)
    keep = offsets[None, :] < lengths[:, None]
    src_idx = (src.to(torch.int64)[:, None] * block_size + offsets[None, :])[keep]
    dst_idx = (dst.to(torch.int64)[:, None] * block_size + offsets[None, :])[keep]
    return src_idx, dst_idx
