"""Paged attention over the engine's block tables, plugged into transformers through
`AttentionInterface`, and the attention's own per-step state (set by the step executor).

An attached model's config names `ATTN_IMPLEMENTATION`. Outside a runtime step both the
attention function and the mask function registered under that name delegate to the model's
original implementation, so the model behaves exactly as before for any other caller. Inside a
step, masks are not built at all (the block tables say who attends to what) and attention runs
over the paged KV cache.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alora.kv_cache import PagedKVCache
from alora.plan import AttentionPlan

ATTN_IMPLEMENTATION = "alora_paged"


# --------------------------------------------------------------------------------------------
# Attention metadata: built once per step from the plan, shared by every layer.
# --------------------------------------------------------------------------------------------


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[len(blocks) * block_size, KVH, d]: the slots of `blocks`, in order. Whole blocks are
    contiguous runs of slots: index_select copies them as memcpy rows, several times faster
    than advanced indexing slot by slot."""
    per_block = cache.view(-1, block_size, *cache.shape[1:]).index_select(0, blocks)
    return per_block.view(-1, *cache.shape[1:])


@dataclass
class SeqGroup:
    """Sequences attended together in one SDPA call, padded to the group's longest query and
    context. Steps are split into a decode group (one query token each) and a prefill group,
    so that one long prefill chunk does not pad every decode sequence to its length."""

    q_index: torch.Tensor  # int64 [S, Q]: token indices of each sequence's queries (pad: 0)
    out_index: torch.Tensor  # int64 [n]: q_index at the valid query slots, row-major
    q_valid: torch.Tensor  # bool [S, Q]
    kv_slots: torch.Tensor  # int64 [S, L]: cache slot of each key position (pad: 0)
    q_pos: torch.Tensor  # int64 [S, 1, Q, 1]
    k_pos: torch.Tensor  # int64 [1, 1, 1, L]
    k_valid: torch.Tensor  # bool [S, 1, 1, L]
    # With whole-block gathers (L a multiple of the block size): the block of each run of
    # block_size key positions, int64 [S * L / block_size] (pad: 0). None: gather slots.
    kv_blocks: torch.Tensor | None = None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def gather(self, cache: torch.Tensor, block_size: int) -> torch.Tensor:
        """[S, L, KVH, d] keys or values of every sequence's context, padded."""
        if self.kv_blocks is None:
            return cache[self.kv_slots]
        blocks = _gather_blocks(cache, self.kv_blocks, block_size)
        return blocks.view(self.kv_slots.shape[0], -1, *cache.shape[1:])

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """bool [S, 1, Q, L]: causal over the sequence's own positions, within the window."""
        window = int(sliding_window) if sliding_window else None
        cached = self._masks.get(window)
        if cached is not None:
            return cached
        m = (self.k_pos <= self.q_pos) & self.k_valid
        if window is not None:
            # transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window
            m = m & (self.k_pos > self.q_pos - window)
        # Padded query rows attend to key 0 so that softmax sees no empty row (no NaN); their
        # outputs are dropped.
        pad_rows = ~self.q_valid[:, None, :, None] & (self.k_pos == 0)
        m = m | pad_rows
        self._masks[window] = m
        return m


@dataclass(frozen=True)
class ChunkSeq:
    """A prefill sequence whose queries are its own contiguous token range [q0, q1) at
    positions [cached, cached + q1 - q0): attention is causal over its own chunk (SDPA
    `is_causal`, no mask, no gather) plus, when `cached` > 0, unmasked over its cached part."""

    q0: int
    q1: int
    cached: int  # tokens of context already in the cache before this chunk
    # The cached part's blocks, int64 [ceil(cached / block_size)] (None: see cached_runs).
    cached_blocks: torch.Tensor | None
    # When the cached slots are read in place: (first slot, length) of each range of
    # consecutive slots (see `_slot_runs`); () otherwise (or when nothing is cached).
    cached_runs: tuple[tuple[int, int], ...] = ()

    @property
    def context(self) -> int:
        return self.cached + self.q1 - self.q0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]
    groups: list[SeqGroup]
    num_tokens: int
    # Fast path for the prefill group (the last group): one entry per prefill sequence, or
    # None when some sequence does not have the layout ChunkSeq needs.
    chunks: list[ChunkSeq] | None = None
    # Fast path for a decode group of one sequence: its context's slots as ranges of
    # consecutive slots (first slot, length), read in place (`_slot_runs`); None otherwise.
    decode_runs: tuple[tuple[int, int], ...] | None = None


# Turn the fast paths off to run the reference (gathered slots + explicit mask) everywhere;
# tests compare the two.
FAST_PATHS = True
# A context in a few ranges of consecutive slots is attended range by range in place
# (merged by log-sum-exp) instead of gathered, when its ranges average at least
# RUN_TOKENS tokens (and are at most MAX_RUNS): each extra range costs one flash call,
# about what gathering 500 tokens costs (SmolLM2 shapes, CPU: 2,048 tokens in 2 or 4
# ranges 0.89-0.94x the gather's time, in 8 ranges 1.08x; 512 tokens in 2 ranges 1.35x).
# One range is always read in place.
MAX_RUNS = 16
RUN_TOKENS = 512


def build_attention_metadata(
    plan: AttentionPlan,
    *,
    block_size: int,
    device: torch.device | str,
    fast_paths: bool | None = None,
) -> AttentionMetadata:
    """Index tensors for paged attention over a step's sequences. `fast_paths` (default:
    the module's FAST_PATHS) adds the layouts the causal prefill and in-place decode use."""
    positions = np.asarray(plan.positions, dtype=np.int64)
    query_start = np.asarray(plan.query_start, dtype=np.int64)
    context_lens = np.asarray(plan.context_lens, dtype=np.int64)
    block_tables = np.asarray(plan.block_tables, dtype=np.int64)
    slot_mapping = plan.slot_mapping
    q_lens = np.diff(query_start)
    if q_lens.size and (bool((q_lens > context_lens).any()) or bool((q_lens < 1).any())):
        raise ValueError("each sequence needs 1 <= query tokens <= context length")
    fast = FAST_PATHS if fast_paths is None else fast_paths
    groups: list[SeqGroup] = []
    for sel in (np.flatnonzero(q_lens == 1), np.flatnonzero(q_lens > 1)):
        if sel.size:
            groups.append(
                _build_group(
                    sel,
                    positions,
                    query_start,
                    q_lens,
                    context_lens,
                    block_tables,
                    block_size,
                    whole_blocks=fast,
                )
            )
    dev = torch.device(device)
    for g in groups:
        for name in ("q_index", "out_index", "q_valid", "kv_slots", "q_pos", "k_pos", "k_valid"):
            setattr(g, name, getattr(g, name).to(dev, non_blocking=True))
        if g.kv_blocks is not None:
            g.kv_blocks = g.kv_blocks.to(dev, non_blocking=True)
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(np.asarray(slot_mapping, dtype=np.int64)).to(dev),
        groups=groups,
        num_tokens=int(positions.shape[0]),
    )
    if fast:
        prefill = np.flatnonzero(q_lens > 1)
        if prefill.size:
            meta.chunks = _chunk_seqs(
                prefill, positions, query_start, context_lens, block_tables, block_size, dev
            )
        decode = np.flatnonzero(q_lens == 1)
        if decode.size == 1:
            i = int(decode[0])
            meta.decode_runs = _slot_runs(block_tables[i], int(context_lens[i]), block_size)
    return meta


def _slot_runs(
    table: np.ndarray, length: int, block_size: int
) -> tuple[tuple[int, int], ...] | None:
    """The first `length` slots of a block table as (first slot, length) ranges of
    consecutive cache slots; None when it takes more than one and reading them in place
    would not pay (see RUN_TOKENS).

    The ranges cover the slots as a set, not in table order: every query they serve sees
    every one of these keys (decode, or a chunk's cached part), so key order is irrelevant.
    That matters because freed units are reused last-freed-first, so a sequence's table
    often runs through block ids downwards. Full blocks are grouped by consecutive id; a
    partial last block joins the range that ends just before it, or stands alone."""
    nb = (length + block_size - 1) // block_size
    blocks = table[:nb].astype(np.int64)
    if nb == 0 or bool((blocks < 0).any()):
        return None
    full = length // block_size
    ids = np.sort(blocks[:full])
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    runs = [
        [int(ids[b0]) * block_size, int(b1 - b0) * block_size]
        for b0, b1 in zip([0, *breaks.tolist()], [*breaks.tolist(), full], strict=True)
        if b1 > b0
    ]
    if full < nb:  # the partial last block
        start, rest = int(blocks[nb - 1]) * block_size, length - full * block_size
        joined = next((r for r in runs if r[0] + r[1] == start), None)
        if joined is not None:
            joined[1] += rest
        else:
            runs.append([start, rest])
    if len(runs) > 1 and len(runs) > min(MAX_RUNS, length // RUN_TOKENS):
        return None
    return tuple((a, n) for a, n in runs)


def _chunk_seqs(
    sel: np.ndarray,
    positions: np.ndarray,
    query_start: np.ndarray,
    context_lens: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    device: torch.device,
) -> list[ChunkSeq] | None:
    out: list[ChunkSeq] = []
    for i in sel:
        q0, q1 = int(query_start[i]), int(query_start[i + 1])
        cached = int(context_lens[i]) - (q1 - q0)
        # The chunk must be the context's tail, in order (what the engine schedules).
        if not np.array_equal(positions[q0:q1], np.arange(cached, cached + q1 - q0)):
            return None
        blocks, runs = None, ()
        if cached:
            found = _slot_runs(block_tables[i], cached, block_size)
            if found is None:
                nb = -(-cached // block_size)
                blocks = torch.from_numpy(block_tables[i][:nb].astype(np.int64)).to(device)
            else:
                runs = found
        out.append(ChunkSeq(q0, q1, cached, blocks, runs))
    return out


def _build_group(
    sel: np.ndarray,
    positions: np.ndarray,
    query_start: np.ndarray,
    q_lens: np.ndarray,
    context_lens: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    *,
    whole_blocks: bool = False,
) -> SeqGroup:
    qmax = int(q_lens[sel].max())
    lmax = int(context_lens[sel].max())
    if whole_blocks:
        lmax = -(-lmax // block_size) * block_size
    qa = np.arange(qmax, dtype=np.int64)
    q_valid = qa[None, :] < q_lens[sel, None]
    q_index = np.where(q_valid, query_start[sel, None] + qa[None, :], 0)
    q_pos = np.where(q_valid, positions[q_index], 0)
    ka = np.arange(lmax, dtype=np.int64)
    k_valid = ka[None, :] < context_lens[sel, None]
    needed_blocks = (lmax + block_size - 1) // block_size
    if needed_blocks > block_tables.shape[1]:
        raise ValueError("block table narrower than the context it must cover")
    blocks = block_tables[sel][:, ka // block_size]
    if bool((blocks[k_valid] < 0).any()):
        raise ValueError("block table has no block for a position inside the context")
    kv_slots = np.where(k_valid, blocks * block_size + ka[None, :] % block_size, 0)
    kv_blocks = None
    if whole_blocks:
        # Blocks past a sequence's context are read (as block 0) and masked out.
        kv_blocks = torch.from_numpy(np.maximum(blocks[:, ::block_size], 0).reshape(-1))
    return SeqGroup(
        q_index=torch.from_numpy(q_index),
        out_index=torch.from_numpy(q_index[q_valid]),
        q_valid=torch.from_numpy(q_valid),
        kv_slots=torch.from_numpy(kv_slots),
        q_pos=torch.from_numpy(q_pos)[:, None, :, None],
        k_pos=torch.from_numpy(ka)[None, None, None, :],
        k_valid=torch.from_numpy(k_valid)[:, None, None, :],
        kv_blocks=kv_blocks,
    )


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    meta: AttentionMetadata,
    *,
    scaling: float | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """query [T, H, d], key/value [T, KVH, d] of the step's tokens (post-RoPE, post-norm).

    Writes K/V at the step's slots, then attends every query over its sequence's cached
    keys. Returns [T, H, d].
    """
    cache.write(layer, meta.slot_mapping, key, value)
    k_cache, v_cache = cache.key(layer), cache.value(layer)
    num_heads, num_kv = query.shape[1], k_cache.shape[1]
    out = query.new_empty(query.shape)
    for gi, g in enumerate(meta.groups):
        prefill = gi == len(meta.groups) - 1 and meta.chunks is not None
        if prefill and _chunks_fit(meta.chunks, sliding_window, query.device):
            chunks = meta.chunks or []
            whole = len(chunks) == 1 and chunks[0].q1 - chunks[0].q0 == len(out)
            if whole and len(meta.groups) == 1:
                # The whole step is one chunk: SDPA's output, transposed, is already the
                # contiguous [T, H, d] the model wants; no copy into `out`.
                return _chunk_attention(
                    query, key, value, k_cache, v_cache, chunks[0], scaling, cache.block_size
                )
            for c in chunks:
                out[c.q0 : c.q1] = _chunk_attention(
                    query, key, value, k_cache, v_cache, c, scaling, cache.block_size
                )
            continue
        runs = meta.decode_runs if not prefill and gi == 0 else None
        if runs is not None and (len(runs) == 1 or query.device.type == "cpu"):
            length = sum(n for _, n in runs)
            if not sliding_window or length <= int(sliding_window):
                _decode_in_place(out, query, k_cache, v_cache, g, runs, scaling)
                continue
        q = query[g.q_index].transpose(1, 2)  # [S, H, Q, d]
        k = g.gather(k_cache, cache.block_size).transpose(1, 2)  # [S, KVH, L, d]
        v = g.gather(v_cache, cache.block_size).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attn_mask=g.mask(sliding_window),
            scale=scaling,
            enable_gqa=num_heads != num_kv,
        )
        out.index_copy_(0, g.out_index, o.transpose(1, 2)[g.q_valid])
    return out


def _chunks_fit(
    chunks: list[ChunkSeq] | None, sliding_window: int | None, device: torch.device
) -> bool:
    """Whether the causal fast path is exact for these chunks: no window cuts any context,
    and a chunk with cached context has the merge it needs (log-sum-exp from the CPU flash
    kernel; elsewhere the reference path runs)."""
    if chunks is None:
        return False
    if sliding_window and any(c.context > int(sliding_window) for c in chunks):
        return False
    return device.type == "cpu" or all(c.cached == 0 for c in chunks)


def _flash_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU flash kernel behind SDPA, which also returns the log-sum-exp of each query's
    scores ([1, H, Q], float32) and broadcasts K/V heads over query heads (GQA) itself."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )
    return out, lse


def _chunk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    c: ChunkSeq,
    scaling: float | None,
    block_size: int,
) -> torch.Tensor:
    """[Q, H, d]: causal attention of one chunk over its own K/V (as the step computed them,
    rounded to the cache dtype like the reference path reads them) and, merged by
    log-sum-exp, over the context cached before it, which no query of the chunk is masked
    from."""
    q = query[c.q0 : c.q1].transpose(0, 1)[None]  # [1, H, Q, d]
    k = key[c.q0 : c.q1].to(k_cache.dtype).to(q.dtype).transpose(0, 1)[None]
    v = value[c.q0 : c.q1].to(v_cache.dtype).to(q.dtype).transpose(0, 1)[None]
    gqa = q.shape[1] != k.shape[1]
    if c.cached == 0:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        return o[0].transpose(0, 1)
    o_own, lse_own = _flash_lse(q, k, v, True, scaling)
    if c.cached_blocks is None:
        o_ctx, lse_ctx = _attend_runs(q, k_cache, v_cache, c.cached_runs, scaling)
    else:
        # Whole blocks (memcpy runs), then the cached prefix of them.
        kc = _gather_blocks(k_cache, c.cached_blocks, block_size)[: c.cached]
        vc = _gather_blocks(v_cache, c.cached_blocks, block_size)[: c.cached]
        kc = kc.to(q.dtype).transpose(0, 1)[None]
        vc = vc.to(q.dtype).transpose(0, 1)[None]
        o_ctx, lse_ctx = _flash_lse(q, kc, vc, False, scaling)
    # softmax over both parts = each part's softmax weighted by its share of exp(lse)
    w_ctx = torch.sigmoid(lse_ctx - lse_own)[..., None].to(q.dtype)
    return torch.lerp(o_own, o_ctx, w_ctx)[0].transpose(0, 1)


def _range_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, run: tuple[int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, KVH, length, d] views of the cache's slots [start, start + length), in `dtype`."""
    start, length = run
    k = k_cache[start : start + length].transpose(0, 1)[None].to(dtype)
    v = v_cache[start : start + length].transpose(0, 1)[None].to(dtype)
    return k, v


def _attend_runs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    runs: tuple[tuple[int, int], ...],
    scaling: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of q [1, H, Q, d] attending, unmasked, the slots of `runs` read in place:
    one flash call per run, merged by log-sum-exp (each run's softmax weighted by its share
    of the total exp(lse))."""
    parts = [_flash_lse(q, *_range_kv(k_cache, v_cache, r, q.dtype), False, scaling) for r in runs]
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([p[1] for p in parts])  # [R, 1, H, Q]
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total)[..., None].to(q.dtype)  # [R, 1, H, Q, 1]
    out = (torch.stack([p[0] for p in parts]) * weights).sum(0)
    return out, total


def _decode_in_place(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    g: SeqGroup,
    runs: tuple[tuple[int, int], ...],
    scaling: float | None,
) -> None:
    """One decode query over a context stored in a few contiguous ranges of slots: attends
    the cache in place (views, no gather, no mask); several ranges are merged by
    log-sum-exp (CPU: the flash kernel that returns it)."""
    t = g.out_index  # [1]
    q = query.index_select(0, t).transpose(0, 1)[None]  # [1, H, 1, d]
    if len(runs) == 1:  # SDPA, which any device has
        k, v = _range_kv(k_cache, v_cache, runs[0], q.dtype)
        gqa = q.shape[1] != k.shape[1]
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
    else:
        o, _ = _attend_runs(q, k_cache, v_cache, runs, scaling)
    out.index_copy_(0, t, o[0].transpose(0, 1))


# --------------------------------------------------------------------------------------------
# Per-step state.
# --------------------------------------------------------------------------------------------


@dataclass
class AttentionStep:
    """What the paged attention needs during one runtime forward pass."""

    cache: PagedKVCache
    meta: AttentionMetadata
    layer_of: dict[int, int]  # id(attention module) -> layer index, of the runtime's model


_STEP: ContextVar[AttentionStep | None] = ContextVar("alora_attention_step", default=None)


@contextlib.contextmanager
def attention_step(state: AttentionStep) -> Iterator[AttentionStep]:
    """Inside: attention modules of the runtime's model run paged over `state`."""
    token = _STEP.set(state)
    try:
        yield state
    finally:
        _STEP.reset(token)


# --------------------------------------------------------------------------------------------
# transformers integration.
# --------------------------------------------------------------------------------------------

# The original implementation is kept on the config itself, so that a deep copy of an attached
# model (PEFT does this, and so may users) still delegates correctly outside runtime steps.
_ORIGINAL_ATTR = "_alora_original_attn_implementation"


def _original_impl(config: Any) -> str:
    impl = getattr(config, _ORIGINAL_ATTR, None)
    if impl is None:
        raise RuntimeError("model config is not attached to an aLoRA runtime")
    return impl


def _model_eager_fn(module: nn.Module) -> Callable[..., Any]:
    """The modeling file's own eager attention (what transformers falls back to)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        fn = eager_attention_forward
    return fn


def alora_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function transformers calls as `attention_interface(module, q, k, v, mask, ...)`;
    query [B, H, T, d], key/value [B, KVH, T, d]; returns ([B, T, H, d], weights)."""
    ctx = _STEP.get()
    layer = ctx.layer_of.get(id(module)) if ctx is not None else None
    if ctx is None or layer is None:
        from transformers import AttentionInterface

        impl = _original_impl(module.config)
        fn = AttentionInterface().get_interface(impl, _model_eager_fn(module))
        return fn(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if query.shape[0] != 1:
        raise RuntimeError("a runtime step runs the model on one flattened token axis")
    out = paged_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        ctx.cache,
        layer,
        ctx.meta,
        scaling=scaling,
        sliding_window=kwargs.get("sliding_window"),
    )
    return out[None], None


def alora_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Mask interface: no mask inside a step, the original implementation's mask outside."""
    if _STEP.get() is not None:
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = kwargs.get("config")
    return ALL_MASK_ATTENTION_FUNCTIONS[_original_impl(config)](*args, **kwargs)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, alora_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, alora_mask)
    _registered = True


def install(config: Any) -> str | None:
    """Point `config` at the paged attention; returns the implementation it had (restore it
    with `uninstall`)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    _register()
    original = config._attn_implementation
    if original == ATTN_IMPLEMENTATION:
        raise RuntimeError("model is already attached to an aLoRA runtime")
    effective = original or "eager"
    if effective not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(
            f"attention implementation {effective!r} is not supported; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    setattr(config, _ORIGINAL_ATTR, effective)
    # The internal attribute, not the property: the setter also rewrites sub-configs, and
    # detach must restore exactly what was there.
    config._attn_implementation_internal = ATTN_IMPLEMENTATION
    return original


def uninstall(config: Any, original: str | None) -> None:
    config._attn_implementation_internal = original
    if hasattr(config, _ORIGINAL_ATTR):
        delattr(config, _ORIGINAL_ATTR)
