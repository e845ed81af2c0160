"""The torch backend's bmm-over-views form (one token per segment, rows laid out segment
after segment: a decode step of n requests on n adapters) against the float64 oracle, and
the layouts that must not take it."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backend import arena, make_batch, oracle

from alora.backend import TorchBackend


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    extra=st.integers(0, 6),  # inactive tokens after the active ones, or spread among them
    rank=st.integers(1, 17),
    lo=st.integers(0, 9),
    spread=st.booleans(),
    dims=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31),
)
def test_uniform_form_matches_oracle(
    n: int,
    extra: int,
    rank: int,
    lo: int,
    spread: bool,
    dims: tuple[int, int],
    dtype: torch.dtype,
    seed: int,
) -> None:
    d_in, d_out = dims
    g = torch.Generator().manual_seed(seed)
    num_tokens = n + extra
    tokens = list(range(0, num_tokens, 1 + (extra >= n))) if spread else list(range(num_tokens))
    tokens = tokens[:n]
    if len(tokens) < n:
        tokens = list(range(n))
    seg_tokens = [[t] for t in tokens]
    rows = [list(range(lo + a * rank, lo + (a + 1) * rank)) for a in range(n)]
    scales = [0.5 + a for a in range(n)]
    batch = make_batch(seg_tokens, [rank] * n, rows, scales)
    assert batch.uniform == (lo, rank, tokens == list(range(n)), 1, rank)
    x = torch.randn(num_tokens, d_in, generator=g, dtype=dtype)
    y = torch.randn(num_tokens, d_out, generator=g, dtype=dtype)
    a_pool = torch.randn(lo + n * rank + 3, d_in, generator=g, dtype=dtype)
    bt_pool = torch.randn(lo + n * rank + 3, d_out, generator=g, dtype=dtype)
    ref = oracle(y, x, a_pool, bt_pool, seg_tokens, rows, scales)
    got = y.clone()
    TorchBackend().add_lora(got, x, a_pool, bt_pool, batch)
    err = (got.double() - ref).norm() / ref.norm().clamp_min(1e-12)
    assert err < 1e-5
    for t in set(range(num_tokens)) - set(tokens):
        assert torch.equal(got[t], y[t]), "inactive token modified"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 10),
    rank=st.integers(1, 9),
    lo=st.integers(0, 5),
    g=st.integers(1, 90),
    dims=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    seed=st.integers(0, 2**31),
)
def test_uniform_form_on_strided_views(
    n: int, rank: int, lo: int, g: int, dims: tuple[int, int], seed: int
) -> None:
    """The runtime's layout: rows step by ceil((in + out) / g) row ids, adapters one after
    another; the form slices the overlapping views with that step (NaN elsewhere)."""
    d_in, d_out = dims
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    y = torch.randn(n, d_out, generator=gen)
    a_pool = torch.randn(n * rank, d_in, generator=gen)
    bt_pool = torch.randn(n * rank, d_out, generator=gen)
    _buf, a_view, bt_view, ids = arena(a_pool, bt_pool, g, [lo + p for p in range(n * rank)])
    rows = [list(range(a * rank, (a + 1) * rank)) for a in range(n)]
    seg_tokens = [[a] for a in range(n)]
    scales = [0.5 + a for a in range(n)]
    batch = make_batch(seg_tokens, [rank] * n, [[ids[p] for p in rs] for rs in rows], scales)
    step = -(-(d_in + d_out) // g)
    in_seg = step if rank > 1 else 1
    assert batch.uniform == (ids[0], rank, True, in_seg, rank * step if n > 1 else rank * in_seg)
    ref = oracle(y, x, a_pool, bt_pool, seg_tokens, rows, scales)
    got = y.clone()
    TorchBackend().add_lora(got, x, a_view, bt_view, batch)
    assert (got.double() - ref).norm() / ref.norm().clamp_min(1e-12) < 1e-5


def test_layouts_that_are_not_uniform() -> None:
    two_tokens = make_batch([[0, 1], [2]], [2, 2], [[0, 1], [2, 3]], [1.0, 1.0])
    mixed_ranks = make_batch([[0], [1]], [2, 3], [[0, 1], [2, 3, 4]], [1.0, 1.0])
    steps = make_batch([[0], [1]], [2, 2], [[0, 1], [3, 5]], [1.0, 1.0])
    uneven = make_batch([[0], [1], [2]], [2, 2, 2], [[0, 1], [3, 4], [9, 10]], [1.0] * 3)
    inner = make_batch([[0], [1]], [2, 2], [[1, 0], [2, 3]], [1.0, 1.0])
    same = make_batch([[0], [1]], [2, 2], [[0, 1], [0, 1]], [1.0, 1.0])  # stride 0
    for batch in (two_tokens, mixed_ranks, steps, uneven, inner, same):
        assert batch.uniform is None


def test_segments_stepping_downwards_are_uniform() -> None:
    """Adapters paged in one after another take runs from the top of the unit space, so a
    batch in load order steps downwards: read as the reversed segments, same result."""
    gen = torch.Generator().manual_seed(1)
    n, rank, d_in, d_out = 4, 3, 6, 5
    rows = [[30 - a * 8 + j for j in range(rank)] for a in range(n)]
    scales = [0.5, 1.0, 2.0, 3.0]
    tokens = [[1], [0], [3], [2]]
    batch = make_batch(tokens, [rank] * n, rows, scales)
    assert batch.uniform == (30, rank, False, 1, -8)
    swapped = make_batch([[0], [1]], [2, 2], [[2, 3], [0, 1]], [1.0, 1.0])
    assert swapped.uniform == (2, 2, True, 1, -2)
    x = torch.randn(n + 1, d_in, generator=gen)
    y = torch.randn(n + 1, d_out, generator=gen)
    a_pool = torch.randn(40, d_in, generator=gen)
    bt_pool = torch.randn(40, d_out, generator=gen)
    ref = oracle(y, x, a_pool, bt_pool, tokens, rows, scales)
    got = y.clone()
    TorchBackend().add_lora(got, x, a_pool, bt_pool, batch)
    assert (got.double() - ref).norm() / ref.norm() < 1e-5
    assert torch.equal(got[n], y[n]), "inactive token modified"


def test_segments_apart_are_uniform_with_a_stride() -> None:
    """Adapters in runs of units loaded in order: each segment's rows a progression, the
    segments a progression of their own (a gap between them is fine)."""
    gen = torch.Generator().manual_seed(0)
    n, rank, d_in, d_out = 3, 2, 5, 4
    rows = [[a * 7 + 2 * j + 1 for j in range(rank)] for a in range(n)]
    batch = make_batch([[a] for a in range(n)], [rank] * n, rows, [0.5, 1.0, 2.0])
    assert batch.uniform == (1, rank, True, 2, 7)
    x = torch.randn(n, d_in, generator=gen)
    y = torch.randn(n, d_out, generator=gen)
    a_pool = torch.randn(20, d_in, generator=gen)
    bt_pool = torch.randn(20, d_out, generator=gen)
    ref = oracle(y, x, a_pool, bt_pool, [[a] for a in range(n)], rows, [0.5, 1.0, 2.0])
    got = y.clone()
    TorchBackend().add_lora(got, x, a_pool, bt_pool, batch)
    assert (got.double() - ref).norm() / ref.norm() < 1e-5
