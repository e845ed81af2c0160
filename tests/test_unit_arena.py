"""Adapter rows inside the KV cache's units (issue 11), Python side: the strided per-module
views, page-in writes through flat indices, per-module LoRA batches from the plan's
(segment, module) arrays, and the LoRA delta read from the views against a dense float64
reference. No engine: row placements come from a small packer that follows the contract
(rows inside one unit's K or V part, never overlapping)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alora.backend import TorchBackend
from alora.kv_cache import PagedKVCache
from alora.lora import AdapterEntry, AdapterPools, LoraBatchCache, build_lora_batches
from alora.model import ModelGeometry, ModuleSpec

# ------------------------------------------------------------------------------ fixtures


def make_geometry(dims: list[tuple[int, int]], layers: int, kv_heads: int, head_dim: int):
    mods = tuple(ModuleSpec(f"m{i}", f"p.m{i}", a, b) for i, (a, b) in enumerate(dims))
    return ModelGeometry(
        num_layers=layers,
        num_heads=kv_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=50,
        max_model_len=64,
        dtype=torch.float32,
        device=torch.device("cpu"),
        modules=mods,
    )


def make_cache(geo: ModelGeometry, num_blocks: int, block_size: int, dtype=torch.float32):
    return PagedKVCache(
        num_layers=geo.num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=geo.num_kv_heads,
        head_dim=geo.head_dim,
        dtype=dtype,
        device="cpu",
    )


def granularity(cache: PagedKVCache, geo: ModelGeometry) -> int:
    widths = [w for m in geo.modules for w in (m.in_features, m.out_features)]
    return math.gcd(cache.P, *widths)


def place(
    cache: PagedKVCache, geo: ModelGeometry, g: int, units: list[int], ranks: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack an adapter's A and Bt rows (ranks[m] of each per module) into `units` (their K
    parts, then V parts), each row inside one part, as the core would:
    (row_start int32[M + 1], A rows, Bt rows)."""
    regions = [(u * cache.P, cache.P) for u in units] + [
        (cache.S + u * cache.P, cache.P) for u in units
    ]
    ri, used = 0, 0

    def take(w: int) -> int:
        nonlocal ri, used
        while regions[ri][1] - used < w:
            ri, used = ri + 1, 0
            if ri == len(regions):
                raise ValueError("adapter does not fit its units")
        at = (regions[ri][0] + used) // g
        used += w
        return at

    rows: list[int] = []
    bt_rows: list[int] = []
    starts = [0]
    for m, spec in enumerate(geo.modules):
        for _ in range(ranks[m]):
            rows.append(take(spec.in_features))
            bt_rows.append(take(spec.out_features))
        starts.append(len(rows))
    as32 = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
    return as32(starts), as32(rows), as32(bt_rows)


def units_needed(cache: PagedKVCache, geo: ModelGeometry, ranks: list[int]) -> int:
    n = 1
    while True:
        try:
            place(cache, geo, granularity(cache, geo), list(range(n)), ranks)
            return n
        except (ValueError, IndexError):
            n += 1


@dataclass
class FakeAdapter:
    """AdapterInfo (metadata) and AdapterWeights (host weights) of one adapter."""

    id: int
    layer_ranks: dict[tuple[int, str], int]  # (layer, module) -> rank, absent = not adapted
    scales: dict[tuple[int, str], float]
    geo: ModelGeometry
    seed: int
    tensors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        for (layer, name), r in self.layer_ranks.items():
            spec = self.geo.module(name)
            a = rng.standard_normal((r, spec.in_features)).astype(np.float32)
            b = rng.standard_normal((spec.out_features, r)).astype(np.float32)
            a.flags.writeable = False  # as the core hands them out
            b.flags.writeable = False
            self.tensors[(layer, name)] = (a, b)

    @property
    def module_ranks(self) -> list[int]:
        return [
            max((r for (_, n), r in self.layer_ranks.items() if n == spec.name), default=0)
            for spec in self.geo.modules
        ]

    @property
    def rank(self) -> int:
        return max(self.module_ranks, default=0)

    @property
    def segment_scale(self) -> float:
        biggest = max((abs(s) for s in self.scales.values()), default=0.0)
        return biggest if biggest > 0 else 1.0

    def weights(self, layer: int, name: str):
        return self.tensors.get((layer, name))

    def scale(self, layer: int, name: str) -> float:
        return self.scales.get((layer, name), 0.0)


def random_adapter(rng: np.random.Generator, geo: ModelGeometry, aid: int) -> FakeAdapter:
    layer_ranks: dict[tuple[int, str], int] = {}
    scales: dict[tuple[int, str], float] = {}
    for spec in geo.modules:
        if rng.random() < 0.3:
            continue  # module not targeted
        top = int(rng.integers(1, 6))
        for layer in range(geo.num_layers):
            if rng.random() < 0.2:
                continue  # layer not adapted (layers_to_transform)
            layer_ranks[(layer, spec.name)] = int(rng.integers(1, top + 1))
            scales[(layer, spec.name)] = float(rng.uniform(-3, 3))
    if not layer_ranks:
        layer_ranks[(0, geo.modules[0].name)] = 2
        scales[(0, geo.modules[0].name)] = 1.5
    return FakeAdapter(aid, layer_ranks, scales, geo, seed=aid)


# ------------------------------------------------------------------------------ views


def test_views_address_the_contract_elements() -> None:
    geo = make_geometry([(6, 10), (4, 4)], layers=3, kv_heads=2, head_dim=4)
    cache = make_cache(geo, num_blocks=5, block_size=4)
    assert (cache.P, cache.S, cache.unit_elems) == (4 * 2 * 4, 5 * 32, 32)
    g = granularity(cache, geo)
    assert g == 2
    a, bt = cache.row_views(6, 10, g)
    a_rows, bt_rows = (2 * cache.S - 6) // g + 1, (2 * cache.S - 10) // g + 1
    assert tuple(a.shape) == (3, a_rows, 6) and tuple(bt.shape) == (3, bt_rows, 10)
    assert a.stride() == (2 * cache.S, g, 1) and bt.stride() == (2 * cache.S, g, 1)
    cache.kv.copy_(torch.arange(cache.kv.numel(), dtype=torch.float32).view_as(cache.kv))
    for layer in range(3):
        flat = cache.kv[layer].reshape(-1)
        for c in (0, 1, 7, a_rows - 1):
            assert torch.equal(a[layer, c], flat[c * g : c * g + 6])
        for c in (0, 1, 7, bt_rows - 1):
            assert torch.equal(bt[layer, c], flat[c * g : c * g + 10])
    # The last row id ends exactly inside the layer's arena.
    assert (bt_rows - 1) * g + 10 <= 2 * cache.S < bt_rows * g + 10


def test_geometry_errors() -> None:
    geo = make_geometry([(6, 10)], layers=1, kv_heads=1, head_dim=4)
    cache = make_cache(geo, num_blocks=2, block_size=4)  # P = 16
    with pytest.raises(ValueError, match="must divide"):
        cache.row_views(6, 10, 3)
    with pytest.raises(ValueError, match="raise block_size"):
        cache.row_views(20, 10, 2)
    with pytest.raises(ValueError, match="positive integer"):
        cache.row_views(6, 10, 0)
    ids = lambda *v: np.array(v, dtype=np.int32)  # noqa: E731
    z = torch.zeros(1, 1, 6), torch.zeros(1, 1, 10)
    with pytest.raises(ValueError, match="straddles the K and V sides"):
        cache.write_rows(6, 10, 2, ids(14), ids(0), *z)  # A at [28, 34) crosses S = 32
    # Across a unit boundary within a side is fine: a run of consecutive units.
    cache.write_rows(6, 10, 2, ids(6), ids(9), *z)  # A at [12, 18) crosses unit 0 -> 1
    with pytest.raises(ValueError, match="range"):
        cache.write_rows(6, 10, 2, ids(99), ids(8), *z)
    with pytest.raises(ValueError, match="overlap"):
        cache.write_rows(6, 10, 2, ids(8), ids(8), *z)  # A and Bt rows on top of each other
    two = torch.zeros(1, 2, 6), torch.zeros(1, 2, 10)
    with pytest.raises(ValueError, match="overlap"):
        cache.write_rows(6, 10, 2, ids(0, 0), ids(8, 16), *two)
    with pytest.raises(ValueError, match=r"a_rows must be \[1, 1, 6\]"):
        cache.write_rows(6, 10, 2, ids(0), ids(8), *two)
    with pytest.raises(ValueError, match="1 A row ids but 2 Bt row ids"):
        cache.write_rows(6, 10, 2, ids(0), ids(8, 16), *z)


def test_write_rows_is_one_indexing_op_per_module() -> None:
    from torch.profiler import profile

    geo = make_geometry([(8, 8)], layers=4, kv_heads=2, head_dim=4)
    cache = make_cache(geo, num_blocks=6, block_size=4)
    rows, bt_rows = np.array([2, 5, 9], dtype=np.int32), np.array([3, 6, 10], dtype=np.int32)
    with profile() as prof:
        cache.write_rows(8, 8, 8, rows, bt_rows, torch.ones(4, 3, 8), torch.full((4, 3, 8), 2.0))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::index_copy_") == 1
    a, bt = cache.row_views(8, 8, 8)
    assert bool((a[:, rows] == 1).all()) and bool((bt[:, bt_rows] == 2).all())


# ------------------------------------------------------------------------------ page-in


def test_page_in_round_trip_and_zero_rows() -> None:
    geo = make_geometry([(8, 8), (8, 24), (16, 16)], layers=3, kv_heads=2, head_dim=8)
    cache = make_cache(geo, num_blocks=8, block_size=4)  # P = 64
    g = granularity(cache, geo)
    pools = AdapterPools(geo, cache, g)
    assert pools.nbytes() == 0
    ad = FakeAdapter(
        7,
        {(0, "m0"): 3, (2, "m0"): 1, (1, "m1"): 2},  # m0 rank 3 (layer 1 absent), m2 untargeted
        {(0, "m0"): 2.0, (2, "m0"): -4.0, (1, "m1"): 0.5},
        geo,
        seed=3,
    )
    assert ad.module_ranks == [3, 2, 0] and ad.segment_scale == 4.0
    cache.kv.fill_(float("nan"))  # stale KV where the adapter goes
    starts, rows, bt_rows = place(cache, geo, g, [5, 2], ad.module_ranks)
    pools.load(AdapterEntry.from_info(ad, ["m0", "m1", "m2"]), starts, rows, bt_rows, ad)
    for m, spec in enumerate(geo.modules):
        mrows = torch.from_numpy(rows[starts[m] : starts[m + 1]].astype(np.int64))
        mbt = torch.from_numpy(bt_rows[starts[m] : starts[m + 1]].astype(np.int64))
        for layer in range(geo.num_layers):
            a = pools.a[spec.name][layer].index_select(0, mrows)
            bt = pools.bt[spec.name][layer].index_select(0, mbt)
            want_a = torch.zeros_like(a)
            want_bt = torch.zeros_like(bt)
            w = ad.weights(layer, spec.name)
            if w is not None:
                r = w[0].shape[0]
                ratio = ad.scale(layer, spec.name) / ad.segment_scale
                want_a[:r] = torch.from_numpy(w[0].copy())
                want_bt[:r] = torch.from_numpy(w[1].T.copy()) * ratio
            assert torch.equal(a, want_a), (spec.name, layer)
            torch.testing.assert_close(bt, want_bt, rtol=0, atol=0)


def test_entry_from_info_uses_summaries_only() -> None:
    info = SimpleNamespace(module_ranks=[0, 8, 4], segment_scale=2.5)
    entry = AdapterEntry.from_info(info, ["q", "k", "v"])  # type: ignore[arg-type]
    assert entry.seg_scale == 2.5 and entry.targets == frozenset({"k", "v"})
    with pytest.raises(ValueError, match="3 module ranks for 2 modules"):
        AdapterEntry.from_info(info, ["q", "k"])  # type: ignore[arg-type]


def test_load_refuses_bad_row_starts() -> None:
    geo = make_geometry([(8, 8)], layers=1, kv_heads=2, head_dim=8)
    cache = make_cache(geo, num_blocks=2, block_size=4)
    pools = AdapterPools(geo, cache, 8)
    ad = FakeAdapter(1, {(0, "m0"): 2}, {(0, "m0"): 1.0}, geo, seed=0)
    two, one = np.array([0, 1], np.int32), np.array([0], np.int32)
    with pytest.raises(ValueError, match="row_start must have 2 entries"):
        pools.load(ad, one, two, two + 2, ad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 rows for m0 of rank 2"):
        pools.load(ad, two, one, one + 2, ad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 A row ids but 1 Bt row ids"):
        pools.load(ad, two, two, one, ad)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    dims=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=4),
    layers=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([4, 8, 16]),
    block_size=st.sampled_from([2, 4, 8]),
    num_adapters=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_page_ins_touch_only_their_rows(
    dims: list[tuple[int, int]],
    layers: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    num_adapters: int,
    seed: int,
) -> None:
    """Random module dims, ranks and unit placements: after every page-in, each element of
    the cache outside the adapters' rows keeps its KV pattern bit for bit, each adapter's rows
    read back exactly through the views, and the LoRA delta read from the views (every
    backend form) equals a dense float64 reference."""
    p = block_size * kv_heads * head_dim
    dims = [(a, b) for a, b in dims if max(a, b) <= p] or [(1, 1)]
    geo = make_geometry(dims, layers, kv_heads, head_dim)
    rng = np.random.default_rng(seed)
    adapters = [random_adapter(rng, geo, aid) for aid in range(num_adapters)]
    probe = make_cache(geo, 1, block_size)
    need = [units_needed(probe, geo, ad.module_ranks) for ad in adapters]
    num_blocks = sum(need) + int(rng.integers(1, 4))
    cache = make_cache(geo, num_blocks, block_size)
    g = granularity(cache, geo)
    pools = AdapterPools(geo, cache, g)
    pattern = torch.from_numpy(rng.standard_normal(cache.kv.shape).astype(np.float32))
    cache.kv.copy_(pattern)
    free = list(rng.permutation(num_blocks))
    written = torch.zeros(layers, 2 * cache.S, dtype=torch.bool)
    placed = {}
    for ad, n in zip(adapters, need, strict=True):
        units = [int(free.pop()) for _ in range(n)]
        starts, rows, bt_rows = place(cache, geo, g, units, ad.module_ranks)
        pools.load(ad, starts, rows, bt_rows, ad)  # type: ignore[arg-type]
        placed[ad.id] = (starts, rows, bt_rows)
        for m, spec in enumerate(geo.modules):
            for c in rows[starts[m] : starts[m + 1]]:
                written[:, c * g : c * g + spec.in_features] = True
            for c in bt_rows[starts[m] : starts[m + 1]]:
                written[:, c * g : c * g + spec.out_features] = True
        flat = cache.kv.view(layers, -1)
        assert torch.equal(flat[~written], pattern.view(layers, -1)[~written])
    names = [s.name for s in geo.modules]
    entries = {ad.id: AdapterEntry.from_info(ad, names) for ad in adapters}  # type: ignore[arg-type]
    for ad in adapters:  # round trip
        starts, rows, _ = placed[ad.id]
        for m, spec in enumerate(geo.modules):
            idx = torch.from_numpy(rows[starts[m] : starts[m + 1]].astype(np.int64))
            for layer in range(layers):
                w = ad.weights(layer, spec.name)
                r = 0 if w is None else w[0].shape[0]
                got_a = pools.a[spec.name][layer].index_select(0, idx)
                if r:
                    assert torch.equal(got_a[:r], torch.from_numpy(w[0].copy()))
                assert not bool(got_a[r:].any())
    check_delta(geo, pools, adapters, entries, placed, rng)


def check_delta(geo, pools, adapters, entries, placed, rng) -> None:
    """A step over the adapters (and base tokens): per-module batches from the plan's
    (segment, module) arrays, the delta from the views == float64 dense reference."""
    num_mod = len(geo.modules)
    order = list(rng.permutation(len(adapters)))
    seg_tokens: list[list[int]] = []
    t = 0
    base_tokens: list[int] = []
    for _ in order:
        base = int(rng.integers(0, 3))
        base_tokens += list(range(t, t + base))
        t += base
        n = int(rng.integers(1, 5))
        seg_tokens.append(list(range(t, t + n)))
        t += n
    num_tokens = t
    ranks, rstarts, rows, bt_rows = [], [0], [], []
    for a in order:
        ad = adapters[a]
        starts, arows, brows = placed[ad.id]
        for m in range(num_mod):
            ranks.append(ad.module_ranks[m])
            rows += list(arows[starts[m] : starts[m + 1]])
            bt_rows += list(brows[starts[m] : starts[m + 1]])
            rstarts.append(len(rows))
    plan = SimpleNamespace(
        sorted_token_idx=np.asarray([x for s in seg_tokens for x in s], dtype=np.int64),
        segment_start=np.cumsum([0] + [len(s) for s in seg_tokens]).astype(np.int32),
        segment_adapter=np.asarray([adapters[a].id for a in order], dtype=np.uint64),
        adapter_rank=np.asarray(ranks, dtype=np.int32),
        adapter_row_start=np.asarray(rstarts, dtype=np.int32),
        adapter_rows=np.asarray(rows, dtype=np.int32),
        adapter_bt_rows=np.asarray(bt_rows, dtype=np.int32),
    )
    names = [s.name for s in geo.modules]
    batches = build_lora_batches(plan, entries=entries, module_names=names, device="cpu")
    for m, spec in enumerate(geo.modules):
        users = [i for i, a in enumerate(order) if adapters[a].module_ranks[m] > 0]
        if not users:
            assert batches[spec.name] is None
            continue
        batch = batches[spec.name]
        assert batch is not None and batch.num_segments == len(users)
        for layer in range(geo.num_layers):
            x = torch.from_numpy(rng.standard_normal((num_tokens, spec.in_features)))
            x = x.float()
            y0 = torch.from_numpy(rng.standard_normal((num_tokens, spec.out_features))).float()
            ref = y0.double().clone()
            for i, a in enumerate(order):
                w = adapters[a].weights(layer, spec.name)
                if w is None:
                    continue
                a64, b64 = (
                    torch.from_numpy(np.array(w[0], np.float64)),
                    torch.from_numpy(np.array(w[1], np.float64)),
                )
                s = adapters[a].scale(layer, spec.name)
                toks = seg_tokens[i]
                ref[toks] += s * (x.double()[toks] @ a64.t()) @ b64.t()
            for limit in (0, 1 << 30):
                y = y0.clone()
                TorchBackend(gather_limit=limit).add_lora(
                    y, x, pools.a[spec.name][layer], pools.bt[spec.name][layer], batch
                )
                err = (y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-9)
                assert err < 1e-5, (spec.name, layer, limit, float(err))
                assert torch.equal(y[base_tokens], y0[base_tokens])


def test_build_lora_batches_per_module() -> None:
    """Segments whose module rank is 0 are left out of that module's batch; rows are each
    module's own; modules with the same segments share the token tensors."""
    entries = {
        10: SimpleNamespace(seg_scale=2.0),
        11: SimpleNamespace(seg_scale=0.1),  # host facts keep it exact (float64)
    }
    # 2 segments x 3 modules; adapter 10 targets m0, m2; adapter 11 targets m0, m1.
    plan = SimpleNamespace(
        sorted_token_idx=np.array([4, 1, 2, 0], dtype=np.int64),
        segment_start=np.array([0, 1, 4], dtype=np.int32),
        segment_adapter=np.array([10, 11], dtype=np.uint64),
        adapter_rank=np.array([2, 0, 1, 3, 1, 0], dtype=np.int32),
        adapter_row_start=np.array([0, 2, 2, 3, 6, 7, 7], dtype=np.int32),
        adapter_rows=np.array([100, 105, 300, 7, 9, 11, 500], dtype=np.int32),
        adapter_bt_rows=np.array([200, 205, 400, 17, 19, 21, 600], dtype=np.int32),
    )
    b = build_lora_batches(plan, entries=entries, module_names=["m0", "m1", "m2"], device="cpu")  # type: ignore[arg-type]
    m0, m1, m2 = b["m0"], b["m1"], b["m2"]
    assert m0 is not None and m1 is not None and m2 is not None
    assert m0.token_idx.tolist() == [4, 1, 2, 0] and m0.seg_start_host == (0, 1, 4)
    assert m0.seg_rank_host == (2, 3) and m0.rows.tolist() == [100, 105, 7, 9, 11]
    assert m0.bt is not m0 and m0.bt.rows.tolist() == [200, 205, 17, 19, 21]
    assert m0.bt.pad_row == 200 and m0.bt.seg_row_start_host == m0.seg_row_start_host
    assert m0.seg_row_start_host == (0, 2, 5) and m0.seg_scale_host == (2.0, 0.1)
    assert m1.token_idx.tolist() == [1, 2, 0] and m1.seg_start_host == (0, 3)
    assert m1.rows.tolist() == [500] and m1.seg_rank_host == (1,) and m1.seg_scale_host == (0.1,)
    assert m2.token_idx.tolist() == [4] and m2.rows.tolist() == [300]
    assert m2.max_rank == 1 and m2.max_seg_tokens == 1
    for batch in (m0, m1, m2):
        assert batch.rows.dtype == torch.int32 and batch.seg_rank.dtype == torch.int32
        assert batch.token_idx.dtype == torch.int64 and batch.seg_scale.dtype == torch.float32
        assert np.array_equal(batch.host_rows(), batch.rows.numpy())
        assert np.array_equal(batch.host_token_idx(), batch.token_idx.numpy())
    none = dict(plan.__dict__, adapter_rank=np.zeros(6, dtype=np.int32))
    none["adapter_row_start"] = np.zeros(7, dtype=np.int32)
    none["adapter_rows"] = np.zeros(0, dtype=np.int32)
    none["adapter_bt_rows"] = np.zeros(0, dtype=np.int32)
    b = build_lora_batches(
        SimpleNamespace(**none), entries=entries, module_names=["m0", "m1", "m2"], device="cpu"
    )  # type: ignore[arg-type]
    assert b == {"m0": None, "m1": None, "m2": None}


def test_lora_batch_cache_reuses_only_an_identical_plan() -> None:
    """The executor's one-entry cache: the same plan (a decode step of the same requests)
    gets the very same batches; any change of token indices, rows or scales rebuilds, and
    what it returns always equals a fresh build."""
    entries = {10: SimpleNamespace(seg_scale=2.0), 11: SimpleNamespace(seg_scale=0.5)}
    plan = SimpleNamespace(
        sorted_token_idx=np.array([0, 1], dtype=np.int64),
        segment_start=np.array([0, 1, 2], dtype=np.int32),
        segment_adapter=np.array([10, 11], dtype=np.uint64),
        adapter_rank=np.array([2, 1], dtype=np.int32),
        adapter_row_start=np.array([0, 2, 3], dtype=np.int32),
        adapter_rows=np.array([4, 5, 9], dtype=np.int32),
        adapter_bt_rows=np.array([6, 7, 10], dtype=np.int32),
    )
    cache = LoraBatchCache(["m0"], torch.device("cpu"))
    first = cache.get(plan, entries)  # type: ignore[arg-type]
    copy = SimpleNamespace(**{k: v.copy() for k, v in plan.__dict__.items()})
    again = cache.get(copy, entries)  # type: ignore[arg-type]
    assert again is first

    def same(a: dict, b: dict) -> bool:
        x, y = a["m0"], b["m0"]
        return (
            x.rows.tolist() == y.rows.tolist()
            and x.bt.rows.tolist() == y.bt.rows.tolist()
            and x.token_idx.tolist() == y.token_idx.tolist()
            and x.seg_scale_host == y.seg_scale_host
        )

    changes = {
        "token order": {"sorted_token_idx": np.array([1, 0], dtype=np.int64)},
        "a row": {"adapter_rows": np.array([4, 5, 8], dtype=np.int32)},
        "a Bt row": {"adapter_bt_rows": np.array([6, 7, 11], dtype=np.int32)},
    }
    prev = first
    for name, change in changes.items():
        p2 = SimpleNamespace(**dict(plan.__dict__, **change))
        got = cache.get(p2, entries)  # type: ignore[arg-type]
        assert got is not prev, name
        fresh = build_lora_batches(p2, entries=entries, module_names=["m0"], device="cpu")  # type: ignore[arg-type]
        assert same(got, fresh), name
        prev = got
    rescaled = {10: SimpleNamespace(seg_scale=2.0), 11: SimpleNamespace(seg_scale=0.25)}
    got = cache.get(plan, rescaled)  # type: ignore[arg-type]
    assert got is not prev and got["m0"].seg_scale_host == (2.0, 0.25)
    assert cache.get(plan, entries)["m0"].seg_scale_host == (2.0, 0.5)  # type: ignore[arg-type, index]


def test_half_precision_cache_folds_ratios_into_range() -> None:
    """A half-precision cache: Bt rows hold B^T * scale / seg_scale, within [-|B|, |B|]."""
    geo = make_geometry([(8, 8)], layers=2, kv_heads=2, head_dim=8)
    cache = make_cache(geo, num_blocks=3, block_size=4, dtype=torch.float16)
    g = granularity(cache, geo)
    pools = AdapterPools(geo, cache, g)
    ad = FakeAdapter(1, {(0, "m0"): 4, (1, "m0"): 4}, {(0, "m0"): 1e-4, (1, "m0"): 16.0}, geo, 5)
    starts, rows, bt_rows = place(cache, geo, g, [1], ad.module_ranks)
    pools.load(ad, starts, rows, bt_rows, ad)  # type: ignore[arg-type]
    idx = torch.from_numpy(bt_rows.astype(np.int64))
    bt1 = pools.bt["m0"][1].index_select(0, idx).float()
    torch.testing.assert_close(
        bt1, torch.from_numpy(ad.tensors[(1, "m0")][1].T.copy()), atol=2e-3, rtol=1e-3
    )
    assert bool(torch.isfinite(pools.bt["m0"][0].index_select(0, idx)).all())
