"""The CPU kernel backend (`alora-cpu` through `_core.cpu_add_lora`) against the float64
oracle of `test_backend`: hypothesis-drawn batches (heterogeneous ranks, scattered rows,
several tokens per segment, inactive tokens that must stay bit-identical), on contiguous
pools and on the runtime's layout (overlapping strided views of one buffer, NaN outside
the rows); which batches go to the torch reference; refusals that write nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backend import arena, check_against_oracle, make_batch, oracle, problems, tensors

from alora import _core
from alora.backend import LoraBatch, TorchBackend
from alora.cpu_backend import CpuBackend


class NoFallback(TorchBackend):
    def add_lora(self, *args: object) -> None:  # type: ignore[override]
        raise AssertionError("the batch went to the torch fallback")


class Counting(TorchBackend):
    calls = 0

    def add_lora(self, *args: object) -> None:  # type: ignore[override]
        self.calls += 1
        super().add_lora(*args)  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(problems())
def test_kernel_matches_float64_oracle(problem: tuple) -> None:
    num_tokens, _, _, _, ranks, rows, seg_tokens, scales, _ = problem
    x, y, a_pool, bt_pool = tensors(problem)
    batch = make_batch(seg_tokens, ranks, rows, scales)
    backend = CpuBackend(max_seg_tokens=1 << 20, fallback=NoFallback())
    got = y.clone()
    backend.add_lora(got, x, a_pool, bt_pool, batch)
    check_against_oracle(
        got, y, oracle(y, x, a_pool, bt_pool, seg_tokens, rows, scales), seg_tokens, num_tokens
    )


@settings(max_examples=80, deadline=None)
@given(problems(), st.integers(1, 200), st.randoms(use_true_random=False))
def test_kernel_on_strided_views(problem: tuple, g: int, rnd: object) -> None:
    """The runtime's pools: rows scattered over one buffer at row stride g (often smaller
    than a row), A and Bt rows apart, NaN everywhere else; a wrong read shows as NaN."""
    num_tokens, _, _, pool_rows, ranks, rows, seg_tokens, scales, _ = problem
    x, y, a_pool, bt_pool = tensors(problem)
    slots = list(range(pool_rows + 5))
    rnd.shuffle(slots)  # type: ignore[attr-defined]
    _buf, a_view, bt_view, ids = arena(a_pool, bt_pool, g, slots[:pool_rows])
    batch = make_batch(seg_tokens, ranks, [[ids[p] for p in rs] for rs in rows], scales)
    got = y.clone()
    CpuBackend(max_seg_tokens=1 << 20, fallback=NoFallback()).add_lora(
        got, x, a_view, bt_view, batch
    )
    ref = oracle(y, x, a_pool, bt_pool, seg_tokens, rows, scales)
    check_against_oracle(got, y, ref, seg_tokens, num_tokens)


def small_problem(dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g).to(dtype)
    y = torch.randn(6, 5, generator=g).to(dtype)
    a = torch.randn(10, 8, generator=g).to(dtype)
    bt = torch.randn(10, 5, generator=g).to(dtype)
    seg_tokens, ranks, rows, scales = [[0, 1, 2], [4]], [2, 3], [[1, 2], [5, 6, 7]], [0.5, 2.0]
    return x, y, a, bt, seg_tokens, ranks, rows, scales


@pytest.mark.parametrize(
    ("case", "to_torch"),
    [
        ("decode", False),
        ("long segment", True),
        ("float64", True),
        ("non-contiguous x", True),
        ("y inside a pool's storage", True),
    ],
)
def test_which_batches_take_the_kernel(case: str, to_torch: bool) -> None:
    x, y, a, bt, seg_tokens, ranks, rows, scales = small_problem(
        torch.float64 if case == "float64" else torch.float32
    )
    if case == "non-contiguous x":
        x = torch.randn(8, 6).t()
    got = y.clone()
    if case == "y inside a pool's storage":
        # y shares the buffer the pools' rows live in (the kernel reads A / Bt while writing y)
        buf = torch.cat([a.reshape(-1), bt.reshape(-1), y.reshape(-1)])
        a, bt = buf[: a.numel()].view_as(a), buf[a.numel() : a.numel() + bt.numel()].view_as(bt)
        got = buf[a.numel() + bt.numel() :].view_as(y)
    fallback = Counting()
    backend = CpuBackend(max_seg_tokens=2 if case == "long segment" else 8, fallback=fallback)
    backend.add_lora(got, x, a, bt, make_batch(seg_tokens, ranks, rows, scales))
    assert fallback.calls == int(to_torch)
    check_against_oracle(got, y, oracle(y, x, a, bt, seg_tokens, rows, scales), seg_tokens, 6)


def test_bad_arguments_are_refused_and_write_nothing() -> None:
    x, y, a, bt, seg_tokens, ranks, rows, scales = small_problem()
    batch: LoraBatch = make_batch(seg_tokens, ranks, rows, scales)
    packed, scale = batch.cpu_segments
    args = (x.view(-1).numpy(), a.view(-1).numpy(), (0, 8, 8), bt.view(-1).numpy(), (0, 5, 5))
    cases = {
        "row past the arena": ((*args[:2], (24, 8, 8), *args[3:]), packed, scale),
        "truncated segments": (args, packed[:-1], scale),
        "a scale too many": (args, packed, np.append(scale, np.float32(1))),
    }
    for name, (a_args, p, s) in cases.items():
        got = y.clone()
        with pytest.raises(ValueError):
            _core.cpu_add_lora(got.view(-1).numpy(), *a_args, p, s)
        assert torch.equal(got, y), name
    for i in range(2):  # contiguous, but column-major: a flat read would be wrong
        arrays = [y.clone().numpy(), x.numpy()]
        arrays[i] = np.asfortranarray(arrays[i])
        assert not arrays[i].flags.c_contiguous
        before = arrays[0].copy()
        with pytest.raises(ValueError, match="C-contiguous"):
            _core.cpu_add_lora(arrays[0], arrays[1], *args[1:], packed, scale)
        assert np.array_equal(arrays[0], before)
    bad_tok = packed.copy()
    bad_tok[2] = 6  # the first token index: outside the step's 6 tokens
    got = y.clone()
    with pytest.raises(ValueError, match="token index 6"):
        _core.cpu_add_lora(got.view(-1).numpy(), *args, bad_tok, scale)
    assert torch.equal(got, y)


def test_pool_arguments_are_derived_once_per_view_and_dropped_with_it() -> None:
    """The backend keys what it derives from a pool on the view's id: an entry lives exactly
    as long as its views, so fresh views (whose ids CPython reuses at once) never meet a
    stale entry; each result is checked against the oracle."""
    backend = CpuBackend(fallback=NoFallback())
    g = torch.Generator().manual_seed(1)
    stacks = [(torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 5, generator=g))]
    stacks.append((torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 5, generator=g)))
    x, y, _, _, seg_tokens, ranks, rows, scales = small_problem()
    for i in range(12):
        a_stack, bt_stack = stacks[i % 2]
        a, bt = a_stack[i % 3], bt_stack[i % 3]  # fresh views every call
        got = y.clone()
        backend.add_lora(got, x, a, bt, make_batch(seg_tokens, ranks, rows, scales))
        check_against_oracle(got, y, oracle(y, x, a, bt, seg_tokens, rows, scales), seg_tokens, 6)
        del a, bt
        assert not backend._cache
    kept = stacks[0][0].unbind(0), stacks[0][1].unbind(0)  # persistent views, as the pools'
    for layer in range(3):
        for _ in range(2):
            backend.add_lora(
                y.clone(),
                x,
                kept[0][layer],
                kept[1][layer],
                make_batch(seg_tokens, ranks, rows, scales),
            )
    assert len(backend._cache) == 3
    del kept
    assert not backend._cache


def test_bound_call_adds_for_any_leading_shape_and_declines_what_the_kernel_cannot_take() -> None:
    """`bind` prepares the kernel's call once; the call takes the linear's output and input as
    they are ([1, T, out] / [1, T, in] in a model) and returns False, y untouched, for what
    `add_lora` would send to torch; `bind` is None for pools or batches the kernel never
    takes."""
    x, y, a, bt, seg_tokens, ranks, rows, scales = small_problem()
    batch = make_batch(seg_tokens, ranks, rows, scales)
    backend = CpuBackend(max_seg_tokens=8, fallback=NoFallback())
    call = backend.bind(a, bt, batch)
    assert call is not None
    want = oracle(y, x, a, bt, seg_tokens, rows, scales)
    for _ in range(2):  # the same call, again on fresh tensors
        got = y.clone()[None]
        assert call(got, x[None]) is True
        check_against_oracle(got[0], y, want, seg_tokens, 6)
    declined = {
        "float64 x": (y.clone(), x.double()),
        "non-contiguous x": (y.clone(), torch.randn(8, 6).t()),
        "y that requires grad": (y.clone().requires_grad_(), x),
        "non-contiguous y": (torch.randn(5, 6).t(), x),
    }
    buf = torch.cat([a.reshape(-1), bt.reshape(-1), y.reshape(-1)])
    a_in, bt_in = buf[: a.numel()].view_as(a), buf[a.numel() : a.numel() + bt.numel()].view_as(bt)
    in_pool = backend.bind(a_in, bt_in, batch)
    assert in_pool is not None
    for name, (y_in, x_in) in [*declined.items(), ("y in a pool", (None, x))]:
        fn = in_pool if y_in is None else call
        y_in = buf[a.numel() + bt.numel() :].view_as(y) if y_in is None else y_in
        before = y_in.detach().clone()
        assert fn(y_in, x_in) is False, name
        assert torch.equal(y_in.detach(), before), name
    assert CpuBackend(max_seg_tokens=2).bind(a, bt, batch) is None  # a segment of 3 tokens
    assert backend.bind(a.double(), bt.double(), batch) is None
    empty = make_batch([[]], [2], [[1, 2]], [1.0])
    got = y.clone()
    assert backend.bind(a, bt, empty)(got, x) is True  # type: ignore[misc]
    assert torch.equal(got, y)
