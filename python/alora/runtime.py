"""AdapterRuntime: serve many LoRA and aLoRA adapters on one Hugging Face causal LM.

The Rust engine (`alora._core.Engine`) decides everything about memory and batching and
hands back a StepPlan per forward pass; this module owns the tensors: it executes adapter
page-ins and prefix copies, runs the model with the paged attention and the LoRA hooks,
samples, and commits the sampled tokens back to the engine.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alora import _core
from alora.attention import (
    StepContext,
    build_attention_metadata,
    install,
    step_context,
    uninstall,
)
from alora.backend import LoraBackend, TorchBackend
from alora.kv_cache import PagedKVCache
from alora.lora import AdapterEntry, AdapterPools, LoraHooks, build_lora_batches, segment_scale
from alora.model import ModelGeometry, attention_module, decoder_layers, introspect
from alora.sampling import SamplingParams, sample

ChatMessages = Sequence[Mapping[str, Any]]
Prompt = str | Sequence[int] | ChatMessages

_CPU_KV_BYTES = 1 << 30  # default KV budget without a GPU
_CPU_ADAPTER_BYTES = 1 << 30
_MIN_BLOCKS = 4


@dataclass
class GenerationResult:
    """A finished request."""

    request_id: int
    token_ids: list[int]  # generated tokens (a stop token that ended the request included)
    finish_reason: str | None  # "stop", "length" or "abort"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    computed_tokens: int  # tokens run through the model (recomputation included)
    lora_tokens: int  # computed tokens that got LoRA compute
    preemptions: int
    time_to_first_token: float | None  # seconds from add_request to the first token
    latency: float  # seconds from add_request to the end
    adapter: str | None = None
    text: str | None = None  # with a tokenizer
    # float32 [V] per generated token, with return_logits
    logits: list[torch.Tensor] | None = field(default=None, repr=False)
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StepOutput:
    """One request's progress in one step (what `step()` returns)."""

    request_id: int
    new_token: int | None
    finished: bool
    finish_reason: str | None
    result: GenerationResult | None = None  # set when finished


@dataclass(frozen=True)
class StreamDelta:
    """One new token of one of the prompts passed to `stream()`."""

    index: int  # position of the prompt in the `prompts` argument
    request_id: int
    token_id: int | None  # None only for a request that finished without a new token
    finished: bool
    finish_reason: str | None
    text: str | None = None  # decoded text of the token, with a tokenizer
    result: GenerationResult | None = None  # set when finished


@dataclass
class _RequestState:
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    generator: torch.Generator | None
    return_logits: bool
    t_start: float
    t_first: float | None = None
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


class AdapterRuntime:
    """Attach to `model` (a transformers causal LM on its own device and dtype) and serve
    base, LoRA and aLoRA requests on it, with the base model's KV cache reused exactly.

    The model keeps working for other callers while attached: outside a runtime step the
    attention and the target linears behave exactly as before. `detach()` restores it.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
        *,
        block_size: int = 16,
        kv_cache_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        adapter_rows: int | None = None,
        adapter_memory: int | None = None,
        max_batch_tokens: int = 2048,
        max_num_seqs: int = 64,
        lora_backend: LoraBackend | None = None,
        enable_prefix_cache: bool = True,
        max_model_len: int | None = None,
        page_rows: int = 8,
    ) -> None:
        if kv_cache_blocks is not None and kv_cache_memory is not None:
            raise ValueError("give kv_cache_blocks or kv_cache_memory, not both")
        if adapter_rows is not None and adapter_memory is not None:
            raise ValueError("give adapter_rows or adapter_memory, not both")
        for name, value in (
            ("block_size", block_size),
            ("max_batch_tokens", max_batch_tokens),
            ("max_num_seqs", max_num_seqs),
            ("page_rows", page_rows),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

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

        num_blocks = self._size_kv(kv_cache_blocks, kv_cache_memory, max_num_seqs)
        rows = self._size_adapter_rows(adapter_rows, adapter_memory, page_rows)

        self._engine = _core.Engine(
            num_layers=geo.num_layers,
            modules=[m.as_engine_tuple() for m in geo.modules],
            block_size=block_size,
            num_blocks=num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_num_seqs=max_num_seqs,
            adapter_rows=rows,
            max_model_len=self.max_model_len,
            page_rows=page_rows,
            enable_prefix_cache=enable_prefix_cache,
        )
        self.backend: LoraBackend = lora_backend or _default_backend(self.device)
        self._cache = PagedKVCache(
            num_layers=geo.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=geo.num_kv_heads,
            head_dim=geo.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self._pools = AdapterPools(geo, rows, self.dtype, self.device)
        self._entries: dict[int, AdapterEntry] = {}
        self._requests: dict[int, _RequestState] = {}
        self._default_stop = _eos_ids(model, tokenizer)

        # Attach last, once everything that can fail has succeeded.
        layers = decoder_layers(model)
        self._layer_of = {id(attention_module(layer)): i for i, layer in enumerate(layers)}
        self._original_attn = install(model.config)
        try:
            self._hooks = LoraHooks(self, layers, geo)
        except BaseException:
            uninstall(model.config, self._original_attn)
            raise
        self._attached = True

    # ---------------------------------------------------------------------------- sizing

    def _size_kv(self, blocks: int | None, memory: int | None, max_num_seqs: int) -> int:
        per_block = self.geometry.kv_bytes_per_block(self.block_size)
        if blocks is not None:
            if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
                raise ValueError(f"kv_cache_blocks must be a positive integer, got {blocks!r}")
            return blocks
        if memory is not None:
            n = int(memory) // per_block
            if n < 1:
                raise ValueError(
                    f"kv_cache_memory of {memory} bytes holds no KV block ({per_block} bytes each)"
                )
            return n
        wanted = max_num_seqs * math.ceil(self.max_model_len / self.block_size)
        budget = (
            _free_cuda_memory(self.device) // 4 if self.device.type == "cuda" else _CPU_KV_BYTES
        )
        return max(min(wanted, budget // per_block), _MIN_BLOCKS)

    def _size_adapter_rows(self, rows: int | None, memory: int | None, page_rows: int) -> int:
        per_row = self.geometry.adapter_bytes_per_row()
        if rows is not None:
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise ValueError(f"adapter_rows must be a positive integer, got {rows!r}")
            return rows
        if memory is not None:
            n = int(memory) // per_row
            if n < 1:
                raise ValueError(
                    f"adapter_memory of {memory} bytes holds no adapter row ({per_row} bytes each)"
                )
            return n
        budget = (
            _free_cuda_memory(self.device) // 10
            if self.device.type == "cuda"
            else _CPU_ADAPTER_BYTES
        )
        n = min(1024, budget // per_row)
        return max(n // page_rows * page_rows, page_rows)

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
        if (path is None) == (state_dict is None):
            raise ValueError("give either a path or a state_dict (with its config)")
        if path is not None:
            if config is not None:
                raise ValueError("config goes with state_dict; a directory has its own")
            path = Path(path).expanduser()
            cfg_path = path / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
            inv = self._invocation_tokens(cfg, invocation_tokens)
            info = self._engine.load_adapter(name, str(path), inv)
        else:
            if config is None:
                raise ValueError("a state_dict needs its config (LoraConfig, dict or JSON)")
            cfg_json = _config_json(config)
            inv = self._invocation_tokens(json.loads(cfg_json), invocation_tokens)
            assert state_dict is not None
            tensors = {k: _to_f32_numpy(v) for k, v in state_dict.items()}
            info = self._engine.load_adapter_from_tensors(name, cfg_json, tensors, inv)
        self._entries[info.id] = AdapterEntry(
            info=info,
            seg_scale=segment_scale(info, self.geometry),
            targets=frozenset(info.target_modules),
        )
        return info

    def _invocation_tokens(
        self, cfg: Mapping[str, Any], explicit: Sequence[int] | None
    ) -> list[int] | None:
        if explicit is not None:
            return [int(t) for t in explicit]
        if cfg.get("alora_invocation_tokens") or not cfg.get("invocation_string"):
            return None
        if self.tokenizer is None:
            raise _core.ConfigError(
                "the adapter's config gives only `invocation_string`: pass a tokenizer to "
                "AdapterRuntime or invocation_tokens= to load_adapter"
            )
        ids = self.tokenizer(cfg["invocation_string"], add_special_tokens=False)["input_ids"]
        return [int(t) for t in ids]

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter; refused (AdapterBusyError) while requests use it."""
        self._check_attached()
        info = self._engine.adapter(name)
        self._engine.unload_adapter(name)
        self._entries.pop(info.id, None)

    @property
    def adapters(self) -> dict[str, _core.AdapterInfo]:
        """Loaded adapters by name."""
        return {e.info.name: e.info for e in self._entries.values()}

    # ---------------------------------------------------------------------------- requests

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
    ) -> int:
        """Queue one request; returns its id. Nothing is queued when an argument is invalid.

        `stop_token_ids=None` stops on the model's EOS token(s); pass `()` to never stop early.
        """
        self._check_attached()
        params = _sampling_params(max_new_tokens, temperature, top_p, top_k, seed)
        ids = self._prompt_ids(prompt)
        return self._add(ids, adapter, max_new_tokens, params, stop_token_ids, return_logits)

    def _add(
        self,
        ids: list[int],
        adapter: str | None,
        max_new_tokens: int,
        params: SamplingParams,
        stop_token_ids: Sequence[int] | None,
        return_logits: bool,
    ) -> int:
        stops = self._default_stop if stop_token_ids is None else [int(t) for t in stop_token_ids]
        rid = self._engine.add_request(
            ids, adapter=adapter, max_new_tokens=max_new_tokens, stop_token_ids=stops
        )
        self._requests[rid] = _RequestState(
            prompt=ids,
            adapter=adapter,
            params=params,
            generator=params.make_generator(self.device),
            return_logits=return_logits,
            t_start=time.perf_counter(),
        )
        return rid

    def abort(self, request_id: int) -> GenerationResult:
        """Abort an unfinished request; its KV blocks are released at once."""
        out = self._engine.abort(request_id)
        return self._finish(out)

    def has_unfinished(self) -> bool:
        return self._engine.has_unfinished()

    def step(self) -> list[StepOutput]:
        """Run one forward pass of the engine's next plan; [] when nothing is unfinished."""
        self._check_attached()
        plan = self._engine.schedule()
        if plan is None:
            return []
        try:
            logits = self._forward(plan)
            seq_ids = plan.request_ids[plan.sample_seqs]
            states = [self._requests[int(r)] for r in seq_ids]
            sampled = sample(logits, [s.params for s in states], [s.generator for s in states])
        except BaseException:
            self._fail_step(plan)
            raise
        outputs = self._engine.commit(plan.step_id, sampled)
        now = time.perf_counter()
        row_of = {int(r): i for i, r in enumerate(seq_ids)}
        results: list[StepOutput] = []
        for out in outputs:
            rid = out.request_id
            state = self._requests.get(rid)
            if state is None:
                continue
            if out.new_token is not None:
                state.tokens.append(out.new_token)
                if state.t_first is None:
                    state.t_first = now
                if state.return_logits:
                    state.logits.append(logits[row_of[rid]].detach().to("cpu", torch.float32))
            result = self._finish(out) if out.finished else None
            results.append(StepOutput(rid, out.new_token, out.finished, out.finish_reason, result))
        return results

    def _fail_step(self, plan: _core.StepPlan) -> None:
        """A forward pass failed: drop the plan's requests and close the step, so that the
        engine releases their blocks and pins and stays usable."""
        # Cleanup errors are suppressed so that the forward pass's exception propagates.
        for rid in {int(r) for r in plan.request_ids}:
            if rid in self._requests:
                with contextlib.suppress(_core.AloraError):
                    self._engine.abort(rid)
                self._requests.pop(rid, None)
        with contextlib.suppress(_core.AloraError):
            self._engine.commit(plan.step_id, [0] * len(plan.sample_seqs))

    def _finish(self, out: _core.RequestOutput) -> GenerationResult:
        state = self._requests.pop(out.request_id, None)
        now = time.perf_counter()
        tokens = list(out.output_tokens)
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return GenerationResult(
            request_id=out.request_id,
            token_ids=tokens,
            finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens,
            cached_tokens=out.cached_tokens,
            computed_tokens=out.computed_tokens,
            lora_tokens=out.lora_tokens,
            preemptions=out.preemptions,
            time_to_first_token=(
                state.t_first - state.t_start if state and state.t_first is not None else None
            ),
            latency=now - state.t_start if state else 0.0,
            adapter=state.adapter if state else None,
            text=text,
            logits=state.logits if state and state.return_logits else None,
            prompt_token_ids=list(state.prompt) if state else [],
        )

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
    ) -> list[GenerationResult]:
        """Generate for every prompt (token ids, a string, or chat messages), with the same
        adapter or one per prompt (None = base model). Results in the order of the prompts."""
        results: list[GenerationResult | None] = []
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
        ):
            if delta.finished:
                while len(results) <= delta.index:
                    results.append(None)
                results[delta.index] = delta.result
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

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
    ) -> Iterator[StreamDelta]:
        """Like `generate`, but yields each new token as it is sampled. Closing the iterator
        early aborts the prompts' unfinished requests."""
        self._check_attached()
        prompt_list = _as_prompt_list(prompts)
        if not prompt_list:
            return
        adapters = _as_adapter_list(adapter, len(prompt_list))
        params = _sampling_params(max_new_tokens, temperature, top_p, top_k, seed)
        # Validate and tokenize everything before queueing anything.
        id_lists = [self._prompt_ids(p) for p in prompt_list]
        for a in adapters:
            if a is not None:
                self._engine.adapter(a)
        index_of: dict[int, int] = {}
        try:
            for i, (ids, a) in enumerate(zip(id_lists, adapters, strict=True)):
                # Distinct seeds per prompt, so a batch does not sample identical streams.
                p = params if seed is None or i == 0 else _reseed(params, seed + i)
                rid = self._add(ids, a, max_new_tokens, p, stop_token_ids, return_logits)
                index_of[rid] = i
            pending = set(index_of)
            while pending:
                outputs = self.step()
                if not outputs and not self._engine.has_unfinished():
                    raise _core.StepError("engine went idle with requests unfinished")
                for out in outputs:
                    if out.request_id not in pending:
                        continue
                    if out.finished:
                        pending.discard(out.request_id)
                    text = None
                    if self.tokenizer is not None and out.new_token is not None:
                        text = self.tokenizer.decode([out.new_token])
                    yield StreamDelta(
                        index=index_of[out.request_id],
                        request_id=out.request_id,
                        token_id=out.new_token,
                        finished=out.finished,
                        finish_reason=out.finish_reason,
                        text=text,
                        result=out.result,
                    )
        finally:
            for rid in index_of:
                if rid in self._requests:
                    try:
                        self.abort(rid)
                    except _core.UnknownRequestError:
                        self._requests.pop(rid, None)

    # ---------------------------------------------------------------------------- forward

    @torch.inference_mode()
    def _forward(self, plan: _core.StepPlan) -> torch.Tensor:
        """Run the model on the plan's tokens; float32 logits [N, V] at `sample_indices`."""
        dev = self.device
        for adapter_id, rows in plan.adapter_loads:
            self._pools.load(self._entries[int(adapter_id)], rows)
        if len(plan.copy_src):
            self._cache.copy_prefixes(
                torch.from_numpy(np.asarray(plan.copy_src)),
                torch.from_numpy(np.asarray(plan.copy_dst)),
                torch.from_numpy(np.asarray(plan.copy_len)),
            )
        attn = build_attention_metadata(
            positions=plan.positions,
            query_start=plan.query_start,
            context_lens=plan.context_lens,
            block_tables=plan.block_tables,
            slot_mapping=plan.slot_mapping,
            block_size=self.block_size,
            device=dev,
        )
        lora = build_lora_batches(
            sorted_token_idx=plan.sorted_token_idx,
            segment_start=plan.segment_start,
            segment_adapter=plan.segment_adapter,
            adapter_rank=plan.adapter_rank,
            adapter_row_start=plan.adapter_row_start,
            adapter_rows=plan.adapter_rows,
            entries=self._entries,
            module_names=[m.name for m in self.geometry.modules],
            device=dev,
        )
        ctx = StepContext(
            owner=self,
            cache=self._cache,
            attn=attn,
            layer_of=self._layer_of,
            lora=lora,
            pools=self._pools,
            backend=self.backend,
        )
        input_ids = torch.from_numpy(np.asarray(plan.input_ids, dtype=np.int64)).to(dev)
        positions = torch.from_numpy(np.asarray(plan.positions, dtype=np.int64)).to(dev)
        keep = torch.from_numpy(np.asarray(plan.sample_indices, dtype=np.int64)).to(dev)
        with step_context(ctx):
            out = self.model(
                input_ids=input_ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=keep,
            )
        return out.logits[0].float()

    # ---------------------------------------------------------------------------- misc

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass token ids instead")
            ids = self.tokenizer(prompt)["input_ids"]
        elif _is_chat(prompt):
            if self.tokenizer is None:
                raise ValueError("chat prompts need a tokenizer with a chat template")
            ids = self.tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = list(prompt)  # type: ignore[arg-type]
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not ids:
            raise _core.InvalidRequestError("empty prompt: a request needs at least one token")
        # Vectorised: a per-token Python check costs milliseconds on long conversations.
        if not isinstance(ids, np.ndarray) and not _all_int_types(ids):
            raise ValueError("prompt token ids must be integers")
        try:
            arr = np.asarray(ids, dtype=np.int64)
        except OverflowError:
            raise _core.InvalidRequestError("prompt token id out of the int64 range") from None
        if arr.ndim != 1:
            raise ValueError(f"prompt token ids must be a flat sequence, got shape {arr.shape}")
        vocab = self.geometry.vocab_size
        bad = (arr < 0) | (arr >= vocab)
        if bad.any():
            t = int(arr[int(bad.argmax())])
            raise _core.InvalidRequestError(f"token id {t} is outside the vocabulary [0, {vocab})")
        return arr.tolist()

    def stats(self) -> dict[str, int]:
        """The engine's counters (free/used/total blocks, running, waiting, ...)."""
        return dict(self._engine.stats())

    def reset_prefix_cache(self) -> None:
        self._engine.reset_prefix_cache()

    @property
    def engine(self) -> _core.Engine:
        return self._engine

    @property
    def kv_cache(self) -> PagedKVCache:
        return self._cache

    @property
    def kv_cache_bytes(self) -> int:
        """Device bytes of the paged KV cache."""
        return self._cache.nbytes()

    @property
    def adapter_pool_bytes(self) -> int:
        """Device bytes of the adapter row pools (every layer and module, A and Bt)."""
        return self._pools.nbytes()

    @property
    def attached(self) -> bool:
        return self._attached

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this runtime was detached from its model")

    def detach(self) -> None:
        """Abort every request and restore the model exactly as it was. Idempotent."""
        if not self._attached:
            return
        for rid in list(self._requests):
            with contextlib.suppress(_core.UnknownRequestError):
                self._engine.abort(rid)
        self._requests.clear()
        self._hooks.remove()
        uninstall(self.model.config, self._original_attn)
        self._attached = False
        # Release device memory now rather than whenever the runtime is collected.
        del self._cache, self._pools

    def __enter__(self) -> AdapterRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


# -------------------------------------------------------------------------------- helpers


def _default_backend(device: torch.device) -> LoraBackend:
    try:
        from alora.kernels import default_backend
    except ImportError:
        return TorchBackend()
    backend = default_backend(device)
    return backend if backend is not None else TorchBackend()


def _free_cuda_memory(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


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


def _sampling_params(
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None
) -> SamplingParams:
    n = max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def _reseed(params: SamplingParams, seed: int) -> SamplingParams:
    return SamplingParams(params.temperature, params.top_p, params.top_k, seed)


def _is_chat(prompt: Any) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) for m in prompt)
    )


def _is_token_list(prompt: Any) -> bool:
    return (
        isinstance(prompt, (Sequence, np.ndarray, torch.Tensor))
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and (
            prompt.ndim == 1 and prompt.dtype.kind in "iu"
            if isinstance(prompt, np.ndarray)
            else _all_int_types(prompt)
        )
    )


def _all_int_types(values: Any) -> bool:
    """Every element an integer (bools excluded), checked per distinct type, not per element."""
    types = set(map(type, values))
    return all(issubclass(t, (int, np.integer)) and t is not bool for t in types)


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    """A single prompt (string, token ids, chat) or a list of them -> a list of prompts."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if isinstance(prompts, str) or _is_token_list(prompts) or _is_chat(prompts):
        return [prompts]
    if isinstance(prompts, Sequence):
        return list(prompts)
    raise TypeError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")


def _as_adapter_list(adapter: Any, n: int) -> list[str | None]:
    if adapter is None or isinstance(adapter, str):
        return [adapter] * n
    adapters = list(adapter)
    if len(adapters) != n:
        raise ValueError(f"{len(adapters)} adapters for {n} prompts")
    for a in adapters:
        if a is not None and not isinstance(a, str):
            raise TypeError(f"adapter names must be strings or None, got {a!r}")
    return adapters


def _config_json(config: Any) -> str:
    if isinstance(config, str):
        json.loads(config)  # a clear JSON error here rather than in the engine
        return config
    if isinstance(config, Mapping):
        data = dict(config)
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    else:
        raise TypeError(f"config must be a LoraConfig, a dict or a JSON string, not {config!r}")
    return json.dumps(data, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"cannot serialize {type(obj).__name__} in an adapter config")


def _to_f32_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).contiguous().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))
