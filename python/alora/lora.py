"""LoRA glue: device pools of adapter rank rows, paging rows in from the engine's host
weights, per-step LoRA batches, and forward hooks on the target linears.

The target linears are not replaced: a forward hook adds the LoRA delta to the linear's
output in place, and only inside a runtime step. The model's module tree and state dict never
change, and outside a step the hooks return at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from alora.backend import LoraBackend, LoraBatch
from alora.model import ModelGeometry
from alora.plan import LoraPlan

if TYPE_CHECKING:
    from alora._core import AdapterInfo


@dataclass(frozen=True)
class AdapterEntry:
    """What the runtime keeps per loaded adapter besides the engine's AdapterInfo."""

    info: AdapterInfo
    seg_scale: float  # the scale passed to the backend for this adapter's segments
    targets: frozenset[str]  # module names with weights in at least one layer


def segment_scale(info: AdapterInfo, geometry: ModelGeometry) -> float:
    """The adapter's segment scale: the largest |scale| over its adapted (layer, module)s.
    Each module's scale is folded into its Bt rows as a ratio to it, so the ratios lie in
    [-1, 1]: rows in a half-precision pool never overflow, whatever the alpha patterns."""
    scales = [
        abs(float(info.scale(layer, spec.name)))
        for layer in range(geometry.num_layers)
        for spec in geometry.modules
        if info.module_rank(layer, spec.name) > 0
    ]
    biggest = max(scales, default=0.0)
    return biggest if biggest > 0.0 else 1.0


class AdapterPools:
    """Per module: `a[name]` [layers, R, in] and `bt[name]` [layers, R, out], model dtype.

    Rows of adapter `a` at (layer, module): A rows <- A (its first r_m rows), Bt rows <-
    B^T * scale_m / seg_scale(a), rows >= r_m zero, so that one scale per segment is exact
    whatever the adapter's rank and alpha patterns."""

    def __init__(
        self, geometry: ModelGeometry, rows: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.geometry = geometry
        self.rows = rows
        self.dtype = dtype
        self.device = device
        L = geometry.num_layers
        self.a: dict[str, torch.Tensor] = {}
        self.bt: dict[str, torch.Tensor] = {}
        for spec in geometry.modules:
            self.a[spec.name] = torch.zeros((L, rows, spec.in_features), dtype=dtype, device=device)
            self.bt[spec.name] = torch.zeros(
                (L, rows, spec.out_features), dtype=dtype, device=device
            )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.bt.values()))

    def load(self, entry: AdapterEntry, rows: np.ndarray) -> None:
        """Fill pool `rows` (int32[rank]) with the adapter's weights, every layer and module."""
        rows_np = np.asarray(rows, dtype=np.int64)
        n = int(rows_np.shape[0])
        if n == 0:
            return
        if int(rows_np.min()) < 0 or int(rows_np.max()) >= self.rows:
            raise ValueError(f"adapter rows out of range [0, {self.rows})")
        if n < entry.info.rank:
            raise ValueError(f"{n} rows for an adapter of rank {entry.info.rank}")
        idx = torch.from_numpy(rows_np).to(self.device)
        L = self.geometry.num_layers
        for spec in self.geometry.modules:
            # Assemble every layer on the host in float32, then one copy per pool.
            a_host = torch.zeros((L, n, spec.in_features), dtype=torch.float32)
            bt_host = torch.zeros((L, n, spec.out_features), dtype=torch.float32)
            if spec.name in entry.targets:
                for layer in range(L):
                    w = entry.info.weights(layer, spec.name)
                    if w is None:
                        continue
                    a_np, b_np = w
                    r = a_np.shape[0]
                    ratio = float(entry.info.scale(layer, spec.name)) / entry.seg_scale
                    a_host[layer, :r] = torch.from_numpy(np.array(a_np, copy=True))
                    bt_host[layer, :r] = torch.from_numpy(np.array(b_np, copy=True)).t() * ratio
            self.a[spec.name].index_copy_(1, idx, a_host.to(self.device, self.dtype))
            self.bt[spec.name].index_copy_(1, idx, bt_host.to(self.device, self.dtype))


def build_lora_batches(
    plan: LoraPlan,
    *,
    entries: dict[int, AdapterEntry],
    module_names: Sequence[str],
    device: torch.device,
) -> dict[str, LoraBatch | None]:
    """module name -> the LoraBatch of the segments whose adapter targets it (None: none).

    One batch per distinct set of segments, shared by every module (and layer) with that set.
    """
    sorted_token_idx = plan.sorted_token_idx
    segment_start = plan.segment_start
    segment_adapter = plan.segment_adapter
    adapter_rank = plan.adapter_rank
    adapter_row_start = plan.adapter_row_start
    adapter_rows = plan.adapter_rows
    num_segments = int(segment_adapter.shape[0])
    if num_segments == 0:
        return dict.fromkeys(module_names)
    seg_entries = [entries[int(a)] for a in segment_adapter]
    by_set: dict[tuple[int, ...], LoraBatch | None] = {}
    result: dict[str, LoraBatch | None] = {}
    for name in module_names:
        keep = tuple(i for i in range(num_segments) if name in seg_entries[i].targets)
        if keep not in by_set:
            by_set[keep] = (
                _make_batch(
                    keep,
                    sorted_token_idx,
                    segment_start,
                    adapter_rank,
                    adapter_row_start,
                    adapter_rows,
                    [seg_entries[i].seg_scale for i in keep],
                    device,
                )
                if keep
                else None
            )
        result[name] = by_set[keep]
    return result


def _make_batch(
    keep: tuple[int, ...],
    sorted_token_idx: np.ndarray,
    segment_start: np.ndarray,
    adapter_rank: np.ndarray,
    adapter_row_start: np.ndarray,
    adapter_rows: np.ndarray,
    scales: list[float],
    device: torch.device,
) -> LoraBatch | None:
    seg_start = np.asarray(segment_start, dtype=np.int64)
    row_start = np.asarray(adapter_row_start, dtype=np.int64)
    tok_parts = [sorted_token_idx[seg_start[i] : seg_start[i + 1]] for i in keep]
    row_parts = [adapter_rows[row_start[i] : row_start[i + 1]] for i in keep]
    counts = [len(p) for p in tok_parts]
    if sum(counts) == 0:
        return None
    token_idx = np.concatenate(tok_parts).astype(np.int64, copy=False)
    rows = np.concatenate(row_parts).astype(np.int32, copy=False)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    ranks = np.asarray([int(adapter_rank[i]) for i in keep], dtype=np.int32)
    rstarts = np.concatenate([[0], np.cumsum([len(p) for p in row_parts])]).astype(np.int32)
    return LoraBatch(
        token_idx=torch.from_numpy(token_idx).to(device),
        seg_start=torch.from_numpy(starts).to(device),
        seg_rank=torch.from_numpy(ranks).to(device),
        seg_row_start=torch.from_numpy(rstarts).to(device),
        rows=torch.from_numpy(rows).to(device),
        seg_scale=torch.tensor(scales, dtype=torch.float32, device=device),
        seg_start_host=tuple(int(v) for v in starts),
        seg_rank_host=tuple(int(v) for v in ranks),
        seg_row_start_host=tuple(int(v) for v in rstarts),
        seg_scale_host=tuple(float(s) for s in scales),
        max_rank=int(ranks.max()) if ranks.size else 0,
        max_seg_tokens=max(counts),
    )


@dataclass
class LoraStep:
    """What the LoRA hooks need during one runtime forward pass."""

    owner: object  # the runtime that runs the step; other runtimes' hooks stay inert
    batches: dict[str, LoraBatch | None]  # module name -> batch (None: no segment targets it)
    pools: AdapterPools
    backend: LoraBackend


_STEP: ContextVar[LoraStep | None] = ContextVar("alora_lora_step", default=None)


@contextlib.contextmanager
def lora_step(state: LoraStep) -> Iterator[LoraStep]:
    """Inside: the owner's hooks add the LoRA deltas of `state`'s batches (the caller has
    activated hooks on the modules the batches name, see `LoraHooks.activate`)."""
    token = _STEP.set(state)
    try:
        yield state
    finally:
        _STEP.reset(token)


class LoraHooks:
    """Forward hooks on the target linears of every decoder layer, registered per module
    name only while steps use that name: a module with any forward hook takes the slow
    path of `nn.Module.__call__`, which cost more than the step's LoRA math in batch-1
    decode (7 linears x 30 layers on SmolLM2), and base-model steps need none at all."""

    def __init__(self, owner: object, layers: nn.ModuleList, geometry: ModelGeometry) -> None:
        self._owner = owner
        self._sites: dict[str, list[tuple[int, nn.Module]]] = {
            spec.name: [(i, layer.get_submodule(spec.path)) for i, layer in enumerate(layers)]
            for spec in geometry.modules
        }
        self._handles: dict[str, list[RemovableHandle]] = {}

    @property
    def active(self) -> frozenset[str]:
        return frozenset(self._handles)

    def activate(self, names: Iterable[str]) -> None:
        """Hook exactly the modules named in `names` (every layer); others get no hook. A
        no-op when the set is unchanged, the common case from one step to the next."""
        wanted = set(names)
        if wanted == self._handles.keys():
            return
        for name in [n for n in self._handles if n not in wanted]:
            for h in self._handles.pop(name):
                h.remove()
        for name in wanted - self._handles.keys():
            self._handles[name] = [
                module.register_forward_hook(_make_hook(self._owner, i, name), with_kwargs=True)
                for i, module in self._sites[name]
            ]

    def remove(self) -> None:
        for handles in self._handles.values():
            for h in handles:
                h.remove()
        self._handles.clear()


def _make_hook(owner: object, layer: int, name: str) -> Any:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor | None:
        ctx = _STEP.get()
        if ctx is None or ctx.owner is not owner:
            return None
        batch = ctx.batches.get(name)
        if batch is None:
            return None
        x = args[0] if args else kwargs["input"]
        y2d = output.view(-1, output.shape[-1])  # a view, so the in-place add reaches output
        ctx.backend.add_lora(
            y2d,
            x.reshape(-1, x.shape[-1]),
            ctx.pools.a[name][layer],
            ctx.pools.bt[name][layer],
            batch,
        )
        return output

    return hook
