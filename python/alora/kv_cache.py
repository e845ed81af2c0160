"""The device's memory units: the paged KV cache tensor, whose blocks also hold adapter rows.
The engine owns every decision about it (which unit holds what); this class only stores the
tensor and executes writes and copies.

A unit is one block id `u`, the same in every layer. It serves either as a KV block or as
adapter storage (issue 11). Adapter rows live in each layer's *flat arena*
`kv[l].reshape(-1)` (K side, then V side, `2 * S` elements): an A row id `c` of a module
covers elements `[c * g, c * g + in)`, a Bt row id `[c * g, c * g + out)`, where the
granularity `g` comes from the engine (`Engine.row_granularity`). The core places rows inside
the adapter's own units (a row crosses from one unit into the next only within a run of
consecutive units it holds), never overlapping each other or a KV block in use.
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

    def num_rows(self, width: int, granularity: int) -> int:
        """Row ids whose `width` elements lie wholly in a layer's flat arena."""
        self._check_geometry(width, granularity)
        return (2 * self.S - width) // granularity + 1

    def row_view(self, width: int, granularity: int) -> torch.Tensor:
        """A read-only strided view [L, R, width] of every row id of that width, over all
        layers: row stride `granularity`, layer stride `2 * S`. Rows overlap each other (the
        stride is smaller than a row): read with indexing, slicing or matmuls only, never
        write it and never materialise it whole (`.contiguous()`, `.clone()`); write with
        `write_rows`."""
        g = granularity
        rows = self.num_rows(width, g)
        kv = self.kv
        return kv.as_strided(
            (self.num_layers, rows, width), (2 * self.S, g, 1), kv.storage_offset()
        )

    def row_views(
        self, in_features: int, out_features: int, granularity: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One module's A view [L, R_in, in] and Bt view [L, R_out, out] (see `row_view`)."""
        return self.row_view(in_features, granularity), self.row_view(out_features, granularity)

    def write_rows(
        self,
        in_features: int,
        out_features: int,
        granularity: int,
        a_ids: np.ndarray | torch.Tensor,
        bt_ids: np.ndarray | torch.Tensor,
        a_rows: torch.Tensor,
        bt_rows: torch.Tensor,
    ) -> None:
        """Write one module's rows in every layer: A rows `a_rows` [L, r, in] at row ids
        `a_ids` int32 [r], Bt rows `bt_rows` [L, r, out] at `bt_ids` (any float dtype and
        device; converted to the cache's). One indexing op over `kv.view(L, -1)` for all
        layers. Row ids are checked on the host first (in range, each row inside the K or the
        V side, no two rows overlapping)."""
        g = granularity
        a_np, bt_np = _ids(a_ids), _ids(bt_ids)
        r = int(a_np.shape[0])
        L = self.num_layers
        if int(bt_np.shape[0]) != r:
            raise ValueError(f"{r} A row ids but {bt_np.shape[0]} Bt row ids")
        if tuple(a_rows.shape) != (L, r, in_features):
            raise ValueError(f"a_rows must be [{L}, {r}, {in_features}], got {tuple(a_rows.shape)}")
        if tuple(bt_rows.shape) != (L, r, out_features):
            raise ValueError(
                f"bt_rows must be [{L}, {r}, {out_features}], got {tuple(bt_rows.shape)}"
            )
        if r == 0:
            return
        self.check_rows([(a_np, in_features), (bt_np, out_features)], g)
        dev = self.kv.device
        idx, src = [], []
        for ids, width, rows in ((a_np, in_features, a_rows), (bt_np, out_features, bt_rows)):
            start = torch.from_numpy(ids * g).to(dev)
            idx.append((start[:, None] + torch.arange(width, device=dev)[None, :]).reshape(-1))
            src.append(rows.to(dev, self.kv.dtype).reshape(L, r * width))
        self.kv.view(L, -1).index_copy_(1, torch.cat(idx), torch.cat(src, dim=1))

    def check_rows(self, groups: list[tuple[np.ndarray, int]], granularity: int) -> None:
        """ValueError unless every row (ids of a given width, per group) is in range, lies
        inside the K side or the V side of the layer's arena, and overlaps no other row of
        any group. The core guarantees more (rows inside the adapter's own units; a row may
        run from one unit into the next only within a run of consecutive units it holds);
        this cheap host check catches an addressing bug before the write spreads it."""
        g, side = granularity, self.S
        starts, ends = [], []
        for ids, width in groups:
            total = self.num_rows(width, g)
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if ids.size == 0:
                continue
            if int(ids.min()) < 0 or int(ids.max()) >= total:
                raise ValueError(f"row ids out of range [0, {total}): {ids.min()}..{ids.max()}")
            start = ids * g
            if bool(((start % side) + width > side).any()):
                raise ValueError(
                    f"a row of {width} elements at a row id straddles the K and V sides "
                    f"({side} elements each)"
                )
            starts.append(start)
            ends.append(start + width)
        if not starts:
            return
        start, end = np.concatenate(starts), np.concatenate(ends)
        order = np.argsort(start, kind="stable")
        if bool((start[order][1:] < end[order][:-1]).any()):
            raise ValueError("row ids overlap each other")

    def _check_geometry(self, width: int, granularity: int) -> None:
        g, p = granularity, self.P
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"granularity must be a positive integer, got {g!r}")
        if width < 1:
            raise ValueError("row widths must be positive")
        if p % g or width % g:
            raise ValueError(
                f"granularity {g} must divide the unit size {p} and the row width {width}"
            )
        if width > p:
            raise ValueError(
                f"a row of {width} elements does not fit a unit of {p} elements: raise block_size"
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


def _ids(ids: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
    return arr.astype(np.int64, copy=False).reshape(-1)
