"""Device memory sizing: how many KV blocks and adapter rows a runtime allocates."""

from __future__ import annotations

import math

import torch

from alora.model import ModelGeometry

CPU_KV_BYTES = 1 << 30  # default KV budget without a GPU
CPU_ADAPTER_BYTES = 1 << 30
MIN_BLOCKS = 4


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _bytes(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number of bytes >= 0, got {value!r}")
    return int(value)


def kv_blocks(
    geo: ModelGeometry,
    block_size: int,
    blocks: int | None,
    memory: int | None,
    max_num_seqs: int,
    max_model_len: int,
) -> int:
    per_block = geo.kv_bytes_per_block(block_size)
    if blocks is not None:
        return positive_int("kv_cache_blocks", blocks)
    if memory is not None:
        n = _bytes("kv_cache_memory", memory) // per_block
        if n < 1:
            raise ValueError(
                f"kv_cache_memory of {memory} bytes holds no KV block ({per_block} bytes each)"
            )
        return n
    wanted = max_num_seqs * math.ceil(max_model_len / block_size)
    budget = free_cuda_memory(geo.device) // 4 if geo.device.type == "cuda" else CPU_KV_BYTES
    return max(min(wanted, budget // per_block), MIN_BLOCKS)


def adapter_rows(geo: ModelGeometry, rows: int | None, memory: int | None, page_rows: int) -> int:
    per_row = geo.adapter_bytes_per_row()
    if rows is not None:
        return positive_int("adapter_rows", rows)
    if memory is not None:
        n = _bytes("adapter_memory", memory) // per_row
        if n < 1:
            raise ValueError(
                f"adapter_memory of {memory} bytes holds no adapter row ({per_row} bytes each)"
            )
        return n
    budget = free_cuda_memory(geo.device) // 10 if geo.device.type == "cuda" else CPU_ADAPTER_BYTES
    n = min(1024, budget // per_row)
    return max(n // page_rows * page_rows, page_rows)


def free_cuda_memory(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
