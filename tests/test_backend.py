"""The torch LoRA backend against an independent float64 oracle, in both of its forms
(per-segment and gathered), over hypothesis-drawn batches: heterogeneous ranks, scattered
pool rows, inactive tokens that must stay bit-identical."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alora.backend import LoraBatch, TorchBackend


def make_batch(
    seg_tokens: list[list[int]], ranks: list[int], rows: list[list[int]], scales: list[float]
) -> LoraBatch:
    starts = np.cumsum([0] + [len(t) for t in seg_tokens])
    rstarts = np.cumsum([0, *ranks])
    return LoraBatch(
        token_idx=torch.tensor([t for seg in seg_tokens for t in seg], dtype=torch.int64),
        seg_start=torch.tensor(starts, dtype=torch.int32),
        seg_rank=torch.tensor(ranks, dtype=torch.int32),
        seg_row_start=torch.tensor(rstarts, dtype=torch.int32),
        rows=torch.tensor([r for rs in rows for r in rs], dtype=torch.int32),
        seg_scale=torch.tensor(scales, dtype=torch.float32),
        seg_start_host=tuple(int(v) for v in starts),
        seg_rank_host=tuple(ranks),
        seg_row_start_host=tuple(int(v) for v in rstarts),
        seg_scale_host=tuple(scales),
        max_rank=max(ranks),
        max_seg_tokens=max(len(t) for t in seg_tokens),
    )


@st.composite
def problems(draw: st.DrawFn) -> tuple:
    num_tokens = draw(st.integers(1, 40))
    d_in = draw(st.integers(1, 70))
    d_out = draw(st.integers(1, 70))
    num_seg = draw(st.integers(1, 6))
    ranks = [draw(st.integers(1, 17)) for _ in range(num_seg)]
    pool_rows = sum(ranks) + draw(st.integers(0, 10))
    perm = draw(st.permutations(list(range(pool_rows))))
    rows, used = [], 0
    for r in ranks:
        rows.append(list(perm[used : used + r]))
        used += r
    # Each token belongs to at most one segment; some stay inactive.
    owner = [draw(st.integers(-1, num_seg - 1)) for _ in range(num_tokens)]
    seg_tokens = [[t for t, o in enumerate(owner) if o == a] for a in range(num_seg)]
    scales = [draw(st.floats(0.1, 4.0)) for _ in range(num_seg)]
    seed = draw(st.integers(0, 2**31))
    return num_tokens, d_in, d_out, pool_rows, ranks, rows, seg_tokens, scales, seed


def oracle(y, x, a_pool, bt_pool, seg_tokens, rows, scales) -> torch.Tensor:
    out = y.double().clone()
    for toks, rs, s in zip(seg_tokens, rows, scales, strict=True):
        for t in toks:
            v = a_pool.double()[rs] @ x.double()[t]
            out[t] += s * (v @ bt_pool.double()[rs])
    return out


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(["loop", "gather", "dense", "views"]))
def test_backend_matches_float64_oracle(problem: tuple, form: str) -> None:
    num_tokens, d_in, d_out, pool_rows, ranks, rows, seg_tokens, scales, seed = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_in, generator=g)
    y = torch.randn(num_tokens, d_out, generator=g)
    a_pool = torch.randn(pool_rows, d_in, generator=g)
    bt_pool = torch.randn(pool_rows, d_out, generator=g)
    if form == "views":  # contiguous tokens and rows per segment: the per-segment view form
        sizes = [len(seg) for seg in seg_tokens]
        bounds = np.minimum(np.cumsum([0, *sizes]), num_tokens)
        seg_tokens = [list(range(b0, b1)) for b0, b1 in itertools.pairwise(bounds)]
        offsets = np.cumsum([0, *ranks])
        rows = [list(range(o, o + r)) for o, r in zip(offsets, ranks, strict=False)]
    if form == "dense":  # every token active, so the dense form is chosen
        owner = {t for seg in seg_tokens for t in seg}
        spare = [t for t in range(num_tokens) if t not in owner]
        seg_tokens = [seg_tokens[0] + spare, *seg_tokens[1:]]
        if len(seg_tokens) == 1:
            seg_tokens.append([])
            ranks, rows, scales = [*ranks, 1], [*rows, [rows[0][0]]], [*scales, 1.0]
    batch = make_batch(seg_tokens, ranks, rows, scales)
    backend = TorchBackend(gather_limit=0 if form in ("loop", "views") else 1 << 30)
    ref = oracle(y, x, a_pool, bt_pool, seg_tokens, rows, scales)
    got = y.clone()
    backend.add_lora(got, x, a_pool, bt_pool, batch)
    err = (got.double() - ref).norm() / ref.norm().clamp_min(1e-12)
    assert err < 1e-5
    active = {t for seg in seg_tokens for t in seg}
    for t in range(num_tokens):
        if t not in active:
            assert torch.equal(got[t], y[t]), "inactive token modified"


def test_half_precision_accumulates_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=g).half()
    a_pool = (torch.randn(16, 256, generator=g) * 0.1).half()
    bt_pool = (torch.randn(16, 64, generator=g) * 0.1).half()
    batch = make_batch([[0, 1, 2], [5, 6]], [8, 4], [list(range(8)), [12, 13, 14, 15]], [2.0, 0.5])
    ref = oracle(
        torch.zeros(8, 64),
        x,
        a_pool,
        bt_pool,
        [[0, 1, 2], [5, 6]],
        [list(range(8)), [12, 13, 14, 15]],
        [2.0, 0.5],
    )
    for limit in (0, 1 << 30):
        y = torch.zeros(8, 64, dtype=torch.float16)
        TorchBackend(gather_limit=limit).add_lora(y, x, a_pool, bt_pool, batch)
        assert (y.double() - ref).norm() / ref.norm() < 2e-3
