"""The step executor: turns one `StepWork` into logits. It is the only code that touches
tensors for a step: it writes adapter rows and prefix copies (the pre-work), builds the
attention and LoRA per-step state, and runs the model once over the flattened batch.

It publishes nothing: if it raises, the caller rolls the step back in the core
(`cancel_step`), which makes whatever it half-wrote unreachable (rows of adapters it paged in
are not resident, destination blocks of copies are not cached)."""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from alora.attention import AttentionStep, attention_step, build_attention_metadata
from alora.backend import LoraBackend
from alora.cpu_linear import PackedLinears
from alora.fetcher import MAX_EVENTS, LoadEvent
from alora.kv_cache import PagedKVCache
from alora.lora import (
    AdapterEntry,
    AdapterPools,
    LoraBatchCache,
    LoraHooks,
    LoraStep,
    lora_step,
)
from alora.model import ModelGeometry
from alora.plan import PreWork, StepWork


class StepExecutor:
    def __init__(
        self,
        *,
        owner: object,
        model: nn.Module,
        geometry: ModelGeometry,
        cache: PagedKVCache,
        pools: AdapterPools,
        backend: LoraBackend,
        hooks: LoraHooks,
        layer_of: dict[int, int],
        block_size: int,
        linears: PackedLinears | None = None,
    ) -> None:
        self.owner = owner
        self.model = model
        self.geometry = geometry
        self.cache = cache
        self.pools = pools
        self.backend = backend
        self.hooks = hooks
        self.layer_of = layer_of
        self.block_size = block_size
        self.linears = linears
        self.module_names = [m.name for m in geometry.modules]
        self.lora_batches = LoraBatchCache(self.module_names, geometry.device)
        # Host -> device page-in latencies (wall time of the writes; on CUDA the copies are
        # asynchronous, so this is the time to enqueue them).
        self.load_events: deque[LoadEvent] = deque(maxlen=MAX_EVENTS)

    @torch.inference_mode()
    def run(self, work: StepWork, entries: dict[int, AdapterEntry]) -> torch.Tensor:
        """float32 logits [N, V] at the plan's `sample_indices`. `entries`: the adapters of
        the plan's segments and page-ins, snapshotted when the plan was made."""
        self.pre_work(work.pre, entries)
        return self.forward(work, entries)

    def pre_work(self, pre: PreWork, entries: dict[int, AdapterEntry]) -> None:
        for load in pre.adapter_loads:
            entry = entries[load.adapter_id]
            t0 = time.perf_counter()
            self.pools.load(entry, load.row_start, load.rows, load.bt_rows, load.weights)
            t1 = time.perf_counter()
            self.load_events.append(LoadEvent(entry.info.name, "device", t1 - t0, t1))
        if len(pre.copy_src):
            self.cache.copy_prefixes(
                torch.from_numpy(np.asarray(pre.copy_src)),
                torch.from_numpy(np.asarray(pre.copy_dst)),
                torch.from_numpy(np.asarray(pre.copy_len)),
            )

    def forward(self, work: StepWork, entries: dict[int, AdapterEntry]) -> torch.Tensor:
        dev = self.geometry.device
        attn = AttentionStep(
            cache=self.cache,
            meta=build_attention_metadata(work.attention, block_size=self.block_size, device=dev),
            layer_of=self.layer_of,
        )
        lora = LoraStep(
            owner=self.owner,
            batches=self.lora_batches.get(work.lora, entries),
            pools=self.pools,
            backend=self.backend,
        )
        # Hooks only on the modules this step's adapters target (none on a base step).
        self.hooks.activate(name for name, b in lora.batches.items() if b is not None)
        input_ids = torch.from_numpy(np.asarray(work.input_ids, dtype=np.int64)).to(dev)
        positions = torch.from_numpy(np.asarray(work.attention.positions, dtype=np.int64)).to(dev)
        keep = torch.from_numpy(np.asarray(work.sample_indices, dtype=np.int64)).to(dev)
        packed = self.linears.active() if self.linears is not None else nullcontext()
        with attention_step(attn), lora_step(lora), packed:
            out = self.model(
                input_ids=input_ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=keep,
            )
        return out.logits[0].float()
