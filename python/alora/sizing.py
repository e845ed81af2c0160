"""Device memory sizing: how many memory units (KV blocks, which also hold adapter rows) a
runtime allocates, and the optional caps per kind (issue 11: one device budget).

A unit is one KV block of every layer, `geo.kv_bytes_per_block(block_size)` bytes. Adapter
budgets given in bytes (or in old-style rows of every module, `adapter_rows`) become units
rounded up, so a budget that held a row before still holds one; KV budgets in bytes round
down, as before.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from alora.model import ModelGeometry

CPU_KV_BYTES = 1 << 30  # default KV budget without a GPU
CPU_ADAPTER_BYTES = 1 << 30
MIN_BLOCKS = 4
DEFAULT_ADAPTER_ROWS = 1024  # the old default adapter budget, in rows of every module
DEFAULT_HOST_ADAPTER_BYTES = 1 << 30  # host LRU of adapter weights read from disk


class DeviceUnits(NamedTuple):
    num_units: int  # units of the one device tensor (Engine num_blocks)
    kv_block_cap: int | None  # most units KV may hold (None: no cap)
    adapter_block_cap: int | None  # most units adapters may hold (None: no cap)


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _bytes(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number of bytes >= 0, got {value!r}")
    if isinstance(value, float) and math.isinf(value):
        raise ValueError(f"{name} must be a finite number of bytes, got {value!r}")
    return int(value)


def device_units(
    geo: ModelGeometry,
    block_size: int,
    *,
    device_memory: int | None = None,
    kv_cache_blocks: int | None = None,
    kv_cache_memory: int | None = None,
    adapter_rows: int | None = None,
    adapter_memory: int | None = None,
    max_num_seqs: int,
    max_model_len: int,
) -> DeviceUnits:
    """Units and caps for the runtime's keywords (the contract's "AdapterRuntime sizing").

    - `device_memory` given: units = device_memory // unit bytes; each explicit KV budget
      (`kv_cache_blocks` or `kv_cache_memory`) and adapter budget (`adapter_rows` or
      `adapter_memory`) is a cap within it.
    - else: units = KV part + adapter part, each the explicit budget or the old default
      (KV: enough for max_num_seqs full-length sequences within a quarter of free GPU memory,
      or 1 GiB on the CPU; adapters: 1024 rows of every module within a tenth of free GPU
      memory, or 1 GiB on the CPU); each explicit one is also a cap, so the old two-budget
      calls keep two fixed budgets.
    """
    positive_int("block_size", block_size)
    if kv_cache_blocks is not None and kv_cache_memory is not None:
        raise ValueError("give kv_cache_blocks or kv_cache_memory, not both")
    if adapter_rows is not None and adapter_memory is not None:
        raise ValueError("give adapter_rows or adapter_memory, not both")
    unit = geo.kv_bytes_per_block(block_size)
    per_row = geo.adapter_bytes_per_row()

    kv_cap: int | None = None
    if kv_cache_blocks is not None:
        kv_cap = positive_int("kv_cache_blocks", kv_cache_blocks)
    elif kv_cache_memory is not None:
        kv_cap = _bytes("kv_cache_memory", kv_cache_memory) // unit
        if kv_cap < 1:
            raise ValueError(
                f"kv_cache_memory of {kv_cache_memory} bytes holds no KV block "
                f"({unit} bytes each at block_size {block_size})"
            )

    adapter_cap: int | None = None
    if adapter_rows is not None:
        adapter_cap = math.ceil(positive_int("adapter_rows", adapter_rows) * per_row / unit)
    elif adapter_memory is not None:
        nbytes = _bytes("adapter_memory", adapter_memory)
        if nbytes < per_row:
            raise ValueError(
                f"adapter_memory of {adapter_memory} bytes holds no adapter row "
                f"({per_row} bytes each)"
            )
        adapter_cap = math.ceil(nbytes / unit)

    if device_memory is not None:
        units = _bytes("device_memory", device_memory) // unit
        if units < 1:
            raise ValueError(
                f"device_memory of {device_memory} bytes holds no memory unit "
                f"({unit} bytes each: one KV block of every layer at block_size {block_size})"
            )
        for name, cap in (("KV", kv_cap), ("adapter", adapter_cap)):
            if cap is not None and cap > units:
                raise ValueError(
                    f"the {name} budget ({cap} units of {unit} bytes) exceeds device_memory "
                    f"({units} units)"
                )
        return DeviceUnits(units, kv_cap, adapter_cap)

    kv_part = (
        kv_cap
        if kv_cap is not None
        else _default_kv_units(geo, block_size, unit, max_num_seqs, max_model_len)
    )
    if adapter_cap is not None:
        adapter_part = adapter_cap
    else:
        adapter_part = _default_adapter_units(geo, unit, per_row)
    return DeviceUnits(kv_part + adapter_part, kv_cap, adapter_cap)


def _default_kv_units(
    geo: ModelGeometry, block_size: int, unit: int, max_num_seqs: int, max_model_len: int
) -> int:
    wanted = max_num_seqs * math.ceil(max_model_len / block_size)
    budget = free_cuda_memory(geo.device) // 4 if geo.device.type == "cuda" else CPU_KV_BYTES
    return max(min(wanted, budget // unit), MIN_BLOCKS)


def _default_adapter_units(geo: ModelGeometry, unit: int, per_row: int) -> int:
    budget = free_cuda_memory(geo.device) // 10 if geo.device.type == "cuda" else CPU_ADAPTER_BYTES
    rows = max(min(DEFAULT_ADAPTER_ROWS, budget // per_row), 1)
    return math.ceil(rows * per_row / unit)


def host_cache_bytes(value: object) -> int:
    """The host adapter tier's byte budget (`host_adapter_memory`), checked."""
    return _bytes("host_adapter_memory", value)


def free_cuda_memory(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
