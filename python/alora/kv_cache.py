"""The paged KV cache's device memory. The engine owns every decision about it (which block
holds what); this class only stores tensors and executes writes and copies."""

from __future__ import annotations

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
