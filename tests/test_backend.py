"""The torch LoRA backend against an independent float64 oracle, in both of its forms
(per-segment and gathered), over hypothesis-drawn batches: heterogeneous ranks, scattered
pool rows, inactive tokens that must stay bit-identical; on contiguous pools and on the
runtime's layout (overlapping strided views of one flat buffer, everything outside the used
rows poisoned with NaN, so a read of a wrong element shows)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alora.backend import TorchBackend
from alora.testing import make_lora_batch as make_batch


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


def tensors(problem: tuple) -> tuple[torch.Tensor, ...]:
    """(x, y, a_pool, bt_pool) of a drawn problem, from its seed."""
    num_tokens, d_in, d_out, pool_rows, *_rest, seed = problem
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_tokens, d_in, generator=g),
        torch.randn(num_tokens, d_out, generator=g),
        torch.randn(pool_rows, d_in, generator=g),
        torch.randn(pool_rows, d_out, generator=g),
    )


def arena(
    a_pool: torch.Tensor, bt_pool: torch.Tensor, granularity: int, slots: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The pools laid out as in the KV cache: row id c at elements [c*g, c*g + in + out) of
    one flat buffer (A row, then Bt row), pool row p at row id slots[p] * step, where step
    = ceil((in + out) / g) keeps rows apart. Returns (buffer, a view, bt view, row id of
    each pool row); every element outside the written rows is NaN."""
    d_in, d_out = a_pool.shape[1], bt_pool.shape[1]
    w, g = d_in + d_out, granularity
    step = -(-w // g)
    ids = [s * step for s in slots]
    size = (max(ids, default=0) + step + 2) * g + w
    buf = torch.full((size,), float("nan"), dtype=a_pool.dtype)
    for p, c in enumerate(ids):
        buf[c * g : c * g + d_in] = a_pool[p]
        buf[c * g + d_in : c * g + w] = bt_pool[p]
    rows = (size - w) // g + 1
    a_view = buf.as_strided((rows, d_in), (g, 1), 0)
    bt_view = buf.as_strided((rows, d_out), (g, 1), d_in)
    return buf, a_view, bt_view, ids


def oracle(y, x, a_pool, bt_pool, seg_tokens, rows, scales) -> torch.Tensor:
    out = y.double().clone()
    for toks, rs, s in zip(seg_tokens, rows, scales, strict=True):
        for t in toks:
            v = a_pool.double()[rs] @ x.double()[t]
            out[t] += s * (v @ bt_pool.double()[rs])
    return out


def arrange(form: str, num_tokens: int, ranks, rows, seg_tokens, scales):  # type: ignore[no-untyped-def]
    """Shape a drawn problem for `form`: "views" gets contiguous tokens and rows per segment
    (the per-segment view form), "dense" every token active (the dense form is chosen)."""
    if form == "views":
        sizes = [len(seg) for seg in seg_tokens]
        bounds = np.minimum(np.cumsum([0, *sizes]), num_tokens)
        seg_tokens = [list(range(b0, b1)) for b0, b1 in itertools.pairwise(bounds)]
        offsets = np.cumsum([0, *ranks])
        rows = [list(range(o, o + r)) for o, r in zip(offsets, ranks, strict=False)]
    if form == "dense":
        owner = {t for seg in seg_tokens for t in seg}
        spare = [t for t in range(num_tokens) if t not in owner]
        seg_tokens = [seg_tokens[0] + spare, *seg_tokens[1:]]
        if len(seg_tokens) == 1:
            seg_tokens.append([])
            ranks, rows, scales = [*ranks, 1], [*rows, [rows[0][0]]], [*scales, 1.0]
    return ranks, rows, seg_tokens, scales


def check_against_oracle(got, y, ref, seg_tokens, num_tokens) -> None:  # type: ignore[no-untyped-def]
    err = (got.double() - ref).norm() / ref.norm().clamp_min(1e-12)
    assert err < 1e-5
    active = {t for seg in seg_tokens for t in seg}
    for t in range(num_tokens):
        if t not in active:
            assert torch.equal(got[t], y[t]), "inactive token modified"


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(["loop", "gather", "dense", "views"]))
def test_backend_matches_float64_oracle(problem: tuple, form: str) -> None:
    num_tokens, _, _, _, ranks, rows, seg_tokens, scales, _ = problem
    x, y, a_pool, bt_pool = tensors(problem)
    ranks, rows, seg_tokens, scales = arrange(form, num_tokens, ranks, rows, seg_tokens, scales)
    batch = make_batch(seg_tokens, ranks, rows, scales)
    backend = TorchBackend(gather_limit=0 if form in ("loop", "views") else 1 << 30)
    ref = oracle(y, x, a_pool, bt_pool, seg_tokens, rows, scales)
    got = y.clone()
    backend.add_lora(got, x, a_pool, bt_pool, batch)
    check_against_oracle(got, y, ref, seg_tokens, num_tokens)


@settings(max_examples=60, deadline=None)
@given(
    problems(),
    st.sampled_from(["loop", "gather", "dense", "views"]),
    st.integers(1, 200),
    st.randoms(use_true_random=False),
)
def test_backend_on_strided_views(problem: tuple, form: str, g: int, rnd: object) -> None:
    """The runtime's pools: overlapping strided views (row stride g, possibly smaller than a
    row), rows scattered (or an arithmetic progression with the module's row step, for the
    per-segment view form), NaN outside the rows. No form may copy a whole view."""
    num_tokens, _, _, pool_rows, ranks, rows, seg_tokens, scales, _ = problem
    x, y, a_pool, bt_pool = tensors(problem)
    ranks, rows, seg_tokens, scales = arrange(form, num_tokens, ranks, rows, seg_tokens, scales)
    if form == "views":
        slots = [p + 3 for p in range(pool_rows)]  # consecutive slots: rows step evenly
    else:
        slots = list(range(pool_rows + 5))
        rnd.shuffle(slots)  # type: ignore[attr-defined]
        slots = slots[:pool_rows]
    _buf, a_view, bt_view, ids = arena(a_pool, bt_pool, g, slots)
    view_rows = [[ids[p] for p in rs] for rs in rows]
    batch = make_batch(seg_tokens, ranks, view_rows, scales)
    if form == "views":
        assert all(sp is not None for sp in batch.spans)
    ref = oracle(y, x, a_pool, bt_pool, seg_tokens, rows, scales)
    got = y.clone()
    backend = TorchBackend(gather_limit=0 if form in ("loop", "views") else 1 << 30)
    backend.add_lora(got, x, a_view, bt_view, batch)
    check_against_oracle(got, y, ref, seg_tokens, num_tokens)


def test_no_form_copies_a_whole_view() -> None:
    """A 64 MB overlapping view: every form reads only the batch's rows (embedding_bag, which
    copies a non-contiguous weight whole, is not used on it)."""
    from torch.profiler import profile

    d_in, d_out, g = 512, 512, 64
    buf = torch.zeros(1 << 22)
    rows_total = (buf.numel() - d_in - d_out) // g + 1
    a_view = buf.as_strided((rows_total, d_in), (g, 1), 0)
    bt_view = buf.as_strided((rows_total, d_out), (g, 1), d_in)
    x = torch.randn(6, d_in)
    batch = make_batch([[0, 2], [4, 5]], [2, 3], [[0, 32], [64, 96, 128]], [1.0, 2.0])
    for limit in (0, 1 << 30):
        y = torch.zeros(6, d_out)
        with profile() as prof:
            TorchBackend(gather_limit=limit).add_lora(y, x, a_view, bt_view, batch)
        names = {e.key for e in prof.key_averages()}
        assert not names & {"aten::contiguous", "aten::clone", "aten::embedding_bag"}, names


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
