"""`alora.sizing.device_units`: one device budget of memory units with optional caps per kind,
and the old two-budget keywords mapped onto it."""

from __future__ import annotations

import math

import pytest
import torch

from alora import sizing
from alora.model import ModelGeometry, ModuleSpec
from alora.sizing import DeviceUnits, device_units


def _geo() -> ModelGeometry:
    mods = (ModuleSpec("q_proj", "self_attn.q_proj", 64, 64), ModuleSpec("v_proj", "v", 64, 32))
    return ModelGeometry(
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=100,
        max_model_len=256,
        dtype=torch.float32,
        device=torch.device("cpu"),
        modules=mods,
    )


GEO = _geo()
BS = 8
UNIT = GEO.kv_bytes_per_block(BS)  # 2 * 2 layers * 8 * 2 * 16 * 4 bytes = 4096
ROW = GEO.adapter_bytes_per_row()  # 2 layers * (128 + 96) * 4 bytes = 1792
KW = dict(max_num_seqs=4, max_model_len=256)


def test_unit_and_row_sizes() -> None:
    assert UNIT == 4096 and ROW == 1792


def test_device_memory_alone_is_one_budget_without_caps() -> None:
    assert device_units(GEO, BS, device_memory=100 * UNIT + 7, **KW) == (100, None, None)


def test_device_memory_with_caps() -> None:
    got = device_units(
        GEO, BS, device_memory=100 * UNIT, kv_cache_blocks=60, adapter_memory=10 * UNIT, **KW
    )
    assert got == DeviceUnits(100, 60, 10)
    got = device_units(GEO, BS, device_memory=100 * UNIT, kv_cache_memory=30 * UNIT + 1, **KW)
    assert got == (100, 30, None)
    # adapter_rows=R means R rows of every module, rounded up to units
    got = device_units(GEO, BS, device_memory=100 * UNIT, adapter_rows=5, **KW)
    assert got == (100, None, math.ceil(5 * ROW / UNIT))


def test_without_device_memory_the_parts_add_up_and_explicit_parts_cap() -> None:
    got = device_units(GEO, BS, kv_cache_blocks=16, adapter_rows=8, **KW)
    assert got == (16 + math.ceil(8 * ROW / UNIT), 16, math.ceil(8 * ROW / UNIT))
    got = device_units(GEO, BS, kv_cache_memory=10 * UNIT + 5, adapter_memory=24 * ROW, **KW)
    assert got == (10 + math.ceil(24 * ROW / UNIT), 10, math.ceil(24 * ROW / UNIT))


def test_defaults_match_the_old_two_budgets() -> None:
    # KV: max_num_seqs full-length sequences; adapters: 1024 old rows of every module.
    kv = 4 * math.ceil(256 / BS)
    adapters = math.ceil(1024 * ROW / UNIT)
    assert device_units(GEO, BS, **KW) == (kv + adapters, None, None)
    got = device_units(GEO, BS, kv_cache_blocks=5, **KW)
    assert got == (5 + adapters, 5, None)
    got = device_units(GEO, BS, adapter_rows=3, **KW)
    assert got == (kv + math.ceil(3 * ROW / UNIT), None, math.ceil(3 * ROW / UNIT))
    # At least MIN_BLOCKS of KV by default, however short the sequences.
    tiny = device_units(GEO, BS, max_num_seqs=1, max_model_len=1)
    assert tiny.num_units == sizing.MIN_BLOCKS + adapters


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kv_cache_blocks=4, kv_cache_memory=1 << 20), "not both"),
        (dict(adapter_rows=4, adapter_memory=1 << 20), "not both"),
        (dict(kv_cache_memory=10), "holds no KV block"),
        (dict(adapter_memory=ROW - 1), "holds no adapter row"),
        (dict(device_memory=UNIT - 1), "holds no memory unit"),
        (dict(device_memory=10 * UNIT, kv_cache_blocks=11), "exceeds device_memory"),
        (dict(device_memory=10 * UNIT, adapter_memory=11 * UNIT), "exceeds device_memory"),
        (dict(kv_cache_blocks=0), "kv_cache_blocks must be a positive integer"),
        (dict(kv_cache_blocks=True), "kv_cache_blocks must be a positive integer"),
        (dict(adapter_rows=2.0), "adapter_rows must be a positive integer"),
        (dict(device_memory=-1), "device_memory must be a number of bytes"),
        (dict(device_memory=float("nan")), "device_memory must be a number of bytes"),
        (dict(device_memory=float("inf")), "finite"),
        (dict(adapter_memory="1GB"), "adapter_memory must be a number of bytes"),
    ],
)
def test_bad_values_are_refused_with_their_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        device_units(GEO, BS, **kwargs, **KW)  # type: ignore[arg-type]


def test_host_cache_bytes_and_positive_int() -> None:
    assert sizing.host_cache_bytes(0) == 0
    assert sizing.host_cache_bytes(1 << 30) == 1 << 30
    with pytest.raises(ValueError, match="host_adapter_memory"):
        sizing.host_cache_bytes(-5)
    assert sizing.positive_int("x", 3) == 3
    with pytest.raises(ValueError, match="x must be a positive integer"):
        sizing.positive_int("x", 0)
