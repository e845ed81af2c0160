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
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

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


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]
    groups: list[SeqGroup]
    num_tokens: int


def build_attention_metadata(
    plan: AttentionPlan, *, block_size: int, device: torch.device | str
) -> AttentionMetadata:
    """Index tensors for paged attention over a step's sequences."""
    positions = np.asarray(plan.positions, dtype=np.int64)
    query_start = np.asarray(plan.query_start, dtype=np.int64)
    context_lens = np.asarray(plan.context_lens, dtype=np.int64)
    block_tables = np.asarray(plan.block_tables, dtype=np.int64)
    slot_mapping = plan.slot_mapping
    q_lens = np.diff(query_start)
    if q_lens.size and (bool((q_lens > context_lens).any()) or bool((q_lens < 1).any())):
        raise ValueError("each sequence needs 1 <= query tokens <= context length")
    groups: list[SeqGroup] = []
    for sel in (np.flatnonzero(q_lens == 1), np.flatnonzero(q_lens > 1)):
        if sel.size:
            groups.append(
                _build_group(
                    sel, positions, query_start, q_lens, context_lens, block_tables, block_size
                )
            )
    dev = torch.device(device)
    for g in groups:
        for name in ("q_index", "out_index", "q_valid", "kv_slots", "q_pos", "k_pos", "k_valid"):
            setattr(g, name, getattr(g, name).to(dev, non_blocking=True))
    return AttentionMetadata(
        slot_mapping=torch.from_numpy(np.asarray(slot_mapping, dtype=np.int64)).to(dev),
        groups=groups,
        num_tokens=int(positions.shape[0]),
    )


def _build_group(
    sel: np.ndarray,
    positions: np.ndarray,
    query_start: np.ndarray,
    q_lens: np.ndarray,
    context_lens: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
) -> SeqGroup:
    qmax = int(q_lens[sel].max())
    lmax = int(context_lens[sel].max())
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
    return SeqGroup(
        q_index=torch.from_numpy(q_index),
        out_index=torch.from_numpy(q_index[q_valid]),
        q_valid=torch.from_numpy(q_valid),
        kv_slots=torch.from_numpy(kv_slots),
        q_pos=torch.from_numpy(q_pos)[:, None, :, None],
        k_pos=torch.from_numpy(ka)[None, None, None, :],
        k_valid=torch.from_numpy(k_valid)[:, None, None, :],
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
    for g in meta.groups:
        q = query[g.q_index].transpose(1, 2)  # [S, H, Q, d]
        k = k_cache[g.kv_slots].transpose(1, 2)  # [S, KVH, L, d]
        v = v_cache[g.kv_slots].transpose(1, 2)
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
