"""AdapterRuntime: serve many LoRA and aLoRA adapters on one Hugging Face causal LM.

The facade: it attaches to the model, loads adapters, validates and submits requests, and
hands back results. The Rust engine (`alora._core.Engine`) decides everything about memory
and batching; `EngineLoop` runs steps as transactions; `StepExecutor` is the only code that
touches tensors for a step.

Threading: every public method may be called from any thread. `generate`, `stream` and
`stream_async` submit their requests and read their own outputs while one engine loop
thread steps the model; `add_request` + `step` is the manual loop for callers that step
themselves (one thread, and not while generate/stream are running).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alora import _core, cpu_linear, sizing
from alora.attention import install, uninstall
from alora.backend import LoraBackend, TorchBackend
from alora.cpu_backend import CpuBackend
from alora.cpu_linear import PackedLinears
from alora.engine_loop import Channel, EngineLoop, Submission
from alora.executor import StepExecutor
from alora.fetcher import LoadEvent
from alora.kv_cache import PagedKVCache
from alora.lora import AdapterEntry, AdapterPools, LoraHooks
from alora.model import ModelGeometry, attention_module, decoder_layers, introspect
from alora.outputs import GenerationResult, StepOutput, StreamDelta
from alora.prompts import (
    Prompt,
    as_adapter_list,
    as_prompt_list,
    config_json,
    prompt_ids,
    state_dict_arrays,
)
from alora.prompts import (
    invocation_tokens as config_invocation_tokens,
)
from alora.sampling import LogitsProcessor, SamplingParams

__all__ = ["AdapterRuntime", "GenerationResult", "StepOutput", "StreamDelta"]

# How often a waiting caller checks that the engine loop is alive (it restarts it if not).
_POLL_S = 0.5


class AdapterRuntime:
    """Attach to `model` (a transformers causal LM on its own device and dtype) and serve
    base, LoRA and aLoRA requests on it, with the base model's KV cache reused exactly.

    The model keeps working for other callers while attached: outside a runtime step the
    attention and the target linears behave exactly as before. `detach()` restores it.

    `prepack_weights` (float32 models on the CPU): inside steps the base model's linears run
    oneDNN's GEMM on weights reordered once at attach, faster than `F.linear` at every batch
    shape that matters (see `alora.cpu_linear`), at the cost of a second copy of those
    weights in host memory (`prepacked_bytes`). None (the default) packs where torch has
    oneDNN and the copy takes at most half the host memory free at attach. The copy is a
    snapshot: weights changed after attach need a new runtime, as the KV cache does anyway.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
        *,
        block_size: int = 16,
        device_memory: int | None = None,
        kv_cache_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        adapter_rows: int | None = None,
        adapter_memory: int | None = None,
        host_adapter_memory: int = sizing.DEFAULT_HOST_ADAPTER_BYTES,
        max_batch_tokens: int = 2048,
        max_num_seqs: int = 64,
        lora_backend: LoraBackend | None = None,
        enable_prefix_cache: bool = True,
        max_model_len: int | None = None,
        prepack_weights: bool | None = None,
    ) -> None:
        for name, value in (
            ("block_size", block_size),
            ("max_batch_tokens", max_batch_tokens),
            ("max_num_seqs", max_num_seqs),
        ):
            sizing.positive_int(name, value)

        self.model = model
        self.tokenizer = tokenizer
        self.geometry: ModelGeometry = introspect(model)
        geo = self.geometry
        self.device = geo.device
        self.dtype = geo.dtype
        self.max_model_len = int(max_model_len or geo.max_model_len)
        if self.max_model_len > geo.max_model_len:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {geo.max_model_len}"
            )
        self.block_size = block_size
        units = sizing.device_units(
            geo,
            block_size,
            device_memory=device_memory,
            kv_cache_blocks=kv_cache_blocks,
            kv_cache_memory=kv_cache_memory,
            adapter_rows=adapter_rows,
            adapter_memory=adapter_memory,
            max_num_seqs=max_num_seqs,
            max_model_len=self.max_model_len,
        )
        self._engine = _core.Engine(
            num_layers=geo.num_layers,
            modules=[m.as_engine_tuple() for m in geo.modules],
            block_size=block_size,
            num_blocks=units.num_units,
            kv_dim=geo.num_kv_heads * geo.head_dim,
            max_batch_tokens=max_batch_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=self.max_model_len,
            enable_prefix_cache=enable_prefix_cache,
            vocab_size=geo.vocab_size,
            kv_block_cap=units.kv_block_cap,
            adapter_block_cap=units.adapter_block_cap,
            host_cache_bytes=sizing.host_cache_bytes(host_adapter_memory),
        )
        # One tensor of memory units: KV blocks and adapter rows alike (architecture 3a).
        self._cache = PagedKVCache(
            num_layers=geo.num_layers,
            num_blocks=units.num_units,
            block_size=block_size,
            num_kv_heads=geo.num_kv_heads,
            head_dim=geo.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self._pools = AdapterPools(geo, self._cache, self._engine.row_granularity)
        self._entries: dict[int, AdapterEntry] = {}
        self._module_names = [m.name for m in geo.modules]
        self._default_stop = _eos_ids(model, tokenizer)

        # Attach last, once everything that can fail has succeeded.
        layers = decoder_layers(model)
        layer_of = {id(attention_module(layer)): i for i, layer in enumerate(layers)}
        if prepack_weights and not cpu_linear.available(model):
            raise ValueError(
                "prepack_weights=True needs float32 weights on the CPU and a torch built "
                "with oneDNN (torch.backends.mkldnn)"
            )
        self._original_attn = install(model.config)
        self._linears: PackedLinears | None = None
        try:
            self._hooks = LoraHooks(self, layers, geo)
            if prepack_weights or (
                prepack_weights is None
                and cpu_linear.available(model)
                and cpu_linear.fits_by_default(model)
            ):
                self._linears = PackedLinears(self, model)
        except BaseException:
            if hasattr(self, "_hooks"):
                self._hooks.remove()
            uninstall(model.config, self._original_attn)
            raise
        self._executor = StepExecutor(
            owner=self,
            model=model,
            geometry=geo,
            cache=self._cache,
            pools=self._pools,
            backend=lora_backend or _default_backend(self.device),
            hooks=self._hooks,
            layer_of=layer_of,
            block_size=block_size,
            linears=self._linears,
        )
        decode = None
        if tokenizer is not None:

            def decode(ids: list[int]) -> str:
                return str(tokenizer.decode(ids, skip_special_tokens=True))

        self._loop = EngineLoop(self._engine, self._executor, self._entries, decode)
        self._attached = True

    # ---------------------------------------------------------------------------- adapters

    def load_adapter(
        self,
        name: str,
        path: str | Path | None = None,
        *,
        state_dict: Mapping[str, Any] | None = None,
        config: Any = None,
        invocation_tokens: Sequence[int] | None = None,
    ) -> _core.AdapterInfo:
        """Load a PEFT adapter: a directory (`adapter_config.json` +
        `adapter_model.safetensors`), or a state dict (as from `get_peft_model_state_dict`)
        with its config (a peft LoraConfig, a dict or a JSON string).

        An older aLoRA config with only `invocation_string` is tokenized with the runtime's
        tokenizer; `invocation_tokens` overrides both.
        """
        self._check_attached()
        if not isinstance(name, str):
            raise _core.ConfigError(f"an adapter name must be a string, got {name!r}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise _core.ConfigError(f"path must be a directory path, got {path!r}")
        if (path is None) == (state_dict is None):
            raise _core.ConfigError("give either a path or a state_dict (with its config)")
        if path is not None:
            if config is not None:
                raise _core.ConfigError("config goes with state_dict; a directory has its own")
            path = str(Path(path).expanduser())
            inv = invocation_tokens
            if inv is None:
                inv = config_invocation_tokens(self.tokenizer, path=path)
            with self._loop.lock:
                info = self._engine.load_adapter(name, path, inv)
                self._register(info)
            return info
        if config is None:
            raise _core.ConfigError("a state_dict needs its config (LoraConfig, dict or JSON)")
        cfg = config_json(config)
        inv = invocation_tokens
        if inv is None:
            inv = config_invocation_tokens(self.tokenizer, config_json_text=cfg)
        assert state_dict is not None
        tensors = state_dict_arrays(state_dict)
        with self._loop.lock:
            info = self._engine.load_adapter_from_tensors(name, cfg, tensors, inv)
            self._register(info)
        return info

    def _register(self, info: _core.AdapterInfo) -> None:
        self._entries[info.id] = AdapterEntry.from_info(info, self._module_names)

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter; refused (AdapterBusyError) while requests use it."""
        self._check_attached()
        if not isinstance(name, str):
            raise _core.UnknownAdapterError(f"unknown adapter {name!r}")
        with self._loop.lock:
            info = self._engine.adapter(name)
            self._engine.unload_adapter(name)
            self._entries.pop(info.id, None)

    @property
    def adapters(self) -> dict[str, _core.AdapterInfo]:
        """Loaded adapters by name."""
        with self._loop.lock:
            return {e.info.name: e.info for e in self._entries.values()}

    # ---------------------------------------------------------------------------- requests

    def _submissions(
        self,
        prompts: Sequence[Prompt],
        adapters: Sequence[str | None],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        stop_token_ids: Sequence[int] | None,
        return_logits: bool,
        logprobs: int | None,
        logits_processors: Sequence[LogitsProcessor] | None,
        add_special_tokens: bool | None,
    ) -> list[Submission]:
        """Everything the Python side validates, for every prompt, before anything is queued
        (the core validates the rest, all or nothing, in `EngineLoop.submit`)."""
        self._check_attached()
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            logprobs=logprobs,
            logits_processors=tuple(logits_processors or ()),
        )
        if not isinstance(return_logits, bool):
            raise _core.InvalidRequestError(f"return_logits must be a bool, got {return_logits!r}")
        stops = self._default_stop if stop_token_ids is None else stop_token_ids
        return [
            Submission(
                ids=prompt_ids(p, self.tokenizer, add_special_tokens),
                adapter=a,
                max_new_tokens=max_new_tokens,
                params=params,
                stop_token_ids=stops,
                return_logits=return_logits,
            )
            for p, a in zip(prompts, adapters, strict=True)
        ]

    def add_request(
        self,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        return_logits: bool = False,
        logprobs: int | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        add_special_tokens: bool | None = None,
    ) -> int:
        """Queue one request for the manual loop (`step()`); returns its id. Nothing is
        queued when an argument is invalid (a typed `AloraError` names it).

        `stop_token_ids=None` stops on the model's EOS token(s); pass `()` to never stop early.
        """
        (sub,) = self._submissions(
            [prompt],
            [adapter],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=stop_token_ids,
            return_logits=return_logits,
            logprobs=logprobs,
            logits_processors=logits_processors,
            add_special_tokens=add_special_tokens,
        )
        return self._loop.submit([sub], None)[0]

    def abort(self, request_id: int) -> GenerationResult:
        """Abort an unfinished request (from any thread); its KV blocks are released at once
        and its stream, if any, ends with finish_reason "abort"."""
        return self._loop.abort(request_id)

    def has_unfinished(self) -> bool:
        with self._loop.lock:
            return bool(self._engine.has_unfinished())

    def step(self) -> list[StepOutput]:
        """Run one step of the manual loop; [] when nothing is unfinished. If it raises, the
        step was rolled back and its requests are queued again, intact."""
        self._check_attached()
        return self._loop.step(manual=True)

    # ---------------------------------------------------------------------------- generate

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        adapter: str | Sequence[str | None] | None = None,
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        return_logits: bool = False,
        logprobs: int | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        add_special_tokens: bool | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt (token ids, a string, or chat messages), with the same
        adapter or one per prompt (None = base model). Results in the order of the prompts.

        A request that fails alone (e.g. its logits processor raised) has finish_reason
        "error" and its cause in `error`; the others are unaffected."""
        results: dict[int, GenerationResult] = {}
        for delta in self.stream(
            prompts,
            adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=stop_token_ids,
            return_logits=return_logits,
            logprobs=logprobs,
            logits_processors=logits_processors,
            add_special_tokens=add_special_tokens,
        ):
            if delta.finished and delta.result is not None:
                results[delta.index] = delta.result
        return [results[i] for i in range(len(results))]

    def _start(
        self, prompts: Prompt | Sequence[Prompt], adapter: Any, channel: Channel, kw: Any
    ) -> dict[int, int]:
        prompt_list = as_prompt_list(prompts)
        if not prompt_list:
            return {}
        adapters = as_adapter_list(adapter, len(prompt_list))
        subs = self._submissions(prompt_list, adapters, **kw)
        rids = self._loop.submit(subs, channel)
        self._loop.ensure_running()
        return {rid: i for i, rid in enumerate(rids)}

    def _delta(self, index_of: dict[int, int], out: StepOutput) -> StreamDelta:
        text = None
        if self.tokenizer is not None and out.new_token is not None:
            text = self.tokenizer.decode([out.new_token])
        return StreamDelta(
            index=index_of[out.request_id],
            request_id=out.request_id,
            token_id=out.new_token,
            finished=out.finished,
            finish_reason=out.finish_reason,
            text=text,
            result=out.result,
            logprob=out.logprob,
            top_logprobs=out.top_logprobs,
        )

    def _abort_pending(self, pending: set[int]) -> None:
        for rid in pending:
            with contextlib.suppress(_core.UnknownRequestError):
                self._loop.abort(rid)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        adapter: str | Sequence[str | None] | None = None,
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        return_logits: bool = False,
        logprobs: int | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        add_special_tokens: bool | None = None,
    ) -> Iterator[StreamDelta]:
        """Like `generate`, but yields each new token as it is sampled. Every argument is
        validated before the first delta; closing the iterator early aborts the prompts'
        unfinished requests."""
        kw = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=stop_token_ids,
            return_logits=return_logits,
            logprobs=logprobs,
            logits_processors=logits_processors,
            add_special_tokens=add_special_tokens,
        )
        channel = Channel()
        index_of = self._start(prompts, adapter, channel, kw)
        return self._stream(index_of, channel)

    def _stream(self, index_of: dict[int, int], channel: Channel) -> Iterator[StreamDelta]:
        pending = set(index_of)
        try:
            while pending:
                out = channel.get(timeout=_POLL_S)
                if out is None:
                    self._loop.ensure_running()
                    continue
                if out.request_id not in pending:
                    continue
                if out.finished:
                    pending.discard(out.request_id)
                yield self._delta(index_of, out)
        finally:
            self._abort_pending(pending)

    async def stream_async(
        self,
        prompts: Prompt | Sequence[Prompt],
        adapter: str | Sequence[str | None] | None = None,
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        return_logits: bool = False,
        logprobs: int | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        add_special_tokens: bool | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """`stream` for asyncio: `async for delta in rt.stream_async(...)`. Validation errors
        raise at the first `__anext__`, before anything is queued. Leaving the loop early or
        cancelling the consuming task aborts the unfinished requests at once."""
        kw = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=stop_token_ids,
            return_logits=return_logits,
            logprobs=logprobs,
            logits_processors=logits_processors,
            add_special_tokens=add_special_tokens,
        )
        channel = Channel(asyncio.get_running_loop())
        index_of = self._start(prompts, adapter, channel, kw)
        pending = set(index_of)
        try:
            while pending:
                out = await channel.aget()
                if out.request_id not in pending:
                    continue
                if out.finished:
                    pending.discard(out.request_id)
                yield self._delta(index_of, out)
        finally:
            self._abort_pending(pending)

    # ---------------------------------------------------------------------------- misc

    def stats(self) -> dict[str, int]:
        """The engine's counters: memory units (total_blocks; used_blocks referenced by KV,
        cached_blocks, adapter_blocks, free_blocks), requests, adapters (registered, resident
        on the device, in host memory) and load/eviction counts."""
        with self._loop.lock:
            return dict(self._engine.stats())

    def cached_prefix_hashes(self) -> list[int]:
        """The prefix summary of this runtime's KV cache: 64-bit chained hashes of its cached
        base-model blocks. A router compares it with `alora._core.base_prefix_hashes(tokens,
        rt.block_size)` of a request to count the leading blocks cached here."""
        with self._loop.lock:
            return list(self._engine.cached_base_hashes())

    def reset_prefix_cache(self) -> None:
        with self._loop.lock:
            self._engine.reset_prefix_cache()

    @property
    def backend(self) -> LoraBackend:
        return self._executor.backend

    @backend.setter
    def backend(self, value: LoraBackend) -> None:
        self._executor.backend = value

    @property
    def engine(self) -> _core.Engine:
        """The Rust engine (for inspection; use the runtime's methods to change it)."""
        return self._engine

    @property
    def engine_loop(self) -> EngineLoop:
        return self._loop

    @property
    def kv_cache(self) -> PagedKVCache:
        return self._cache

    @property
    def prepacked_bytes(self) -> int:
        """Host bytes of the oneDNN-packed copies of the base linears' weights (CPU float32;
        0 when not packed, see `prepack_weights`)."""
        return self._linears.nbytes if self._linears is not None else 0

    @property
    def device_memory_bytes(self) -> int:
        """Device bytes of the memory units (KV blocks and adapter rows share them)."""
        return self._cache.nbytes()

    def load_events(self) -> list[LoadEvent]:
        """Recent adapter loads, oldest first: "disk" (file -> host memory, on the fetch
        threads) and "device" (host -> device rows, in a step's pre-work), with seconds."""
        with self._loop.lock:
            events = [*self._loop.fetcher.events, *self._executor.load_events]
        return sorted(events, key=lambda e: e.at)

    @property
    def attached(self) -> bool:
        return self._attached

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this runtime was detached from its model")

    def detach(self) -> None:
        """Abort every request, stop the engine loop and restore the model exactly as it
        was. Idempotent."""
        if not self._attached:
            return
        self._loop.close()
        self._hooks.remove()
        if self._linears is not None:
            self._linears.remove()
            self._linears = None
            self._executor.linears = None
        uninstall(self.model.config, self._original_attn)
        self._attached = False
        # Release device memory now rather than whenever the runtime is collected.
        del self._cache, self._pools
        self._executor.cache = None  # type: ignore[assignment]
        self._executor.pools = None  # type: ignore[assignment]

    close = detach

    def __enter__(self) -> AdapterRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


# -------------------------------------------------------------------------------- helpers


def _default_backend(device: Any) -> LoraBackend:
    if torch.device(device).type == "cpu":
        return CpuBackend()  # the Rust kernel for decode-shaped float32 batches, else torch
    try:
        from alora.kernels import default_backend
    except ImportError:
        return TorchBackend()
    backend = default_backend(device)
    return backend if backend is not None else TorchBackend()


def _eos_ids(model: nn.Module, tokenizer: Any | None) -> list[int]:
    eos: Any = None
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        eos = gen_cfg.eos_token_id
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
