"""The attention fast paths (causal prefill over the chunk's own K/V plus its cached part,
in-place decode over a context in one or a few runs of consecutive blocks, runs merged by
log-sum-exp, whole-block gathers) against the reference path
(gathered slots and an explicit mask) and a dense float64 reference, on random layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import alora.attention as att
from alora.attention import _slot_runs, build_attention_metadata, paged_attention
from alora.kv_cache import PagedKVCache
from alora.plan import AttentionPlan


def _dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, window: int | None
) -> torch.Tensor:
    """q [Q, H, d] at the last Q positions of k/v [L, KVH, d]; float64 softmax attention."""
    qn, h, _ = q.shape
    length, kvh, _ = k.shape
    kk = k.repeat_interleave(h // kvh, dim=1).transpose(0, 1).double()
    vv = v.repeat_interleave(h // kvh, dim=1).transpose(0, 1).double()
    scores = q.transpose(0, 1).double() @ kk.transpose(1, 2) * scaling
    qpos = torch.arange(length - qn, length)[:, None]
    kpos = torch.arange(length)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ vv).transpose(0, 1)


def _run_case(
    *,
    ctx: list[int],
    qlens: list[int],
    block_size: int,
    kvh: int,
    heads: int,
    window: int | None,
    contiguous: bool,
    seed: int,
    d: int = 16,
    runs: int = 0,
) -> None:
    """`contiguous`: blocks in table order; else `runs` > 0 cuts the block ids into that
    many runs of consecutive ids, shuffled (a conversation's layout), and `runs` = -1 takes
    them in descending order (units reused last-freed-first); else every block apart. Ranges
    of any length are read in place here (RUN_TOKENS = 1), so the merges run."""
    saved = att.RUN_TOKENS
    att.RUN_TOKENS = 1
    try:
        _run_layout(ctx, qlens, block_size, kvh, heads, window, contiguous, seed, d, runs)
    finally:
        att.RUN_TOKENS = saved


def _run_layout(  # type: ignore[no-untyped-def]
    ctx, qlens, block_size, kvh, heads, window, contiguous, seed, d, runs
) -> None:
    g = torch.Generator().manual_seed(seed)
    bs = block_size
    nblocks = [math.ceil(c / bs) for c in ctx]
    num_blocks = sum(nblocks) + 2
    if contiguous:
        order = list(range(num_blocks))
    elif runs == -1:
        order = list(reversed(range(num_blocks)))
    elif runs:
        cuts = sorted(torch.randperm(num_blocks - 1, generator=g)[: runs - 1].add(1).tolist())
        pieces = [list(range(a, b)) for a, b in zip([0, *cuts], [*cuts, num_blocks], strict=True)]
        order = [b for i in torch.randperm(len(pieces), generator=g).tolist() for b in pieces[i]]
    else:
        order = torch.randperm(num_blocks, generator=g).tolist()
    tables = np.full((len(ctx), max(nblocks) + 1), -1, dtype=np.int32)
    cur = 0
    for s, nb in enumerate(nblocks):
        tables[s, :nb] = [int(b) for b in order[cur : cur + nb]]
        cur += nb
    caches = {
        fast: PagedKVCache(
            num_layers=2,
            num_blocks=num_blocks,
            block_size=bs,
            num_kv_heads=kvh,
            head_dim=d,
            dtype=torch.float32,
            device="cpu",
        )
        for fast in (True, False)
    }
    layer = 1
    full_k = [torch.randn(c, kvh, d, generator=g) for c in ctx]
    full_v = [torch.randn(c, kvh, d, generator=g) for c in ctx]

    def slots_of(s: int, pos: np.ndarray) -> np.ndarray:
        return tables[s][pos // bs].astype(np.int64) * bs + pos % bs

    for s, c in enumerate(ctx):
        hist = c - qlens[s]
        if hist:
            for cache in caches.values():
                cache.write(
                    layer,
                    torch.from_numpy(slots_of(s, np.arange(hist))),
                    full_k[s][:hist],
                    full_v[s][:hist],
                )
    pairs = list(zip(ctx, qlens, strict=True))
    plan = AttentionPlan(
        positions=np.concatenate([np.arange(c - q, c) for c, q in pairs]),
        query_start=np.concatenate([[0], np.cumsum(qlens)]).astype(np.int64),
        context_lens=np.asarray(ctx, dtype=np.int64),
        block_tables=tables,
        slot_mapping=np.concatenate(
            [slots_of(s, np.arange(c - q, c)) for s, (c, q) in enumerate(pairs)]
        ),
    )
    q_all = torch.randn(sum(qlens), heads, d, generator=g)
    k_new = torch.cat([full_k[s][c - q :] for s, (c, q) in enumerate(pairs)])
    v_new = torch.cat([full_v[s][c - q :] for s, (c, q) in enumerate(pairs)])
    scaling = 0.3
    outs = {}
    for fast, cache in caches.items():
        meta = build_attention_metadata(plan, block_size=bs, device="cpu", fast_paths=fast)
        if fast:
            # The layouts drawn here are the ones the fast paths exist for.
            assert (meta.chunks is not None) == any(q > 1 for q in qlens)
            if contiguous and sum(q == 1 for q in qlens) == 1:
                assert meta.decode_runs is not None and len(meta.decode_runs) == 1
            if runs and len(ctx) == 1 and qlens == [1]:
                assert meta.decode_runs is not None
                # Descending: the full blocks are one range, a partial last block (the lowest
                # id, its unused slots before the next block) a second.
                assert len(meta.decode_runs) <= (2 if runs == -1 else runs)
            assert all(g.kv_blocks is not None for g in meta.groups)
        else:
            assert meta.chunks is None and meta.decode_runs is None
            assert all(g.kv_blocks is None for g in meta.groups)
        outs[fast] = paged_attention(
            q_all, k_new, v_new, cache, layer, meta, scaling=scaling, sliding_window=window
        )
    # Both paths write the same cache.
    assert torch.equal(caches[True].kv, caches[False].kv)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    start = 0
    for s, (_c, q) in enumerate(pairs):
        ref = _dense(q_all[start : start + q], full_k[s], full_v[s], scaling, window)
        torch.testing.assert_close(
            outs[True][start : start + q].double(), ref, rtol=1e-4, atol=1e-5
        )
        start += q


@st.composite
def _cases(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 4))
    ctx = [draw(st.integers(1, 70)) for _ in range(n)]
    # Mix of decode (1), chunked prefill with cached context (< c) and fresh prefill (= c).
    qlens = [draw(st.sampled_from([1, max(1, c // 2), c])) for c in ctx]
    kvh = draw(st.sampled_from([1, 2, 3]))
    return dict(
        ctx=ctx,
        qlens=qlens,
        block_size=draw(st.sampled_from([1, 4, 16])),
        kvh=kvh,
        heads=kvh * draw(st.sampled_from([1, 3])),
        window=draw(st.sampled_from([None, 5, 64, 200])),
        contiguous=draw(st.booleans()),
        seed=draw(st.integers(0, 10_000)),
        runs=draw(st.sampled_from([0, -1, 2, 3, 5])),
    )


@settings(max_examples=150, deadline=None)
@given(_cases())
def test_fast_paths_equal_reference_and_dense(case: dict) -> None:
    _run_case(**case)


@pytest.mark.parametrize(
    ("ctx", "qlens", "window"),
    [
        ([300], [300], None),  # fresh prefill, several flash blocks
        ([300], [44], None),  # chunk after a cached part
        ([300], [1], None),  # batch-1 decode in place
        ([300], [1], 256),  # decode whose context the window cuts: reference path
        ([300], [100], 256),  # prefill the window cuts: reference path
        ([300], [100], 4096),  # window wider than the context: fast path
        ([40, 300, 7, 129], [1, 120, 7, 1], None),  # mixed decode + prefill
    ],
)
@pytest.mark.parametrize(("contiguous", "runs"), [(True, 0), (False, 3), (False, -1), (False, 0)])
def test_fast_paths_long(
    ctx: list[int], qlens: list[int], window: int | None, contiguous: bool, runs: int
) -> None:
    _run_case(
        ctx=ctx,
        qlens=qlens,
        block_size=16,
        kvh=3,
        heads=9,
        window=window,
        contiguous=contiguous,
        seed=sum(ctx) + sum(qlens),
        runs=runs,
    )


def test_half_precision_cache_rounds_like_reference() -> None:
    """A bfloat16 model: the fast path reads its own chunk's K/V rounded to the cache dtype,
    as the reference reads them back from the cache."""
    torch.manual_seed(0)
    bs, kvh, heads, d, n, cached = 4, 2, 4, 16, 24, 8
    tables = np.arange(8, dtype=np.int32)[None]
    plan = AttentionPlan(
        positions=np.arange(cached, n),
        query_start=np.array([0, n - cached]),
        context_lens=np.array([n]),
        block_tables=tables,
        slot_mapping=np.arange(cached, n, dtype=np.int64),
    )
    q = torch.randn(n - cached, heads, d, dtype=torch.bfloat16)
    k = torch.randn(n, kvh, d, dtype=torch.bfloat16)
    v = torch.randn(n, kvh, d, dtype=torch.bfloat16)
    outs = []
    for fast in (True, False):
        cache = PagedKVCache(
            num_layers=1,
            num_blocks=8,
            block_size=bs,
            num_kv_heads=kvh,
            head_dim=d,
            dtype=torch.bfloat16,
            device="cpu",
        )
        cache.write(0, torch.arange(cached), k[:cached], v[:cached])
        meta = build_attention_metadata(plan, block_size=bs, device="cpu", fast_paths=fast)
        outs.append(paged_attention(q, k[cached:], v[cached:], cache, 0, meta, scaling=0.25))
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=2e-2, atol=2e-2)


def test_slot_runs_cover_the_context_as_a_set() -> None:
    bs = 4
    # Descending ids (units reused last-freed-first): full blocks 7..11 are one range.
    table = np.asarray([11, 10, 9, 8, 7], dtype=np.int32)
    assert _slot_runs(table, 20, bs) == ((28, 20),)
    # A partial last block (id 7, 2 of 4 slots) is a range of its own: its unused slots lie
    # between it and block 8. Two ranges pay off only when they average RUN_TOKENS tokens.
    assert _slot_runs(table, 18, bs) is None
    ascending = np.asarray([3, 4, 5, 6], dtype=np.int32)
    assert _slot_runs(ascending, 15, bs) == ((12, 15),)  # the partial block joins its run
    saved = att.RUN_TOKENS
    att.RUN_TOKENS = 8
    try:
        assert _slot_runs(table, 18, bs) == ((32, 16), (28, 2))
        assert _slot_runs(np.asarray([0, 1, 5, 6], dtype=np.int32), 16, bs) == ((0, 8), (20, 8))
        assert (
            _slot_runs(np.asarray([0, 5, 1, 6], dtype=np.int32), 15, bs) is None
        )  # 2 ranges > 15 // 8
    finally:
        att.RUN_TOKENS = saved
    assert _slot_runs(np.asarray([2, -1], dtype=np.int32), 5, bs) is None
