"""LoRA glue: adapter rows inside the KV cache's units, paging rows in from host weights,
per-step LoRA batches, and forward hooks on the target linears.

Adapter rows are not separate tensors: `AdapterPools` holds, per module, strided read-only
views of the KV cache tensor (see `kv_cache.py` for the addressing), and page-ins write through
`PagedKVCache.write_rows`.

The target linears are not replaced: a forward hook adds the LoRA delta to the linear's
output in place, and only inside a runtime step. The model's module tree and state dict never
change, and outside a step the hooks return at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from alora.backend import LoraBackend, LoraBatch
from alora.kv_cache import PagedKVCache
from alora.model import ModelGeometry

if TYPE_CHECKING:
    from alora._core import AdapterInfo
    from alora.plan import LoraPlan


class AdapterWeightsLike(Protocol):
    """`alora._core.AdapterWeights`: an adapter's host weights."""

    def weights(self, layer: int, module: str) -> tuple[np.ndarray, np.ndarray] | None: ...

    def scale(self, layer: int, module: str) -> float: ...


@dataclass(frozen=True)
class AdapterEntry:
    """What the runtime keeps per registered adapter besides the engine's AdapterInfo (built
    from the info's summaries alone: no per-(layer, module) calls, so registering 10,000
    adapters costs nothing here)."""

    info: AdapterInfo
    seg_scale: float  # the scale passed to the backend for this adapter's segments
    targets: frozenset[str]  # module names with weights in at least one layer

    @classmethod
    def from_info(cls, info: AdapterInfo, module_names: Sequence[str]) -> AdapterEntry:
        """seg_scale = info.segment_scale; targets = the modules whose rank is > 0 in
        `info.module_ranks` (engine module order = `module_names`)."""
        ranks = list(info.module_ranks)
        if len(ranks) != len(module_names):
            raise ValueError(f"{len(ranks)} module ranks for {len(module_names)} modules")
        return cls(
            info=info,
            seg_scale=float(info.segment_scale),
            targets=frozenset(n for n, r in zip(module_names, ranks, strict=True) if r > 0),
        )


class AdapterPools:
    """Per module: `a[name]` [layers, R_in, in] and `bt[name]` [layers, R_out, out], strided
    read-only views of the KV cache tensor (model dtype). A rows and Bt rows have their own
    row ids (the core places them inside the adapter's units, see `kv_cache.py`).

    An adapter's rows of module m (r_m = its largest rank of m over layers): A rows <- A,
    Bt rows <- B^T * scale_lm / seg_scale, rows j >= r_lm of a layer with a lower rank (or no
    weights) zero, so that one scale per segment is exact whatever the adapter's rank and alpha
    patterns. The pools add no device memory: they are the cache's units."""

    def __init__(self, geometry: ModelGeometry, cache: PagedKVCache, granularity: int) -> None:
        self.geometry = geometry
        self.cache = cache
        self.granularity = granularity
        self.a: dict[str, torch.Tensor] = {}
        self.bt: dict[str, torch.Tensor] = {}
        # One view per layer, made once: the hooks run 4-7 x layers times a step, and a
        # backend may key what it derives from a pool on the view (CpuBackend does).
        self.a_layers: dict[str, tuple[torch.Tensor, ...]] = {}
        self.bt_layers: dict[str, tuple[torch.Tensor, ...]] = {}
        for spec in geometry.modules:
            a, bt = cache.row_views(spec.in_features, spec.out_features, granularity)
            self.a[spec.name], self.bt[spec.name] = a, bt
            self.a_layers[spec.name], self.bt_layers[spec.name] = a.unbind(0), bt.unbind(0)

    def nbytes(self) -> int:
        """Device bytes the pools add beyond the KV cache: none."""
        return 0

    def load(
        self,
        entry: AdapterEntry | AdapterInfo,
        row_start: np.ndarray,
        rows: np.ndarray,
        bt_rows: np.ndarray,
        weights: AdapterWeightsLike,
    ) -> None:
        """Page an adapter in: for every module m, write its A rows at row ids
        `rows[row_start[m]:row_start[m + 1]]` (int32, r_m of them) and its Bt rows at the same
        range of `bt_rows`, in every layer, from `weights` (`weights.weights(layer, name) ->
        (A [r, in], B [out, r]) | None`, `weights.scale(layer, name)`). One write per module,
        all layers at once."""
        info = entry.info if isinstance(entry, AdapterEntry) else entry
        seg_scale = float(info.segment_scale)
        modules = self.geometry.modules
        starts = np.asarray(row_start, dtype=np.int64).reshape(-1)
        rows_np = np.asarray(rows, dtype=np.int64).reshape(-1)
        bt_np = np.asarray(bt_rows, dtype=np.int64).reshape(-1)
        if bt_np.shape != rows_np.shape:
            raise ValueError(f"{rows_np.shape[0]} A row ids but {bt_np.shape[0]} Bt row ids")
        if starts.shape[0] != len(modules) + 1:
            raise ValueError(f"row_start must have {len(modules) + 1} entries, got {len(starts)}")
        if starts[0] != 0 or starts[-1] != rows_np.shape[0] or bool((np.diff(starts) < 0).any()):
            raise ValueError("row_start must rise from 0 to len(rows)")
        ranks = list(info.module_ranks)
        L = self.geometry.num_layers
        for m, spec in enumerate(modules):
            mrows = rows_np[starts[m] : starts[m + 1]]
            mbt = bt_np[starts[m] : starts[m + 1]]
            r = int(mrows.shape[0])
            if r < ranks[m]:
                raise ValueError(f"{r} rows for {spec.name} of rank {ranks[m]}")
            if r == 0:
                continue
            # Assemble every layer on the host in float32, then one write for the module.
            a_host = np.zeros((L, r, spec.in_features), dtype=np.float32)
            bt_host = np.zeros((L, r, spec.out_features), dtype=np.float32)
            for layer in range(L):
                w = weights.weights(layer, spec.name)
                if w is None:
                    continue
                a_np, b_np = w
                rl = int(a_np.shape[0])
                if rl > r:
                    raise ValueError(f"layer {layer} {spec.name} has rank {rl} > {r} rows")
                ratio = float(weights.scale(layer, spec.name)) / seg_scale
                a_host[layer, :rl] = a_np
                np.multiply(np.asarray(b_np).T, np.float32(ratio), out=bt_host[layer, :rl])
            self.cache.write_rows(
                spec.in_features,
                spec.out_features,
                self.granularity,
                mrows,
                mbt,
                torch.from_numpy(a_host),
                torch.from_numpy(bt_host),
            )


def build_lora_batches(
    plan: LoraPlan,
    *,
    entries: dict[int, AdapterEntry],
    module_names: Sequence[str],
    device: torch.device,
) -> dict[str, LoraBatch | None]:
    """module name -> the LoraBatch of the segments whose adapter targets it (None: none).

    The plan's `adapter_rank` / `adapter_row_start` are per (segment, module), row-major;
    each module gets its own batch (its rows differ from every other module's), built with
    numpy only. Segments whose rank for the module is 0, or that have no tokens, are left
    out. Modules whose segment set coincides share the token tensors; all the modules'
    small int32 arrays reach the device in one copy."""
    num_modules = len(module_names)
    seg_adapter = np.asarray(plan.segment_adapter)
    num_segments = int(seg_adapter.shape[0])
    if num_segments == 0:
        return dict.fromkeys(module_names)
    seg_start = np.asarray(plan.segment_start, dtype=np.int64)
    counts = np.diff(seg_start)
    ranks = np.asarray(plan.adapter_rank, dtype=np.int64).reshape(num_segments, num_modules)
    rstart = np.asarray(plan.adapter_row_start, dtype=np.int64)
    all_rows = np.asarray(plan.adapter_rows)
    all_bt_rows = np.asarray(plan.adapter_bt_rows)
    sorted_tok = np.asarray(plan.sorted_token_idx, dtype=np.int64)
    # float64 on the host (the per-segment form's exact alpha), float32 on the device.
    seg_scale = np.asarray([entries[a].seg_scale for a in seg_adapter.tolist()], dtype=np.float64)
    seg_of_token = np.repeat(np.arange(num_segments), counts)

    # Per module: kept segments, then the int32 pieces of every module in one host buffer.
    keeps: list[np.ndarray | None] = []
    pieces: list[np.ndarray] = []
    for m in range(num_modules):
        keep = np.flatnonzero((ranks[:, m] > 0) & (counts > 0))
        if keep.size == 0:
            keeps.append(None)
            continue
        keeps.append(keep)
        k_ranks = ranks[keep, m]
        k_starts = rstart[keep * num_modules + m]
        total = int(k_ranks.sum())
        offsets = np.concatenate([[0], np.cumsum(k_ranks)])
        idx = np.repeat(k_starts - offsets[:-1], k_ranks) + np.arange(total)
        pieces += [
            all_rows[idx].astype(np.int32),
            all_bt_rows[idx].astype(np.int32),
            k_ranks.astype(np.int32),
            offsets.astype(np.int32),
        ]
    if not pieces:
        return dict.fromkeys(module_names)
    lengths = [p.shape[0] for p in pieces]
    buf = torch.from_numpy(np.concatenate(pieces)).to(device)
    views = iter(torch.split(buf, lengths))
    host = iter(pieces)

    shared: dict[bytes, tuple] = {}  # kept segments -> (token_idx, seg_start, scales, host facts)
    result: dict[str, LoraBatch | None] = {}
    for name, keep in zip(module_names, keeps, strict=True):
        if keep is None:
            result[name] = None
            continue
        key = keep.tobytes()
        if key not in shared:
            if keep.size == num_segments:
                tok = sorted_tok
            else:
                mask = np.zeros(num_segments, dtype=bool)
                mask[keep] = True
                tok = sorted_tok[mask[seg_of_token]]
            k_counts = counts[keep]
            starts = np.concatenate([[0], np.cumsum(k_counts)]).astype(np.int32)
            scales = seg_scale[keep]
            shared[key] = (
                torch.from_numpy(np.ascontiguousarray(tok)).to(device),
                torch.from_numpy(starts).to(device),
                torch.from_numpy(scales.astype(np.float32)).to(device),
                tok,
                tuple(starts.tolist()),
                tuple(scales.tolist()),
                int(k_counts.max()),
            )
        token_idx, starts_t, scales_t, tok_host, starts_host, scales_host, longest = shared[key]
        rows_t, bt_t, ranks_t, rstarts_t = next(views), next(views), next(views), next(views)
        rows_h, bt_h, ranks_h, rstarts_h = next(host), next(host), next(host), next(host)
        result[name] = LoraBatch(
            token_idx=token_idx,
            seg_start=starts_t,
            seg_rank=ranks_t,
            seg_row_start=rstarts_t,
            rows=rows_t,
            seg_scale=scales_t,
            seg_start_host=starts_host,
            seg_rank_host=tuple(ranks_h.tolist()),
            seg_row_start_host=tuple(rstarts_h.tolist()),
            seg_scale_host=scales_host,
            max_rank=int(ranks_h.max()),
            max_seg_tokens=longest,
            token_idx_host=tok_host,
            rows_host=rows_h,
            bt_rows=bt_t,
            bt_rows_host=bt_h,
        )
    return result


class LoraBatchCache:
    """`build_lora_batches` for the last plan seen: a decode step of the same requests has the
    same LoRA plan as the one before it (same segments, token indices and rows), so its
    batches, and what backends memoise on them (`cpu_segments`, `scratch`), are reused. The
    key is the plan's arrays and the segments' scales, so any change rebuilds; nothing
    derived from the rows' contents is kept, so a page-in into the same rows is safe."""

    def __init__(self, module_names: Sequence[str], device: torch.device) -> None:
        self.module_names = list(module_names)
        self.device = device
        self._key: tuple | None = None
        self._batches: dict[str, LoraBatch | None] = {}

    def get(self, plan: LoraPlan, entries: dict[int, AdapterEntry]) -> dict[str, LoraBatch | None]:
        adapters = np.asarray(plan.segment_adapter)
        key = (
            *(
                np.asarray(a).tobytes()
                for a in (
                    plan.sorted_token_idx,
                    plan.segment_start,
                    adapters,
                    plan.adapter_rank,
                    plan.adapter_row_start,
                    plan.adapter_rows,
                    plan.adapter_bt_rows,
                )
            ),
            tuple(entries[a].seg_scale for a in adapters.tolist()),
        )
        if key != self._key:
            self._key = None  # a failed build leaves no stale entry behind
            self._batches = build_lora_batches(
                plan, entries=entries, module_names=self.module_names, device=self.device
            )
            self._key = key
        return self._batches


@dataclass
class LoraStep:
    """What the LoRA hooks need during one runtime forward pass."""

    owner: object  # the runtime that runs the step; other runtimes' hooks stay inert
    batches: dict[str, LoraBatch | None]  # module name -> batch (None: no segment targets it)
    pools: AdapterPools
    backend: LoraBackend
    # Group fusion (backends with `fuse_groups`): fused shrinks waiting for their other
    # members' hooks, by (layer, module), and the (layer, module) hooks that ran. Per step,
    # so nothing outlives the forward pass or crosses to another runtime.
    fused: dict[tuple[int, str], FusedShrink] = field(default_factory=dict, repr=False)
    fired: set[tuple[int, str]] = field(default_factory=set, repr=False)


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


# Linears that read the same tensor in a decoder layer (Llama, Mistral, Qwen2/3, Granite...):
# the attention input feeds q/k/v, the MLP input gate/up. Order = order within a fused launch.
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


def fusion_groups(geometry: ModelGeometry) -> dict[str, tuple[str, ...]]:
    """module name -> the modules that read its input (itself included, in launch order):
    names of one `SHARED_INPUT_GROUPS` entry with the same parent module in the layer and the
    same in_features. Modules without a partner are left out. A name table, not in_features
    alone: o_proj often has q's in_features but reads the attention output."""
    by_name = {spec.name: spec for spec in geometry.modules}
    groups: dict[str, tuple[str, ...]] = {}
    for names in SHARED_INPUT_GROUPS:
        buckets: dict[tuple[str, int], list[str]] = {}
        for n in names:
            spec = by_name.get(n)
            if spec is not None:
                key = (spec.path.rpartition(".")[0], spec.in_features)
                buckets.setdefault(key, []).append(n)
        for members in buckets.values():
            if len(members) > 1:
                groups.update(dict.fromkeys(members, tuple(members)))
    return groups


def _version(x: torch.Tensor) -> int | None:
    """x's in-place version counter; None for inference tensors, which keep none."""
    return None if x.is_inference() else int(x._version)


@dataclass(eq=False)
class FusedShrink:
    """One fused shrink over a group's modules in one layer (x read once for all), kept in
    the step until each member's hook expands its own slice `vp[index[name]]`."""

    x: torch.Tensor  # the input it read: a member's hook uses it only for this very tensor
    version: int | None  # x._version then (None: an inference tensor, no counter)
    data_ptr: int
    vp: torch.Tensor  # partial V of every member, [members, splits, T_active, ldv]
    plan: Any
    index: dict[str, int]  # member -> its module index in vp / plan

    def reads(self, x: torch.Tensor) -> bool:
        return self.x is x and self.data_ptr == x.data_ptr() and self.version == _version(x)


class LoraHooks:
    """Forward hooks on the target linears of every decoder layer, registered per module
    name only while steps use that name: a module with any forward hook takes the slow
    path of `nn.Module.__call__`, which cost more than the step's LoRA math in batch-1
    decode (7 linears x 30 layers on SmolLM2), and base-model steps need none at all.

    With a backend that has `fuse_groups` (the CUDA kernels), modules that read the same
    input (`fusion_groups`: q/k/v, gate/up) share one shrink per layer: see `_fused_add`."""

    def __init__(self, owner: object, layers: nn.ModuleList, geometry: ModelGeometry) -> None:
        self._owner = owner
        self._sites: dict[str, list[tuple[int, nn.Module]]] = {
            spec.name: [(i, layer.get_submodule(spec.path)) for i, layer in enumerate(layers)]
            for spec in geometry.modules
        }
        self.groups = fusion_groups(geometry)
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
            group = self.groups.get(name, ())
            self._handles[name] = [
                module.register_forward_hook(
                    _make_hook(self._owner, i, name, group), with_kwargs=True
                )
                for i, module in self._sites[name]
            ]

    def remove(self) -> None:
        for handles in self._handles.values():
            for h in handles:
                h.remove()
        self._handles.clear()


def _make_hook(owner: object, layer: int, name: str, group: tuple[str, ...] = ()) -> Any:
    # The backend's bound call for this site (`bind`), kept with the batch, backend and pools
    # it was made for: a steady decode reuses its batches, so each site binds once per plan.
    bound: list[Any] = [None, None, None, None]  # batch, backend, pools, call (None: none)

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
        backend = ctx.backend
        pools = ctx.pools
        if bound[0] is not batch or bound[1] is not backend or bound[2] is not pools:
            bind = getattr(backend, "bind", None)
            call = (
                None
                if bind is None
                else bind(pools.a_layers[name][layer], pools.bt_layers[name][layer], batch)
            )
            bound[:] = batch, backend, pools, call
        call = bound[3]
        if call is not None and call(output, x):
            return output
        x2d = x.reshape(-1, x.shape[-1])
        y2d = output.view(-1, output.shape[-1])  # a view, so the in-place add reaches output
        fuse = bool(group) and getattr(backend, "fuse_groups", False)
        if fuse and _fused_add(ctx, layer, name, group, x, x2d, y2d, batch):
            return output
        backend.add_lora(y2d, x2d, pools.a_layers[name][layer], pools.bt_layers[name][layer], batch)
        return output

    return hook


def _fused_add(
    ctx: LoraStep,
    layer: int,
    name: str,
    group: tuple[str, ...],
    x: torch.Tensor,
    x2d: torch.Tensor,
    y2d: torch.Tensor,
    batch: LoraBatch,
) -> bool:
    """Add module `name`'s delta through its group's fused shrink; False: not done, the
    caller adds it on its own (`add_lora`), which is always correct.

    The first member hook of a group to fire in a layer runs one shrink for itself and every
    member that has not fired yet in this layer, is active this step and whose batch shares
    its segments (`backend.fusable`: same tokens, ranks and scales, own rows), stashes it in
    the step, and expands its own slice. A later member expands its slice only if the stash
    read this very x (same tensor object, data pointer and version); else it goes alone.
    Whatever the order the hooks fire in, each member's delta is added exactly once."""
    backend: Any = ctx.backend
    ctx.fired.add((layer, name))
    bt = ctx.pools.bt_layers[name][layer]
    stash = ctx.fused.pop((layer, name), None)
    if stash is not None:
        if not stash.reads(x):
            return False
        backend.expand([y2d], [bt], stash.vp, [batch], stash.plan, module=stash.index[name])
        return True
    members = [
        n
        for n in group
        if n == name
        or (
            (other := ctx.batches.get(n)) is not None
            and (layer, n) not in ctx.fired
            and (layer, n) not in ctx.fused
            and backend.fusable(x2d, [batch, other])
        )
    ]
    if len(members) < 2:
        return False
    batches = [ctx.batches[n] for n in members]
    if not backend.fusable(x2d, batches):
        return False
    plan = backend.plan(batches, x2d.shape[1])
    vp = backend.shrink(x2d, [ctx.pools.a_layers[n][layer] for n in members], batches, plan=plan)
    stash = FusedShrink(
        x=x,
        version=_version(x),
        data_ptr=x.data_ptr(),
        vp=vp,
        plan=plan,
        index={n: i for i, n in enumerate(members)},
    )
    for n in members:
        if n != name:
            ctx.fused[(layer, n)] = stash
    backend.expand([y2d], [bt], vp, [batch], plan, module=stash.index[name])
    return True
