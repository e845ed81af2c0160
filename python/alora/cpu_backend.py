"""The LoRA op on the CPU: the Rust kernel (`alora-cpu`, exposed as `_core.cpu_add_lora`) for
batches of short segments (decode, aLoRA invocations), the torch reference for the rest.

In a decode step every adapter has one token (a few for short aLoRA invocations), so the op is
a batched mat-vec whose cost is reading each adapter's A and Bt rows once. Torch's `bmm` over
16 rank-16 adapters reaches about a third of the read bandwidth (per-matrix setup and op
dispatch dominate); the kernel streams the rows in place, wherever the pools' rows lie in the
KV cache's memory, with no gather and one call per module. Segments with many tokens (prefill
chunks of more than 128 tokens) are matrix products, where torch's GEMMs win, so they go to
`TorchBackend`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from alora import _core
from alora.backend import LoraBatch, TorchBackend


def _arena(pool: torch.Tensor) -> np.ndarray:
    """A 1-D float32 array over the whole storage of `pool` (the kernel addresses rows from
    element 0 of it, so the pool's storage offset and row stride pass as they are)."""
    n = pool.untyped_storage().nbytes() // pool.element_size()
    return pool.as_strided((n,), (1,), 0).numpy()


# The pools' half of `_core.cpu_add_lora`'s arguments: arena, (offset, stride, width) of A,
# then of Bt.
KernelPoolArgs = tuple[np.ndarray, tuple[int, int, int], np.ndarray, tuple[int, int, int]]


Spans = tuple[tuple[int, int], tuple[int, int]]  # the A and Bt pools' storages, in bytes


class _PoolArgs(NamedTuple):
    """What the kernel needs of one (A pool, Bt pool) pair, derived once per pair."""

    args: KernelPoolArgs | None  # None: the pools do not suit the kernel
    spans: Spans  # byte ranges of the pools' storages: y in none of them
    refs: tuple[weakref.ref, weakref.ref]  # keep the callbacks that drop the entry alive


def _pool_args(a_pool: torch.Tensor, bt_pool: torch.Tensor) -> KernelPoolArgs | None:
    if not (
        a_pool.device.type == bt_pool.device.type == "cpu"
        and a_pool.dtype == bt_pool.dtype == torch.float32
        and a_pool.stride(1) == 1
        and bt_pool.stride(1) == 1
    ):
        return None
    return (
        _arena(a_pool),
        (a_pool.storage_offset(), a_pool.stride(0), a_pool.shape[1]),
        _arena(bt_pool),
        (bt_pool.storage_offset(), bt_pool.stride(0), bt_pool.shape[1]),
    )


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


_F32 = torch.float32


def _io_ok(y: torch.Tensor, x: torch.Tensor, spans: Spans) -> bool:
    """Whether y and x suit the kernel as they are. Runs once per hook, so attribute reads
    only: no storage object per call (the pools' spans are derived once)."""
    if not (
        y.dtype is _F32
        and x.dtype is _F32
        and y.is_cpu
        and x.is_cpu
        and y.is_contiguous()
        and x.is_contiguous()
        and not y.requires_grad
    ):
        return False
    p = y.data_ptr()
    (a_lo, a_hi), (b_lo, b_hi) = spans
    return not (a_lo <= p < a_hi or b_lo <= p < b_hi)


BoundLora = Callable[[torch.Tensor, torch.Tensor], bool]


class CpuBackend:
    """`LoraBackend` for float32 models on the CPU. Batches whose segments hold at most
    `max_seg_tokens` tokens each run on the Rust kernel; others, and other dtypes or
    layouts, run on `TorchBackend` (the reference). The default 128 is below where the
    kernel's per-token dot products start to lose to torch's matrix products at the wider
    input (`benches/bench_cpu_kernel.py`: rank 16, 1 thread, kernel time over torch's at
    `in` 576 / 1536: 0.19 / 0.25x at 4 tokens, 0.48 / 0.85x at 64, 0.59 / 0.97x at 128,
    0.69 / 1.10x at 256, 0.78 / 1.10x at 512; 16 segments of 4-16 tokens 0.12-0.55x).
    Decode and aLoRA invocations take the kernel; long prefill chunks take torch's GEMM."""

    name = "cpu"

    def __init__(self, max_seg_tokens: int = 128, fallback: TorchBackend | None = None) -> None:
        self.max_seg_tokens = max_seg_tokens
        self.fallback = fallback or TorchBackend()
        self._cache: dict[tuple[int, int], _PoolArgs] = {}

    def _pools(self, a_pool: torch.Tensor, bt_pool: torch.Tensor) -> _PoolArgs:
        """The pair's kernel arguments (`args` None: the pools do not suit the kernel), made
        once per pair of views: the hooks pass each layer's persistent views
        (`AdapterPools.a_layers`), and deriving them took most of a call's host time. The
        entry goes when either view is collected, so an id in a key is never a reused one."""
        key = (id(a_pool), id(bt_pool))
        entry = self._cache.get(key)
        if entry is None:
            cache = self._cache

            def drop(_: weakref.ref) -> None:
                cache.pop(key, None)

            entry = cache[key] = _PoolArgs(
                args=_pool_args(a_pool, bt_pool),
                spans=(_span(a_pool), _span(bt_pool)),
                refs=(weakref.ref(a_pool, drop), weakref.ref(bt_pool, drop)),
            )
        return entry

    def bind(
        self, a_pool: torch.Tensor, bt_pool: torch.Tensor, batch: LoraBatch
    ) -> BoundLora | None:
        """The kernel's call for this pool pair and batch with every argument but y and x
        made once (None: the kernel does not take them): `call(y, x)` adds the delta to y,
        the linear's output, for its input x, both of any leading shape, and returns True,
        or returns False with y untouched when y or x does not suit the kernel as it is.

        A LoRA hook binds once per (layer, module, batch), and a steady decode reuses its
        batches from step to step, so a decode step's hooks skip the per-call lookups,
        reshapes and conversions of `add_lora` (issue #12: host time per hook)."""
        if batch.num_active == 0:
            return _added
        pools = self._pools(a_pool, bt_pool)
        if pools.args is None or batch.max_seg_tokens > self.max_seg_tokens:
            return None
        args = (*pools.args, *batch.cpu_segments)
        spans = pools.spans

        def call(y: torch.Tensor, x: torch.Tensor) -> bool:
            if not _io_ok(y, x, spans):
                return False
            # Inside the runtime's steps (inference mode) x needs no detach.
            _core.cpu_add_lora(y.numpy(), (x.detach() if x.requires_grad else x).numpy(), *args)
            return True

        return call

    def add_lora(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        a_pool: torch.Tensor,
        bt_pool: torch.Tensor,
        batch: LoraBatch,
    ) -> None:
        call = self.bind(a_pool, bt_pool, batch)
        if call is None or not call(y, x):
            self.fallback.add_lora(y, x, a_pool, bt_pool, batch)


def _added(y: torch.Tensor, x: torch.Tensor) -> bool:
    """The bound call of a batch without tokens: nothing to add."""
    return True
